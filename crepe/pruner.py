"""Sequential layer-wise pruning (spec §1.5) of every ``nn.Linear`` in the decoder blocks.

Per block: hook its linears and run the calibration inputs through the *dense* block to collect
float32 input statistics, then score, mask and zero each linear, then run the inputs through the
*pruned* block to produce the next block's inputs. Embeddings, norms and the head are never
pruned. With an offloaded model only the current block and its activations visit the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crepe.blocks import (
    BlockInputs,
    capture_inputs,
    find_blocks,
    model_device,
    prunable_linears,
    run_block,
)
from crepe.errors import CrepeError
from crepe.masks import LayerSparsity, measure_sparsity, select_mask
from crepe.scoring import get_scorer, resolve_params, score
from crepe.types import SparsitySpec, check_group


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; ``group=None`` means the method's official comparison group."""

    method: str
    sparsity: SparsitySpec
    params: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    rule: str = "exact"  # "exact" counts, or the official "threshold" (<= tau) rule for layers

    def resolved_group(self) -> str:
        return check_group(self.group) if self.group else get_scorer(self.method).default_group

    def resolved_params(self) -> dict[str, Any]:
        return resolve_params(self.method, self.params)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": self.sparsity.sparsity,
            "pattern": str(self.sparsity.pattern) if self.sparsity.pattern else None,
            "group": None if self.sparsity.pattern else self.resolved_group(),
            "rule": self.rule,
            "params": self.resolved_params(),
        }


