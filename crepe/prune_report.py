"""What a prune did and the checks that it did it right: :class:`PruneReport` and its helpers.

:func:`measure_layer` counts a pruned weight's zeros (N:M validity under its channel permutation),
:func:`expected_pruned` is the exact count a mask must prune, and :func:`verify_report` compares the
two for every layer after the loop: a mismatch is a bug and raises, it is never silently kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from crepe.masks import LayerSparsity, measure_sparsity
from crepe.methods import is_updater
from crepe.prune_config import PruneConfig
from crepe.sparsegpt import expected_block_pruned
from crepe.types import NMPattern
from crepe.weights import PrunableWeight

__all__ = ["PruneReport", "expected_pruned", "jsonable", "measure_layer", "skipped_row", "verify_report"]


@dataclass
class PruneReport:
    """Per-layer zeros, pruned counts and targets of one :func:`crepe.pruner.prune_model` call."""

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
        """Every failed Cholesky attempt (layer, percdamp, stage) of SparseGPT and of an ``obs`` update, in
        pruning order."""
        return [r for info in self.layer_info.values() for key in ("sparsegpt", "update")
                for r in info.get(key, {}).get("damping_retries", [])]

    def update_summary(self) -> dict[str, Any] | None:
        """Totals over layers of the weight update (``obs``): layers updated, OBS loss, dead inputs."""
        ups = [i["update"] for i in self.layer_info.values() if "obs_loss" in i.get("update", {})]
        if not ups:
            return None
        return {"updated_layers": len(ups), "obs_loss": sum(u["obs_loss"] for u in ups),
                "dead_inputs": sum(u.get("dead_inputs", 0) for u in ups),
                "skipped_layers": sum(1 for i in self.layer_info.values() if "skipped" in i.get("update", {}))}

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
            "update_summary": self.update_summary(),
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


def jsonable(value: Any) -> Any:
    """``value`` with tensors made JSON-clean: scalars as numbers, up to 64 values as lists, else None."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else (value.tolist() if value.numel() <= 64 else None)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def skipped_row(full: str, w: PrunableWeight, reason: str) -> dict[str, Any]:
    """The report row of a weight matrix left dense: its kind, shape, size, zeros and why."""
    param = w.param.detach()
    zeros = 0 if param.is_meta else int((param == 0).sum()) if not w.fused else int((w.matrix() == 0).sum())
    numel = w.numel if w.fused else param.numel()
    return {"name": full, "kind": w.kind, "shape": list(w.shape) if w.kind != "other" else list(param.shape),
            "numel": numel, "n_zeros": zeros, "reason": reason}


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
