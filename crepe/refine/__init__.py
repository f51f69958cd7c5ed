"""Mask refinements that run after a method's score, inside the sequential loop.

- ``"cp"`` / ``"lsa"``: channel permutation for N:M (spec §6.1 / §6.2), implemented in
  :mod:`crepe.permute` (``permuted_mask(scores, pattern, method, **params)``);
- ``"dsnot"``: DSnoT prune-and-grow without weight updates (spec §9), :mod:`crepe.refine.dsnot`;
- ``"r2-dsnot"``: our documented R²-DSnoT variant (spec §10), same module.

:func:`resolve_refine_params` validates a refinement's parameters before any model work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crepe.errors import CrepeError
from crepe.permute import PERMUTE_DEFAULTS, permuted_mask
from crepe.refine.dsnot import DSNOT_DEFAULTS, R2_DEFAULTS, check_dsnot_params, refine_layer
from crepe.registry import Registry

# The refinement registry (``refine.method``, ``--refine``): one entry per name; ``obj`` is the function
# the pruner calls for it (``permuted_mask`` before the N:M selection, ``refine_layer`` after the mask).
REFINES = Registry("refinement")
REFINES.register("cp", "N:M only: RIA's heuristic channel reallocation before the N:M selection (spec §6.1)",
                 defaults=PERMUTE_DEFAULTS["cp"], patterns="nm", obj=permuted_mask)
REFINES.register("lsa", "N:M only: channel reallocation plus linear-sum-assignment refinement (spec §6.2)",
                 defaults=PERMUTE_DEFAULTS["lsa"], patterns="nm", obj=permuted_mask)
REFINES.register("dsnot", "DSnoT training-free prune-and-grow from the method's mask, no weight update (spec §9)",
                 defaults=DSNOT_DEFAULTS, obj=refine_layer)
REFINES.register("r2-dsnot", "R²-DSnoT, our documented variant of DSnoT (spec §10); reduces to DSnoT",
                 defaults=R2_DEFAULTS, obj=refine_layer)
REFINE_DOCS = {name: entry.doc for name, entry in REFINES.items()}
PERMUTE_REFINES: tuple[str, ...] = tuple(n for n, e in REFINES.items() if e.obj is permuted_mask)  # cp, lsa
DSNOT_REFINES: tuple[str, ...] = tuple(n for n, e in REFINES.items() if e.obj is refine_layer)  # dsnot, r2-dsnot


def check_refine(refine: str | None) -> str | None:
    if refine is not None and refine not in REFINES:
        raise CrepeError(f"unknown refinement {refine!r}; allowed: {', '.join(REFINES)} (or none)")
    return refine


def refine_defaults(refine: str) -> dict[str, Any]:
    check_refine(refine)
    if refine in PERMUTE_REFINES:
        return {}  # cp / lsa: crepe.permute owns its parameters and checks them
    return dict(REFINES[refine].defaults)


def resolve_refine_params(refine: str | None, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``params``; unknown names or bad values raise CrepeError."""
    params = dict(params or {})
    if refine is None:
        if params:
            raise CrepeError(f"refine parameters {sorted(params)} were given but no refinement (--refine) was chosen")
        return {}
    defaults = refine_defaults(refine)
    if refine in PERMUTE_REFINES:
        return params
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise CrepeError(
            f"refinement {refine!r} has no parameter {unknown[0]!r}; its parameters: {', '.join(sorted(defaults))}"
        )
    full = {**defaults, **params}
    check_dsnot_params(refine, full)
    return full


__all__ = [
    "DSNOT_REFINES",
    "PERMUTE_REFINES",
    "REFINES",
    "REFINE_DOCS",
    "check_refine",
    "refine_defaults",
    "resolve_refine_params",
]
