"""CRePE's 2D neighbourhood sum: a K x K window without the weight's own row and column, centre kept.

``n[i, j] = sum of A[p, q]`` over ``|p - i| <= r, |q - j| <= r`` with ``p != i and q != j``, plus
``A[i, j]`` itself (``r = (K - 1) / 2``), zero-padded at the borders, so an interior window holds
``(K - 1)**2 + 1`` weights. This is the paper's Eq. (2) as reconstructed in spec §7 [R].

Three implementations:

- ``"sat"`` (default): summed-area tables in float64, O(1) work per element and time independent of
  K. With ``u`` the 1 x K row segment minus the centre, ``n = colsum_K(u) - u + A`` (equivalently
  ``Box - Row - Col + 2A``). Prefix sums run along one axis at a time
  in float64, so long rows of float32 values lose no digits.
- ``"separable"``: the same identity with the window sums from two 1-D box filters in float32,
  O(K) work per element.
- ``"conv"``: the masked ``conv2d`` form, kept as the reference (O(K^2) per element).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crepe.errors import CrepeError

NEIGHBORHOOD_METHODS = ("sat", "separable", "conv")


def check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise CrepeError(f"kernel_size {kernel_size!r} is not an integer; use an odd integer >= 3")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise CrepeError(f"kernel_size {kernel_size} is invalid; use an odd integer >= 3 (e.g. 9)")
    return kernel_size


def neighborhood_kernel(kernel_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The K x K 0/1 kernel: ones off the centre row and column, plus the centre."""
    k = check_kernel_size(kernel_size)
    r = k // 2
    kernel = torch.ones(k, k, dtype=dtype)
    kernel[r, :] = 0
    kernel[:, r] = 0
    kernel[r, r] = 1
    return kernel


def _window_sums_1d(x: torch.Tensor, kernel_size: int, dim: int) -> torch.Tensor:
    """Sum of ``x`` over a centred, zero-padded window of ``kernel_size`` along ``dim`` (prefix sums)."""
    r = kernel_size // 2
    pad = [0, 0, 0, 0]
    # F.pad counts from the last dim: (left, right) of dim 1, then (top, bottom) of dim 0.
    pad[(1 - dim) * 2 : (1 - dim) * 2 + 2] = [r + 1, r]
    csum = torch.cumsum(F.pad(x, pad), dim=dim)  # csum[k] = sum of padded x[: k + 1]
    n = x.shape[dim]
    return csum.narrow(dim, kernel_size, n) - csum.narrow(dim, 0, n)


def _neighborhood_sat(a: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # With u = (1 x K row segment) - centre, the window is W_col(u) - u + centre: the K x 1 column
    # sums of u cover the K x K box minus the centre column, and subtracting u drops the centre row.
    a64 = a.to(torch.float64)
    u = _window_sums_1d(a64, kernel_size, dim=1)
    u.sub_(a64)
    n = _window_sums_1d(u, kernel_size, dim=0)
    n.sub_(u).add_(a64)
    return n.to(torch.float32)


def _box_1d(x: torch.Tensor, kernel_size: int, dim: int) -> torch.Tensor:
    r = kernel_size // 2
    if dim == 1:
        out = F.avg_pool1d(x[:, None, :], kernel_size, stride=1, padding=r, count_include_pad=True)
        return out[:, 0, :] * kernel_size
    return _box_1d(x.t(), kernel_size, 1).t()


def _neighborhood_separable(a: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # avg_pool1d caps padding at half the kernel, which always holds here (padding = K // 2).
    a32 = a.to(torch.float32)
    row = _box_1d(a32, kernel_size, 1)
    col = _box_1d(a32, kernel_size, 0)
    box = _box_1d(row, kernel_size, 0)
    return box - row - col + 2 * a32


def _neighborhood_conv(a: torch.Tensor, kernel_size: int) -> torch.Tensor:
    kernel = neighborhood_kernel(kernel_size, a.dtype).to(a.device)
    r = kernel_size // 2
    return F.conv2d(a[None, None], kernel[None, None], padding=r)[0, 0]


def neighborhood_sum(
    abs_weight: torch.Tensor, kernel_size: int = 9, method: str = "sat"
) -> torch.Tensor:
    """Cross-excluding K x K neighbourhood sum of ``abs_weight`` (out, in); float32, same shape.

    ``method`` is ``"sat"`` (O(1) per element, default), ``"separable"`` or ``"conv"`` (reference).
    """
    check_kernel_size(kernel_size)
    if abs_weight.dim() != 2:
        raise CrepeError(f"neighborhood_sum needs a 2-D matrix, got shape {tuple(abs_weight.shape)}")
    if method == "sat":
        return _neighborhood_sat(abs_weight, kernel_size)
    if method == "separable":
        return _neighborhood_separable(abs_weight, kernel_size)
    if method == "conv":
        return _neighborhood_conv(abs_weight.to(torch.float32), kernel_size)
    raise CrepeError(
        f"unknown neighbourhood method {method!r}; allowed: {', '.join(NEIGHBORHOOD_METHODS)}"
    )
