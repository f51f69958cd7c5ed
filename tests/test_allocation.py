"""Checks crepe.allocation: hand-computed OWL / DLP / AlphaPruning mappings, their exact means, band
widths and monotonic relations (hypothesis), the ESD alpha against a loop reference and a known
power law, the dense calibration statistics against a whole-model hooked forward, block_ratios on
all five tiny architectures and input validation; and tasks.plots.plot_ratios, the allocation's figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crepe.allocation import (
    ALLOCATOR_DEFAULTS,
    ALLOCATORS,
    RATIO_MEAN,
    alpha_ratios_from_metric,
    block_ratios,
    dense_wanda_stats,
    dlp_ratios,
    needs_calibration,
    owl_ratios_from_outliers,
    wanda_block_stats,
    weighted_mean,
)
from crepe.blocks import find_blocks
from crepe.errors import CrepeError
from crepe.esd import block_esd_metrics, block_param_counts, esd_alpha, esd_alpha_from_eigenvalues
from tasks.plots import plot_ratios

FAST = settings(deadline=None, max_examples=60)


def prunable_linears(block):
    """Independent reference: every nn.Linear of a (dense, non-MoE) block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

stats_lists = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=2, max_size=40)


# --- OWL ----------------------------------------------------------------------------------------


def test_owl_golden():
    # d = (0, .08, .16) -> minus mean .08 plus (1 - .5) -> (.42, .5, .58); s = 1 - d
    assert owl_ratios_from_outliers([0.0, 5.0, 10.0], 0.5, lam=0.08) == pytest.approx([0.58, 0.5, 0.42])


@FAST
@given(lod=stats_lists, target=st.floats(0.2, 0.8), lam=st.floats(0.0, 0.09))
def test_owl_mean_band_and_monotone(lod, target, lam):
    assume(max(lod) - min(lod) > 1e-6)
    r = owl_ratios_from_outliers(lod, target, lam)
    assert len(r) == len(lod)
    assert np.mean(r) == pytest.approx(target, abs=1e-9)  # simple mean
    assert max(r) - min(r) == pytest.approx(2 * lam, abs=1e-9)  # band width 2 lam
    assert all(target - 2 * lam - 1e-12 <= v <= target + 2 * lam + 1e-12 for v in r)
    for i in range(len(lod)):
        for j in range(len(lod)):
            if lod[i] > lod[j]:
                assert r[i] <= r[j]  # more outliers -> lower sparsity


def test_owl_clips_nonpositive_to_001_and_refuses_full_blocks():
    # target .05: d = (.87, .95, 1.03) -> s = (.13, .05, -.03) -> the last becomes 0.01
    assert owl_ratios_from_outliers([0.0, 5.0, 10.0], 0.05, 0.08) == pytest.approx([0.13, 0.05, 0.01])
    # target .99: s = (1.07, .99, .91): block 0 would be pruned entirely
    with pytest.raises(CrepeError, match=">= 1"):
        owl_ratios_from_outliers([0.0, 5.0, 10.0], 0.99, 0.08)


def test_equal_statistics_give_uniform_ratios():
    assert owl_ratios_from_outliers([3.0, 3.0, 3.0], 0.6) == [0.6, 0.6, 0.6]
    assert dlp_ratios([2.0], 0.6) == [0.6]
    assert alpha_ratios_from_metric([4.0, 4.0], [10, 30], 0.6) == [0.6, 0.6]


# --- DLP ----------------------------------------------------------------------------------------


def test_dlp_golden():
    # phi = 1..4, sum 10 -> I = (.9, .8, .7, .6) -> scaled (.3, .2, .1, 0), mean .15
    # -> density (.45, .35, .25, .15) at target .7 -> sparsity (.55, .65, .75, .85)
    assert dlp_ratios([1.0, 2.0, 3.0, 4.0], 0.7, alpha=0.15) == pytest.approx([0.55, 0.65, 0.75, 0.85])


