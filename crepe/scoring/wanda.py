"""Wanda (Sun et al. 2023, arXiv 2306.11695): ``S = |W_ij| * ||X_j||_2``, compared per output row."""

from __future__ import annotations

import torch

from crepe.scoring import register_scorer


@register_scorer("wanda", needs_activations=True, default_group="row")
def score_wanda(weight: torch.Tensor, act_norm: torch.Tensor | None) -> torch.Tensor:
    """|W| times the input-channel activation norm."""
    assert act_norm is not None
    return weight.abs() * act_norm[None, :]
