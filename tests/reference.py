"""Slow, obviously-correct pure-Python reference implementations used as test oracles.

Everything here works on nested Python lists and loops; torch appears only at the boundary.
"""

from __future__ import annotations

import math

import torch


def to_rows(t: torch.Tensor) -> list[list[float]]:
    """A 2-D tensor as a list of rows of Python floats (float32 values, exactly)."""
    return [[float(v) for v in row] for row in t.detach().to(torch.float32).tolist()]


def _prune_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the ``k`` lowest values; ties go to the lower index (stable ascending sort)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return set(order[:k])


def mask_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly ``floor(s * in)`` lowest scores in every row."""
    rows = to_rows(scores)
    out = []
    for row in rows:
        k = int(math.floor(sparsity * len(row)))
        pruned = _prune_lowest(row, k)
        out.append([j not in pruned for j in range(len(row))])
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


def mask_layer_exact(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly ``floor(s * numel)`` lowest scores of the whole matrix."""
    rows = to_rows(scores)
    width = scores.shape[1]
    flat = [v for row in rows for v in row]
    k = int(math.floor(sparsity * len(flat)))
    pruned = _prune_lowest(flat, k)
    keep = [i not in pruned for i in range(len(flat))]
    return torch.tensor(keep, dtype=torch.bool).reshape(len(rows), width)


def mask_layer_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Official RIA/magnitude rule: prune every score ``<=`` sorted[floor(s * numel)] (0-based)."""
    rows = to_rows(scores)
    flat = sorted(v for row in rows for v in row)
    tau = flat[int(math.floor(sparsity * len(flat)))]
    return torch.tensor([[v > tau for v in row] for row in rows], dtype=torch.bool)


def mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest of every ``m`` consecutive entries of each row."""
    rows = to_rows(scores)
    out = []
    for row in rows:
        keep_row = []
        for start in range(0, len(row), m):
            group = row[start : start + m]
            pruned = _prune_lowest(group, n)
            keep_row.extend(j not in pruned for j in range(len(group)))
        out.append(keep_row)
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


def neighborhood_sum_loop(a: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """n[i][j] = A[i][j] + sum of A[p][q] with |p-i|, |q-j| <= r, p != i and q != j (zero outside)."""
    rows = [[float(v) for v in row] for row in a.detach().to(torch.float64).tolist()]
    h, w = len(rows), len(rows[0])
    r = kernel_size // 2
    out = [[0.0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            total = rows[i][j]
            for p in range(i - r, i + r + 1):
                for q in range(j - r, j + r + 1):
                    if p == i or q == j:
                        continue
                    if 0 <= p < h and 0 <= q < w:
                        total += rows[p][q]
            out[i][j] = total
    return torch.tensor(out, dtype=torch.float64)


def ria_scores(weight: torch.Tensor, act_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """(|W_ij| / r_i + |W_ij| / c_j) * act_j ** a, with a zero term where the sum is zero."""
    return crepe_scores(weight, act_norm, 1.0, 1.0, 0.0, 3, a)


def crepe_scores(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    kernel_size: int,
    a: float = 0.5,
) -> torch.Tensor:
    """(alpha A/r + beta A/c + gamma A/n) * act ** a in float64 loops (0 where a sum is 0)."""
    abs_w = [[abs(v) for v in row] for row in weight.detach().to(torch.float64).tolist()]
    act = [float(v) for v in act_norm.detach().to(torch.float64).tolist()]
    h, w = len(abs_w), len(abs_w[0])
    row_sum = [sum(abs_w[i]) for i in range(h)]
    col_sum = [sum(abs_w[i][j] for i in range(h)) for j in range(w)]
    nbr = neighborhood_sum_loop(torch.tensor(abs_w, dtype=torch.float64), kernel_size).tolist()

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    out = [[0.0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            x = abs_w[i][j]
            cri = alpha * ratio(x, row_sum[i]) + beta * ratio(x, col_sum[j])
            if gamma:
                cri += gamma * ratio(x, nbr[i][j])
            out[i][j] = cri * max(act[j], 0.0) ** a
    return torch.tensor(out, dtype=torch.float64)
