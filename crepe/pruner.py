"""Sequential layer-wise pruning (spec §1.5) of every ``nn.Linear`` in the decoder blocks.

Per block: hook its linears and run the calibration inputs through the *dense* block to collect
float32 input statistics, then score, mask and zero each linear, then run the inputs through the
*pruned* block to produce the next block's inputs. Embeddings, norms and the head are never
pruned. With an offloaded model only the current block and its activations visit the device.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crepe.blocks import BlockInputs, capture_inputs, find_blocks, model_device, run_block
from crepe.errors import CrepeError
from crepe.masks import LAYER_RULES, LayerSparsity, measure_sparsity, select_mask
from crepe.methods import get_method, is_updater, resolve_method_params
from crepe.refine import DSNOT_REFINES, PERMUTE_REFINES, check_refine, resolve_refine_params
from crepe.refine.dsnot import refine_layer
from crepe.scoring import get_scorer, score
from crepe.sparsegpt import check_pattern_blocksize, expected_block_pruned, sparsegpt_prune, sparsegpt_score
from crepe.stats import BlockStats, InputNormAccumulator, LayerStats
from crepe.types import NMPattern, SparsitySpec, check_group, check_sparsity
from crepe.weights import BlockWeights, PrunableWeight, block_weights, check_regex

__all__ = ["InputNormAccumulator", "LayerStats", "PruneConfig", "PruneReport", "prune_model", "prune_linear_"]

ALLOCATIONS: tuple[str, ...] = ("owl", "alpha", "dlp")
MOE_FALLBACKS: tuple[str, ...] = ("all-tokens", "magnitude")
CALIBRATED_ALLOCATIONS: tuple[str, ...] = ("owl", "dlp")  # AlphaPruning reads only the weights


def _allocation_module() -> Any | None:
    """:mod:`crepe.allocation` if this installation has it (imported lazily: optional at import)."""
    try:
        return importlib.import_module("crepe.allocation")
    except ImportError:
        return None


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

    SparseGPT with ``refine="dsnot"``/``"r2-dsnot"`` is DSnoT's ``--initial_method sparsegpt``: the
    initial mask comes from the static saliency ``W^2 / diag(U)^2`` (per output row by default) and
    the weights are not reconstructed, as in the official DSnoT code.
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

    @property
    def reconstructs(self) -> bool:
        """True when the method rewrites the kept weights (SparseGPT without DSnoT)."""
        return is_updater(self.method) and self.refine not in DSNOT_REFINES

    @property
    def needs_calibration(self) -> bool:
        return (
            get_method(self.method).needs_activations
            or self.refine in DSNOT_REFINES
            or self.allocation in CALIBRATED_ALLOCATIONS
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

    def resolved_allocation_params(self) -> dict[str, Any]:
        """The allocator's defaults overlaid with ``allocation_params`` (as given without the module)."""
        module = _allocation_module() if self.allocation in ALLOCATIONS else None
        if module is None:
            return dict(self.allocation_params)
        return module.resolve_allocator_params(self.allocation, self.allocation_params)

    def validate(self) -> None:
        """Raise CrepeError for unknown names, bad values and combinations that make no sense."""
        params = self.resolved_params()
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
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise CrepeError(f"unknown allocation {self.allocation!r}; allowed: {', '.join(ALLOCATIONS)} (or none)")
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
            module = _allocation_module()
            if module is not None:
                module.check_target(self.sparsity.sparsity)
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
        }


