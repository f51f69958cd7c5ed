"""CRePE (Park, arXiv 2606.01544): RIA's relative importance plus a 2D neighbourhood term.

``S_ij = (alpha * A_ij / r_i + beta * A_ij / c_j + gamma * A_ij / n_ij) * ||X_j||_2 ** a`` with
``A = |W|`` and ``n_ij`` the cross-excluding K x K neighbourhood sum that keeps the centre
(:func:`crepe.neighborhood.neighborhood_sum`). Compared per layer, as RIA. With alpha = beta = 1
and gamma = 0 it is exactly RIA. The equations are a reconstruction (spec §7 [R]).

Default coefficients: see ``DEFAULT_CREPE_PARAMS`` and docs/methods.md for where they come from.
"""

from __future__ import annotations

import torch

from crepe.errors import CrepeError
from crepe.neighborhood import NEIGHBORHOOD_METHODS, check_kernel_size, neighborhood_sum
from crepe.scoring import register_scorer
from crepe.scoring.ria import activation_factor, relative_importance

# Documented defaults until PHO (issue 3) finds per-model values; see docs/methods.md.
DEFAULT_CREPE_PARAMS = {
    "alpha": 1.0,
    "beta": 1.0,
    "gamma": 0.01,
    "kernel_size": 9,
    "a": 0.5,
    "neighborhood": "sat",
}


@register_scorer(
    "crepe", needs_activations=True, default_group="layer", defaults=DEFAULT_CREPE_PARAMS
)
def score_crepe(
    weight: torch.Tensor,
    act_norm: torch.Tensor | None,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.01,
    kernel_size: int = 9,
    a: float = 0.5,
    neighborhood: str = "sat",
) -> torch.Tensor:
    """(alpha row + beta column + gamma neighbourhood) relative importance times ||X_j||_2^a."""
    assert act_norm is not None
    check_kernel_size(kernel_size)
    if neighborhood not in NEIGHBORHOOD_METHODS:
        raise CrepeError(
            f"unknown neighbourhood method {neighborhood!r}; allowed: {', '.join(NEIGHBORHOOD_METHODS)}"
        )
    abs_w = weight.abs()
    cri = relative_importance(abs_w, alpha, beta)
    if gamma != 0:
        # n >= A (the window keeps its centre), so n == 0 only where A == 0: clamping n to the
        # smallest normal float gives A / n = 0 there and changes nothing elsewhere.
        ratio = neighborhood_sum(abs_w, kernel_size, neighborhood)
        ratio.clamp_(min=torch.finfo(torch.float32).tiny)
        torch.div(abs_w, ratio, out=ratio)
        cri.add_(ratio, alpha=gamma)
    return cri.mul_(activation_factor(act_norm, a))