class InputNormAccumulator:
    """Running sum of squared inputs per input channel (float64); ``norm()`` is ``||X_j||_2``."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        self.sq_sum += (x * x).sum(dim=0).to(torch.float64)
        self.n_tokens += x.shape[0]

    def norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().to(torch.float32)


@dataclass
class PruneReport:
    config: dict[str, Any]
    blocks_path: str
    layers: list[LayerSparsity]
    mask_pruned: dict[str, int]
    seconds: dict[str, float]

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "blocks_path": self.blocks_path,
            "n_linears": len(self.layers),
            "overall_sparsity": self.sparsity,
            "total_zeros": self.total_zeros,
            "total_numel": self.total_numel,
            "nm_valid": self.nm_valid,
            "layers": [
                {**layer.as_dict(), "mask_pruned": self.mask_pruned.get(layer.name)}
                for layer in self.layers
            ],
            "seconds": self.seconds,
        }


def check_finite_weights(named: dict[str, nn.Linear]) -> None:
    for name, module in named.items():
        if not torch.isfinite(module.weight).all():
            raise CrepeError(f"layer {name} has NaN or infinite weights; refusing to prune this model")


def check_pattern_fits(named: dict[str, nn.Linear], spec: SparsitySpec) -> None:
    if spec.pattern is None:
        return
    for name, module in named.items():
        if module.in_features % spec.pattern.m:
            raise CrepeError(
                f"layer {name} has input width {module.in_features}, not divisible by M="
                f"{spec.pattern.m} of pattern {spec.pattern}; choose a pattern whose M divides it"
            )


def prune_linear_(
    module: nn.Linear, config: PruneConfig, act_norm: torch.Tensor | None, device: torch.device
) -> int:
    """Score, mask and zero one linear in place; returns the number of weights the mask pruned."""
    weight = module.weight.data
    scores = score(config.method, weight.to(device), act_norm, **config.resolved_params())
    spec = config.sparsity
    if spec.pattern is not None:
        keep = select_mask(scores, pattern=spec.pattern)
    else:
        keep = select_mask(scores, spec.sparsity, group=config.resolved_group(), rule=config.rule)
    weight.masked_fill_(~keep.to(weight.device), 0)
    return int((~keep).sum())


ProgressFn = Callable[[int, int, str], None]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    config: PruneConfig,
    device: torch.device | str | None = None,
    blocks_path: str | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> PruneReport:
    """Prune every linear in the decoder blocks of ``model`` in place and return a report.

    ``calib_ids`` (n, seqlen) token windows are required for activation-aware methods. ``device``
    is the compute device (default: where the model's weights are); blocks that live elsewhere are
    moved there one at a time and moved back after pruning.
    """
    started = time.perf_counter()
    scorer = get_scorer(config.method)
    config.resolved_params()
    config.resolved_group()
    path, blocks = find_blocks(model, blocks_path)
    named = {
        f"{path}.{i}.{name}": m for i, b in enumerate(blocks) for name, m in prunable_linears(b).items()
    }
    if not named:
        raise CrepeError(f"the blocks at {path!r} contain no nn.Linear layers to prune")
    check_finite_weights(named)
    check_pattern_fits(named, config.sparsity)
    dev = torch.device(device) if device is not None else model_device(model)
    if batch_size < 1:
        raise CrepeError(f"batch_size must be >= 1, got {batch_size}")
    seconds: dict[str, float] = {}
    mask_pruned: dict[str, int] = {}
    inputs: BlockInputs | None = None
    if scorer.needs_activations:
        if calib_ids is None or calib_ids.numel() == 0:
            raise CrepeError(f"method {config.method!r} needs calibration data")
        if calib_ids.dim() != 2:
            raise CrepeError(
                f"calibration ids must have shape (n_samples, seqlen), got {tuple(calib_ids.shape)}"
            )
        t0 = time.perf_counter()
        inputs = capture_inputs(model, blocks, calib_ids, batch_size, dev)
        seconds["capture"] = time.perf_counter() - t0
    t_score = 0.0
    for i, block in enumerate(blocks):
        if progress:
            progress(i, len(blocks), f"block {i}")
        home = next(block.parameters()).device
        block.to(dev)
        linears = prunable_linears(block)
        norms: dict[str, torch.Tensor | None] = {name: None for name in linears}
        if inputs is not None:
            accs = {n: InputNormAccumulator(m.in_features, dev) for n, m in linears.items()}
            hooks = [
                m.register_forward_hook(lambda mod, inp, out, acc=accs[n]: acc.add(inp[0]))
                for n, m in linears.items()
            ]
            try:
                for c, hidden in enumerate(inputs.hidden):
                    run_block(block, hidden, inputs.args[i][c], inputs.kwargs[i][c])
            finally:
                for h in hooks:
                    h.remove()
            norms = {n: acc.norm() for n, acc in accs.items()}
        t0 = time.perf_counter()
        for name, module in linears.items():
            mask_pruned[f"{path}.{i}.{name}"] = prune_linear_(module, config, norms[name], dev)
        t_score += time.perf_counter() - t0
        if inputs is not None and i + 1 < len(blocks):
            inputs.hidden = [
                run_block(block, hidden, inputs.args[i][c], inputs.kwargs[i][c])
                for c, hidden in enumerate(inputs.hidden)
            ]
        block.to(home)
    if progress:
        progress(len(blocks), len(blocks), "done")
    seconds["score_and_mask"] = t_score
    seconds["total"] = time.perf_counter() - started
    layers = [measure_sparsity(n, m.weight, config.sparsity.pattern) for n, m in named.items()]
    report = PruneReport(config.as_dict(), path, layers, mask_pruned, {k: round(v, 3) for k, v in seconds.items()})
    verify_report(report, config)
    return report


def expected_pruned(shape: tuple[int, int], config: PruneConfig) -> int | None:
    """The exact number of weights the mask must prune, or None when ties make it open (threshold)."""
    out_dim, in_dim = shape
    spec = config.sparsity
    if spec.pattern is not None:
        return out_dim * (in_dim // spec.pattern.m) * spec.pattern.n
    if config.resolved_group() == "row":
        return out_dim * int(spec.sparsity * in_dim)
    if config.rule == "threshold":
        return None
    return int(spec.sparsity * out_dim * in_dim)


def verify_report(report: PruneReport, config: PruneConfig) -> None:
    """Check every layer's pruned count and N:M validity; a failure is a bug, never silently kept."""
    for layer in report.layers:
        want = expected_pruned(layer.shape, config)
        got = report.mask_pruned[layer.name]
        if want is not None and got != want:
            raise RuntimeError(f"internal error: {layer.name} pruned {got} weights, expected exactly {want}")
        if layer.nm_valid is False:
            raise RuntimeError(f"internal error: {layer.name} has an N:M group with fewer than N zeros")
        if layer.n_zeros < got:
            raise RuntimeError(f"internal error: {layer.name} has {layer.n_zeros} zeros but {got} were pruned")
