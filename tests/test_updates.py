"""The weight-update axis (``update: none|obs``): fixed-mask OBS reconstruction after any scorer's mask.

On single layers: :func:`crepe.sparsegpt.obs_update` keeps exactly the mask it is given, zeroes the
pruned weights exactly, reproduces SparseGPT's weights with SparseGPT's own mask, and (guarded) never
makes the layer's output error on the calibration inputs larger than plain masking. On tiny models:
the update changes only the kept weights, from Hessians of the dense block with the pruned prefix,
composes with DSnoT and channel permutation, reaches MoE experts, and is validated and recorded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparsegpt import correlated_inputs, hessian_of, indefinite_hessian
from tiny_models import build
from torch import nn

import crepe.pruner as pruner
from bench.families import build_family
from crepe.blocks import find_blocks
from crepe.errors import CrepeError
from crepe.masks import select_mask
from crepe.methods import resolve_method_params
from crepe.prune_config import build_config
from crepe.pruner import PruneConfig, prune_model
from crepe.scoring import score
from crepe.sparsegpt import DEFAULTS, obs_update, sparsegpt_prune
from crepe.types import NMPattern, parse_sparsity
from crepe.updates import UPDATES

PATH = "model.layers"
SCORERS = ("magnitude", "wanda", "ria", "crepe")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scorer_mask(method: str, w: torch.Tensor, x: torch.Tensor, pattern: NMPattern | None) -> torch.Tensor:
    """The keep-mask the pruner would select for ``method`` at 50% (or ``pattern``) on inputs ``x``."""
    params = resolve_method_params(method, {"kernel_size": 3} if method == "crepe" else {})
    scores = score(method, w, x.norm(dim=0), **params)
    if pattern is not None:
        return select_mask(scores, pattern=pattern)
    return select_mask(scores, 0.5, group="row" if method == "wanda" else "layer", rule="exact")


def _out_err(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    """``||W X - W' X||_F`` on the calibration inputs (float64)."""
    return float(torch.linalg.norm(x.double() @ (w.double() - w_new.double()).T.detach()))


# --- the registry -----------------------------------------------------------------------------------


def test_registry_names_and_defaults() -> None:
    assert list(UPDATES) == ["none", "obs"]
    assert UPDATES["none"].defaults == {}
    assert dict(UPDATES["obs"].defaults) == {**DEFAULTS, "guard": True}
    assert UPDATES["obs"].obj is obs_update
    assert UPDATES.get("obs").resolve({"percdamp": 0.1}, "update")["percdamp"] == 0.1


# --- one layer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
@pytest.mark.parametrize("method", SCORERS)
def test_update_keeps_exactly_the_scorers_mask(method: str, pattern: NMPattern | None) -> None:
    x = correlated_inputs(256, 64, seed=1)
    w = torch.randn(32, 64, generator=_gen(2))
    keep = _scorer_mask(method, w, x, pattern)
    res = obs_update(w, hessian_of(x), ~keep, blocksize=32)
    assert torch.equal(res.keep, keep)
    assert res.n_pruned == int((~keep).sum())
    assert bool((res.weight[~keep] == 0).all())  # exactly zero, not just small
    assert bool((res.weight[keep] != w[keep]).any())  # the kept weights were reconstructed
    assert _out_err(x, w, res.weight) < _out_err(x, w, w * keep)
    assert res.info["damping_retries"] == [] and res.info["percdamp"] == 0.01 and res.info["obs_loss"] > 0


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_sparsegpts_own_mask_reproduces_sparsegpt(pattern: NMPattern | None, perm: bool) -> None:
    x = correlated_inputs(256, 96, seed=3)
    h = hessian_of(x)
    w = torch.randn(40, 96, generator=_gen(4))
    order = torch.randperm(96, generator=_gen(5)) if perm else None
    ref = sparsegpt_prune(w, h, 0.5, pattern, blocksize=32, perm=order)
    got = obs_update(w, h, ~ref.keep, blocksize=32, perm=order, guard=False)
    assert torch.equal(got.keep, ref.keep)
    torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-5)
    assert got.info["obs_loss"] == pytest.approx(ref.info["obs_loss"], rel=1e-4)
    guarded = obs_update(w, h, ~ref.keep, blocksize=32, perm=order)
    rows = guarded.info["guarded_rows"]  # rows where plain masking beats the sweep: masked weights instead
    differ = (guarded.weight != got.weight).any(dim=1)
    assert int(differ.sum()) <= rows and rows < w.shape[0] // 4


