"""Symmetric-pruning scores (Yi & Richtárik, arXiv 2501.18980; spec §10, tagged [R/U]).

No official code exists; the formulas are the spec's reading of the paper, in torch orientation
(``W`` is (out, in), row i = output channel, column j = input channel):

- ``lp_ria``: ``S_ij = |W_ij| (1/||W_{:,j}||_p + 1/||W_{i,:}||_p) * ||X_j||_2^a``. With p = 1 it is
  RIA exactly (same code path, bit for bit). Defaults p = 2, a = 0.5 (RIA's exponent).
- ``stoch_ria``: RIA's relative importance with each l1 norm estimated from a random subset of its
  row or column: ``k = ceil(beta * n)`` entries drawn uniformly without replacement, independently
  per row and per column, scaled by ``n / k`` (unbiased). No activation factor, as in the paper's
  definition. Defaults beta = 0.1, seed = 0; a ``torch.Generator`` on the CPU seeded with ``seed``
  draws the subsets (rows first, then columns), so the result does not depend on the device.
  beta = 1 uses the exact sums (equal to ``ri`` = RIA without activations). Every call with the same
  seed draws the same subsets for the same shape; pass a different seed per layer to decorrelate.
- ``sym_weight``: the "symmetric" weight-only score with the weights as pseudo-activations,
  ``S_ij = |W_ij| (||W_{:,j}||_2 + ||W_{i,:}||_2)``.

All three are compared per layer by default, like RIA (the paper builds on RIA's setup).
"""

from __future__ import annotations

import math

import torch

from crepe.errors import CrepeError
from crepe.scoring import register_scorer
from crepe.scoring.ria import activation_factor, relative_importance, safe_inverse


def check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 1:
        raise CrepeError(f"norm order p={p!r} is not allowed; use a number >= 1 (or inf)")
    return float(p)


def lp_norms(abs_weight: torch.Tensor, p: float, dim: int) -> torch.Tensor:
    """``||.||_p`` along ``dim`` of a non-negative matrix, computed as ``max * ||x / max||_p``.

    Scaling by the maximum keeps ``x ** p`` from underflowing in float32 for large p.
    """
    if p == 1:
        return abs_weight.sum(dim=dim)
    peak = abs_weight.amax(dim=dim, keepdim=True)
    unit = abs_weight / torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.linalg.vector_norm(unit, ord=p, dim=dim) * peak.squeeze(dim)


@register_scorer("lp_ria", needs_activations=True, default_group="layer", defaults={"p": 2.0, "a": 0.5})
def score_lp_ria(
    weight: torch.Tensor, act_norm: torch.Tensor | None, p: float = 2.0, a: float = 0.5
) -> torch.Tensor:
    """|W| (1/column l_p norm + 1/row l_p norm) times ||X_j||_2^a; p = 1 is RIA."""
    assert act_norm is not None
    p = check_p(p)
    abs_w = weight.abs()
    if p == 1:
        ri = relative_importance(abs_w)
    else:
        inv_row = safe_inverse(lp_norms(abs_w, p, dim=1))  # (out,)
        inv_col = safe_inverse(lp_norms(abs_w, p, dim=0))  # (in,)
        ri = abs_w * (inv_row[:, None] + inv_col[None, :])
    return ri.mul_(activation_factor(act_norm, a))


def sample_count(beta: float, n: int) -> int:
    """``ceil(beta * n)`` entries (at least 1, at most n); beta is rounded to 9 digits first."""
    return min(n, max(1, math.ceil(round(beta * n, 9))))


def sampled_abs_sums(abs_weight: torch.Tensor, beta: float, generator: torch.Generator) -> torch.Tensor:
    """Unbiased estimate of every row's sum: ``n/k`` times the sum of ``k`` distinct random entries."""
    rows, n = abs_weight.shape
    k = sample_count(beta, n)
    if k == n:
        return abs_weight.sum(dim=1)
    keys = torch.rand(rows, n, generator=generator)  # CPU draw: identical on every device
    idx = torch.topk(keys, k, dim=1).indices.to(abs_weight.device)
    return abs_weight.gather(1, idx).sum(dim=1) * (n / k)


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise CrepeError(f"sampling ratio beta={beta!r} is outside (0, 1]; use e.g. 0.1")
    return float(beta)


@register_scorer(
    "stoch_ria", needs_activations=False, default_group="layer", defaults={"beta": 0.1, "seed": 0}
)
def score_stoch_ria(
    weight: torch.Tensor, act_norm: torch.Tensor | None, beta: float = 0.1, seed: int = 0
) -> torch.Tensor:
    """|W| (1/sampled column sum + 1/sampled row sum): RIA's relative importance, l1 norms estimated."""
    beta = check_beta(beta)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CrepeError(f"seed must be an integer, got {seed!r}")
    abs_w = weight.abs()
    if sample_count(beta, abs_w.shape[0]) == abs_w.shape[0] and sample_count(beta, abs_w.shape[1]) == abs_w.shape[1]:
        return relative_importance(abs_w)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inv_row = safe_inverse(sampled_abs_sums(abs_w, beta, gen))  # (out,)
    inv_col = safe_inverse(sampled_abs_sums(abs_w.t(), beta, gen))  # (in,)
    return abs_w * (inv_row[:, None] + inv_col[None, :])


@register_scorer("sym_weight", needs_activations=False, default_group="layer")
def score_sym_weight(weight: torch.Tensor, act_norm: torch.Tensor | None) -> torch.Tensor:
    """|W| (column l2 norm + row l2 norm): symmetric pruning with the weights as pseudo-activations."""
    abs_w = weight.abs()
    row = lp_norms(abs_w, 2.0, dim=1)  # (out,) ||W_{i,:}||_2
    col = lp_norms(abs_w, 2.0, dim=0)  # (in,)  ||W_{:,j}||_2
    return abs_w * (row[:, None] + col[None, :])
