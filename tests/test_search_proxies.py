"""Checks crepe.search.proxies: Gini golden values and a slow reference, outlier ratios (global and
subset-relative means) and compute_proxies on a hand-written mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.search.proxies import PROXY_NAMES, compute_proxies, gini, outlier_ratio

FAST = settings(deadline=None, max_examples=40)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def gini_reference(values: list[float]) -> float:
    """Mean absolute difference over twice the mean: sum_ij |x_i - x_j| / (2 n^2 mean)."""
    n = len(values)
    total = sum(values)
    if n == 0 or total == 0:
        return 0.0
    diff = sum(abs(a - b) for a in values for b in values)
    return diff / (2 * n * total)


# --- gini ---------------------------------------------------------------------------------------


def test_gini_constant_is_zero():
    assert gini(torch.full((17,), 3.5)) == 0.0


@pytest.mark.parametrize("n", [1, 2, 5, 100])
def test_gini_one_hot_is_max(n):
    x = torch.zeros(n)
    x[n // 2] = 2.0
    assert gini(x) == pytest.approx((n - 1) / n, abs=1e-15)


def test_gini_hand_computed():
    # sorted 1,2,3,4: sum (2k-5) x_k = -3 - 2 + 3 + 12 = 10; n sum = 4 * 10 = 40 -> 0.25
    assert gini(t([4, 1, 3, 2])) == pytest.approx(0.25, abs=1e-15)


def test_gini_empty_and_all_zero_are_zero():
    assert gini(torch.zeros(0)) == 0.0
    assert gini(torch.zeros(3, 4)) == 0.0


def test_gini_rejects_negative_and_nan():
    with pytest.raises(CrepeError, match="nonnegative"):
        gini(t([1.0, -0.5]))
    with pytest.raises(CrepeError, match="NaN"):
        gini(t([1.0, float("nan")]))


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), scale=st.floats(1e-3, 1e3))
def test_gini_matches_reference_and_is_scale_invariant(seed, n, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=gen, dtype=torch.float64) ** 3
    got = gini(x)
    assert got == pytest.approx(gini_reference(x.tolist()), abs=1e-12)
    assert gini(x * scale) == pytest.approx(got, abs=1e-12)
    assert 0.0 <= got <= (n - 1) / n + 1e-12


# --- outliers -----------------------------------------------------------------------------------


def test_outlier_ratio_hand_made():
    # mean = (1*9 + 91) / 10 = 10; 5 * mean = 50: only 91 is above -> 1 / 10
    assert outlier_ratio(t([1] * 9 + [91])) == pytest.approx(0.1)
    # strict inequality: mean = 1, 5 * mean = 5, and 5 is not above 5
    assert outlier_ratio(t([0, 0, 0, 0, 5])) == 0.0
    x = t([0, 0, 0, 0, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 50])
    # mean = 100 / 25 = 4; 5 * mean = 20: both 50s are outliers -> 2 / 25
    assert outlier_ratio(x) == pytest.approx(2 / 25)
    assert outlier_ratio(t([2.0, 2.0])) == 0.0
    assert outlier_ratio(torch.zeros(0)) == 0.0
    # m is configurable: mean 10, 2 * mean = 20 -> only 91
    assert outlier_ratio(t([1] * 9 + [91]), m=2.0) == pytest.approx(0.1)
    assert outlier_ratio(t([1] * 9 + [91]), m=10.0) == 0.0


def test_outlier_pruned_uses_the_subsets_own_mean():
    # retained: ten 100s; pruned: nine 0.01 and one 1.0
    retained = [100.0] * 10
    pruned = [0.01] * 9 + [1.0]
    scores = t([retained, pruned])
    keep = torch.tensor([[True] * 10, [False] * 10])
    proxies = compute_proxies(scores, keep)
    # pruned mean = 1.09 / 10 = 0.109; 5 * mean = 0.545 < 1.0 -> 1 / 10
    assert proxies["outlier_pruned"] == pytest.approx(0.1)
    # the global-mean definition finds nothing: mean ~ 50.05, 5 * mean ~ 250 > every pruned score
    global_threshold = 5.0 * scores.double().mean()
    assert int((scores[~keep].double() > global_threshold).sum()) == 0
    assert proxies["outlier"] == 0.0
    assert proxies["outlier_retained"] == 0.0


# --- compute_proxies ----------------------------------------------------------------------------


def test_compute_proxies_small_matrix():
    scores = t([[1, 2, 3, 4], [0.5, 0.5, 8, 20]])
    keep = torch.tensor([[False, False, True, True], [False, True, False, True]])
    got = compute_proxies(scores, keep)
    assert tuple(got) == tuple(PROXY_NAMES)
    pruned = [1.0, 2.0, 0.5, 8.0]  # row-major order of ~keep
    retained = [3.0, 4.0, 0.5, 20.0]
    assert got["gini_pruned"] == pytest.approx(gini_reference(pruned), abs=1e-12)
    assert got["gini_retained"] == pytest.approx(gini_reference(retained), abs=1e-12)
    # all: mean = 39 / 8 = 4.875, 5 * mean = 24.375 -> none
    assert got["outlier"] == 0.0
    # pruned mean 2.875, 5x = 14.375 -> none; retained mean 6.875, 5x = 34.375 -> none
    assert got["outlier_pruned"] == 0.0 and got["outlier_retained"] == 0.0
    assert all(isinstance(v, float) for v in got.values())


def test_compute_proxies_all_kept_gives_zero_pruned_proxies():
    scores = t([[1, 5, 2]])
    got = compute_proxies(scores, torch.ones(1, 3, dtype=torch.bool))
    assert got["gini_pruned"] == 0.0 and got["outlier_pruned"] == 0.0
    assert got["gini_retained"] == pytest.approx(gini_reference([1.0, 5.0, 2.0]))


def test_compute_proxies_rejects_bad_mask():
    scores = t([[1, 2], [3, 4]])
    with pytest.raises(CrepeError, match="bool mask"):
        compute_proxies(scores, torch.ones(2, 2))
    with pytest.raises(CrepeError, match="bool mask"):
        compute_proxies(scores, torch.ones(1, 2, dtype=torch.bool))