def _random_layer(seed: int, out: int, inp: int, tokens: int, mix: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + mix * torch.randn(inp, inp, generator=g))
    return torch.randn(out, inp, generator=g), x


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000), out=st.integers(1, 12), inp=st.integers(2, 40), tokens=st.integers(1, 80),
    mix=st.floats(0.0, 3.0), density=st.floats(0.1, 0.9), blocksize=st.integers(1, 24),
)
def test_update_never_increases_the_output_error(
    seed: int, out: int, inp: int, tokens: int, mix: float, density: float, blocksize: int
) -> None:
    w, x = _random_layer(seed, out, inp, tokens, mix)
    prune = torch.rand(out, inp, generator=_gen(seed + 1)) < density
    res = obs_update(w, hessian_of(x), prune, blocksize=blocksize)
    assert torch.equal(res.keep, ~prune) and bool((res.weight[prune] == 0).all())
    masked = _out_err(x, w, w * ~prune)
    assert _out_err(x, w, res.weight) <= masked * (1 + 1e-4) + 1e-4


def test_unguarded_sweep_can_be_worse_than_masking() -> None:
    """Why the guard exists: with a mask it did not choose, the greedy sweep can grow a later pruned
    weight; on ill-conditioned inputs some row's error then exceeds plain masking's."""
    worse = 0
    for seed in range(20):
        w, x = _random_layer(seed, 6, 16, 64, 2.0)
        prune = torch.rand(6, 16, generator=_gen(seed + 1)) < 0.5
        h = hessian_of(x)
        raw = obs_update(w, h, prune, blocksize=16, guard=False)
        guarded = obs_update(w, h, prune, blocksize=16)
        masked = _out_err(x, w, w * ~prune)
        worse += _out_err(x, w, raw.weight) > masked * 1.01
        assert _out_err(x, w, guarded.weight) <= masked * (1 + 1e-5)
        assert (guarded.info["guarded_rows"] > 0) == bool((guarded.weight != raw.weight).any())
    assert worse > 0


def test_bad_mask_and_params_raise() -> None:
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(RuntimeError, match="does not match weight"):
        obs_update(w, h, torch.zeros(4, 8))  # not bool
    with pytest.raises(CrepeError, match="update obs percdamp=0"):
        obs_update(w, h, torch.zeros(4, 8, dtype=torch.bool), percdamp=0)
    none = obs_update(w, h, torch.zeros(4, 8, dtype=torch.bool))
    torch.testing.assert_close(none.weight, w, rtol=0, atol=0)  # nothing pruned: nothing changes


def test_dead_inputs_and_damping_retries() -> None:
    x = correlated_inputs(128, 24, seed=6)
    x[:, [3, 17]] = 0.0
    w = torch.randn(8, 24, generator=_gen(7))
    prune = torch.rand(8, 24, generator=_gen(8)) < 0.5
    res = obs_update(w, hessian_of(x), prune, blocksize=8)
    assert res.info["dead_inputs"] == 2 and bool((res.weight[:, [3, 17]] == 0).all())
    assert torch.equal(res.keep, ~prune)
    retried = obs_update(w, indefinite_hessian(24, seed=3), prune, blocksize=8, layer="L")
    assert retried.info["percdamp"] == pytest.approx(0.1)
    assert retried.info["damping_retries"] == [{"layer": "L", "percdamp": 0.01, "failed": "cholesky of H"}]


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "wanda", "update": "admm"}, "unknown weight update 'admm'; allowed: none, obs"),
        ({"method": "sparsegpt", "update": "obs"}, "already reconstructs its weights; use update none"),
        ({"method": "wanda", "update": "obs", "update_params": {"damp": 1}}, "update 'obs' has no parameter 'damp'"),
        ({"method": "wanda", "update": "obs", "update_params": {"blocksize": 0}}, "update 'obs' blocksize=0"),
        ({"method": "wanda", "update": "obs", "update_params": {"guard": "yes"}}, "guard='yes' must be true or false"),
        ({"method": "wanda", "update_params": {"percdamp": 0.1}}, "update 'none' has no parameter 'percdamp'"),
    ],
)
def test_bad_updates_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(CrepeError, match=message.replace("(", r"\(")):
        build_config(kwargs.pop("method"), "0.5", **kwargs)


def test_needs_calibration_and_record() -> None:
    magnitude = build_config("magnitude", "2:4", update="obs")
    assert magnitude.needs_calibration and magnitude.needs_hessian
    assert not build_config("magnitude", "2:4").needs_calibration
    dsnot = build_config("sparsegpt", "0.5", refine="dsnot", update="obs", update_params={"percdamp": 0.05})
    d = dsnot.as_dict()
    assert d["update"] == "obs" and d["update_params"] == {**DEFAULTS, "percdamp": 0.05, "guard": True}
    assert build_config("wanda", "0.5").as_dict()["update"] == "none"
    assert build_config("wanda", "0.5").as_dict()["update_params"] == {}


