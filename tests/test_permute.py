"""Checks crepe.permute: hand-computed CP permutations and masks, N:M validity in permuted order,
retained score never below plain N:M, LSA passes monotone and each pass optimal against a
brute-force search over all donor assignments, determinism and input validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.masks import nm_groups_valid, select_mask
from crepe.permute import (
    PERMUTE_METHODS,
    cp_permutation,
    lsa_fast_blocks,
    lsa_refine,
    lsa_step,
    lsa_value_matrix,
    nm_retained,
    nm_valid_permuted,
    permuted_mask,
    retained_score,
)
from crepe.types import NMPattern

FAST = settings(deadline=None, max_examples=40)
P24 = NMPattern(2, 4)
T, F = True, False
PATTERNS = [NMPattern(1, 2), NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 4), NMPattern(4, 8)]


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def ref_retained(scores: torch.Tensor, pattern: NMPattern, perm: list[int]) -> float:
    """Loop reference: per row, per group of M permuted positions, the sum of the M-N largest."""
    keep = pattern.m - pattern.n
    total = 0.0
    for row in scores.tolist():
        for start in range(0, len(perm), pattern.m):
            vals = sorted((row[c] for c in perm[start : start + pattern.m]), reverse=True)
            total += sum(vals[:keep])
    return total


def exact_nm_in_permuted_order(keep: torch.Tensor, pattern: NMPattern, perm: list[int]) -> bool:
    """Every group of M permuted positions of every row prunes exactly N."""
    view = keep[:, torch.tensor(perm)]
    pruned = (~view).reshape(keep.shape[0], -1, pattern.m).sum(dim=-1)
    return bool((pruned == pattern.n).all())


def random_scores(seed: int, out: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(out, width, generator=g) * torch.rand(1, width, generator=g) * 10


# --- golden cases --------------------------------------------------------------------------------


def test_cp_golden_1x8_reaches_the_optimum_and_is_not_nm_in_original_order():
    s = t([[1, 2, 3, 4, 5, 6, 7, 8]])
    # sigma = 0..7; G = 2 chunks of each quantile: c0=[0,1] c1=[2,3] c2=[4,5] c3=[6,7]
    # group 0 = c0[0], c1[1], c2[0], c3[1] = 0,3,4,7; group 1 = c0[1], c1[0], c2[1], c3[0] = 1,2,5,6
    assert cp_permutation(s, P24).tolist() == [0, 3, 4, 7, 1, 2, 5, 6]
    keep, info = permuted_mask(s, P24, "cp")
    # groups (1,4,5,8) and (2,3,6,7) keep 5,8 and 6,7: the top four channels 4..7
    assert torch.equal(keep, torch.tensor([[F, F, F, F, T, T, T, T]]))
    assert info["retained_before"] == 22.0  # identity keeps 3+4 and 7+8
    assert info["retained_after"] == 26.0 and info["gain"] == 4.0
    assert info["relative_gain"] == pytest.approx(4 / 22)
    assert info["permutation"] == [0, 3, 4, 7, 1, 2, 5, 6]
    assert not nm_groups_valid(keep.float(), P24)  # not N:M in the original order ...
    assert nm_valid_permuted(keep, P24, info["permutation"])  # ... but N:M after the permutation
    assert nm_valid_permuted(keep.float() * s, P24, info["permutation"])  # as a pruned weight too


def test_cp_golden_ties_in_channel_importance_keep_index_order():
    s = t([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
    # every column sums to 9: the stable sort keeps 0..7, so the snake is the one above
    keep, info = permuted_mask(s, P24, "cp")
    assert info["permutation"] == [0, 3, 4, 7, 1, 2, 5, 6]
    # row 1 through the permutation: (8,5,4,1) keeps 8,5; (7,6,3,2) keeps 7,6 -> channels 0,1,2,3
    assert torch.equal(keep, torch.tensor([[F, F, F, F, T, T, T, T], [T, T, T, T, F, F, F, F]]))
    assert info["retained_before"] == 44.0 and info["retained_after"] == 52.0


def test_cp_golden_fallback_keeps_identity_when_cp_retains_less():
    s = t([[3, 9, 3, 1, 7, 2, 1, 8], [8, 6, 9, 4, 3, 1, 6, 0]])
    # column sums (11,15,12,5,10,3,7,8) -> sigma = 5,3,6,7,4,0,2,1 -> perm 5,7,4,1 | 3,6,0,2
    assert cp_permutation(s, P24).tolist() == [5, 7, 4, 1, 3, 6, 0, 2]
    # identity: 12 + 15 + 17 + 9 = 53; CP: 17 + 6 + 9 + 17 = 49
    keep_off, off = permuted_mask(s, P24, "cp", fallback=False)  # official: always use CP
    assert off["retained_before"] == 53.0 and off["retained_after"] == 49.0 and off["gain"] == -4.0
    assert not off["fallback_used"]
    keep_on, on = permuted_mask(s, P24, "cp")  # default: keep the identity
    assert on["fallback_used"] and on["retained_after"] == 53.0 and on["gain"] == 0.0
    assert on["permutation"] == list(range(8)) and on["retained_cp"] == 49.0
    assert torch.equal(keep_on, select_mask(s, pattern=P24))
    assert retained_score(s, keep_off) == 49.0


def test_lsa_value_matrix_golden_1x8():
    s = t([[1, 2, 3, 4, 5, 6, 7, 8]])
    # slot 0: group 0 keeps (2,3,4) and takes x; group 1 keeps (6,7,8) and takes x. K = 2.
    # V[0, g] = top2({2,3,4,x}) = 4 + max(x, 3): x = 1 -> 7, x = 5 -> 9
    # V[1, g] = top2({6,7,8,x}) = 8 + max(x, 7): x = 1 -> 15, x = 5 -> 15
    v = lsa_value_matrix(s, P24, 0)
    assert v.tolist() == [[7.0, 9.0], [15.0, 15.0]]


# --- LSA against brute force -----------------------------------------------------------------


def brute_force_slot(scores, pattern, perm, slot, blocks):
    """Best retained score over every donor assignment of ``slot`` within each slice (loops)."""
    m = pattern.m
    groups = len(perm) // m
    per = groups // blocks
    best_perm = list(perm)
    for b in range(blocks):
        base = list(best_perm)
        best = None
        for donors in itertools.permutations(range(per)):
            cand = list(base)
            for r, g in enumerate(donors):
                cand[(b * per + r) * m + slot] = perm[(b * per + g) * m + slot]
            value = ref_retained(scores, pattern, cand)
            if best is None or value > best[0]:
                best = (value, cand)
        best_perm = best[1]
    return ref_retained(scores, pattern, best_perm)


@pytest.mark.parametrize(
    "seed,pattern,groups,blocks",
    [(0, P24, 4, 1), (1, P24, 5, 1), (2, NMPattern(1, 4), 4, 1), (3, NMPattern(3, 4), 4, 2), (4, NMPattern(1, 2), 6, 3)],
)
def test_lsa_step_is_optimal_per_slot(seed, pattern, groups, blocks):
    width = groups * pattern.m
    s = random_scores(seed, 3, width)
    g = torch.Generator().manual_seed(seed + 100)
    perm = torch.randperm(width, generator=g)
    for slot in range(pattern.m):
        new = lsa_step(s, pattern, perm, slot, blocks)
        # only slot `slot` changes, and only by a permutation within each slice
        assert sorted(new.tolist()) == list(range(width))
        other = [k for k in range(width) if k % pattern.m != slot]
        assert new[other].tolist() == perm[other].tolist()
        got = ref_retained(s, pattern, new.tolist())
        best = brute_force_slot(s, pattern, perm.tolist(), slot, blocks)
        assert got == pytest.approx(best, rel=1e-6)  # V's row sums are float32 per chunk


def test_lsa_refine_passes_are_monotone_and_start_from_cp():
    s = random_scores(7, 16, 64)
    perm = cp_permutation(s, P24)
    start = nm_retained(s, P24, perm)
    final, totals = lsa_refine(s, P24, perm)
    assert len(totals) == 4
    assert all(b >= a for a, b in zip([start, *totals], totals))
    assert totals[-1] == pytest.approx(ref_retained(s, P24, final.tolist()), rel=1e-12)
    assert totals[-1] > start  # random scores: LSA finds something


def test_identical_channels_nothing_to_gain():
    col = torch.tensor([[3.0], [1.0], [2.0]])
    s = col.expand(3, 16).contiguous()
    for method in PERMUTE_METHODS:
        keep, info = permuted_mask(s, P24, method)
        # every row is constant: 4 groups x 2 kept x (3 + 1 + 2) = 48 whatever the order
        assert info["retained_after"] == info["retained_before"] == 48.0
        assert all(v == info["retained_before"] for v in info["lsa_passes"])
        assert exact_nm_in_permuted_order(keep, P24, info["permutation"])


# --- properties -----------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    out=st.integers(1, 6),
    groups=st.integers(1, 6),
    pattern=st.sampled_from(PATTERNS),
    method=st.sampled_from(PERMUTE_METHODS),
    ties=st.booleans(),
)
def test_permuted_masks_are_nm_and_never_retain_less(seed, out, groups, pattern, method, ties):
    s = random_scores(seed, out, groups * pattern.m)
    if ties:
        s = (s * 2).round()  # many equal scores
    keep, info = permuted_mask(s, pattern, method)
    perm = info["permutation"]
    assert sorted(perm) == list(range(s.shape[1]))
    assert keep.dtype == torch.bool and keep.shape == s.shape
    assert exact_nm_in_permuted_order(keep, pattern, perm)
    assert int((~keep).sum()) == out * groups * pattern.n
    assert info["retained_after"] >= info["retained_before"]
    assert info["retained_after"] == pytest.approx(retained_score(s, keep), rel=1e-12, abs=1e-9)
    assert info["retained_after"] == pytest.approx(ref_retained(s, pattern, perm), rel=1e-9, abs=1e-6)
    assert info["retained_before"] == pytest.approx(
        ref_retained(s, pattern, list(range(s.shape[1]))), rel=1e-9, abs=1e-6
    )
    if method == "lsa":
        chain = [info["retained_cp"], *info["lsa_passes"]]
        assert all(b >= a for a, b in zip(chain, chain[1:]))


@FAST
@given(seed=st.integers(0, 10_000), method=st.sampled_from(PERMUTE_METHODS))
def test_permutation_is_deterministic(seed, method):
    s = random_scores(seed, 8, 32)
    keep1, info1 = permuted_mask(s, P24, method)
    keep2, info2 = permuted_mask(s.clone(), P24, method)
    assert torch.equal(keep1, keep2) and info1 == info2


@pytest.mark.parametrize("importance", ["retained_degree_unstructured", "retained_degree_per_outneuron"])
def test_retained_degree_importance_variants(importance):
    s = random_scores(11, 8, 32)
    keep, info = permuted_mask(s, P24, "cp", importance=importance)
    assert info["importance"] == importance
    assert exact_nm_in_permuted_order(keep, P24, info["permutation"])
    assert info["retained_after"] >= info["retained_before"]


def test_fast_blocks_match_the_official_table():
    assert lsa_fast_blocks("model.layers.0.self_attn.q_proj") == 4
    assert lsa_fast_blocks("self_attn.o_proj") == 4
    assert lsa_fast_blocks("mlp.gate_proj") == 8 and lsa_fast_blocks("mlp.up_proj") == 8
    assert lsa_fast_blocks("mlp.down_proj") == 16


def test_lsa_with_blocks_stays_valid():
    s = random_scores(5, 8, 64)  # 16 groups
    keep, info = permuted_mask(s, P24, "lsa", blocks=4)
    assert info["blocks"] == 4
    assert exact_nm_in_permuted_order(keep, P24, info["permutation"])
    assert info["retained_after"] >= info["retained_cp"]


# --- errors ---------------------------------------------------------------------------------------


def test_errors():
    s = random_scores(0, 4, 16)
    with pytest.raises(CrepeError, match="unknown channel permutation"):
        permuted_mask(s, P24, "greedy")
    with pytest.raises(CrepeError, match="no option 'blocks'"):
        permuted_mask(s, P24, "cp", blocks=2)
    with pytest.raises(CrepeError, match="not divisible by M=4"):
        permuted_mask(random_scores(0, 4, 10), P24)
    with pytest.raises(CrepeError, match="does not divide"):
        permuted_mask(s, P24, "lsa", blocks=3)
    with pytest.raises(CrepeError, match="positive integer"):
        permuted_mask(s, P24, "lsa", blocks=0)
    with pytest.raises(CrepeError, match="unknown channel importance"):
        permuted_mask(s, P24, "cp", importance="max")
    with pytest.raises(CrepeError, match="N:M pattern"):
        permuted_mask(s, 0.5, "cp")  # type: ignore[arg-type]
    with pytest.raises(CrepeError, match="NaN"):
        permuted_mask(torch.full((2, 8), float("nan")), P24)
    with pytest.raises(CrepeError, match="not a permutation"):
        nm_valid_permuted(torch.ones(2, 8, dtype=torch.bool), P24, [0, 0, 1, 2, 3, 4, 5, 6])
