"""What to prune and how: :class:`PruneConfig`, its validation and its resolved (recorded) form.

Names come from the registries: methods from :mod:`crepe.methods`, refinements from
:data:`crepe.refine.REFINES`, layer allocations from :data:`crepe.allocation.ALLOCATORS`, weight
updates from :data:`crepe.updates.UPDATES`.
:meth:`PruneConfig.validate` rejects every bad name, value and combination before any model work;
:meth:`PruneConfig.as_dict` is the form a report and a manifest record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crepe.allocation import ALLOCATORS, check_target, needs_calibration, resolve_allocator_params
from crepe.errors import CrepeError
from crepe.masks import LAYER_RULES
from crepe.methods import get_method, is_updater, resolve_method_params
from crepe.neighborhood import check_kernel_size
from crepe.refine import DSNOT_REFINES, PERMUTE_REFINES, check_refine, resolve_refine_params
from crepe.scoring import get_scorer
from crepe.sparsegpt import check_pattern_blocksize
from crepe.types import SparsitySpec, check_group, check_sparsity, parse_sparsity
from crepe.updates import NEEDS_HESSIAN, UPDATES
from crepe.weights import check_regex

__all__ = ["MOE_FALLBACKS", "PruneConfig", "build_config"]

MOE_FALLBACKS: tuple[str, ...] = ("all-tokens", "magnitude")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; ``group=None`` means the method's official comparison group.

    - ``method``: a scorer (magnitude, wanda, ria, crepe, ...) or an updater (sparsegpt);
    - ``refine``: None, ``"cp"`` / ``"lsa"`` (channel permutation, N:M only), ``"dsnot"`` or
      ``"r2-dsnot"`` (prune-and-grow from the method's mask), with ``refine_params``;
    - ``allocation``: None or ``"owl"`` / ``"alpha"`` / ``"dlp"``: per-block unstructured ratios
      whose mean is ``sparsity`` (:func:`crepe.allocation.block_ratios`), with ``allocation_params``;
    - ``block_sparsity``: explicit per-block unstructured ratios (one per decoder block), instead
      of an allocator; ``sparsity`` is then only the nominal target recorded in the manifest.

    - ``update``: ``"none"`` (zero the pruned weights) or ``"obs"`` (fixed-mask OBS reconstruction of
      the kept weights after the final mask, :mod:`crepe.updates`), with ``update_params``.

    SparseGPT with ``refine="dsnot"``/``"r2-dsnot"`` is DSnoT's ``--initial_method sparsegpt``: the
    initial mask comes from the static saliency ``W^2 / diag(U)^2`` (per output row by default) and
    the weights are not reconstructed, as in the official DSnoT code (unless ``update="obs"``).
    ``update="obs"`` needs the input Hessian, so it calibrates even with ``magnitude``; plain SparseGPT
    with ``"obs"`` is refused (it already reconstructs its weights).
    """

    method: str
    sparsity: SparsitySpec
    params: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    rule: str = "exact"  # "exact" counts, or the official "threshold" (<= tau) rule for layers
    refine: str | None = None
    refine_params: dict[str, Any] = field(default_factory=dict)
    allocation: str | None = None
    allocation_params: dict[str, Any] = field(default_factory=dict)
    block_sparsity: tuple[float, ...] | None = None
    targets: str | None = None  # regex over full weight names: prune only matching weights
    ignore: str | None = None  # regex over full weight names: leave matching weights dense
    prune_router: bool = False  # MoE router/gate weights are left dense unless True
    moe_min_tokens: int = 16  # an expert routed fewer calibration tokens follows ``moe_fallback``
    moe_fallback: str = "all-tokens"  # "all-tokens": calibrate it on every token; "magnitude": |W|
    update: str = "none"  # what happens to the kept weights after the mask (crepe.updates.UPDATES)
    update_params: dict[str, Any] = field(default_factory=dict)

    @property
    def reconstructs(self) -> bool:
        """True when the method rewrites the kept weights (SparseGPT without DSnoT)."""
        return is_updater(self.method) and self.refine not in DSNOT_REFINES

    @property
    def needs_hessian(self) -> bool:
        """True when the loop must collect each weight's input Hessian (SparseGPT or an ``obs`` update)."""
        return is_updater(self.method) or self.update in NEEDS_HESSIAN

    @property
    def needs_calibration(self) -> bool:
        """True when calibration inputs are needed; ``update="obs"`` needs them for any method, magnitude too."""
        return (
            get_method(self.method).needs_activations
            or self.refine in DSNOT_REFINES
            or (self.allocation in ALLOCATORS and needs_calibration(self.allocation))
            or self.update in NEEDS_HESSIAN
        )

    def resolved_group(self) -> str:
        if is_updater(self.method):
            if self.refine in DSNOT_REFINES:  # DSnoT's initial mask is per output row (official)
                return check_group(self.group) if self.group else "row"
            if self.group:
                raise CrepeError(
                    f"group={self.group!r} does not apply to method {self.method!r}, which selects its "
                    "unstructured mask per column block itself; leave --group unset"
                )
            return f"block{self.resolved_params()['blocksize']}"
        return check_group(self.group) if self.group else get_scorer(self.method).default_group

    def resolved_params(self) -> dict[str, Any]:
        return resolve_method_params(self.method, self.params)

    def resolved_refine_params(self) -> dict[str, Any]:
        return resolve_refine_params(self.refine, self.refine_params)

    def resolved_update_params(self) -> dict[str, Any]:
        """The update's defaults overlaid with ``update_params``; an unknown update or parameter raises."""
        return UPDATES.get(self.update).resolve(self.update_params, "update")

    def resolved_allocation_params(self) -> dict[str, Any]:
        """The allocator's defaults overlaid with ``allocation_params`` (as given for an unknown allocator)."""
        if self.allocation not in ALLOCATORS:
            return dict(self.allocation_params)
        return resolve_allocator_params(self.allocation, self.allocation_params)

    def validate(self) -> None:
        """Raise CrepeError for unknown names, bad values and combinations that make no sense."""
        params = self.resolved_params()
        _check_score_params(self.method, params)
        pattern = self.sparsity.pattern
        if self.rule not in LAYER_RULES:
            raise CrepeError(f"unknown selection rule {self.rule!r}; allowed: {', '.join(LAYER_RULES)}")
        if pattern is None:
            self.resolved_group()
        elif self.group:
            check_group(self.group)
        check_refine(self.refine)
        self.resolved_refine_params()
        if self.refine in PERMUTE_REFINES and pattern is None:
            raise CrepeError(
                f"refine {self.refine!r} (channel permutation) only applies to N:M patterns, not to "
                f"unstructured sparsity {self.sparsity}; use a pattern such as 2:4 or drop --refine"
            )
        if self.allocation is not None and self.allocation not in ALLOCATORS:
            raise CrepeError(f"unknown allocation {self.allocation!r}; allowed: {', '.join(ALLOCATORS)} (or none)")
        if self.allocation_params and self.allocation is None:
            raise CrepeError(
                f"allocation parameters {sorted(self.allocation_params)} were given but no allocation "
                "(--allocation) was chosen"
            )
        if self.allocation is not None and pattern is not None:
            raise CrepeError(
                f"allocation {self.allocation!r} sets a different unstructured sparsity per block and cannot "
                f"be combined with the N:M pattern {pattern}; use an unstructured sparsity such as 0.7"
            )
        if self.allocation is not None:
            self.resolved_allocation_params()
            check_target(self.sparsity.sparsity)
        if self.block_sparsity is not None:
            if pattern is not None:
                raise CrepeError(
                    f"per-block sparsities cannot be combined with the N:M pattern {pattern}; use an "
                    "unstructured sparsity"
                )
            if self.allocation is not None:
                raise CrepeError(
                    f"give either allocation {self.allocation!r} or explicit per-block sparsities, not both"
                )
            if not self.block_sparsity:
                raise CrepeError("the per-block sparsity list is empty; give one ratio per decoder block")
            for value in self.block_sparsity:
                check_sparsity(value)
        if is_updater(self.method):
            check_pattern_blocksize(pattern, params["blocksize"])
        self.resolved_update_params()
        if self.update != "none" and self.reconstructs:
            raise CrepeError(
                f"method {self.method!r} already reconstructs its weights; use update none (or add a DSnoT "
                f"refinement, whose mask update {self.update!r} then reconstructs)"
            )
        check_regex(self.targets, "targets")
        check_regex(self.ignore, "ignore")
        if self.moe_fallback not in MOE_FALLBACKS:
            raise CrepeError(
                f"unknown MoE fallback {self.moe_fallback!r}; allowed: {', '.join(MOE_FALLBACKS)}"
            )
        if isinstance(self.moe_min_tokens, bool) or not isinstance(self.moe_min_tokens, int) or self.moe_min_tokens < 0:
            raise CrepeError(f"moe_min_tokens must be an integer >= 0, got {self.moe_min_tokens!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": self.sparsity.sparsity,
            "pattern": str(self.sparsity.pattern) if self.sparsity.pattern else None,
            "group": None if self.sparsity.pattern else self.resolved_group(),
            "rule": self.rule,
            "params": self.resolved_params(),
            "refine": self.refine,
            "refine_params": self.resolved_refine_params(),
            "allocation": self.allocation,
            "allocation_params": self.resolved_allocation_params(),
            "block_sparsity": list(self.block_sparsity) if self.block_sparsity is not None else None,
            "targets": self.targets,
            "ignore": self.ignore,
            "prune_router": self.prune_router,
            "moe_min_tokens": self.moe_min_tokens,
            "moe_fallback": self.moe_fallback,
            "update": self.update,
            "update_params": self.resolved_update_params(),
        }


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_score_params(method: str, params: Mapping[str, Any]) -> None:
    """Values a scorer's formula needs: CRePE's coefficients finite and >= 0 (not all 0) and an odd K; the
    activation exponent ``a`` finite."""
    if method == "crepe":
        for key in ("alpha", "beta", "gamma"):
            if not _finite(params[key]) or params[key] < 0:
                raise CrepeError(f"{key}={params[key]!r} must be a finite number >= 0")
        if params["alpha"] == params["beta"] == params["gamma"] == 0:
            raise CrepeError("alpha, beta and gamma are all 0, which scores every weight 0; make one positive")
        check_kernel_size(params["kernel_size"])
    if "a" in params and not _finite(params["a"]):
        raise CrepeError(f"activation exponent a={params['a']!r} must be a finite number")