@dataclass
class PruneReport:
    config: dict[str, Any]
    blocks_path: str
    layers: list[LayerSparsity]
    mask_pruned: dict[str, int]
    seconds: dict[str, float]
    targets: dict[str, float] = field(default_factory=dict)  # per-layer target sparsity (unstructured)
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # refinement / SparseGPT facts
    block_sparsity: list[float] | None = None  # per-block ratios actually used (allocation or explicit)
    kinds: dict[str, str] = field(default_factory=dict)  # layer name -> linear | conv1d | expert | router
    skipped: list[dict[str, Any]] = field(default_factory=list)  # matrices left dense, each with its reason

    @property
    def total_zeros(self) -> int:
        return sum(layer.n_zeros for layer in self.layers)

    @property
    def total_numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.total_zeros / self.total_numel if self.total_numel else 0.0

    @property
    def nm_valid(self) -> bool | None:
        flags = [layer.nm_valid for layer in self.layers]
        return None if any(f is None for f in flags) else all(flags)  # type: ignore[arg-type]

    @property
    def damping_retries(self) -> list[dict[str, Any]]:
        """Every failed SparseGPT Cholesky attempt (layer, percdamp, stage), in pruning order."""
        return [r for info in self.layer_info.values() for r in info.get("sparsegpt", {}).get("damping_retries", [])]

    def refine_summary(self) -> dict[str, Any] | None:
        """Totals over layers of the refinement (DSnoT swaps, permutation gains)."""
        dsnot = [i["dsnot"] for i in self.layer_info.values() if "dsnot" in i]
        perm = [i["permutation"] for i in self.layer_info.values() if "permutation" in i]
        out: dict[str, Any] = {}
        if dsnot:
            out["dsnot_swaps"] = sum(d.get("swaps", 0) for d in dsnot)
            out["dsnot_layers_skipped"] = sum(1 for d in dsnot if d.get("skipped"))
            out["dsnot_layers"] = len(dsnot)
        if perm:
            out["permuted_layers"] = len(perm)
        return out or None

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """Zeros and sizes per weight kind (experts apart from the rest), pruned weights only."""
        out: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            row = out.setdefault(self.kinds.get(layer.name, "linear"), {"n_weights": 0, "zeros": 0, "numel": 0})
            row["n_weights"] += 1
            row["zeros"] += layer.n_zeros
            row["numel"] += layer.numel
        for row in out.values():
            row["sparsity"] = row["zeros"] / row["numel"] if row["numel"] else 0.0
        return dict(sorted(out.items()))

    def all_block_weights(self) -> dict[str, Any]:
        """Sparsity over every weight matrix in the blocks, the ones left dense included."""
        zeros = self.total_zeros + sum(s["n_zeros"] for s in self.skipped)
        numel = self.total_numel + sum(s["numel"] for s in self.skipped)
        return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0,
                "n_pruned_weights": len(self.layers), "n_skipped_weights": len(self.skipped)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "blocks_path": self.blocks_path,
            "n_linears": len(self.layers),
            "by_kind": self.by_kind(),
            "all_block_weights": self.all_block_weights(),
            "skipped": self.skipped,
            "overall_sparsity": self.sparsity,
            "total_zeros": self.total_zeros,
            "total_numel": self.total_numel,
            "nm_valid": self.nm_valid,
            "block_sparsity": self.block_sparsity,
            "damping_retries": self.damping_retries,
            "refine_summary": self.refine_summary(),
            "layers": [
                {
                    **layer.as_dict(),
                    "kind": self.kinds.get(layer.name, "linear"),
                    "mask_pruned": self.mask_pruned.get(layer.name),
                    "target_sparsity": self.targets.get(layer.name),
                    **({"info": self.layer_info[layer.name]} if self.layer_info.get(layer.name) else {}),
                }
                for layer in self.layers
            ],
            "seconds": self.seconds,
        }


def check_finite_weights(named: dict[str, PrunableWeight]) -> None:
    for name, w in named.items():
        if w.param.is_meta:
            continue  # not materialised yet (streamed model): checked when its block loads
        if not torch.isfinite(w.matrix()).all():
            raise CrepeError(f"layer {name} has NaN or infinite weights; refusing to prune this model")


