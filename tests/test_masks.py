"""Checks crepe.masks: golden keep-masks for row / layer-exact / layer-threshold / N:M selection,
and hypothesis properties (exact counts, tie-breaking by index, scale invariance, nesting,
agreement with the loop references in tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.masks import (
    measure_sparsity,
    nm_groups_valid,
    select_mask,
    select_nm,
    select_unstructured,
)
from crepe.types import NMPattern

FAST = settings(deadline=None, max_examples=50)

T, F = True, False


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def score_matrices(draw, max_rows=6, max_cols=12, width_multiple=1, tied=None):
    """(out, in) float32 scores; ``tied`` draws small integers (many ties), else floats."""
    rows = draw(st.integers(1, max_rows))
    cols = width_multiple * draw(st.integers(1, max(1, max_cols // width_multiple)))
    if tied is None:
        tied = draw(st.booleans())
    if tied:
        values = st.integers(-2, 3).map(float)
    else:
        values = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    data = draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(data, dtype=torch.float32).reshape(rows, cols)


sparsities = st.floats(0.0, 1.0, exclude_max=True)
patterns = st.sampled_from([NMPattern(1, 4), NMPattern(2, 4), NMPattern(3, 4), NMPattern(4, 8)])


# --- golden cases -------------------------------------------------------------------------------


def test_select_row_golden_1x8():
    s = t([[5, 1, 7, 3, 8, 2, 6, 4]])
    # 50% of 8 = 4 per row: the four lowest are 1, 2, 3, 4 at columns 1, 5, 3, 7
    expected = torch.tensor([[T, F, T, F, T, F, T, F]])
    assert torch.equal(select_mask(s, sparsity=0.5, group="row"), expected)


def test_select_row_golden_2x8_each_row_own_count():
    s = t([[1, 2, 3, 4, 5, 6, 7, 8], [100, 90, 80, 70, 60, 50, 40, 30]])
    # floor(0.25 * 8) = 2 per row: row 0 drops 1, 2 (cols 0, 1); row 1 drops 30, 40 (cols 7, 6)
    # (per layer the 4 lowest would all be in row 0)
    expected = torch.tensor([[F, F, T, T, T, T, T, T], [T, T, T, T, T, T, F, F]])
    assert torch.equal(select_unstructured(s, 0.25, group="row"), expected)


def test_select_row_golden_floor_of_count():
    s = t([[3, 1, 2], [1, 2, 3], [2, 3, 1]])
    # floor(0.6 * 3) = 1 per row: the 1 in each row goes
    expected = torch.tensor([[T, F, T], [F, T, T], [T, T, F]])
    assert torch.equal(select_mask(s, sparsity=0.6, group="row"), expected)


def test_select_row_golden_ties_lower_index_first():
    s = t([[2, 1, 1, 1]])
    # floor(0.5 * 4) = 2 of three tied 1s: columns 1 and 2 go, column 3 stays
    expected = torch.tensor([[T, F, F, T]])
    assert torch.equal(select_mask(s, sparsity=0.5, group="row"), expected)


def test_select_layer_exact_golden_2x8():
    s = t([[1, 2, 3, 4, 5, 6, 7, 8], [100, 90, 80, 70, 60, 50, 40, 30]])
    # floor(0.25 * 16) = 4 lowest of the matrix: 1, 2, 3, 4, all in row 0
    expected = torch.tensor([[F, F, F, F, T, T, T, T], [T, T, T, T, T, T, T, T]])
    assert torch.equal(select_mask(s, sparsity=0.25), expected)  # group defaults to layer


def test_select_layer_exact_golden_3x3_ties_row_major():
    s = t([[1, 0, 1], [1, 0, 1], [1, 1, 1]])
    # floor(0.4 * 9) = 3: both 0s (flat 1, 4) then the first tied 1 in row-major order (flat 0)
    expected = torch.tensor([[F, F, T], [T, F, T], [T, T, T]])
    assert torch.equal(select_mask(s, sparsity=0.4, group="layer", rule="exact"), expected)


def test_select_layer_threshold_golden_1x8_prunes_k_plus_one():
    s = t([[5, 1, 7, 3, 8, 2, 6, 4]])
    # k = floor(0.25 * 8) = 2, tau = sorted[2] = 3: prune <= 3 (1, 2, 3) -> k + 1 = 3 pruned
    expected = torch.tensor([[T, F, T, F, T, F, T, T]])
    assert torch.equal(select_mask(s, sparsity=0.25, rule="threshold"), expected)


def test_select_layer_threshold_golden_ties_all_pruned():
    s = t([[1, 2, 2, 2], [2, 5, 6, 7]])
    # k = floor(0.25 * 8) = 2, tau = sorted[2] = 2: every 2 goes (five pruned); exact would drop 2
    expected = torch.tensor([[F, F, F, F], [F, T, T, T]])
    assert torch.equal(select_mask(s, sparsity=0.25, rule="threshold"), expected)
    exact = torch.tensor([[F, F, T, T], [T, T, T, T]])
    assert torch.equal(select_mask(s, sparsity=0.25, rule="exact"), exact)


def test_select_nm_golden_2_4():
    s = t([[4, 1, 3, 2, 5, 8, 6, 7]])
    # 2:4 -> group (4,1,3,2) drops 1, 2; group (5,8,6,7) drops 5, 6
    expected = torch.tensor([[T, F, T, F, F, T, F, T]])
    assert torch.equal(select_mask(s, pattern=NMPattern(2, 4)), expected)


def test_select_nm_golden_1_4_and_3_4_count_zeros():
    s = t([[4, 1, 3, 2], [1, 2, 3, 4]])
    # 1:4 prunes one (the minimum), 3:4 keeps one (the maximum)
    assert torch.equal(select_nm(s, NMPattern(1, 4)), torch.tensor([[T, F, T, T], [F, T, T, T]]))
    assert torch.equal(select_nm(s, NMPattern(3, 4)), torch.tensor([[T, F, F, F], [F, F, F, T]]))


def test_select_nm_golden_groups_along_input_not_output():
    # (out=4, in=8): scores rise down every column, so groups of 4 taken along the output dimension
    # (dim 0) would drop rows 0 and 1 in every column; along the input, each row drops its two lowest
    # of every 4 consecutive inputs, the same columns in every row
    s = t([[1, 2, 7, 8, 8, 7, 2, 1],
           [3, 4, 9, 10, 10, 9, 4, 3],
           [5, 6, 11, 12, 12, 11, 6, 5],
           [7, 8, 13, 14, 14, 13, 8, 7]])
    row = [F, F, T, T, T, T, F, F]
    assert torch.equal(select_nm(s, NMPattern(2, 4)), torch.tensor([row] * 4))


def test_select_nm_golden_4_8_ties():
    s = t([[0, 0, 0, 0, 0, 0, 0, 0]])
    # 4:8 of all ties: the four lowest indices go
    assert torch.equal(select_nm(s, NMPattern(4, 8)), torch.tensor([[F, F, F, F, T, T, T, T]]))


@pytest.mark.parametrize("rule", ["exact", "threshold"])
@pytest.mark.parametrize("group", ["row", "layer"])
def test_select_unstructured_zero_sparsity_keeps_all(group, rule):
    s = t([[0, 0, 1], [2, 0, 3]])
    mask = select_unstructured(s, 0.0, group=group, rule=rule)
    assert mask.all()


def test_select_unstructured_negative_scores_ordered():
    s = t([[-5, -1, 0, 3]])
    # negative scores are the lowest: floor(0.5 * 4) = 2 -> -5, -1 go
    assert torch.equal(select_mask(s, sparsity=0.5), torch.tensor([[F, F, T, T]]))


# --- errors -------------------------------------------------------------------------------------


def test_select_nm_width_not_divisible_raises_with_width():
    with pytest.raises(CrepeError, match="10"):
        select_nm(torch.rand(2, 10), NMPattern(2, 4))


def test_select_mask_needs_exactly_one_of_sparsity_pattern():
    s = torch.rand(2, 8)
    with pytest.raises(CrepeError):
        select_mask(s)
    with pytest.raises(CrepeError):
        select_mask(s, sparsity=0.5, pattern=NMPattern(2, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "call",
    [
        lambda s: select_mask(s, sparsity=0.5, group="row"),
        lambda s: select_mask(s, sparsity=0.5, group="layer"),
        lambda s: select_mask(s, sparsity=0.5, rule="threshold"),
        lambda s: select_mask(s, pattern=NMPattern(2, 4)),
    ],
)
def test_select_mask_nonfinite_scores_raise(bad, call):
    s = torch.rand(2, 8)
    s[1, 3] = bad
    with pytest.raises(CrepeError):
        call(s)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": 0.5, "group": "column"},
        {"sparsity": 0.5, "rule": "median"},
    ],
)
def test_select_mask_bad_arguments_raise(kwargs):
    with pytest.raises(CrepeError):
        select_mask(torch.rand(3, 8), **kwargs)


@pytest.mark.parametrize("shape", [(8,), (2, 2, 4)])
def test_select_mask_non_2d_scores_raise(shape):
    with pytest.raises(CrepeError):
        select_mask(torch.rand(shape), sparsity=0.5)


# --- properties ---------------------------------------------------------------------------------


@FAST
@given(score_matrices(width_multiple=8), patterns)
def test_select_nm_exact_zero_count_per_group(scores, pattern):
    mask = select_nm(scores, pattern)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups = (~mask).reshape(scores.shape[0], -1, pattern.m).sum(-1)
    assert (groups == pattern.n).all()
    assert nm_groups_valid(scores * mask, pattern) or (scores == 0).any()


@FAST
@given(score_matrices(), sparsities)
def test_select_row_exact_count_per_row(scores, sparsity):
    mask = select_mask(scores, sparsity=sparsity, group="row")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    k = math.floor(sparsity * scores.shape[1])
    assert ((~mask).sum(dim=1) == k).all()


@FAST
@given(score_matrices(), sparsities)
def test_select_layer_exact_count(scores, sparsity):
    mask = select_mask(scores, sparsity=sparsity, group="layer", rule="exact")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int((~mask).sum()) == math.floor(sparsity * scores.numel())


@FAST
@given(score_matrices(), st.floats(0.01, 1.0, exclude_max=True))
def test_select_layer_threshold_prunes_at_least_k_plus_one(scores, sparsity):
    mask = select_mask(scores, sparsity=sparsity, rule="threshold")
    k = math.floor(sparsity * scores.numel())
    pruned = int((~mask).sum())
    assert pruned >= k + 1
    # everything pruned scores no higher than everything kept
    if mask.any():
        assert scores[~mask].max() < scores[mask].min()


@FAST
@given(score_matrices(), sparsities, st.sampled_from(["row", "exact", "threshold"]))
def test_select_unstructured_matches_reference(scores, sparsity, rule):
    if rule == "row":
        got = select_mask(scores, sparsity=sparsity, group="row")
        want = ref.mask_row(scores, sparsity)
    elif rule == "exact":
        got = select_mask(scores, sparsity=sparsity, group="layer")
        want = ref.mask_layer_exact(scores, sparsity)
    else:
        got = select_mask(scores, sparsity=sparsity, rule="threshold")
        want = ref.mask_layer_threshold(scores, sparsity) if sparsity > 0 else torch.ones_like(got)
    assert torch.equal(got, want)


@FAST
@given(score_matrices(width_multiple=8), patterns)
def test_select_nm_matches_reference(scores, pattern):
    got = select_mask(scores, pattern=pattern)
    assert torch.equal(got, ref.mask_nm(scores, pattern.n, pattern.m))


@FAST
@given(
    score_matrices(tied=True),
    sparsities,
    st.floats(1e-3, 1e3),
    st.sampled_from(["row", "exact", "threshold", "nm"]),
)
def test_select_mask_invariant_to_positive_scaling(scores, sparsity, scale, rule):
    # small-integer scores: scaling keeps every order and every tie exactly
    def mask_of(s):
        if rule == "row":
            return select_mask(s, sparsity=sparsity, group="row")
        if rule == "nm":
            return select_mask(s[:, : 4 * (s.shape[1] // 4)], pattern=NMPattern(2, 4))
        return select_mask(s, sparsity=sparsity, rule=rule)

    if rule == "nm" and scores.shape[1] < 4:
        return
    assert torch.equal(mask_of(scores), mask_of(scores * scale))


@FAST
@given(score_matrices(), sparsities, sparsities, st.sampled_from(["row", "exact", "threshold"]))
def test_select_unstructured_higher_sparsity_prunes_superset(scores, s1, s2, rule):
    lo, hi = sorted((s1, s2))
    group = "row" if rule == "row" else "layer"
    rule = "exact" if rule == "row" else rule
    keep_lo = select_mask(scores, sparsity=lo, group=group, rule=rule)
    keep_hi = select_mask(scores, sparsity=hi, group=group, rule=rule)
    # pruned at lo is a subset of pruned at hi
    assert not ((~keep_lo) & keep_hi).any()


@FAST
@given(score_matrices(width_multiple=4))
def test_select_nm_more_zeros_prunes_superset(scores):
    m1, m2, m3 = (select_nm(scores, NMPattern(n, 4)) for n in (1, 2, 3))
    assert not ((~m1) & m2).any()
    assert not ((~m2) & m3).any()


@FAST
@given(score_matrices(width_multiple=4), sparsities)
def test_select_mask_deterministic(scores, sparsity):
    for kwargs in (
        {"sparsity": sparsity, "group": "row"},
        {"sparsity": sparsity, "group": "layer"},
        {"sparsity": sparsity, "rule": "threshold"},
        {"pattern": NMPattern(2, 4)},
    ):
        assert torch.equal(select_mask(scores, **kwargs), select_mask(scores.clone(), **kwargs))


@FAST
@given(score_matrices(tied=False), sparsities)
def test_select_unstructured_keeps_highest_scores(scores, sparsity):
    # every kept score is >= every pruned score (per row for row, whole matrix for layer)
    mask = select_mask(scores, sparsity=sparsity, group="layer")
    if mask.any() and (~mask).any():
        assert scores[mask].min() >= scores[~mask].max()
    rows = select_mask(scores, sparsity=sparsity, group="row")
    for i in range(scores.shape[0]):
        kept, pruned = scores[i][rows[i]], scores[i][~rows[i]]
        if kept.numel() and pruned.numel():
            assert kept.min() >= pruned.max()


def test_select_mask_float64_and_int_scores_accepted():
    s64 = torch.tensor([[3.0, 1.0, 2.0, 4.0]], dtype=torch.float64)
    si = torch.tensor([[3, 1, 2, 4]])
    expected = torch.tensor([[T, F, F, T]])
    assert torch.equal(select_mask(s64, sparsity=0.5), expected)
    assert torch.equal(select_mask(si, pattern=NMPattern(2, 4)), expected)


# --- measurement --------------------------------------------------------------------------------


def test_measure_sparsity_counts_zeros_and_nm_validity():
    w = t([[0, 1, 0, 2, 3, 0, 0, 4], [1, 1, 0, 0, 0, 5, 0, 6]])
    info = measure_sparsity("layer", w, NMPattern(2, 4))
    # zeros: row 0 -> 4, row 1 -> 4; groups (0,1,0,2) (3,0,0,4) (1,1,0,0) (0,5,0,6) all have 2 zeros
    assert info.n_zeros == 8 and info.numel == 16 and info.sparsity == 0.5
    assert info.nm_valid is True
    assert info.shape == (2, 8)
    w[0, 0] = 7  # first group now has one zero
    assert measure_sparsity("layer", w, NMPattern(2, 4)).nm_valid is False
    assert measure_sparsity("layer", w, None).nm_valid is None


def test_nm_groups_valid_width_not_divisible_is_false():
    assert nm_groups_valid(torch.zeros(2, 6), NMPattern(2, 4)) is False
