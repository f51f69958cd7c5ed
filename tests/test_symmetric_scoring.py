"""Checks crepe.scoring.symmetric: hand-computed lp_ria / sym_weight / stoch_ria scores, the
reductions (lp_ria at p = 1 is RIA bit for bit, stoch_ria at beta = 1 is RIA's relative importance),
the sampled-norm estimator (exact on constant matrices, unbiased on average, seeded) and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.scoring import SCORERS, get_scorer, score
from crepe.scoring.ria import relative_importance
from crepe.scoring.symmetric import lp_norms, sample_count, sampled_abs_sums

FAST = settings(deadline=None, max_examples=30)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def random_layer(seed: int, out: int = 16, inp: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g), torch.rand(inp, generator=g) * 10 + 0.1


W = t([[3.0, -4.0], [0.0, 5.0]])  # row l2 norms (5, 5), column l2 norms (3, sqrt 41)
ACT = t([4.0, 9.0])  # ||X||^0.5 = (2, 3)


def test_registry_entries():
    assert {"lp_ria", "stoch_ria", "sym_weight"} <= set(SCORERS)
    lp, stoch, sym = get_scorer("lp_ria"), get_scorer("stoch_ria"), get_scorer("sym_weight")
    assert lp.needs_activations and dict(lp.defaults) == {"p": 2.0, "a": 0.5}
    assert not stoch.needs_activations and dict(stoch.defaults) == {"beta": 0.1, "seed": 0}
    assert not sym.needs_activations and dict(sym.defaults) == {}
    assert lp.default_group == stoch.default_group == sym.default_group == "layer"


def test_lp_ria_golden_p2():
    r41 = math.sqrt(41.0)
    expected = t(
        [
            [3 * (1 / 3 + 1 / 5) * 2, 4 * (1 / r41 + 1 / 5) * 3],
            [0.0, 5 * (1 / r41 + 1 / 5) * 3],
        ]
    )
    torch.testing.assert_close(score("lp_ria", W, ACT), expected)


def test_lp_ria_golden_p_inf_and_a0():
    # l_inf: row max (4, 5), column max (3, 5); a = 0 drops the activations
    expected = t([[3 * (1 / 3 + 1 / 4), 4 * (1 / 5 + 1 / 4)], [0.0, 5 * (1 / 5 + 1 / 5)]])
    torch.testing.assert_close(score("lp_ria", W, ACT, p=math.inf, a=0.0), expected)


@FAST
@given(seed=st.integers(0, 10_000), p=st.sampled_from([1, 1.0]))
def test_lp_ria_p1_is_ria_bit_for_bit(seed, p):
    w, act = random_layer(seed)
    assert torch.equal(score("lp_ria", w, act, p=p), score("ria", w, act))
    assert torch.equal(score("lp_ria", w, act, p=p, a=0.25), score("ria", w, act, a=0.25))


def test_lp_ria_p2_differs_from_ria():
    w, act = random_layer(3)
    assert not torch.allclose(score("lp_ria", w, act), score("ria", w, act))


@pytest.mark.parametrize("p", [2.0, 3.0, 50.0, math.inf])
def test_lp_norms_match_float64_even_where_float32_powers_underflow(p):
    w, _ = random_layer(5)
    a = (w * 1e-3).abs()  # (1e-3)^50 underflows float32: a naive sum of powers would give 0
    for dim in (0, 1):
        ref = torch.linalg.vector_norm(a.double(), ord=p, dim=dim)
        torch.testing.assert_close(lp_norms(a, p, dim).double(), ref, rtol=1e-5, atol=0.0)


def test_sym_weight_golden():
    r41 = math.sqrt(41.0)
    expected = t([[3 * (3 + 5), 4 * (r41 + 5)], [0.0, 5 * (r41 + 5)]])
    torch.testing.assert_close(score("sym_weight", W), expected)


def test_stoch_ria_beta1_is_relative_importance():
    w, act = random_layer(1)
    exact = relative_importance(w.abs())
    assert torch.equal(score("stoch_ria", w, beta=1.0), exact)
    assert torch.equal(score("stoch_ria", w, beta=1.0), score("ria", w, act, a=0.0))


@FAST
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.05, 0.1, 0.3, 0.7]))
def test_stoch_ria_exact_on_constant_magnitudes(seed, beta):
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (12, 40), generator=g).float() * 2 - 1
    w = sign * 0.25  # every |W| = 0.25: any sample of k entries times n/k is the exact sum
    torch.testing.assert_close(score("stoch_ria", w, beta=beta, seed=seed), relative_importance(w.abs()))


def test_stoch_ria_seeded():
    w, _ = random_layer(2, 32, 200)
    a = score("stoch_ria", w, seed=7)
    assert torch.equal(a, score("stoch_ria", w, seed=7))
    assert not torch.equal(a, score("stoch_ria", w, seed=8))
    assert not torch.allclose(a, relative_importance(w.abs()))  # beta = 0.1 really samples


def test_sampled_sums_use_k_entries_and_are_unbiased():
    w, _ = random_layer(4, 6, 50)
    a = w.abs()
    # one row of a single huge entry: the estimate is 0 or 50/k times it, never in between
    a[0] = 0.0
    a[0, 17] = 1.0
    draws = []
    for seed in range(400):
        est = sampled_abs_sums(a, 0.2, torch.Generator().manual_seed(seed))  # k = 10 of 50
        assert est[0].item() in (0.0, pytest.approx(5.0))
        draws.append(est)
    mean = torch.stack(draws).mean(dim=0)
    torch.testing.assert_close(mean, a.sum(dim=1), rtol=0.05, atol=0.0)


def test_sample_count():
    assert sample_count(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert sample_count(0.1, 4096) == 410
    assert sample_count(1e-6, 10) == 1
    assert sample_count(1.0, 7) == 7


def test_errors():
    w, act = random_layer(0)
    with pytest.raises(CrepeError, match="p=0.5"):
        score("lp_ria", w, act, p=0.5)
    with pytest.raises(CrepeError, match="needs act_norm"):
        score("lp_ria", w)
    for beta in (0.0, 1.5, -0.1):
        with pytest.raises(CrepeError, match="beta"):
            score("stoch_ria", w, beta=beta)
    with pytest.raises(CrepeError, match="seed"):
        score("stoch_ria", w, seed=1.5)
    with pytest.raises(CrepeError, match="no parameter 'a'"):
        score("stoch_ria", w, a=0.5)


@pytest.mark.parametrize("method", ["lp_ria", "stoch_ria", "sym_weight"])
def test_new_scores_prune_a_tiny_model(method, calib_ids):
    from tiny_models import build

    from crepe.pruner import PruneConfig, prune_model
    from crepe.types import parse_sparsity

    model = build("llama", seed=0)
    report = prune_model(model, calib_ids, PruneConfig(method, parse_sparsity("0.5")), batch_size=4)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)  # exact per-layer counts, verified inside
    report = prune_model(build("llama", seed=0), calib_ids, PruneConfig(method, parse_sparsity("2:4")))
    assert report.nm_valid
