"""Checks crepe.search.objective: target input norms against a plain forward hook, bad targets,
and ProxyObjective's mask (RIA reduction, the pruner's own mask, N:M validity) and invariances."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, random_ids

from crepe.errors import CrepeError
from crepe.masks import nm_groups_valid, select_mask
from crepe.pruner import PruneConfig, prune_linear_
from crepe.scoring import score
from crepe.search.objective import ProxyObjective, find_target, target_input_norm
from crepe.search.proxies import PROXY_NAMES, compute_proxies, gini
from crepe.types import NMPattern, SparsitySpec, parse_sparsity

HALF = SparsitySpec(0.5)
TWO_FOUR = SparsitySpec(0.5, NMPattern(2, 4))
THETA = {"alpha": 0.7, "beta": 1.3, "gamma": 0.02}


@pytest.fixture(scope="module")
def llama():
    return build("llama", seed=0)


@pytest.fixture(scope="module")
def ids():
    return random_ids(4, 16, seed=99)


def hooked_norm(model, ids, linear) -> torch.Tensor:
    """||X_j||_2 of ``linear``'s input from one ordinary full forward."""
    seen = []
    handle = linear.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    return (x * x).sum(0).sqrt()


def random_layer(seed: int, out: int = 16, inp: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=gen), torch.rand(inp, generator=gen) * 5 + 0.1


# --- target_input_norm --------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "block"), [("self_attn.q_proj", 0), ("mlp.down_proj", 1)])
def test_target_input_norm_matches_forward_hook(llama, ids, module, block):
    got = target_input_norm(llama, ids, module=module, block=block, batch_size=3)
    assert got.dtype == torch.float32 and got.shape == (find_target(llama, module, block).in_features,)
    want = hooked_norm(llama, ids, llama.model.layers[block].get_submodule(module))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_target_input_norm_bad_module_lists_linears(llama, ids):
    with pytest.raises(CrepeError, match=r"no linear 'self_attn\.query'.*self_attn\.q_proj.*mlp\.down_proj"):
        target_input_norm(llama, ids, module="self_attn.query")
    with pytest.raises(CrepeError, match="block 5 does not exist.*0..1"):
        target_input_norm(llama, ids, block=5)
    with pytest.raises(CrepeError, match="shape"):
        target_input_norm(llama, ids[0])


# --- ProxyObjective -----------------------------------------------------------------------------


def test_objective_at_ria_point_gives_the_ria_mask():
    weight, act = random_layer(0)
    objective = ProxyObjective(weight, act, HALF)
    ria = select_mask(score("ria", weight, act), 0.5)
    crepe_mask = objective.mask(objective.scores({"alpha": 1.0, "beta": 1.0, "gamma": 0.0}))
    assert torch.equal(crepe_mask, ria)
    assert not torch.equal(objective.mask(objective.scores({"alpha": 1.0, "beta": 1.0, "gamma": 1.0})), ria)


def test_objective_returns_proxies_of_its_scores_and_mask():
    weight, act = random_layer(1)
    objective = ProxyObjective(weight, act, HALF)
    got = objective(THETA)
    assert tuple(got) == tuple(PROXY_NAMES)
    s = score("crepe", weight, act, **THETA, kernel_size=9)
    keep = select_mask(s, 0.5)
    assert got == compute_proxies(s, keep)
    assert got["gini_pruned"] == gini(s[~keep])


@pytest.mark.parametrize("lam", [0.25, 3.0, 1000.0])
def test_gini_pruned_is_scale_invariant(lam):
    weight, act = random_layer(2)
    objective = ProxyObjective(weight, act, HALF)
    base = objective(THETA)["gini_pruned"]
    scaled = objective({k: lam * v for k, v in THETA.items()})["gini_pruned"]
    assert scaled == pytest.approx(base, rel=1e-5)
    assert objective({"alpha": 0.1, "beta": 1.9, "gamma": 0.5})["gini_pruned"] != pytest.approx(
        base, rel=1e-3
    )


def test_two_four_mask_is_nm_valid():
    weight, act = random_layer(3)
    objective = ProxyObjective(weight, act, TWO_FOUR)
    keep = objective.mask(objective.scores(THETA))
    assert nm_groups_valid(weight * keep, NMPattern(2, 4))
    assert int((~keep).sum()) == weight.numel() // 2
    # N:M, not a per-layer 50% threshold, which would leave some groups with fewer than 2 zeros
    unstructured = select_mask(objective.scores(THETA), 0.5)
    assert not nm_groups_valid(weight * unstructured, NMPattern(2, 4))


@pytest.mark.parametrize(
    ("spec", "group", "rule"),
    [
        ("0.5", "layer", "exact"),
        ("0.6", "row", "exact"),
        ("0.5", "layer", "threshold"),
        ("2:4", "layer", "exact"),
        ("4:8", "layer", "exact"),
    ],
)
def test_objective_mask_equals_the_pruners_mask(llama, spec, group, rule):
    target = find_target(llama)
    act = torch.rand(target.in_features, generator=torch.Generator().manual_seed(4)) + 0.5
    sparsity = parse_sparsity(spec)
    objective = ProxyObjective(target.weight, act, sparsity, group=group, rule=rule, kernel_size=5)
    keep = objective.mask(objective.scores(THETA))
    copy = torch.nn.Linear(target.in_features, target.out_features, bias=False)
    copy.weight.data = target.weight.detach().clone()
    config = PruneConfig("crepe", sparsity, {**THETA, "kernel_size": 5}, group=group, rule=rule)
    prune_linear_(copy, config, act, torch.device("cpu"))
    assert torch.equal(copy.weight == 0, ~keep)


def test_objective_caches_a_private_copy_of_the_weight():
    weight, act = random_layer(5)
    objective = ProxyObjective(weight, act, HALF)
    before = objective(THETA)
    weight.zero_()
    act.zero_()
    assert objective(THETA) == before


def test_objective_kernel_size_from_params_overrides_default():
    weight, act = random_layer(6)
    objective = ProxyObjective(weight, act, HALF, kernel_size=9)
    s3 = objective.scores({**THETA, "kernel_size": 3})
    torch.testing.assert_close(s3, score("crepe", weight, act, **THETA, kernel_size=3), rtol=0, atol=0)
    assert not torch.equal(s3, objective.scores(THETA))


def test_objective_bad_input():
    weight, act = random_layer(7, out=8, inp=30)
    with pytest.raises(CrepeError, match="unknown search parameter 'delta'"):
        ProxyObjective(weight, act, HALF)({**THETA, "delta": 1.0})
    with pytest.raises(CrepeError, match="input width 30 is not divisible by M=4"):
        ProxyObjective(weight, act, TWO_FOUR)
    with pytest.raises(CrepeError, match="act_norm has shape"):
        ProxyObjective(weight, act[:-1], HALF)
    with pytest.raises(CrepeError, match="unknown selection rule"):
        ProxyObjective(weight, act, HALF, rule="median")
    with pytest.raises(CrepeError, match="comparison group"):
        ProxyObjective(weight, act, HALF, group="column")
    with pytest.raises(CrepeError, match="kernel_size 4"):
        ProxyObjective(weight, act, HALF, kernel_size=4)