def check_pattern_fits(named: dict[str, PrunableWeight], spec: SparsitySpec) -> None:
    if spec.pattern is None:
        return
    for name, w in named.items():
        if w.in_features % spec.pattern.m:
            what = {"conv1d": "Conv1D weight", "expert": "expert weight", "router": "router weight"}.get(w.kind, "layer")
            raise CrepeError(
                f"{what} {name} has input width {w.in_features}, not divisible by M="
                f"{spec.pattern.m} of pattern {spec.pattern}; choose a pattern whose M divides it"
            )


def _skipped_row(full: str, w: PrunableWeight, reason: str) -> dict[str, Any]:
    param = w.param.detach()
    zeros = 0 if param.is_meta else int((param == 0).sum()) if not w.fused else int((w.matrix() == 0).sum())
    numel = w.numel if w.fused else param.numel()
    return {"name": full, "kind": w.kind, "shape": list(w.shape) if w.kind != "other" else list(param.shape),
            "numel": numel, "n_zeros": zeros, "reason": reason}


# --- per-layer statistics and pruning --------------------------------------------------------------


@dataclass
class LayerContext:
    """Where a linear sits and what the loop knows about it; ``info``/``perm`` are filled in."""

    name: str = ""  # full dotted name, for reports and errors
    local_name: str = ""  # name inside its block (self_attn.q_proj), for DSnoT's skip_layer
    sparsity: float | None = None  # this block's target (None: the config's)
    stats: LayerStats | None = None
    info: dict[str, Any] = field(default_factory=dict)
    perm: torch.Tensor | None = None  # channel permutation (new position -> original input)
    fallback: str | None = None  # "magnitude": an expert with too few routed tokens is scored by |W|


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else (value.tolist() if value.numel() <= 64 else None)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _permuted_mask_fn(config: PruneConfig) -> Callable[..., Any]:
    try:
        from crepe.permute import permuted_mask
    except ImportError:
        raise CrepeError(
            f"refine {config.refine!r} needs crepe.permute (channel permutation), which this installation lacks"
        ) from None
    return permuted_mask


def _permute(scores: torch.Tensor, config: PruneConfig, ctx: LayerContext) -> torch.Tensor:
    """Channel-permuted N:M keep-mask (original channel order) from :mod:`crepe.permute`.

    Contract: ``permuted_mask(scores, pattern, method, **refine_params) -> (keep, info)`` with
    ``keep`` in the original channel order and ``info["permutation"]`` the permutation (new position ->
    original input channel) under which ``keep`` is N:M; the other ``info`` entries (gains) go
    into the report.
    """
    permuted_mask = _permuted_mask_fn(config)
    assert config.sparsity.pattern is not None
    keep, info = permuted_mask(scores, config.sparsity.pattern, config.refine, **config.refine_params)
    perm = info.get("permutation") if isinstance(info, dict) else None
    if perm is None:
        raise RuntimeError(
            "internal error: crepe.permute.permuted_mask must return the permutation as info['permutation']"
        )
    ctx.perm = torch.as_tensor(perm, dtype=torch.long, device=scores.device)
    ctx.info["permutation"] = {k: _jsonable(v) for k, v in info.items() if k != "permutation"}
    return keep


def _calibration_error(config: PruneConfig) -> str:
    if get_method(config.method).needs_activations:
        return f"method {config.method!r} needs calibration data"
    if config.refine in DSNOT_REFINES:
        return f"refine {config.refine!r} needs calibration data (per-channel input means and variances)"
    return f"allocation {config.allocation!r} needs calibration data"


def as_weight(module: nn.Module | PrunableWeight) -> PrunableWeight:
    """A bare ``nn.Linear`` as a :class:`PrunableWeight`; a PrunableWeight is returned as is."""
    if isinstance(module, PrunableWeight):
        return module
    return PrunableWeight("", "linear", module)


