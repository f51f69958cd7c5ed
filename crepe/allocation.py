"""Non-uniform layer sparsity: one pruning ratio per decoder block (OWL, AlphaPruning, DLP).

Each allocator turns a per-block statistic into per-block sparsities whose mean is the target; the
pruner then prunes every linear of block l at ``ratios[l]`` with the chosen score. Which mean is
kept exact follows each original:

| method  | statistic (per block)                              | band                     | exact mean          |
|---------|----------------------------------------------------|--------------------------|---------------------|
| ``owl`` | outlier ratio of the dense Wanda scores (§11)      | additive, width 2*lam    | simple              |
| ``dlp`` | ``|mean|`` of the dense Wanda scores (§13)         | additive, width 2*alpha  | simple              |
| ``alpha`` | ESD power-law alpha of the weights (§12)         | multiplicative, 1 +- eps | parameter-weighted  |

OWL and DLP ratios that fall to <= 0 are clipped to 0.01 (as the official code does at prune time;
the mean is then no longer exact); ratios >= 1 would prune whole layers (the official code does
not guard them) and raise :class:`CrepeError` instead: lower the target or the band. AlphaPruning
ratios are > 0 by construction (eps < 1) and also raise when >= 1. When every block has the same
statistic (e.g. a one-block model) all ratios equal the target (the official code divides by zero).

The calibration statistics (OWL, DLP) come from one *dense* sequential pass, block by block, with
every block replaying its own recorded call arguments (:mod:`crepe.blocks`): forward hooks collect
the input norms ``||X_j||_2`` of every linear, and the dense block's outputs feed the next block.
The Wanda score is ``|W_ij| * ||X_j||_2``; the official code uses ``||X_j||_2 / sqrt(n_samples)``,
a constant shared by every block, to which both statistics are invariant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from crepe.blocks import capture_inputs, find_blocks, model_device, run_block
from crepe.errors import CrepeError
from crepe.esd import ESD_METRICS, block_esd_metrics, block_param_counts
from crepe.registry import Registry
from crepe.stats import BlockStats
from crepe.weights import prunable_weights


@dataclass(frozen=True)
class Allocator:
    """What the pruner reads about one allocator: the ``obj`` of its :data:`ALLOCATORS` entry."""

    calibrated: bool  # True: one dense calibration pass (input norms); False: the weights only
    ratio_mean: str  # the mean of the ratios that equals the target: "simple" or "param_weighted"


# The allocation registry (``allocation.method``, ``--allocation``): unstructured only. OWL: M = 5,
# lambda = 0.08 is the README/paper setting for unstructured pruning (the argparse default of --Hyper_m
# is 3). AlphaPruning: the code default epsilon 0.3 and the alpha_peak metric.
ALLOCATORS = Registry("layer allocation")
ALLOCATORS.register("owl", "OWL: layer sparsity from the share of outlier activations (spec §11)",
                    defaults={"m": 5.0, "lam": 0.08}, patterns="unstructured", obj=Allocator(True, "simple"))
ALLOCATORS.register("alpha", "AlphaPruning: layer sparsity from the heavy-tail exponent of the weights' ESD (spec §12)",
                    defaults={"epsilon": 0.3, "metric": "alpha_peak"}, patterns="unstructured",
                    obj=Allocator(False, "param_weighted"))
ALLOCATORS.register("dlp", "DLP: layer sparsity from each layer's outlier-based importance (spec §13)",
                    defaults={"alpha": 0.15}, patterns="unstructured", obj=Allocator(True, "simple"))
ALLOCATOR_DEFAULTS: dict[str, dict[str, Any]] = {name: dict(e.defaults) for name, e in ALLOCATORS.items()}
RATIO_MEAN: dict[str, str] = {name: e.obj.ratio_mean for name, e in ALLOCATORS.items()}
MIN_RATIO = 0.01  # official clip for ratios <= 0 (OWL, DLP)


# --- validation ----------------------------------------------------------------------------------


def _check_method(method: str) -> str:
    if method not in ALLOCATORS:
        raise CrepeError(f"unknown layer allocation {method!r}; allowed: {', '.join(ALLOCATORS)}")
    return method


def needs_calibration(method: str) -> bool:
    """True for allocators that need the dense calibration pass (owl, dlp); alpha uses weights only."""
    return bool(ALLOCATORS[_check_method(method)].obj.calibrated)


def check_target(target: float) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise CrepeError(f"target sparsity {target!r} is outside (0, 1); use a fraction such as 0.7")
    return float(target)


def _number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        bound = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise CrepeError(f"{name}={value!r} is outside {bound}")
    return float(value)


def resolve_allocator_params(method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The allocator's defaults overlaid with ``params``; unknown names or bad values raise."""
    defaults = ALLOCATOR_DEFAULTS[_check_method(method)]
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise CrepeError(
            f"layer allocation {method!r} has no parameter {unknown[0]!r}; its parameters: "
            f"{', '.join(defaults)}"
        )
    full = {**defaults, **params}
    if method == "owl":
        full["m"] = _number("m", full["m"], 0.0, low_open=True)
        full["lam"] = _number("lam", full["lam"], 0.0)
    elif method == "dlp":
        full["alpha"] = _number("alpha", full["alpha"], 0.0)
    else:
        full["epsilon"] = _number("epsilon", full["epsilon"], 0.0, 1.0)
        if full["metric"] not in ESD_METRICS:
            raise CrepeError(f"unknown ESD metric {full['metric']!r}; allowed: {', '.join(ESD_METRICS)}")
    return full


