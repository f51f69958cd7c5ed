"""Magnitude pruning: ``S = |W|``, compared per layer (as in the Wanda, RIA and SparseGPT repos)."""

from __future__ import annotations

import torch

from crepe.scoring import register_scorer


@register_scorer("magnitude", needs_activations=False, default_group="layer")
def score_magnitude(weight: torch.Tensor, act_norm: torch.Tensor | None) -> torch.Tensor:
    """|W|."""
    return weight.abs()
