"""Keep-masks from scores (True = keep), with exact counts and deterministic tie-breaking.

- unstructured, ``group="row"``: every output row prunes exactly ``floor(s * in)`` weights (Wanda);
- unstructured, ``group="layer"``: the matrix prunes exactly ``floor(s * out * in)`` weights (RIA,
  magnitude, CRePE). ``rule="threshold"`` instead reproduces the official RIA/magnitude code, which
  prunes every score ``<=`` the element at sorted position ``floor(s * numel)`` (k + 1 plus ties);
- N:M (``pattern``): in every row, each group of M consecutive inputs prunes its N lowest scores.

Ties are broken by position (lower index pruned first), the same order as a stable ascending sort,
so equal inputs always give equal masks. Selection is O(numel) (``kthvalue``), not a full sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crepe.errors import CrepeError
from crepe.types import NMPattern, check_group, check_sparsity

LAYER_RULES = ("exact", "threshold")


def _prune_lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (True = prune) of the ``k`` lowest entries along the last dim, ties by position."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    tau = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < tau
    tie = scores == tau
    need = k - below.sum(dim=-1, keepdim=True)  # how many of the ties to prune, in index order
    return below | (tie & (torch.cumsum(tie.to(torch.int32), dim=-1) <= need))


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 2:
        raise CrepeError(f"scores must be a 2-D (out, in) matrix, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise CrepeError("scores contain NaN or infinite values; check the weights and activations")
    return scores


def select_unstructured(
    scores: torch.Tensor, sparsity: float, group: str = "layer", rule: str = "exact"
) -> torch.Tensor:
    """Keep-mask pruning a fraction ``sparsity`` of ``scores`` per ``group`` ("row" | "layer")."""
    sparsity = check_sparsity(sparsity)
    check_group(group)
    if rule not in LAYER_RULES:
        raise CrepeError(f"unknown selection rule {rule!r}; allowed: {', '.join(LAYER_RULES)}")
    s = _check_scores(scores).to(torch.float32)
    if group == "row":
        k = int(math.floor(sparsity * s.shape[1]))
        return ~_prune_lowest_k(s, k)
    flat = s.reshape(1, -1)
    k = int(math.floor(sparsity * flat.shape[1]))
    if rule == "threshold":
        if sparsity == 0:
            return torch.ones_like(s, dtype=torch.bool)
        # Official RIA/magnitude: tau = sorted[k] (0-based), prune everything <= tau.
        tau = flat.kthvalue(min(k + 1, flat.shape[1]), dim=1).values
        return s > tau
    return ~_prune_lowest_k(flat, k).reshape(s.shape)


def select_nm(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest of every ``m`` consecutive inputs in each row."""
    s = _check_scores(scores).to(torch.float32)
    out_dim, in_dim = s.shape
    if in_dim % pattern.m:
        raise CrepeError(
            f"input width {in_dim} is not divisible by M={pattern.m} of pattern {pattern}; "
            "use a pattern whose M divides the layer's input width"
        )
    groups = s.reshape(out_dim, in_dim // pattern.m, pattern.m)  # (out, in/m, m)
    return ~_prune_lowest_k(groups, pattern.n).reshape(out_dim, in_dim)


def select_mask(
    scores: torch.Tensor,
    sparsity: float | None = None,
    pattern: NMPattern | None = None,
    group: str = "layer",
    rule: str = "exact",
) -> torch.Tensor:
    """Bool keep-mask (True = keep) for ``scores`` (out, in).

    Give exactly one of ``sparsity`` (unstructured fraction in [0, 1), compared within ``group``)
    or ``pattern`` (N zeros per M consecutive inputs of each row; ``group`` is ignored).
    """
    if (sparsity is None) == (pattern is None):
        raise CrepeError("give exactly one of sparsity (e.g. 0.5) or pattern (e.g. 2:4)")
    if pattern is not None:
        return select_nm(scores, pattern)
    assert sparsity is not None
    return select_unstructured(scores, sparsity, group, rule)


# --- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    n_zeros: int
    numel: int
    nm_valid: bool | None  # None for unstructured

    @property
    def sparsity(self) -> float:
        return self.n_zeros / self.numel if self.numel else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "zeros": self.n_zeros,
            "numel": self.numel,
            "sparsity": self.sparsity,
            "nm_valid": self.nm_valid,
        }


def nm_groups_valid(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of M consecutive inputs of every row holds at least N zeros."""
    out_dim, in_dim = weight.shape
    if in_dim % pattern.m:
        return False
    zeros = (weight.reshape(out_dim, in_dim // pattern.m, pattern.m) == 0).sum(dim=-1)
    return bool((zeros >= pattern.n).all())


def measure_sparsity(name: str, weight: torch.Tensor, pattern: NMPattern | None) -> LayerSparsity:
    """Zeros actually present in ``weight`` and, for N:M, whether every group is valid."""
    w = weight.detach()
    n_zeros = int((w == 0).sum())
    valid = nm_groups_valid(w, pattern) if pattern is not None else None
    return LayerSparsity(name, (int(w.shape[0]), int(w.shape[1])), n_zeros, w.numel(), valid)