def prune_linear_(
    module: nn.Module | PrunableWeight,
    config: PruneConfig,
    act_norm: torch.Tensor | None,
    device: torch.device,
    ctx: LayerContext | None = None,
) -> int:
    """Score, mask and zero (or, for SparseGPT, reconstruct) one weight matrix in place.

    ``module`` is an ``nn.Linear`` or any :class:`PrunableWeight` (Conv1D, one expert's slice of a
    fused tensor, ...), always handled as its ``(out, in)`` view. Returns the number of weights the
    mask pruned; ``ctx`` carries this block's sparsity, the layer's statistics and receives
    refinement facts (``ctx.info``) and a channel permutation.
    """
    ctx = ctx if ctx is not None else LayerContext(stats=LayerStats(act_norm=act_norm))
    stats = ctx.stats or LayerStats(act_norm=act_norm)
    spec = config.sparsity
    sparsity = spec.sparsity if ctx.sparsity is None else ctx.sparsity
    weight = as_weight(module).matrix()
    w = weight.to(device)
    params = config.resolved_params()
    if ctx.fallback == "magnitude":
        scores = score("magnitude", w, None)
        group = "layer" if is_updater(config.method) else config.resolved_group()
        keep = (select_mask(scores, pattern=spec.pattern) if spec.pattern is not None
                else select_mask(scores, sparsity, group=group, rule="exact"))
        weight.masked_fill_(~keep.to(weight.device), 0)
        return int((~keep).sum())
    if is_updater(config.method):
        if stats.hessian is None:
            raise CrepeError(_calibration_error(config))
        if config.reconstructs:
            perm = None
            if config.refine in PERMUTE_REFINES:
                saliency, _ = sparsegpt_score(w, stats.hessian, params["percdamp"], params["max_damp_retries"], ctx.name)
                _permute(saliency, config, ctx)
                perm = ctx.perm
            result = sparsegpt_prune(
                w, stats.hessian, sparsity, spec.pattern, params["blocksize"], params["percdamp"], config.rule,
                params["max_damp_retries"], perm, ctx.name,
            )
            weight.copy_(result.weight.to(device=weight.device, dtype=weight.dtype))
            ctx.info["sparsegpt"] = result.info
            return result.n_pruned
        scores, factor = sparsegpt_score(w, stats.hessian, params["percdamp"], params["max_damp_retries"], ctx.name)
        ctx.info["sparsegpt"] = {"percdamp": factor.percdamp, "damping_retries": factor.retries, "dead_inputs": factor.n_dead}
    else:
        scores = score(config.method, w, act_norm, **params)
    if config.refine in PERMUTE_REFINES:
        keep = _permute(scores, config, ctx)
    elif spec.pattern is not None:
        keep = select_mask(scores, pattern=spec.pattern)
    else:
        keep = select_mask(scores, sparsity, group=config.resolved_group(), rule=config.rule)
    if config.refine in DSNOT_REFINES:
        if stats.act_norm is None or stats.mean_prime is None or stats.var is None:
            raise CrepeError(_calibration_error(config))
        keep, info = refine_layer(
            config.refine, config.resolved_refine_params(), ctx.local_name, w, keep, scores,
            stats.act_norm, stats.mean_prime, stats.var, spec.pattern,
        )
        ctx.info["dsnot"] = info
    weight.masked_fill_(~keep.to(weight.device), 0)
    return int((~keep).sum())


ProgressFn = Callable[[int, int, str], None]


