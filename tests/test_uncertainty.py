"""Bootstrap CIs over evaluation windows: hand-checkable golden cases, properties (hypothesis), and the
per-window NLLs and CI that ``perplexity`` (in memory and streamed) returns on a tiny saved LLaMA."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from local_models import save_tiny_llama

from crepe.data import get_eval_tokens
from crepe.errors import CrepeError
from crepe.evaluate import perplexity
from crepe.models import load_model
from crepe.streaming import StreamedModel, load_capped
from crepe.uncertainty import paired_bootstrap, perplexity_ci
from flows.cli import main

SEQLEN = 32
NLL = st.lists(st.floats(0.0, 12.0, allow_nan=False), min_size=2, max_size=24)


# --- golden cases ---------------------------------------------------------------------------------------------


def test_identical_windows_give_a_zero_width_ci_at_the_perplexity() -> None:
    lo, hi = perplexity_ci([2.0] * 7)
    assert lo == pytest.approx(math.exp(2.0), rel=1e-12) and hi == pytest.approx(math.exp(2.0), rel=1e-12)


def test_two_windows_ci_spans_their_perplexities() -> None:
    """Resample means of [1, 2] are 1, 1.5, 2 with chance 1/4, 1/2, 1/4: the 2.5% and 97.5% points are the ends."""
    lo, hi = perplexity_ci([1.0, 2.0])
    assert (lo, hi) == pytest.approx((math.e, math.e**2), rel=1e-12)


def test_one_outlier_window_gives_the_binomial_quantiles() -> None:
    """[0, 0, 0, 1]: the resample mean is k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.32 and P(k <= 2) = 0.95,
    P(k <= 3) = 0.996, so the 95% interval of the mean is [0, 3/4]."""
    lo, hi = perplexity_ci([0.0, 0.0, 0.0, 1.0])
    assert lo == 1.0 and hi == pytest.approx(math.exp(0.75), rel=1e-12)


def test_ci_is_reproducible_for_a_seed_and_moves_with_it() -> None:
    x = [3.1, 2.7, 4.0, 3.3, 2.2, 3.8, 3.0, 2.9]
    assert perplexity_ci(x, seed=3) == perplexity_ci(x, seed=3)
    assert perplexity_ci(x) == perplexity_ci(x, n_boot=2000, seed=0)
    assert len({perplexity_ci(x, seed=s) for s in range(5)}) > 1
    lo, hi = perplexity_ci(x)
    assert lo < math.exp(np.mean(x)) < hi
    # a wider spread of windows (same mean) gives a wider interval
    wide = [3.1 + 3 * (v - 3.1) for v in x]
    wlo, whi = perplexity_ci(wide)
    assert whi / wlo > hi / lo


def test_a_bootstrap_needs_two_windows() -> None:
    for bad in ([], [2.5]):
        with pytest.raises(CrepeError, match=rf"^a bootstrap needs at least 2 windows, got {len(bad)}$"):
            perplexity_ci(bad)
    with pytest.raises(CrepeError, match="^a bootstrap needs at least 2 windows, got 1$"):
        paired_bootstrap([1.0], [1.0])
    with pytest.raises(CrepeError, match="n_boot must be a positive integer, got 0"):
        perplexity_ci([1.0, 2.0], n_boot=0)


def test_non_finite_window_gives_an_infinite_ci() -> None:
    assert perplexity_ci([1.0, float("inf"), 2.0]) == (float("inf"), float("inf"))


def test_paired_against_itself_is_ratio_one_and_not_real() -> None:
    a = [3.1, 2.7, 4.0, 3.3, 2.2, 3.8]
    out = paired_bootstrap(a, a)
    assert out["mean_diff"] == 0.0 and out["ratio"] == 1.0
    assert out["ratio_ci95"] == [1.0, 1.0] and out["diff_ci95"] == [0.0, 0.0]
    assert out["real"] is False and out["n_windows"] == 6


def test_paired_resampling_uses_the_same_windows_for_both() -> None:
    """b = a + 0.5 on every window: noisy windows, constant difference. Paired, the ratio CI has zero width
    (exp(-0.5)); resampling a and b independently would not."""
    a = [3.1, 2.7, 4.0, 3.3, 2.2, 3.8, 3.0, 2.9]
    out = paired_bootstrap(a, [v + 0.5 for v in a])
    assert out["mean_diff"] == pytest.approx(-0.5, abs=1e-12)
    assert out["ratio_ci95"] == pytest.approx([math.exp(-0.5)] * 2, rel=1e-12)
    assert out["real"] is True
    lo, hi = perplexity_ci(a)
    assert hi / lo > 1.5  # the unpaired interval of a alone is far wider than the paired one


def test_paired_noise_around_zero_is_not_real_and_a_consistent_gain_is() -> None:
    base = [3.1, 2.7, 4.0, 3.3, 2.2, 3.8, 3.0, 2.9, 3.5, 2.6]
    alternating = [v + (0.2 if i % 2 else -0.2) for i, v in enumerate(base)]
    noise = paired_bootstrap(alternating, base)
    assert noise["ratio_ci95"][0] < 1.0 < noise["ratio_ci95"][1] and noise["real"] is False
    better = [v - 0.05 - 0.02 * (i % 3) for i, v in enumerate(base)]  # every window a little lower
    gain = paired_bootstrap(better, base)
    assert gain["ratio_ci95"][1] < 1.0 and gain["real"] is True
    assert gain["ratio"] == pytest.approx(math.exp(np.mean(better) - np.mean(base)), rel=1e-12)


def test_paired_refuses_different_windows() -> None:
    with pytest.raises(CrepeError, match="^a paired bootstrap needs the same windows for both models, got 3 and 4 "
                                         "window NLLs$"):
        paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(CrepeError, match="one number per window"):
        perplexity_ci([[1.0, 2.0], [3.0, 4.0]])


# --- properties -------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(NLL, st.integers(0, 2**32 - 1))
def test_ci_contains_the_perplexity_and_is_reproducible(nll: list[float], seed: int) -> None:
    ppl = math.exp(float(np.mean(nll)))
    lo, hi = perplexity_ci(nll, n_boot=300, seed=seed)
    assert lo <= ppl * (1 + 1e-9) and ppl <= hi * (1 + 1e-9)
    assert min(math.exp(v) for v in nll) * (1 - 1e-9) <= lo <= hi <= max(math.exp(v) for v in nll) * (1 + 1e-9)
    assert perplexity_ci(nll, n_boot=300, seed=seed) == (lo, hi)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 12.0), st.floats(0.0, 12.0)), min_size=2, max_size=24),
       st.integers(0, 1000))
def test_paired_is_antisymmetric_and_contains_the_ratio(pairs: list[tuple[float, float]], seed: int) -> None:
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ab, ba = paired_bootstrap(a, b, n_boot=300, seed=seed), paired_bootstrap(b, a, n_boot=300, seed=seed)
    assert ab["ratio_ci95"][0] <= ab["ratio"] * (1 + 1e-9) and ab["ratio"] <= ab["ratio_ci95"][1] * (1 + 1e-9)
    assert ab["diff_ci95"] == pytest.approx([-ba["diff_ci95"][1], -ba["diff_ci95"][0]], abs=1e-9)
    assert ab["real"] == ba["real"]
    assert ab == paired_bootstrap(a, b, n_boot=300, seed=seed)


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("uncertainty") / "tiny")


@pytest.fixture(scope="module")
def tokens(tiny_folder: Path) -> torch.Tensor:
    lm = load_model(str(tiny_folder), device="cpu")
    return get_eval_tokens(lm.tokenizer, "test", "pydoc")[0]


def test_perplexity_keeps_window_nlls_and_a_ci(tiny_folder: Path, tokens: torch.Tensor) -> None:
    lm = load_model(str(tiny_folder), device="cpu")
    res = perplexity(lm.model, tokens, SEQLEN, max_windows=12, batch_size=5)
    assert res.n_windows == 12 and len(res.window_nll) == 12
    assert math.exp(float(np.mean(res.window_nll))) == pytest.approx(res.ppl, rel=1e-9)
    assert sum(res.window_nll) * SEQLEN == pytest.approx(res.nll_sum, rel=1e-9)
    assert len(set(res.window_nll)) > 1  # real windows differ
    assert res.ci95 is not None and res.ci95[0] < res.ppl < res.ci95[1]
    assert res.ci95 == perplexity_ci(res.window_nll)
    # window order: evaluating only the first 5 windows gives the first 5 NLLs, whatever the batching
    head = perplexity(lm.model, tokens, SEQLEN, max_windows=5, batch_size=2)
    assert head.window_nll == pytest.approx(res.window_nll[:5], rel=1e-5)
    record = json.loads(json.dumps(res.as_dict()))
    assert record["ci95"] == list(res.ci95) and record["window_nll"] == res.window_nll
    assert res.as_dict() == record  # as it will read back from a manifest
    one = perplexity(lm.model, tokens, SEQLEN, max_windows=1)
    assert one.ci95 is None and len(one.window_nll) == 1
    assert math.exp(one.window_nll[0]) == pytest.approx(one.ppl, rel=1e-9)


def test_streamed_perplexity_keeps_the_same_window_nlls(tiny_folder: Path, tokens: torch.Tensor) -> None:
    """Blocks read from the shards under a memory cap: the same window NLLs and CI as in memory."""
    memory = perplexity(load_model(str(tiny_folder), device="cpu").model, tokens, SEQLEN, max_windows=6,
                        batch_size=2)
    lm = load_capped(str(tiny_folder), device="cpu", max_memory="400KB")
    assert isinstance(lm, StreamedModel)
    streamed = lm.streamer.perplexity(tokens, SEQLEN, max_windows=6, batch_size=2, windows_per_pass=2)
    assert streamed.window_nll == pytest.approx(memory.window_nll, rel=1e-6)
    assert streamed.ci95 == pytest.approx(memory.ci95, rel=1e-6)
    assert math.exp(float(np.mean(streamed.window_nll))) == pytest.approx(streamed.ppl, rel=1e-9)


def test_crepe_eval_prints_the_ci(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--no-progress", "eval", "--model", str(tiny_folder), "--calib-source", "pydoc", "--eval-source",
              "pydoc", "--seqlen", str(SEQLEN)]
    assert main([*common, "--max-windows", "4"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("perplexity "))
    found = re.fullmatch(r"perplexity ([\d.]+)  \(95% CI ([\d.]+)-([\d.]+) over 4 of \d+ windows x 32 tokens\)", line)
    assert found, line
    ppl, lo, hi = map(float, found.groups())
    assert lo < ppl < hi
    assert main([*common, "--max-windows", "1"]) == 0  # one window: no interval
    assert re.search(r"^perplexity [\d.]+  \(1 of \d+ windows x 32 tokens\)$", capsys.readouterr().out, re.M)
