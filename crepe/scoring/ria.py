"""RIA (Zhang et al. 2024, ICLR): relative importance times ``||X_j||_2 ** a``, compared per layer.

``RI_ij = |W_ij| / c_j + |W_ij| / r_i`` with ``r_i`` the sum of row ``i`` (one output, over its
inputs) and ``c_j`` the sum of column ``j`` (one input, over the outputs); ``a = 0.5``.
"""

from __future__ import annotations

import torch

from crepe.scoring import register_scorer


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 wherever ``den == 0`` (all-zero rows, columns or windows)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def row_term(abs_weight: torch.Tensor) -> torch.Tensor:
    """``A_ij / r_i``: each weight relative to its output row."""
    return safe_ratio(abs_weight, abs_weight.sum(dim=1, keepdim=True))


def column_term(abs_weight: torch.Tensor) -> torch.Tensor:
    """``A_ij / c_j``: each weight relative to its input column."""
    return safe_ratio(abs_weight, abs_weight.sum(dim=0, keepdim=True))


def activation_factor(act_norm: torch.Tensor, a: float) -> torch.Tensor:
    """``||X_j||_2 ** a`` as a (1, in) row; ``a = 0`` gives ones."""
    return act_norm.clamp(min=0).pow(a)[None, :]


@register_scorer("ria", needs_activations=True, default_group="layer", defaults={"a": 0.5})
def score_ria(weight: torch.Tensor, act_norm: torch.Tensor | None, a: float = 0.5) -> torch.Tensor:
    """(|W|/row sum + |W|/column sum) times ||X_j||_2^a."""
    assert act_norm is not None
    abs_w = weight.abs()
    return (row_term(abs_w) + column_term(abs_w)) * activation_factor(act_norm, a)