def _block_targets(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    config: PruneConfig,
    path: str,
    n_blocks: int,
    batch_size: int,
    device: torch.device,
) -> list[float] | None:
    """Per-block unstructured sparsities: explicit, from the allocator, or None (uniform)."""
    if config.block_sparsity is not None:
        if len(config.block_sparsity) != n_blocks:
            raise CrepeError(
                f"{len(config.block_sparsity)} per-block sparsities were given but {path!r} has {n_blocks} blocks"
            )
        return [float(v) for v in config.block_sparsity]
    if config.allocation is None:
        return None
    try:
        from crepe.allocation import block_ratios
    except ImportError:
        raise CrepeError(
            f"allocation {config.allocation!r} needs crepe.allocation, which this installation lacks"
        ) from None
    ratios = [
        float(r)
        for r in block_ratios(
            model, calib_ids, config.allocation, config.sparsity.sparsity, blocks_path=path,
            batch_size=batch_size, device=device, **config.allocation_params,
        )
    ]
    if len(ratios) != n_blocks or not all(math.isfinite(r) and 0.0 <= r < 1.0 for r in ratios):
        raise RuntimeError(
            f"internal error: allocation {config.allocation!r} returned {len(ratios)} ratios for {n_blocks} "
            f"blocks or a ratio outside [0, 1): {ratios}"
        )
    return ratios


BlockHook = Callable[[int, nn.Module], None]


def model_weights(model: nn.Module, config: PruneConfig, blocks_path: str | None = None) -> tuple[
    str, nn.ModuleList, list[BlockWeights]
]:
    """The blocks and, per block, the weights ``config`` prunes and the ones it leaves dense."""
    path, blocks = find_blocks(model, blocks_path)
    per_block = [
        block_weights(b, f"{path}.{i}.", config.targets, config.ignore, config.prune_router)
        for i, b in enumerate(blocks)
    ]
    if not any(bw.weights for bw in per_block):
        if any(bw.skipped for bw in per_block):
            raise CrepeError(
                f"no weight matrix in the blocks at {path!r} is left to prune (targets={config.targets!r}, "
                f"ignore={config.ignore!r}); loosen --targets/--ignore"
            )
        raise CrepeError(f"the blocks at {path!r} contain no weight matrices (nn.Linear, Conv1D, experts) to prune")
    return path, blocks, per_block


def _moe_fallbacks(stats: BlockStats, weights: dict[str, PrunableWeight], config: PruneConfig) -> dict[str, int]:
    """Experts the router sent fewer than ``moe_min_tokens`` (and at least one) tokens: name -> tokens."""
    floor = max(config.moe_min_tokens, 1)
    return {n: stats.tokens(n) for n, w in weights.items() if w.kind == "expert" and stats.tokens(n) < floor}


