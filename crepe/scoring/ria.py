"""RIA (Zhang et al. 2024, ICLR): relative importance times ``||X_j||_2 ** a``, compared per layer.

``RI_ij = |W_ij| / c_j + |W_ij| / r_i`` with ``r_i`` the sum of row ``i`` (one output, over its
inputs) and ``c_j`` the sum of column ``j`` (one input, over the outputs); ``a = 0.5``.
RIA and CRePE share :func:`relative_importance`, so CRePE at alpha = beta = 1, gamma = 0 is RIA
bit for bit.
"""

from __future__ import annotations

import torch

from crepe.scoring import register_scorer


def safe_inverse(den: torch.Tensor) -> torch.Tensor:
    """``1 / den`` with 0 where ``den == 0``: the guard for all-zero rows and columns."""
    return torch.where(den > 0, 1.0 / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def relative_importance(abs_weight: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """``alpha * A_ij / r_i + beta * A_ij / c_j``, computed as ``A_ij * (alpha/r_i + beta/c_j)``.

    One broadcast add and one multiply over the matrix instead of two divisions and an add.
    """
    inv_row = safe_inverse(abs_weight.sum(dim=1)) * alpha  # (out,)
    inv_col = safe_inverse(abs_weight.sum(dim=0)) * beta  # (in,)
    return abs_weight * (inv_row[:, None] + inv_col[None, :])


def activation_factor(act_norm: torch.Tensor, a: float) -> torch.Tensor:
    """``||X_j||_2 ** a`` as a (1, in) row; ``a = 0`` gives ones."""
    return act_norm.clamp(min=0).pow(a)[None, :]


@register_scorer("ria", needs_activations=True, default_group="layer", defaults={"a": 0.5})
def score_ria(weight: torch.Tensor, act_norm: torch.Tensor | None, a: float = 0.5) -> torch.Tensor:
    """(|W|/row sum + |W|/column sum) times ||X_j||_2^a."""
    assert act_norm is not None
    return relative_importance(weight.abs()).mul_(activation_factor(act_norm, a))
