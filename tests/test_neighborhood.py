"""Checks crepe.neighborhood: the cross-excluding K x K window sum (centre kept, zero padding) from the
"sat", "separable" and "conv" methods against a pure-loop reference, the kernel, and input errors."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.neighborhood import NEIGHBORHOOD_METHODS, neighborhood_kernel, neighborhood_sum

FAST = settings(deadline=None, max_examples=50)
KERNELS = [3, 5, 7, 9, 11]
SHAPES = [(13, 13), (13, 17), (17, 13), (3, 2), (1, 7), (2, 1), (1, 1), (4, 11)]


def assert_close_rel_max(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """|got - want| <= rel * max|want| elementwise (the tolerance of spec §19)."""
    want = want.to(torch.float64)
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got.to(torch.float64) - want).abs().max())
    assert err <= rel * scale, f"max error {err} > {rel} * {scale}"


# --- golden cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", NEIGHBORHOOD_METHODS)
def test_neighborhood_sum_golden_2x3_k3(method):
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # K=3 keeps the centre and the diagonal neighbours only:
    # n00 = 1+5, n01 = 2+4+6, n02 = 3+5, n10 = 4+2, n11 = 5+1+3, n12 = 6+2
    expected = torch.tensor([[6.0, 12.0, 8.0], [6.0, 9.0, 8.0]])
    torch.testing.assert_close(neighborhood_sum(a, 3, method), expected)


@pytest.mark.parametrize("method", NEIGHBORHOOD_METHODS)
def test_neighborhood_sum_golden_excludes_cross_keeps_centre(method):
    a = torch.zeros(5, 5)
    a[2, :] = 10.0  # centre row
    a[:, 2] = 10.0  # centre column
    a[2, 2] = 1.0  # centre
    a[0, 0] = 100.0  # corner, off the cross
    # at (2, 2) with K=5: centre 1 + corner 100; the 8 other cross cells (10 each) are excluded
    assert float(neighborhood_sum(a, 5, method)[2, 2]) == pytest.approx(101.0)
    # with K=3 the corner is outside the window: only the centre
    assert float(neighborhood_sum(a, 3, method)[2, 2]) == pytest.approx(1.0)


@pytest.mark.parametrize("method", NEIGHBORHOOD_METHODS)
@pytest.mark.parametrize(("k", "count"), [(3, 5), (5, 17), (7, 37), (9, 65), (11, 101)])
def test_neighborhood_sum_all_ones_interior_count(method, k, count):
    n = neighborhood_sum(torch.ones(30, 30), k, method)
    r = k // 2
    # interior: (K-1)^2 + 1 cells
    assert float(n[15, 15]) == pytest.approx(count)
    assert torch.allclose(n[r:-r, r:-r], torch.full_like(n[r:-r, r:-r], float(count)))
    # zero padding: corner sees r*r off-cross cells + centre, edge midpoint r*2r + centre
    assert float(n[0, 0]) == pytest.approx(r * r + 1)
    assert float(n[0, 15]) == pytest.approx(2 * r * r + 1)
    assert float(n[15, 29]) == pytest.approx(2 * r * r + 1)
    assert float(n.max()) == pytest.approx(count)
    assert float(n[0].max()) < count and float(n[:, -1].max()) < count


# --- agreement between methods and with the loop reference ------------------------------------


@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_neighborhood_sum_methods_match_loop_reference(shape, k):
    gen = torch.Generator().manual_seed(hash((shape, k)) % 2**31)
    a = torch.rand(shape, generator=gen)
    want = ref.neighborhood_sum_loop(a, k)
    conv = neighborhood_sum(a, k, "conv")
    assert_close_rel_max(conv, want)
    for method in ("sat", "separable"):
        got = neighborhood_sum(a, k, method)
        assert got.dtype == torch.float32 and got.shape == a.shape
        assert_close_rel_max(got, conv)
        assert_close_rel_max(got, want)


@pytest.mark.parametrize(("shape", "k"), [((3, 2), 9), ((1, 7), 9), ((2, 3), 11), ((5, 1), 3)])
def test_neighborhood_sum_kernel_larger_than_matrix(shape, k):
    a = torch.arange(1, shape[0] * shape[1] + 1, dtype=torch.float32).reshape(shape)
    want = ref.neighborhood_sum_loop(a, k)
    for method in NEIGHBORHOOD_METHODS:
        assert_close_rel_max(neighborhood_sum(a, k, method), want)


def test_neighborhood_sum_single_row_is_itself():
    # one row: every off-cross cell lies in another row, so n = A
    a = torch.tensor([[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]])
    for method in NEIGHBORHOOD_METHODS:
        torch.testing.assert_close(neighborhood_sum(a, 9, method), a)


@FAST
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.sampled_from(KERNELS),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_neighborhood_sum_random_shapes_match_reference(rows, cols, k, seed, sparse):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(rows, cols, generator=gen) * 10
    if sparse:  # many zero weights, as after pruning
        a = a * (torch.rand(rows, cols, generator=gen) < 0.3)
    want = ref.neighborhood_sum_loop(a, k)
    for method in NEIGHBORHOOD_METHODS:
        got = neighborhood_sum(a, k, method)
        assert_close_rel_max(got, want)
        # the centre counts: n >= A (up to rounding), and all-zero windows give exactly 0
        assert (got >= a - 1e-5 * float(a.max() + 1)).all()


def test_neighborhood_sum_long_rows_keep_precision():
    # 8 x 131072 float32: a float32 prefix sum along the rows loses ~1e-4 relative here
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(8, 2**17, generator=gen)
    conv = neighborhood_sum(a, 9, "conv")
    for method in ("sat", "separable"):
        assert_close_rel_max(neighborhood_sum(a, 9, method), conv, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", NEIGHBORHOOD_METHODS)
def test_neighborhood_sum_returns_float32(dtype, method):
    a = torch.rand(6, 10).to(dtype)
    got = neighborhood_sum(a, 5, method)
    assert got.dtype == torch.float32
    assert_close_rel_max(got, ref.neighborhood_sum_loop(a, 5))


def test_neighborhood_sum_default_is_k9_sat():
    a = torch.rand(12, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(neighborhood_sum(a), neighborhood_sum(a, 9, "sat"))


# --- kernel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KERNELS)
def test_neighborhood_kernel_counts_and_centre(k):
    kernel = neighborhood_kernel(k)
    r = k // 2
    assert kernel.shape == (k, k) and kernel.dtype == torch.float32
    assert set(kernel.unique().tolist()) == {0.0, 1.0}
    assert int(kernel.sum()) == (k - 1) ** 2 + 1
    assert kernel[r, r] == 1
    # the rest of the centre row and column is zero
    assert kernel[r].sum() == 1 and kernel[:, r].sum() == 1
    # symmetric under flips, so correlation equals convolution
    assert torch.equal(kernel, kernel.flip(0)) and torch.equal(kernel, kernel.flip(1))


def test_neighborhood_kernel_golden_k3():
    # K=3: the four diagonal cells plus the centre
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(neighborhood_kernel(3), expected)


def test_neighborhood_kernel_dtype():
    assert neighborhood_kernel(5, torch.float64).dtype == torch.float64


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 10, 1, 0, -3, 3.0, "3", True, None])
def test_neighborhood_bad_kernel_size_raises(k):
    with pytest.raises(CrepeError):
        neighborhood_kernel(k)
    with pytest.raises(CrepeError):
        neighborhood_sum(torch.rand(4, 4), k)


def test_neighborhood_unknown_method_raises_listing_methods():
    with pytest.raises(CrepeError) as info:
        neighborhood_sum(torch.rand(4, 4), 3, "fft")
    assert "fft" in str(info.value)
    for method in NEIGHBORHOOD_METHODS:
        assert method in str(info.value)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_neighborhood_sum_non_2d_raises(shape):
    with pytest.raises(CrepeError):
        neighborhood_sum(torch.rand(shape), 3)