def build_config(method: str, sparsity: str | float | SparsitySpec, params: Mapping[str, Any] | None = None,
                 group: str | None = None, rule: str = "exact", *, refine: str | None = None,
                 refine_params: Mapping[str, Any] | None = None, allocation: str | None = None,
                 allocation_params: Mapping[str, Any] | None = None,
                 block_sparsity: Sequence[float] | None = None, targets: str | None = None, ignore: str | None = None,
                 prune_router: bool = False, moe_min_tokens: int = 16, moe_fallback: str = "all-tokens",
                 update: str = "none", update_params: Mapping[str, Any] | None = None) -> PruneConfig:
    """A validated :class:`PruneConfig` (``sparsity`` may be text such as ``"2:4"``): every bad name, value and
    combination raises CrepeError here, before any model is loaded."""
    get_method(method)
    config = PruneConfig(
        method, sparsity if isinstance(sparsity, SparsitySpec) else parse_sparsity(sparsity), dict(params or {}),
        group, rule, refine=refine, refine_params=dict(refine_params or {}), allocation=allocation,
        allocation_params=dict(allocation_params or {}),
        block_sparsity=tuple(block_sparsity) if block_sparsity is not None else None, targets=targets or None,
        ignore=ignore or None, prune_router=prune_router, moe_min_tokens=moe_min_tokens, moe_fallback=moe_fallback,
        update=update, update_params=dict(update_params or {}),
    )
    config.validate()
    return config