@FAST
@given(phi=stats_lists, target=st.floats(0.35, 0.65), alpha=st.floats(0.0, 0.15))
def test_dlp_mean_band_and_monotone(phi, target, alpha):
    assume(max(phi) - min(phi) > 1e-6)
    r = dlp_ratios(phi, target, alpha)
    assert np.mean(r) == pytest.approx(target, abs=1e-9)
    assert max(r) - min(r) == pytest.approx(2 * alpha, abs=1e-9)
    for i in range(len(phi)):
        for j in range(len(phi)):
            if phi[i] > phi[j]:
                assert r[i] >= r[j]  # larger mean Wanda score -> higher sparsity


# --- AlphaPruning ---------------------------------------------------------------------------------


def test_alpha_golden_equal_sizes():
    # r = (.7, 1, 1.3); scaler = 3 * .5 / 3 = .5
    assert alpha_ratios_from_metric([2.0, 3.0, 4.0], [5, 5, 5], 0.5, 0.3) == pytest.approx([0.35, 0.5, 0.65])


def test_alpha_golden_unequal_sizes():
    # r = (.7, 1.3), sizes (1, 3): scaler = 4 * .5 / (.7 + 3.9) = 2 / 4.6
    r = alpha_ratios_from_metric([1.0, 2.0], [1, 3], 0.5, 0.3)
    assert r == pytest.approx([0.7 * 2 / 4.6, 1.3 * 2 / 4.6])
    assert weighted_mean(r, [1, 3]) == pytest.approx(0.5, abs=1e-12)
    assert np.mean(r) != pytest.approx(0.5)  # the simple mean is not the target


@FAST
@given(
    metrics=st.lists(st.floats(1.5, 8.0), min_size=2, max_size=30),
    seed=st.integers(0, 1000),
    target=st.floats(0.2, 0.7),
    eps=st.floats(0.0, 0.3),
)
@example(metrics=[2.0, 2.0, 2.0, 3.0], seed=0, target=0.6875, eps=0.25)  # a block would exceed 1: refused
def test_alpha_weighted_mean_band_and_monotone(metrics, seed, target, eps):
    assume(max(metrics) - min(metrics) > 1e-6)
    sizes = np.random.default_rng(seed).integers(1, 10_000, len(metrics)).tolist()
    try:
        r = alpha_ratios_from_metric(metrics, sizes, target, eps)
    except CrepeError as exc:
        # the rescaled band can push the heaviest block past 1: refused, never clipped silently
        assert "gives a block sparsity of" in str(exc)
        top = (1 + eps) * target / weighted_mean(
            [(m - min(metrics)) / (max(metrics) - min(metrics)) * 2 * eps + (1 - eps) for m in metrics], sizes)
        assert top >= 1 - 1e-9
        return
    assert weighted_mean(r, sizes) == pytest.approx(target, abs=1e-9)  # parameter-weighted
    assert max(r) / min(r) == pytest.approx((1 + eps) / (1 - eps), rel=1e-9)  # multiplicative band
    for i in range(len(metrics)):
        for j in range(len(metrics)):
            if metrics[i] > metrics[j]:
                assert r[i] >= r[j]  # larger alpha (lighter tail) -> more pruning


# --- ESD metric -----------------------------------------------------------------------------------


def test_esd_alpha_mid_golden():
    w = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0]).sqrt())  # eigenvalues of W^T W: 1, 2, 4, 8
    # k = 2, n = 2: alpha = 1 + 2 / (ln 4 + ln 8 - 2 ln 4) = 1 + 2 / ln 2
    assert esd_alpha(w, "alpha_mid") == pytest.approx(1 + 2 / math.log(2), rel=1e-6)


