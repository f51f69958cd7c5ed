"""PHO's cheap proxies of a pruned layer's quality (spec §8.1-8.2): Gini and OWL-style outlier ratios.

All are computed from one module's scores ``S`` (out, in) and its keep-mask (True = keep).
``gini_pruned``, the Gini coefficient of the scores the mask removes, is the search objective
(lower is better); the others exist for the proxy study (the paper's Table 2).
"""

from __future__ import annotations

import torch

from crepe.errors import CrepeError
from crepe.registry import Registry

OUTLIER_M = 5.0  # OWL's unstructured setting


def _flat64(values: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)
    if x.numel() and not torch.isfinite(x).all():
        raise CrepeError(f"{what} contains NaN or infinite values; it needs finite scores")
    return x


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of nonnegative ``values`` (any shape), in float64; 0 when empty or all zero.

    ``G = sum_k (2k - n - 1) x_k / (n sum_k x_k)`` over the ascending ``x_1 <= ... <= x_n``;
    the range is ``[0, (n - 1) / n]`` and ``G(c x) = G(x)`` for ``c > 0``.
    """
    x = _flat64(values, "gini input")
    n = x.numel()
    if n == 0:
        return 0.0
    if bool((x < 0).any()):
        raise CrepeError(f"gini needs nonnegative values, got a minimum of {float(x.min())!r}")
    total = x.sum()
    if float(total) == 0.0:
        return 0.0
    x = torch.sort(x).values
    coeff = 2.0 * torch.arange(1, n + 1, dtype=torch.float64, device=x.device) - (n + 1)
    return float((coeff * x).sum() / (n * total))


def outlier_ratio(values: torch.Tensor, m: float = OUTLIER_M) -> float:
    """Fraction of ``values`` strictly above ``m`` times their own mean (OWL-style); 0 when empty."""
    z = _flat64(values, "outlier_ratio input")
    if z.numel() == 0:
        return 0.0
    return float((z > m * z.mean()).sum()) / z.numel()


def compute_proxies(scores: torch.Tensor, keep: torch.Tensor, m: float = OUTLIER_M) -> dict[str, float]:
    """Every proxy of :data:`PROXY_NAMES` for ``scores`` (out, in) under keep-mask ``keep`` (bool).

    ``outlier`` uses all scores and their global mean; ``outlier_pruned`` and ``outlier_retained``
    use each subset's *own* mean: with a global threshold, outlier_pruned would be identically 0
    under 50% per-layer pruning (pruned scores <= median <= 2 mean < 5 mean, spec §8.2).
    """
    if keep.dtype != torch.bool or keep.shape != scores.shape:
        raise CrepeError(
            f"keep must be a bool mask shaped like the scores {tuple(scores.shape)}, "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    s = scores.detach().to(torch.float64)
    pruned, retained = s[~keep], s[keep]
    return {
        "gini_pruned": gini(pruned),
        "gini_retained": gini(retained),
        "outlier": outlier_ratio(s, m),
        "outlier_pruned": outlier_ratio(pruned, m),
        "outlier_retained": outlier_ratio(retained, m),
    }


# The proxy registry (``crepe proxy-study`` columns; ``gini_pruned`` is PHO's objective).
PROXY_NAMES = Registry("proxy")
PROXY_NAMES.register("gini_pruned", "Gini coefficient of the scores the mask removes (the search objective, spec §8.1)")
PROXY_NAMES.register("gini_retained", "Gini coefficient of the scores the mask keeps (spec §8.2)")
PROXY_NAMES.register("outlier", "share of scores above OUTLIER_M x the mean of all scores (spec §8.2)")
PROXY_NAMES.register("outlier_pruned", "outlier share among the removed scores, against their own mean (spec §8.2)")
PROXY_NAMES.register("outlier_retained", "outlier share among the kept scores, against their own mean (spec §8.2)")