def _collect_stats(
    block: nn.Module, weights: dict[str, PrunableWeight], inputs: BlockInputs, i: int, dev: torch.device,
    want_mean_var: bool, want_hessian: bool, forced: frozenset[str] = frozenset(),
) -> BlockStats:
    stats = BlockStats(block, weights, dev, want_mean_var, want_hessian, forced)
    try:
        for c, hidden in enumerate(inputs.hidden):
            run_block(block, hidden, inputs.args[i][c], inputs.kwargs[i][c])
            stats.end_chunk()
    finally:
        stats.remove()
    return stats


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    config: PruneConfig,
    device: torch.device | str | None = None,
    blocks_path: str | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    on_block_start: BlockHook | None = None,
    on_block_end: BlockHook | None = None,
) -> PruneReport:
    """Prune every weight matrix in the decoder blocks of ``model`` in place and return a report.

    ``calib_ids`` (n, seqlen) token windows are required for activation-aware methods, SparseGPT,
    DSnoT and the OWL/DLP allocations. ``device`` is the compute device (default: where the model's
    weights are); blocks that live elsewhere are moved there one at a time and moved back after
    pruning. Every check that the weights' shapes allow runs before the first weight changes.

    ``on_block_start(i, block)`` runs before block ``i`` is used (a streamed model materialises it
    there; block 0 is started before the calibration capture); ``on_block_end(i, block)`` runs after
    block ``i`` is pruned, measured and has produced the next block's inputs (write it, free it).
    Weight matrices prunes exclude (router, ``ignore``, ``targets``) are listed in ``report.skipped``.
    """
    started = time.perf_counter()
    config.validate()
    path, blocks, per_block = model_weights(model, config, blocks_path)
    named = {f"{path}.{i}.{n}": w for i, bw in enumerate(per_block) for n, w in bw.weights.items()}
    check_finite_weights(named)
    check_pattern_fits(named, config.sparsity)
    dev = torch.device(device) if device is not None else model_device(model)
    if batch_size < 1:
        raise CrepeError(f"batch_size must be >= 1, got {batch_size}")
    calibrated = config.needs_calibration
    if calibrated:
        if calib_ids is None or calib_ids.numel() == 0:
            raise CrepeError(_calibration_error(config))
        if calib_ids.dim() != 2:
            raise CrepeError(
                f"calibration ids must have shape (n_samples, seqlen), got {tuple(calib_ids.shape)}"
            )
    if config.refine in PERMUTE_REFINES:
        _permuted_mask_fn(config)  # fail before any work when the module is missing
    if (on_block_start is not None or on_block_end is not None) and config.allocation is not None:
        raise CrepeError(
            f"allocation {config.allocation!r} reads every block before pruning and cannot run block by block "
            "on a streamed model; drop the allocation or raise --max-memory so the model fits"
        )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ratios = _block_targets(model, calib_ids if calibrated else None, config, path, len(blocks), batch_size, dev)
    if config.allocation is not None:
        seconds["allocation"] = time.perf_counter() - t0
    mask_pruned: dict[str, int] = {}
    targets: dict[str, float] = {}
    layer_info: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    layers: list[LayerSparsity] = []
    skipped: list[dict[str, Any]] = []
    inputs: BlockInputs | None = None
    started_blocks: set[int] = set()
    if calibrated:
        t0 = time.perf_counter()
        if on_block_start is not None:
            on_block_start(0, blocks[0])
            started_blocks.add(0)
        inputs = capture_inputs(model, blocks, calib_ids, batch_size, dev)
        seconds["capture"] = time.perf_counter() - t0
    want_mean_var = config.refine in DSNOT_REFINES
    want_hessian = is_updater(config.method)
    t_score = 0.0
    for i, block in enumerate(blocks):
        if progress:
            progress(i, len(blocks), f"block {i}")
        if on_block_start is not None and i not in started_blocks:
            on_block_start(i, block)
        weights = per_block[i].weights
        if on_block_start is not None:  # materialised only now
            check_finite_weights({f"{path}.{i}.{n}": w for n, w in weights.items()})
        home = next(block.parameters()).device
        block.to(dev)
        stats: BlockStats | None = None
        fallbacks: dict[str, int] = {}
        if inputs is not None:
            stats = _collect_stats(block, weights, inputs, i, dev, want_mean_var, want_hessian)
            fallbacks = _moe_fallbacks(stats, weights, config)
            if fallbacks and config.moe_fallback == "all-tokens":
                forced = {n: weights[n] for n in fallbacks}
                redo = _collect_stats(block, forced, inputs, i, dev, want_mean_var, want_hessian, frozenset(forced))
                for n in forced:
                    if redo.tokens(n) == 0:
                        raise RuntimeError(f"internal error: the all-tokens pass gave expert weight {n} no tokens")
                    stats.replace(n, redo)
        block_sparsity = ratios[i] if ratios is not None else None
        t0 = time.perf_counter()
        perms: dict[str, torch.Tensor] = {}
        for name, w in weights.items():
            full = f"{path}.{i}.{name}"
            layer_stats = stats.layer(name) if stats is not None else LayerStats()
            ctx = LayerContext(full, name, block_sparsity, layer_stats)
            if name in fallbacks:
                ctx.info["moe"] = {"routed_tokens": fallbacks[name], "min_tokens": config.moe_min_tokens,
                                   "rule": config.moe_fallback}
                ctx.fallback = "magnitude" if config.moe_fallback == "magnitude" else None
            elif w.kind == "expert" and stats is not None:
                ctx.info["moe"] = {"routed_tokens": layer_stats.n_tokens}
            kinds[full] = w.kind
            mask_pruned[full] = prune_linear_(w, config, layer_stats.act_norm, dev, ctx)
            if config.sparsity.pattern is None:
                targets[full] = config.sparsity.sparsity if block_sparsity is None else block_sparsity
            if ctx.info:
                layer_info[full] = _jsonable(ctx.info)
            if ctx.perm is not None:
                perms[full] = ctx.perm.cpu()
        t_score += time.perf_counter() - t0
        if inputs is not None and i + 1 < len(blocks):
            inputs.hidden = [
                run_block(block, hidden, inputs.args[i][c], inputs.kwargs[i][c])
                for c, hidden in enumerate(inputs.hidden)
            ]
        block.to(home)
        layers.extend(measure_layer(f"{path}.{i}.{n}", w.matrix(), config.sparsity.pattern, perms.get(f"{path}.{i}.{n}"))
                      for n, w in weights.items())
        skipped.extend(_skipped_row(f"{path}.{i}.{n}", w, why) for n, (w, why) in per_block[i].skipped.items())
        if on_block_end is not None:
            on_block_end(i, block)
    if progress:
        progress(len(blocks), len(blocks), "done")
    seconds["score_and_mask"] = t_score
    seconds["total"] = time.perf_counter() - started
    report = PruneReport(
        config.as_dict(), path, layers, mask_pruned, {k: round(v, 3) for k, v in seconds.items()},
        targets, layer_info, ratios, kinds, skipped,
    )
    verify_report(report, config)
    return report