def ref_alpha_peak(weight: torch.Tensor, bins: int = 100) -> float:
    """Loop transcription of the official estimator (xmin_peak), on float64 Python numbers."""
    eigs = sorted(torch.linalg.svdvals(weight.float()).square().tolist())  # squared in float32
    eigs = [e for e in eigs if e > 0]
    n_all = len(eigs)
    logs = [math.log(e) for e in eigs]
    h = [math.log10(e) for e in eigs]
    lo, hi = min(h), max(h)
    counts = [0] * bins
    for v in h:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    peak = 10 ** (lo + (hi - lo) * counts.index(max(counts)) / bins)
    xmin_min, xmin_max = math.log10(0.95 * peak), 1.5 * peak
    alphas, dists = [0.0] * (n_all - 1), [1.0] * (n_all - 1)
    for i in range(n_all - 1):
        xmin = eigs[i]
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = n_all - i
        alpha = 1 + n / (sum(logs[i:]) - n * logs[i])
        alphas[i] = alpha
        if alpha > 1:
            dists[i] = max(abs(1 - (eigs[i + m] / xmin) ** (1 - alpha) - m / n) for m in range(n))
    return alphas[dists.index(min(dists))]


@pytest.mark.parametrize("seed,shape", [(0, (64, 64)), (1, (48, 96)), (2, (128, 40)), (3, (200, 150))])
def test_esd_alpha_peak_matches_loop_reference(seed, shape):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) @ torch.diag(torch.rand(shape[1], generator=g) ** 3 + 0.01)
    assert esd_alpha(w, "alpha_peak") == pytest.approx(ref_alpha_peak(w), rel=1e-9)


def test_esd_alpha_recovers_a_power_law():
    # eigenvalues drawn from a Pareto density ~ x^-2.5 on [1, inf): the MLE should find about 2.5
    rng = np.random.default_rng(0)
    eigs = torch.sort(torch.tensor((1 - rng.random(3000)) ** (-1 / 1.5))).values
    assert esd_alpha_from_eigenvalues(eigs, "alpha_peak") == pytest.approx(2.5, abs=0.15)
    # through the SVD of a diagonal weight with those squared singular values
    w = torch.diag(eigs[::10].sqrt().float())
    assert esd_alpha(w, "alpha_peak") == pytest.approx(2.5, abs=0.3)


# --- dense calibration statistics and block_ratios on tiny models ---------------------------------


def reference_stats(model, calib_ids, m):
    """Whole-model dense forward with hooks on every block linear (no block replay at all)."""
    _, blocks = find_blocks(model)
    sq, hooks = {}, []
    for i, block in enumerate(blocks):
        for name, mod in prunable_linears(block).items():
            key = (i, name)
            sq[key] = torch.zeros(mod.in_features, dtype=torch.float64)

            def hook(_m, inp, _out, key=key):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                sq[key] += (x * x).sum(dim=0)

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=calib_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, block in enumerate(blocks):
        lin = prunable_linears(block)
        norms = {n: sq[(i, n)].sqrt().float() for n in lin}
        out.append(wanda_block_stats({n: mod.weight.detach() for n, mod in lin.items()}, norms, m))
    return out


def test_dense_stats_match_a_whole_model_forward(tiny_model, calib_ids):
    ours = dense_wanda_stats(tiny_model, calib_ids, m=3.0, batch_size=4)
    ref = reference_stats(tiny_model, calib_ids, 3.0)
    count = sum(block_param_counts(tiny_model)) / len(ours)
    for (lod, phi), (lod_ref, phi_ref) in zip(ours, ref):
        assert lod == pytest.approx(lod_ref, abs=100 * 2 / count)  # at most 2 scores across the cut
        assert phi == pytest.approx(phi_ref, rel=1e-5)