def _finish(sparsity: np.ndarray, method: str, clip: bool) -> list[float]:
    if clip:
        sparsity = np.where(sparsity <= 0, MIN_RATIO, sparsity)
    if (sparsity >= 1).any():
        worst = float(sparsity.max())
        raise CrepeError(
            f"{method} gives a block sparsity of {worst:.4f} >= 1 (the whole block pruned); "
            "lower the target sparsity or the band parameter"
        )
    return [float(v) for v in sparsity]


# --- pure mappings -------------------------------------------------------------------------------


def _density_band(values: Sequence[float], target: float, half_width: float, method: str) -> list[float]:
    """OWL/DLP mapping: min-max scale to [0, 2*half_width], recentre the mean density at 1 - target,
    sparsity = 1 - density, clip <= 0 to 0.01 (official order of operations)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise CrepeError(f"{method} needs one finite statistic per block, got {list(values)!r}")
    span = v.max() - v.min()
    if span == 0:
        return [target] * v.size
    density = (v - v.min()) * (1.0 / span * half_width * 2)
    density = density - density.mean() + (1.0 - target)
    return _finish(1.0 - density, method, clip=True)


def owl_ratios_from_outliers(lod: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL (spec §11.2): block sparsities from the outlier ratios ``lod`` (percent, any scale).

    ``d_l = (D_l - min D) / (max D - min D) * 2 lam``; ``d_l <- d_l - mean(d) + (1 - target)``;
    ``s_l = 1 - d_l`` (0.01 if <= 0). More outliers -> lower sparsity; ``max - min = 2 lam`` and the
    simple mean is exactly ``target`` unless clipped.
    """
    return _density_band(lod, check_target(target), _number("lam", lam, 0.0), "owl")


def dlp_ratios(scores: Sequence[float], target: float, alpha: float = 0.15) -> list[float]:
    """DLP (spec §13.2-3): block sparsities from ``phi_l = |mean Wanda score of block l|``.

    ``I_l = 1 - phi_l / Σ phi``; then the OWL band on ``I`` with half-width ``alpha``. A larger
    ``phi`` -> lower importance -> higher sparsity; simple mean exactly ``target`` unless clipped.
    """
    phi = np.asarray(scores, dtype=np.float64)
    if phi.ndim != 1 or phi.size == 0 or not np.isfinite(phi).all() or (phi < 0).any():
        raise CrepeError(f"dlp needs one finite non-negative score per block, got {list(scores)!r}")
    total = phi.sum()
    importance = 1.0 - phi / total if total > 0 else np.ones_like(phi)
    return _density_band(importance, check_target(target), _number("alpha", alpha, 0.0), "dlp")


