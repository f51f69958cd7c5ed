"""Scorer registry: one entry per pruning score, "higher = keep".

Every scorer has the signature ``fn(weight, act_norm, **params) -> scores`` where ``weight`` is the
float32 ``nn.Linear.weight`` (out, in) and ``act_norm`` the per-input-channel L2 norm of the
calibration inputs, ``||X_j||_2`` (in,), or ``None`` for scorers that need no calibration.
Adding a method is one :func:`register_scorer` call in a module imported below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.types import Group

ScoreFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: ScoreFn
    needs_activations: bool
    default_group: Group
    defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str,
    *,
    needs_activations: bool,
    default_group: Group,
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``fn`` under ``name`` (lower-case, unique)."""

    def add(fn: ScoreFn) -> ScoreFn:
        if name in SCORERS or not name.isidentifier() or not name.islower():
            raise ValueError(f"bad or duplicate scorer name {name!r}")
        doc = (fn.__doc__ or "").strip().splitlines()
        SCORERS[name] = Scorer(
            name, fn, needs_activations, default_group, dict(defaults or {}), doc[0] if doc else ""
        )
        return fn

    return add


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise CrepeError(f"unknown method {name!r}; known methods: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def resolve_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The scorer's defaults overlaid with ``params``; unknown names raise."""
    scorer = get_scorer(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(scorer.defaults))
    if unknown:
        allowed = ", ".join(sorted(scorer.defaults)) or "none"
        raise CrepeError(f"method {name!r} has no parameter {unknown[0]!r}; its parameters: {allowed}")
    return {**scorer.defaults, **params}


def score(
    method: str, weight: torch.Tensor, act_norm: torch.Tensor | None = None, **params: Any
) -> torch.Tensor:
    """Importance scores of ``weight`` (out, in) under ``method``: float32, same shape, higher = keep.

    ``act_norm`` is ``||X_j||_2`` per input channel, shape (in,); required by activation-aware
    methods (wanda, ria, crepe). ``params`` override the method's defaults (e.g. ``alpha=0.8``).
    """
    scorer = get_scorer(method)
    full = resolve_params(method, params)
    if weight.dim() != 2:
        raise CrepeError(f"score needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if scorer.needs_activations:
        if act_norm is None:
            raise CrepeError(f"method {method!r} needs act_norm (the input-channel norms ||X_j||_2)")
        if act_norm.shape != (w.shape[1],):
            raise CrepeError(
                f"act_norm has shape {tuple(act_norm.shape)} but the weight has {w.shape[1]} inputs"
            )
        act = act_norm.detach().to(device=w.device, dtype=torch.float32)
    else:
        act = None
    return scorer.fn(w, act, **full)


# Last, not at the top: each scorer module registers itself through register_scorer above (an import cycle).
from crepe.scoring import crepe as _crepe  # noqa: E402,F401
from crepe.scoring import magnitude, ria, symmetric, wanda  # noqa: E402,F401  (registration side effects)
