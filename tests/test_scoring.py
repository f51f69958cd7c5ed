"""Checks crepe.scoring: hand-computed scores and masks for magnitude, wanda, ria and crepe, CRePE's
reduction to RIA and its scale invariances, the score() API errors and the scorer registry."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.masks import select_mask
from crepe.scoring import SCORERS, get_scorer, register_scorer, resolve_params, score
from crepe.types import NMPattern

FAST = settings(deadline=None, max_examples=50)
T, F = True, False
ACT_METHODS = ["wanda", "ria", "crepe"]
ALL_METHODS = ["magnitude", *ACT_METHODS]


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def random_layer(seed: int, out: int = 64, inp: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen)
    act_norm = torch.rand(inp, generator=gen) * 10 + 0.1
    return weight, act_norm


# --- golden cases -------------------------------------------------------------------------------


def test_magnitude_golden_1x4():
    w = t([[0.5, -3.0, 2.0, -1.0]])
    # |W| = (0.5, 3, 2, 1); floor(0.5 * 4) = 2 lowest are 0.5 and 1
    torch.testing.assert_close(score("magnitude", w), t([[0.5, 3.0, 2.0, 1.0]]))
    assert torch.equal(select_mask(score("magnitude", w), sparsity=0.5), torch.tensor([[F, T, T, F]]))


def test_wanda_golden_1x4_activations_flip_magnitude_order():
    w = t([[1.0, -2.0, 3.0, -4.0]])
    act = t([100.0, 10.0, 1.0, 0.1])
    # wanda = |W| * ||X|| = (100, 20, 3, 0.4): keeps cols 0, 1; magnitude (1, 2, 3, 4) keeps 2, 3
    torch.testing.assert_close(score("wanda", w, act), t([[100.0, 20.0, 3.0, 0.4]]))
    assert torch.equal(
        select_mask(score("wanda", w, act), sparsity=0.5, group="row"), torch.tensor([[T, T, F, F]])
    )
    assert torch.equal(
        select_mask(score("magnitude", w), sparsity=0.5, group="row"), torch.tensor([[F, F, T, T]])
    )


def test_wanda_golden_2x8_nm():
    w = t([[1, 1, 1, 1, 1, 1, 1, 1], [8, 7, 6, 5, 4, 3, 2, 1]])
    act = t([1, 2, 3, 4, 4, 3, 2, 1])
    # row 0 scores = act: 2:4 drops cols 0,1 and 6,7; row 1 = (8,14,18,20,16,9,4,1): drops 0,1 and 6,7
    expected = torch.tensor([[F, F, T, T, T, T, F, F], [F, F, T, T, T, T, F, F]])
    assert torch.equal(select_mask(score("wanda", w, act), pattern=NMPattern(2, 4)), expected)


def test_ria_golden_2x3_row_and_column_sums():
    w = t([[1.0, -2.0, 3.0], [-4.0, 5.0, 6.0]])
    act = t([4.0, 9.0, 16.0])
    # row sums r = (6, 15) over dim 1, column sums c = (5, 7, 9) over dim 0, sqrt(act) = (2, 3, 4)
    expected = t(
        [
            [(1 / 6 + 1 / 5) * 2, (2 / 6 + 2 / 7) * 3, (3 / 6 + 3 / 9) * 4],
            [(4 / 15 + 4 / 5) * 2, (5 / 15 + 5 / 7) * 3, (6 / 15 + 6 / 9) * 4],
        ]
    )
    torch.testing.assert_close(score("ria", w, act), expected)
    # sorted: S00=0.73 < S01=1.86 < S10=2.13 < S11=3.14 < S02=3.33 < S12=4.27; 50% drops 3
    assert torch.equal(select_mask(score("ria", w, act), sparsity=0.5), torch.tensor([[F, F, T], [F, T, T]]))


def test_ria_golden_3x3_not_symmetric():
    w = t([[1.0, 2.0, 0.5], [0.0, 3.0, 1.0], [4.0, 0.25, 2.0]])
    act = t([1.0, 1.0, 1.0])
    # r = (3.5, 4, 6.25), c = (5, 5.25, 3.5); a transposed sum would swap these per element
    expected = t(
        [
            [1 / 3.5 + 1 / 5, 2 / 3.5 + 2 / 5.25, 0.5 / 3.5 + 0.5 / 3.5],
            [0.0, 3 / 4 + 3 / 5.25, 1 / 4 + 1 / 3.5],
            [4 / 6.25 + 4 / 5, 0.25 / 6.25 + 0.25 / 5.25, 2 / 6.25 + 2 / 3.5],
        ]
    )
    torch.testing.assert_close(score("ria", w, act), expected)


def test_crepe_golden_row_term_is_dim1_column_term_is_dim0():
    w = t([[1.0, -2.0, 3.0], [-4.0, 5.0, 6.0]])
    ones = torch.ones(3)
    # row only (alpha=1): A / r with r = (6, 15); column only (beta=1): A / c with c = (5, 7, 9)
    row = score("crepe", w, ones, alpha=1.0, beta=0.0, gamma=0.0)
    col = score("crepe", w, ones, alpha=0.0, beta=1.0, gamma=0.0)
    torch.testing.assert_close(row, t([[1 / 6, 2 / 6, 3 / 6], [4 / 15, 5 / 15, 6 / 15]]))
    torch.testing.assert_close(col, t([[1 / 5, 2 / 7, 3 / 9], [4 / 5, 5 / 7, 6 / 9]]))
    # 1/3 prunes 2: row term drops 1/6 and 4/15 (col 0); column term drops 1/5 and 2/7 (row 0)
    assert torch.equal(select_mask(row, sparsity=1 / 3), torch.tensor([[F, T, T], [F, T, T]]))
    assert torch.equal(select_mask(col, sparsity=1 / 3), torch.tensor([[F, F, T], [T, T, T]]))


@pytest.mark.parametrize("method", ["sat", "separable", "conv"])
def test_crepe_golden_2x3_k3(method):
    w = t([[1.0, -2.0, 3.0], [-4.0, 5.0, 6.0]])
    act = t([1.0, 4.0, 9.0])
    # r = (6, 15), c = (5, 7, 9), K=3 neighbourhood n = ((6, 12, 8), (6, 9, 8)), sqrt(act) = (1, 2, 3)
    # S = (1 * A/r + 0.5 * A/c + 2 * A/n) * sqrt(act)
    expected = t(
        [
            [
                (1 / 6 + 0.5 * 1 / 5 + 2 * 1 / 6) * 1,
                (2 / 6 + 0.5 * 2 / 7 + 2 * 2 / 12) * 2,
                (3 / 6 + 0.5 * 3 / 9 + 2 * 3 / 8) * 3,
            ],
            [
                (4 / 15 + 0.5 * 4 / 5 + 2 * 4 / 6) * 1,
                (5 / 15 + 0.5 * 5 / 7 + 2 * 5 / 9) * 2,
                (6 / 15 + 0.5 * 6 / 9 + 2 * 6 / 8) * 3,
            ],
        ]
    )
    got = score("crepe", w, act, alpha=1.0, beta=0.5, gamma=2.0, kernel_size=3, neighborhood=method)
    torch.testing.assert_close(got, expected)


def test_crepe_golden_neighbourhood_flips_mask():
    w = t([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0]])
    ones = torch.ones(4)
    # r0 = 4, c = (1, 4, 1, 1): RIA row 0 = (1/4 + 1, 1/4 + 1/4, 1/4 + 1, 1/4 + 1) -> col 1 lowest.
    # K=3 windows of row 0 (centre + diagonals below): n = (1+3, 1+0+0, 1+3+0, 1+0) = (4, 1, 4, 1);
    # gamma=2 adds (2/4, 2, 2/4, 2): row 0 = (1.75, 2.5, 1.75, 3.25) -> col 0 lowest (tie with col 2)
    ria_row0 = score("ria", w, ones)[0]
    cre_row0 = score("crepe", w, ones, alpha=1.0, beta=1.0, gamma=2.0, kernel_size=3)[0]
    torch.testing.assert_close(ria_row0, t([1.25, 0.5, 1.25, 1.25]))
    torch.testing.assert_close(cre_row0, t([1.75, 2.5, 1.75, 3.25]))
    assert torch.equal(select_mask(ria_row0[None], sparsity=0.25), torch.tensor([[T, F, T, T]]))
    assert torch.equal(select_mask(cre_row0[None], sparsity=0.25), torch.tensor([[F, T, T, T]]))


def test_ria_golden_exponent_is_half():
    w = t([[1.0, 2.0]])
    act = t([1.44, 1.0])
    # RI = (1/3 + 1, 2/3 + 1) = (4/3, 5/3); ||X||^0.5 = (1.2, 1): S = (1.6, 1.667) -> col 0 goes
    # ||X||^1 would give (1.92, 1.667) and ||X||^2 (2.76, 1.667) -> col 1 would go
    s = score("ria", w, act)
    torch.testing.assert_close(s, t([[1.6, 5 / 3]]))
    assert torch.equal(select_mask(s, sparsity=0.5), torch.tensor([[F, T]]))
    assert torch.equal(select_mask(score("ria", w, act, a=1.0), sparsity=0.5), torch.tensor([[T, F]]))
    assert torch.equal(select_mask(score("ria", w, act, a=2.0), sparsity=0.5), torch.tensor([[T, F]]))
    # crepe inherits a = 0.5
    c = score("crepe", w, act, alpha=1.0, beta=1.0, gamma=0.0)
    torch.testing.assert_close(c, t([[1.6, 5 / 3]]))


def test_ria_golden_act_values():
    w = t([[1.0, 1.0, 1.0]])
    act = t([4.0, 9.0, 16.0])
    # RI = (1/3 + 1) each; times sqrt(act) = (2, 3, 4); a = 1 or 2 would give (4, 9, 16) or (16, 81, 256)
    torch.testing.assert_close(score("ria", w, act), t([[8 / 3, 4.0, 16 / 3]]))


def test_ria_golden_zero_row_and_column_guards():
    w = t([[0.0, 0.0, 0.0], [0.0, 1.0, -2.0], [0.0, 3.0, 0.0]])
    ones = torch.ones(3)
    # row 0 and column 0 are all zero (sum 0 -> term 0); r = (0, 3, 3), c = (0, 4, 2)
    # S11 = 1/3 + 1/4, S12 = 2/3 + 2/2, S21 = 3/3 + 3/4, S22 = 0
    expected = t([[0.0, 0.0, 0.0], [0.0, 7 / 12, 5 / 3], [0.0, 7 / 4, 0.0]])
    torch.testing.assert_close(score("ria", w, ones), expected)
    # crepe K=3: n11 = 1 + 0, n12 = 2 + A01 + A21 = 5, n21 = 3 + A10 + A12 = 5
    crepe_expected = expected + t([[0.0, 0.0, 0.0], [0.0, 1.0, 2 / 5], [0.0, 3 / 5, 0.0]])
    got = score("crepe", w, ones, alpha=1.0, beta=1.0, gamma=1.0, kernel_size=3)
    torch.testing.assert_close(got, crepe_expected)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_score_all_zero_weight_gives_zeros_not_nan(method):
    w = torch.zeros(3, 5)
    got = score(method, w, torch.ones(5)) if method != "magnitude" else score(method, w)
    assert torch.isfinite(got).all()
    assert torch.equal(got, torch.zeros(3, 5))


@pytest.mark.parametrize("method", ["ria", "crepe"])
def test_score_zero_act_norm_is_finite(method):
    w, _ = random_layer(1, 4, 8)
    act = torch.zeros(8)
    act[::2] = 1.0
    got = score(method, w, act)
    assert torch.isfinite(got).all()
    assert (got[:, 1::2] == 0).all() and (got[:, ::2] > 0).all()


# --- CRePE reduction and invariances ------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_crepe_reduces_to_ria_exactly(seed):
    w, act = random_layer(seed)
    ria = score("ria", w, act)
    cre = score("crepe", w, act, alpha=1.0, beta=1.0, gamma=0.0)
    assert torch.equal(cre, ria)
    for kwargs in ({"sparsity": 0.5}, {"sparsity": 0.7, "rule": "threshold"}, {"pattern": NMPattern(2, 4)}):
        assert torch.equal(select_mask(cre, **kwargs), select_mask(ria, **kwargs))


def test_crepe_gamma_changes_mask():
    w, act = random_layer(0)
    ria_mask = select_mask(score("ria", w, act), sparsity=0.5)
    for gamma in (0.01, 0.1):
        cre = score("crepe", w, act, alpha=1.0, beta=1.0, gamma=gamma)
        assert not torch.equal(select_mask(cre, sparsity=0.5), ria_mask)


def test_crepe_matches_reference_on_random_layer():
    w, act = random_layer(2, 16, 24)
    params = {"alpha": 0.7, "beta": 0.3, "gamma": 0.05, "kernel_size": 5}
    got = score("crepe", w, act, **params)
    want = ref.crepe_scores(w, act, 0.7, 0.3, 0.05, 5).to(torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lam", [4.0, 3.0, 0.37])
def test_crepe_invariant_to_coefficient_scale(lam):
    w, act = random_layer(3)
    base = {"alpha": 0.8, "beta": 0.4, "gamma": 0.02}
    scaled = {k: lam * v for k, v in base.items()}
    s1 = score("crepe", w, act, **base)
    s2 = score("crepe", w, act, **scaled)
    torch.testing.assert_close(s2, lam * s1, rtol=1e-6, atol=0.0)
    for kwargs in ({"sparsity": 0.5}, {"sparsity": 0.6, "rule": "threshold"}, {"pattern": NMPattern(2, 4)}):
        assert torch.equal(select_mask(s1, **kwargs), select_mask(s2, **kwargs))


@pytest.mark.parametrize("method", ["ria", "crepe"])
def test_score_act_norm_rescale_scales_scores_by_sqrt(method):
    w, act = random_layer(4)
    s1 = score(method, w, act)
    # sqrt(16 x) = 4 sqrt(x) exactly in floating point
    assert torch.equal(score(method, w, act * 16), 4 * s1)
    s3 = score(method, w, act * 2.5)
    torch.testing.assert_close(s3, 2.5**0.5 * s1, rtol=1e-6, atol=0.0)
    for kwargs in ({"sparsity": 0.5}, {"pattern": NMPattern(2, 4)}):
        assert torch.equal(select_mask(s3, **kwargs), select_mask(s1, **kwargs))


@pytest.mark.parametrize("method", ["ria", "crepe"])
def test_score_relative_importance_invariant_to_weight_scale(method):
    w, act = random_layer(5)
    # RI and the neighbourhood term are ratios of |W|: scaling W by 2^k leaves scores unchanged
    assert torch.equal(score(method, w * 8, act), score(method, w, act))
    torch.testing.assert_close(score(method, w * 3.3, act), score(method, w, act), rtol=1e-5, atol=0.0)


@FAST
@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 2.0),
    st.floats(0.0, 2.0),
    st.floats(0.0, 0.5),
    st.sampled_from([3, 5, 9]),
)
def test_crepe_and_ria_match_reference_random(rows, cols, seed, alpha, beta, gamma, k):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < 0.8)
    act = torch.rand(cols, generator=gen) * 5
    got = score("crepe", w, act, alpha=alpha, beta=beta, gamma=gamma, kernel_size=k)
    want = ref.crepe_scores(w, act, alpha, beta, gamma, k).to(torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        score("ria", w, act), ref.ria_scores(w, act).to(torch.float32), rtol=1e-5, atol=1e-6
    )


@FAST
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_wanda_and_magnitude_match_definition(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    act = torch.rand(cols, generator=gen) * 5
    want = [[abs(float(w[i, j])) * float(act[j]) for j in range(cols)] for i in range(rows)]
    torch.testing.assert_close(score("wanda", w, act), torch.tensor(want), rtol=1e-6, atol=0.0)
    assert torch.equal(score("magnitude", w), w.abs())


# --- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_score_output_is_float32(method, dtype):
    w, act = random_layer(6, 8, 16)
    w16 = w.to(dtype)
    got = score(method, w16, act.to(dtype))
    assert got.dtype == torch.float32 and got.shape == w.shape
    # same as scoring the float32 upcast of the low-precision weight
    want = score(method, w16.float(), act.to(dtype).float())
    torch.testing.assert_close(got, want)


def test_score_does_not_modify_inputs():
    w, act = random_layer(7, 8, 16)
    w0, a0 = w.clone(), act.clone()
    for method in ALL_METHODS:
        score(method, w, act)
    assert torch.equal(w, w0) and torch.equal(act, a0)


# --- API errors ---------------------------------------------------------------------------------


def test_score_unknown_method_lists_known():
    with pytest.raises(CrepeError) as info:
        score("sparsegptx", torch.rand(2, 4))
    message = str(info.value)
    assert "sparsegptx" in message
    for name in ALL_METHODS:
        assert name in message


@pytest.mark.parametrize(
    ("method", "params"),
    [("magnitude", {"a": 0.5}), ("wanda", {"alpha": 1.0}), ("ria", {"gamma": 0.1}), ("crepe", {"K": 9})],
)
def test_score_unknown_parameter_raises(method, params):
    with pytest.raises(CrepeError) as info:
        score(method, torch.rand(2, 4), torch.rand(4), **params)
    assert next(iter(params)) in str(info.value)


@pytest.mark.parametrize("method", ACT_METHODS)
def test_score_missing_act_norm_raises(method):
    with pytest.raises(CrepeError, match="act_norm"):
        score(method, torch.rand(3, 5))


@pytest.mark.parametrize("method", ACT_METHODS)
@pytest.mark.parametrize("shape", [(6,), (4,), (3,), (1, 5), (5, 1)])
def test_score_act_norm_wrong_shape_raises(method, shape):
    with pytest.raises(CrepeError):
        score(method, torch.rand(3, 5), torch.rand(shape))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_score_non_2d_weight_raises(shape):
    with pytest.raises(CrepeError):
        score("magnitude", torch.rand(shape))


@pytest.mark.parametrize("kernel_size", [4, 1, 9.0])
def test_crepe_bad_kernel_size_raises(kernel_size):
    with pytest.raises(CrepeError):
        score("crepe", torch.rand(3, 5), torch.rand(5), kernel_size=kernel_size)


def test_crepe_bad_neighbourhood_method_raises():
    with pytest.raises(CrepeError):
        score("crepe", torch.rand(3, 5), torch.rand(5), gamma=0.1, neighborhood="fft")


def test_crepe_bad_neighbourhood_method_raises_when_gamma_zero():
    # regression: the method name used to be checked only when gamma != 0 (kernel_size always)
    with pytest.raises(CrepeError, match="fft"):
        score("crepe", torch.rand(3, 5), torch.rand(5), gamma=0.0, neighborhood="fft")


# --- registry -----------------------------------------------------------------------------------


def test_registry_builtin_entries():
    assert {"magnitude", "wanda", "ria", "crepe"} <= set(SCORERS)
    assert get_scorer("magnitude").needs_activations is False
    assert all(get_scorer(m).needs_activations for m in ACT_METHODS)
    # comparison groups of spec §18.1: wanda per row, the others per layer
    assert get_scorer("wanda").default_group == "row"
    assert {get_scorer(m).default_group for m in ("magnitude", "ria", "crepe")} == {"layer"}
    assert get_scorer("ria").defaults == {"a": 0.5}
    assert get_scorer("crepe").defaults["a"] == 0.5
    assert get_scorer("crepe").defaults["kernel_size"] == 9


def test_resolve_params_overlays_defaults():
    full = resolve_params("crepe", {"gamma": 0.5})
    assert full["gamma"] == 0.5
    assert full["kernel_size"] == get_scorer("crepe").defaults["kernel_size"]
    assert resolve_params("magnitude", None) == {}


@pytest.fixture
def temp_scorer():
    name = "zz_test_scaled_magnitude"
    assert name not in SCORERS
    yield name
    SCORERS.pop(name, None)


def test_register_scorer_adds_usable_entry(temp_scorer):
    @register_scorer(temp_scorer, needs_activations=False, default_group="row", defaults={"factor": 2.0})
    def scaled(weight, act_norm, factor):
        """|W| times a factor."""
        return weight.abs() * factor

    w = t([[1.0, -2.0]])
    assert torch.equal(score(temp_scorer, w), t([[2.0, 4.0]]))
    assert torch.equal(score(temp_scorer, w, factor=3.0), t([[3.0, 6.0]]))
    entry = get_scorer(temp_scorer)
    assert entry.default_group == "row" and entry.doc == "|W| times a factor."
    with pytest.raises(CrepeError):
        score(temp_scorer, w, scale=3.0)


def test_register_scorer_rejects_duplicate(temp_scorer):
    register_scorer(temp_scorer, needs_activations=False, default_group="layer")(lambda w, a: w.abs())
    with pytest.raises(ValueError):
        register_scorer(temp_scorer, needs_activations=False, default_group="layer")(lambda w, a: w)
    with pytest.raises(ValueError):
        register_scorer("magnitude", needs_activations=False, default_group="layer")(lambda w, a: w)
    # the originals survive
    assert torch.equal(score(temp_scorer, t([[-1.0]])), t([[1.0]]))
    assert torch.equal(score("magnitude", t([[-2.0]])), t([[2.0]]))


@pytest.mark.parametrize("name", ["Magnitude2", "MYSCORE", "has space", "has-dash", "", "1abc"])
def test_register_scorer_rejects_bad_names(name):
    before = dict(SCORERS)
    with pytest.raises(ValueError):
        register_scorer(name, needs_activations=False, default_group="layer")(lambda w, a: w)
    assert SCORERS == before