def alpha_ratios_from_metric(
    metrics: Sequence[float], sizes: Sequence[int], target: float, epsilon: float = 0.3
) -> list[float]:
    """AlphaPruning (spec §12): ``r_l = (a_l - min a)/(max a - min a) * 2 eps + (1 - eps)``,
    ``s_l = target * r_l * Σ P / Σ (P_l r_l)`` with ``P_l`` = ``sizes[l]`` (prunable parameters).

    Multiplicative band; the parameter-weighted mean ``Σ P_l s_l / Σ P_l`` is exactly ``target``.
    A larger alpha (less heavy-tailed) -> higher sparsity.
    """
    target = check_target(target)
    eps = _number("epsilon", epsilon, 0.0, 1.0)
    a = np.asarray(metrics, dtype=np.float64)
    p = np.asarray(sizes, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
        raise CrepeError(f"alpha needs one finite metric per block, got {list(metrics)!r}")
    if p.shape != a.shape or (p <= 0).any():
        raise CrepeError(f"alpha needs one positive parameter count per block, got {list(sizes)!r}")
    span = a.max() - a.min()
    if span == 0:
        return [target] * a.size
    s1, s2 = 1.0 - eps, 1.0 + eps
    r = ((a - a.min()) / span) * (s2 - s1) + s1
    scaler = p.sum() * target / (p * r).sum()
    return _finish(r * scaler, "alpha", clip=False)


def weighted_mean(ratios: Sequence[float], weights: Sequence[float]) -> float:
    r, w = np.asarray(ratios, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    return float((r * w).sum() / w.sum())


# --- dense calibration statistics (OWL, DLP) ------------------------------------------------------


def wanda_block_stats(
    weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], m: float
) -> tuple[float, float]:
    """(OWL outlier ratio in percent, DLP ``|mean|``) of a block's concatenated Wanda scores.

    ``Z`` = all ``|W_ij| * ||X_j||_2`` of the block's linears; outlier ratio
    ``D = 100 * |{z > m * mean(Z)}| / |Z|``; DLP score ``phi = |mean(Z)|``. Sums in float64.
    """
    total, count = 0.0, 0
    for name, w in weights.items():
        total += float((w.abs().to(torch.float32) * norms[name][None, :]).sum(dtype=torch.float64))
        count += w.numel()
    mean = total / count
    above = 0
    for name, w in weights.items():
        metric = w.abs().to(torch.float32) * norms[name][None, :]
        above += int((metric.to(torch.float64) > m * mean).sum())
    return 100.0 * above / count, abs(mean)


@torch.no_grad()
def dense_wanda_stats(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    m: float = 5.0,
    blocks_path: str | None = None,
    batch_size: int = 8,
    device: Any = None,
) -> list[tuple[float, float]]:
    """Per block: (outlier ratio, |mean|) of the dense Wanda scores, from one dense sequential pass.

    The model is not modified: each block runs once (hooks on its linears), and its *dense* outputs
    are the next block's inputs, with every block's own recorded call arguments replayed.
    """
    if calib_ids is None or not isinstance(calib_ids, torch.Tensor) or calib_ids.numel() == 0:
        raise CrepeError("this layer allocation needs calibration data (token ids)")
    if calib_ids.dim() != 2:
        raise CrepeError(f"calibration ids must have shape (n_samples, seqlen), got {tuple(calib_ids.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CrepeError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _, blocks = find_blocks(model, blocks_path)
    dev = torch.device(device) if device is not None else model_device(model)
    inputs = capture_inputs(model, blocks, calib_ids, batch_size, dev)
    stats: list[tuple[float, float]] = []
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(dev)
        linears = prunable_weights(block)
        if not linears:
            raise CrepeError(f"decoder block {i} contains no weight matrices")
        accs = BlockStats(block, linears, dev, mean_var=False, hessian=False)  # experts: routed tokens
        try:
            outputs = [
                run_block(block, hidden, inputs.args[i][c], inputs.kwargs[i][c])
                for c, hidden in enumerate(inputs.hidden)
            ]
        finally:
            accs.remove()
        weights = {name: w.matrix().detach() for name, w in linears.items()}
        stats.append(wanda_block_stats(weights, {n: accs.norms[n].norm() for n in linears}, m))
        inputs.hidden = outputs
        block.to(home)
    return stats


# --- entry point ---------------------------------------------------------------------------------


def block_ratios(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    method: str,
    target: float,
    blocks_path: str | None = None,
    batch_size: int = 8,
    device: Any = None,
    **params: Any,
) -> list[float]:
    """One sparsity per decoder block for ``method`` ("owl" | "alpha" | "dlp") at mean ``target``.

    Parameters (defaults in ``ALLOCATOR_DEFAULTS``): owl ``m`` (outlier multiple, 5), ``lam``
    (0.08); alpha ``epsilon`` (0.3), ``metric`` ("alpha_peak" | "alpha_mid"); dlp ``alpha`` (0.15).
    The mean that equals ``target`` is ``RATIO_MEAN[method]``: simple for owl and dlp, weighted by
    :func:`block_param_counts` for alpha. owl and dlp need ``calib_ids`` (n, seqlen) and run one dense
    pass; alpha reads only the weights. The model is never modified.
    """
    method = _check_method(method)
    target = check_target(target)
    full = resolve_allocator_params(method, params)
    if method == "alpha":
        metrics = block_esd_metrics(model, full["metric"], blocks_path, device)
        return alpha_ratios_from_metric(
            metrics, block_param_counts(model, blocks_path), target, full["epsilon"]
        )
    m = full["m"] if method == "owl" else ALLOCATOR_DEFAULTS["owl"]["m"]
    stats = dense_wanda_stats(model, calib_ids, m, blocks_path, batch_size, device)
    if method == "owl":
        return owl_ratios_from_outliers([s[0] for s in stats], target, full["lam"])
    return dlp_ratios([s[1] for s in stats], target, full["alpha"])