def test_magnitude_with_obs_needs_and_uses_calibration(calib_ids: torch.Tensor) -> None:
    model = build("llama")
    with pytest.raises(CrepeError, match="update 'obs' needs calibration data"):
        prune_model(model, None, PruneConfig("magnitude", parse_sparsity("0.5"), update="obs"))
    plain = copy.deepcopy(model)
    prune_model(plain, None, PruneConfig("magnitude", parse_sparsity("0.5")))
    report = prune_model(model, calib_ids, PruneConfig("magnitude", parse_sparsity("0.5"), update="obs"))
    _same_masks_new_weights(plain, model)
    assert report.update_summary()["updated_layers"] == 14


# --- whole tiny models ------------------------------------------------------------------------------------


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    _, blocks = find_blocks(model)
    return {f"{PATH}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, nn.Linear)}


def _same_masks_new_weights(plain: nn.Module, updated: nn.Module, prefix: str = PATH) -> None:
    """Layers under ``prefix``: same zeros, and some kept weight changed."""
    a, b = _linears(plain), _linears(updated)
    for name in (n for n in a if n.startswith(prefix)):
        wa, wb = a[name].weight, b[name].weight
        assert torch.equal(wa != 0, wb != 0), name
        kept = wa != 0
        assert bool((wa[kept] != wb[kept]).any()), f"{name}: kept weights not updated"


def _cfg(method: str, sparsity: str, update: str, **kwargs) -> PruneConfig:
    params = {"kernel_size": 3} if method == "crepe" else {}
    return PruneConfig(method, parse_sparsity(sparsity), params=params, update=update, **kwargs)


@pytest.mark.parametrize(
    ("method", "sparsity", "extra"),
    [
        ("wanda", "0.5", {}),
        ("crepe", "2:4", {}),
        ("ria", "2:4", {"refine": "cp"}),
        ("wanda", "0.5", {"refine": "dsnot", "refine_params": {"skip_layer": "no_skip"}}),
        ("sparsegpt", "2:4", {"refine": "dsnot", "refine_params": {"skip_layer": "no_skip"}}),
    ],
)
def test_model_update_keeps_masks_and_reconstructs(method: str, sparsity: str, extra: dict, calib_ids: torch.Tensor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's zeros are exactly the final mask (after CP / DSnoT) handed to the update; block 0, whose
    inputs do not depend on the update, has the same masks as update none; kept weights change; recorded."""
    dense = build("llama")
    plain, updated = copy.deepcopy(dense), copy.deepcopy(dense)
    base = prune_model(plain, calib_ids, _cfg(method, sparsity, "none", **extra), batch_size=4)
    given_masks = _spy_update(monkeypatch)
    report = prune_model(updated, calib_ids, _cfg(method, sparsity, "obs", **extra), batch_size=4)
    _same_masks_new_weights(plain, updated, f"{PATH}.0.")
    assert set(given_masks) == set(_linears(updated))
    for name, m in _linears(updated).items():
        assert torch.equal(m.weight == 0, given_masks[name][1]), name
    assert report.mask_pruned == base.mask_pruned and report.nm_valid == base.nm_valid
    for name, info in report.layer_info.items():
        assert info["update"]["percdamp"] == 0.01 and info["update"]["damping_retries"] == []
        assert info["update"]["obs_loss"] > 0 and "guarded_rows" in info["update"]
        if "refine" in extra:
            assert info.get("dsnot" if extra["refine"] == "dsnot" else "permutation") is not None, name
    dumped = report.as_dict()
    assert dumped["config"]["update"] == "obs" and dumped["config"]["update_params"]["blocksize"] == 128
    assert dumped["update_summary"]["updated_layers"] == 14 and base.update_summary() is None
    # block 0 sees the same dense inputs in both runs: the update lowers every layer's output error there
    xs = _block_inputs(dense, calib_ids, 0)
    p, u, d = _linears(plain), _linears(updated), _linears(dense)
    for name, x in xs.items():
        assert _out_err(x, d[name].weight, u[name].weight) <= _out_err(x, d[name].weight, p[name].weight) * (1 + 1e-4)


def _spy_update(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(Hessian, prune-mask) the pruner hands :func:`obs_update`, by layer name."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    real = pruner.obs_update

    def spy(*args, **kwargs):
        seen[args[6]] = (args[1].clone(), args[2].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(pruner, "obs_update", spy)
    return seen


def _block_inputs(model: nn.Module, ids: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """The inputs of every linear of decoder block ``block`` on ``ids`` (tokens x in)."""
    xs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, inp, _o, n=name: xs.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])))
        for name, m in _linears(model).items() if name.startswith(f"{PATH}.{block}.")
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return xs


def test_update_hessians_from_dense_block_and_updated_prefix(calib_ids: torch.Tensor,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """As SparseGPT: the Hessian is the dense block's (inputs from the pruned *and updated* prefix)."""
    model = build("llama")
    dense = copy.deepcopy(model)
    seen = _spy_update(monkeypatch)
    prune_model(model, calib_ids, _cfg("wanda", "0.5", "obs"), batch_size=4)
    assert len(seen) == 14
    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    inputs = {**_block_inputs(dense, calib_ids, 0), **_block_inputs(hybrid, calib_ids, 1)}
    n = calib_ids.shape[0]
    for name, (h, _) in seen.items():
        x = inputs[name].double()
        torch.testing.assert_close(h.double(), (2.0 / n) * x.T @ x, rtol=1e-4, atol=1e-4)


def test_update_damping_retry_reaches_the_report(calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    target = f"{PATH}.0.self_attn.q_proj"
    real = pruner.BlockStats.layer
    done: list[str] = []

    def poisoned(self, name):
        stats = real(self, name)
        if name == "self_attn.q_proj" and not done:
            done.append(name)
            stats.hessian = indefinite_hessian(stats.hessian.shape[0], seed=3)
        return stats

    monkeypatch.setattr(pruner.BlockStats, "layer", poisoned)
    report = prune_model(build("llama"), calib_ids, _cfg("ria", "0.5", "obs"))
    assert [(r["layer"], r["percdamp"]) for r in report.damping_retries] == [(target, 0.01)]
    assert report.layer_info[target]["update"]["percdamp"] == pytest.approx(0.1)
    assert report.as_dict()["damping_retries"][0]["layer"] == target


def test_fused_moe_experts_get_routed_hessians(calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """qwen3_moe: each fused expert's update Hessian is the Gram matrix of its routed tokens only."""
    model = build_family("qwen3_moe")
    mlp = model.model.layers[0].mlp
    got: list[torch.Tensor] = []
    hook = mlp.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    hook.remove()
    x = got[0]
    with torch.no_grad():
        _, _, index = mlp.gate(x)
    seen = _spy_update(monkeypatch)
    report = prune_model(model, calib_ids, PruneConfig("wanda", parse_sparsity("0.5"), moe_min_tokens=0, update="obs"))
    assert report.by_kind()["expert"]["n_weights"] > 0
    experts = [n for n, k in report.kinds.items() if k == "expert"]
    assert experts and all("obs_loss" in report.layer_info[n]["update"] for n in experts)
    for e in range(int(index.max()) + 1):
        xe = x[(index == e).any(dim=-1)].double()
        h = seen[f"{PATH}.0.mlp.experts.gate_up_proj[{e}]"][0].double()
        g = xe.T @ xe
        torch.testing.assert_close(h / h.trace(), g / g.trace(), rtol=1e-4, atol=1e-6)


def test_magnitude_fallback_experts_are_not_updated(calib_ids: torch.Tensor) -> None:
    """An expert with too few routed tokens is scored by |W| and keeps its masked weights (no Hessian
    worth the name); its siblings are updated."""
    from test_architectures import _starved, per_expert_llama

    model = per_expert_llama()
    e, _, floor = _starved(model, calib_ids[:4])
    config = PruneConfig("wanda", parse_sparsity("0.5"), moe_min_tokens=floor, moe_fallback="magnitude", update="obs")
    dense = copy.deepcopy(model)
    report = prune_model(model, calib_ids[:4], config, batch_size=4)
    starved = f"{PATH}.0.mlp.experts.{e}.up_proj"
    assert report.layer_info[starved]["update"] == {"skipped": "magnitude fallback (too few routed tokens)"}
    w, w0 = model.model.layers[0].mlp.experts[e].up_proj.weight, dense.model.layers[0].mlp.experts[e].up_proj.weight
    assert torch.equal(w[w != 0], w0[w != 0])
    other = f"{PATH}.0.mlp.experts.{(e + 1) % len(model.model.layers[0].mlp.experts)}.up_proj"
    assert "obs_loss" in report.layer_info[other]["update"]
    assert report.update_summary()["skipped_layers"] == 3