def test_block_ratios_on_every_architecture(tiny_model, calib_ids):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sizes = block_param_counts(tiny_model)
    for method in ALLOCATORS:
        ratios = block_ratios(tiny_model, calib_ids, method, 0.6, batch_size=4)
        assert len(ratios) == len(find_blocks(tiny_model)[1])
        assert all(0 < r < 1 for r in ratios)
        mean = weighted_mean(ratios, sizes) if RATIO_MEAN[method] == "param_weighted" else np.mean(ratios)
        assert mean == pytest.approx(0.6, abs=1e-9)
        assert max(ratios) > min(ratios)  # random blocks differ
        assert block_ratios(tiny_model, calib_ids, method, 0.6, batch_size=4) == ratios  # deterministic
        # another batch size only changes float rounding
        assert block_ratios(tiny_model, calib_ids, method, 0.6, batch_size=2) == pytest.approx(ratios, abs=1e-4)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


def test_block_ratios_follow_the_pure_mappings(calib_ids):
    from tiny_models import build

    model = build("llama", seed=3, n_layers=4)
    stats = dense_wanda_stats(model, calib_ids, m=5.0)
    assert block_ratios(model, calib_ids, "owl", 0.5, lam=0.05) == owl_ratios_from_outliers(
        [s[0] for s in stats], 0.5, 0.05
    )
    assert block_ratios(model, calib_ids, "dlp", 0.5, alpha=0.1) == dlp_ratios([s[1] for s in stats], 0.5, 0.1)
    metrics = block_esd_metrics(model, "alpha_mid")
    assert block_ratios(model, None, "alpha", 0.5, epsilon=0.2, metric="alpha_mid") == alpha_ratios_from_metric(
        metrics, block_param_counts(model), 0.5, 0.2
    )


# --- API, validation, plot ------------------------------------------------------------------------


def test_needs_calibration_and_defaults():
    assert needs_calibration("owl") and needs_calibration("dlp") and not needs_calibration("alpha")
    assert ALLOCATOR_DEFAULTS["owl"] == {"m": 5.0, "lam": 0.08}
    assert ALLOCATOR_DEFAULTS["alpha"] == {"epsilon": 0.3, "metric": "alpha_peak"}
    assert ALLOCATOR_DEFAULTS["dlp"] == {"alpha": 0.15}
    with pytest.raises(CrepeError, match="unknown layer allocation"):
        needs_calibration("uniform")


def test_errors(calib_ids):
    from tiny_models import build

    model = build("llama", seed=0)
    with pytest.raises(CrepeError, match="unknown layer allocation"):
        block_ratios(model, calib_ids, "OWL", 0.5)
    for bad in (0.0, 1.0, 1.2, -0.1, True):
        with pytest.raises(CrepeError, match="target sparsity"):
            block_ratios(model, calib_ids, "alpha", bad)
    with pytest.raises(CrepeError, match="needs calibration data"):
        block_ratios(model, None, "owl", 0.5)
    with pytest.raises(CrepeError, match="no parameter 'lambda'"):
        block_ratios(model, calib_ids, "owl", 0.5, **{"lambda": 0.1})
    with pytest.raises(CrepeError, match="epsilon=1.0"):
        block_ratios(model, None, "alpha", 0.5, epsilon=1.0)
    with pytest.raises(CrepeError, match="unknown ESD metric"):
        block_ratios(model, None, "alpha", 0.5, metric="alpha_hill")
    with pytest.raises(CrepeError, match="m=0"):
        block_ratios(model, calib_ids, "owl", 0.5, m=0)
    with pytest.raises(CrepeError, match="positive parameter count"):
        alpha_ratios_from_metric([1.0, 2.0], [1], 0.5)


def test_plot_ratios_writes_a_png_atomically(tmp_path):
    path = tmp_path / "plots" / "ratios.png"
    assert plot_ratios([0.5, 0.6, 0.7], path, target=0.6, title="owl") == path
    first = path.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    plot_ratios([0.7, 0.6], path)  # overwrite in place
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.read_bytes() != first
    assert sorted(p.name for p in path.parent.iterdir()) == ["ratios.png"]  # no temp file left
    with pytest.raises(CrepeError, match="no layer ratios"):
        plot_ratios([], tmp_path / "empty.png")
