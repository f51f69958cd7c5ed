"""Sequential layer-wise pruning (spec §1.5) of every weight matrix in the decoder blocks.

Per block: hook its weights and run the calibration inputs through the *dense* block to collect
float32 input statistics, then score, mask and zero each weight (``update: obs``: then reconstruct
its kept weights from the dense inputs' Hessian), then run the inputs through the *pruned* (and
updated) block to produce the next block's inputs. Embeddings, norms and the head are never
pruned. With an offloaded model only the current block and its activations visit the device.

This module owns the loop (:func:`prune_model`) and one weight's pruning (:func:`prune_linear_`);
the configuration is :mod:`crepe.prune_config`, the report and its checks :mod:`crepe.prune_report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crepe import allocation
from crepe.blocks import BlockInputs, capture_inputs, find_blocks, model_device, run_block
from crepe.errors import CrepeError
from crepe.masks import LayerSparsity, select_mask
from crepe.methods import get_method, is_updater
from crepe.permute import permuted_mask
from crepe.prune_config import PruneConfig
from crepe.prune_report import (
    PruneReport,
    expected_pruned,
    jsonable,
    measure_layer,
    skipped_row,
    verify_report,
)
from crepe.refine import DSNOT_REFINES, PERMUTE_REFINES
from crepe.refine.dsnot import refine_layer
from crepe.scoring import score
from crepe.sparsegpt import obs_update, sparsegpt_prune, sparsegpt_score
from crepe.stats import BlockStats, LayerStats
from crepe.types import SparsitySpec
from crepe.weights import BlockWeights, PrunableWeight, block_weights

# PruneConfig, PruneReport and expected_pruned live in crepe.prune_config / crepe.prune_report and are
# re-exported here: ``from crepe.pruner import PruneConfig, PruneReport, prune_model`` is the front door.
__all__ = ["PruneConfig", "PruneReport", "expected_pruned", "prune_linear_", "prune_model"]

# TEMPORARY: flows/cli.py still reads this name; the integrator points it at crepe.allocation.ALLOCATORS.


def check_finite_weights(named: dict[str, PrunableWeight]) -> None:
    """Refuse a model with a NaN or infinite weight before any weight changes."""
    for name, w in named.items():
        if w.param.is_meta:
            continue  # not materialised yet (streamed model): checked when its block loads
        if not torch.isfinite(w.matrix()).all():
            raise CrepeError(f"layer {name} has NaN or infinite weights; refusing to prune this model")


def check_pattern_fits(named: dict[str, PrunableWeight], spec: SparsitySpec) -> None:
    """Refuse an N:M pattern whose M does not divide some weight's input width."""
    if spec.pattern is None:
        return
    for name, w in named.items():
        if w.in_features % spec.pattern.m:
            what = {"conv1d": "Conv1D weight", "expert": "expert weight", "router": "router weight"}.get(w.kind, "layer")
            raise CrepeError(
                f"{what} {name} has input width {w.in_features}, not divisible by M="
                f"{spec.pattern.m} of pattern {spec.pattern}; choose a pattern whose M divides it"
            )


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


def _permute(scores: torch.Tensor, config: PruneConfig, ctx: LayerContext) -> torch.Tensor:
    """Channel-permuted N:M keep-mask (original channel order) from :mod:`crepe.permute`.

    Contract: ``permuted_mask(scores, pattern, method, **refine_params) -> (keep, info)`` with
    ``keep`` in the original channel order and ``info["permutation"]`` the permutation (new position ->
    original input channel) under which ``keep`` is N:M; the other ``info`` entries (gains) go
    into the report.
    """
    assert config.sparsity.pattern is not None
    keep, info = permuted_mask(scores, config.sparsity.pattern, config.refine, **config.refine_params)
    perm = info.get("permutation") if isinstance(info, dict) else None
    if perm is None:
        raise RuntimeError(
            "internal error: crepe.permute.permuted_mask must return the permutation as info['permutation']"
        )
    ctx.perm = torch.as_tensor(perm, dtype=torch.long, device=scores.device)
    ctx.info["permutation"] = {k: jsonable(v) for k, v in info.items() if k != "permutation"}
    return keep


def _calibration_error(config: PruneConfig) -> str:
    if get_method(config.method).needs_activations:
        return f"method {config.method!r} needs calibration data"
    if config.refine in DSNOT_REFINES:
        return f"refine {config.refine!r} needs calibration data (per-channel input means and variances)"
    if config.update != "none":
        return f"update {config.update!r} needs calibration data (the input Hessian)"
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
    """Score, mask and zero (SparseGPT or ``update: obs``: and reconstruct) one weight matrix in place.

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
        if config.update != "none":
            ctx.info["update"] = {"skipped": "magnitude fallback (too few routed tokens)"}
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
    if config.update == "obs":  # the final mask fixed, the kept weights reconstructed (crepe.updates)
        if stats.hessian is None:
            raise CrepeError(_calibration_error(config))
        up = config.resolved_update_params()
        result = obs_update(w, stats.hessian, ~keep, up["blocksize"], up["percdamp"], up["max_damp_retries"],
                            ctx.name, ctx.perm, up["guard"])
        weight.copy_(result.weight.to(device=weight.device, dtype=weight.dtype))
        ctx.info["update"] = result.info
        return result.n_pruned
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
    ratios = [
        float(r)
        for r in allocation.block_ratios(
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
    want_hessian = config.needs_hessian
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
                layer_info[full] = jsonable(ctx.info)
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
        skipped.extend(skipped_row(f"{path}.{i}.{n}", w, why) for n, (w, why) in per_block[i].skipped.items())
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
