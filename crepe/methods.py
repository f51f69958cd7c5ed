"""Every pruning method by name: the scorers (:mod:`crepe.scoring`) plus the weight-updating methods.

A *scorer* maps a weight and its input norms to importance scores; the pruner selects a mask and
zeroes the weights. An *updater* (SparseGPT, spec §5) chooses its own mask while it rewrites the
remaining weights from the layer's input Hessian, so it cannot be expressed as a score. Both kinds
share one namespace: ``crepe methods`` lists them, ``PruneConfig(method=...)`` accepts them, and a
name may be registered only once across the two registries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crepe import sparsegpt as _sparsegpt
from crepe.errors import CrepeError
from crepe.registry import resolve_params
from crepe.scoring import SCORERS, Scorer


@dataclass(frozen=True)
class Updater:
    """A method that updates the kept weights (not a score); its logic lives in its own module.

    ``default_group`` is a label for reports (e.g. ``"block128"``), not a :data:`crepe.types.GROUPS`
    member, because the method selects its unstructured mask itself.
    """

    name: str
    needs_activations: bool
    default_group: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    check: Callable[[dict[str, Any]], None] | None = None  # validates resolved params, raises CrepeError
    kind: str = "update"


UPDATERS: dict[str, Updater] = {}


def register_updater(
    name: str,
    *,
    needs_activations: bool,
    default_group: str,
    defaults: Mapping[str, Any] | None = None,
    doc: str = "",
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Updater:
    """Register a weight-updating method under ``name`` (lower-case, unique across all methods)."""
    if name in UPDATERS or name in SCORERS or not name.isidentifier() or not name.islower():
        raise ValueError(f"bad or duplicate method name {name!r}")
    entry = Updater(name, needs_activations, default_group, dict(defaults or {}), doc, check)
    UPDATERS[name] = entry
    return entry


def all_methods() -> dict[str, Scorer | Updater]:
    """Scorers and updaters by name, sorted."""
    return dict(sorted({**SCORERS, **UPDATERS}.items()))


def is_updater(name: str) -> bool:
    return name in UPDATERS


def get_method(name: str) -> Scorer | Updater:
    if name in UPDATERS:
        return UPDATERS[name]
    if name in SCORERS:
        return SCORERS[name]
    raise CrepeError(f"unknown method {name!r}; known methods: {', '.join(all_methods())}")


def resolve_method_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's defaults overlaid with ``params``; unknown names raise, values are checked."""
    method = get_method(name)
    return resolve_params(f"method {name!r}", method.defaults, params,
                          method.check if isinstance(method, Updater) else None)


register_updater(
    "sparsegpt",
    needs_activations=True,
    default_group=_sparsegpt.GROUP_LABEL,
    defaults=_sparsegpt.DEFAULTS,
    doc=_sparsegpt.DOC,
    check=_sparsegpt.check_params,
)