def measure_layer(
    name: str, weight: torch.Tensor, pattern: NMPattern | None, perm: torch.Tensor | None = None
) -> LayerSparsity:
    """Zeros of ``weight``; with a channel permutation, N:M validity of ``weight[:, perm]``."""
    w = weight.detach()
    return measure_sparsity(name, w[:, perm.to(w.device)] if perm is not None else w, pattern)


def expected_pruned(
    shape: tuple[int, int], config: PruneConfig, sparsity: float | None = None, magnitude_fallback: bool = False
) -> int | None:
    """The exact number of weights the mask must prune, or None when ties make it open (threshold).

    ``sparsity`` is the layer's own unstructured target (per-block allocation); default the config's.
    """
    out_dim, in_dim = shape
    spec = config.sparsity
    s = spec.sparsity if sparsity is None else sparsity
    if spec.pattern is not None:
        return out_dim * (in_dim // spec.pattern.m) * spec.pattern.n
    if magnitude_fallback:  # an expert scored by |W| (too few routed tokens): the layer or row rule
        group = "layer" if is_updater(config.method) else config.resolved_group()
        return out_dim * int(s * in_dim) if group == "row" else int(s * out_dim * in_dim)
    if config.reconstructs:  # SparseGPT: int(s * out * width) per column block
        return None if config.rule == "threshold" else expected_block_pruned(shape, s, config.resolved_params()["blocksize"])
    if config.resolved_group() == "row":
        return out_dim * int(s * in_dim)
    if config.rule == "threshold":
        return None
    return int(s * out_dim * in_dim)


def verify_report(report: PruneReport, config: PruneConfig) -> None:
    """Check every layer's pruned count and N:M validity; a failure is a bug, never silently kept."""
    for layer in report.layers:
        fallback = report.layer_info.get(layer.name, {}).get("moe", {}).get("rule") == "magnitude"
        want = expected_pruned(layer.shape, config, report.targets.get(layer.name), fallback)
        got = report.mask_pruned[layer.name]
        if want is not None and got != want:
            raise RuntimeError(f"internal error: {layer.name} pruned {got} weights, expected exactly {want}")
        if layer.nm_valid is False:
            raise RuntimeError(f"internal error: {layer.name} has an N:M group with fewer than N zeros")
        if layer.n_zeros < got:
            raise RuntimeError(f"internal error: {layer.name} has {layer.n_zeros} zeros but {got} were pruned")
