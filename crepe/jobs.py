"""End-to-end jobs used by every front end: prune-and-save, evaluate, compare methods.

Each job validates its inputs before doing any work, records where the model and data came from,
and writes artifacts atomically (a temp folder renamed into place).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crepe import data as data_mod
from crepe.errors import CrepeError
from crepe.evaluate import perplexity
from crepe.io import atomic_dir, dir_is_nonempty, read_json, sha256_file, write_json_atomic
from crepe.methods import get_method, resolve_method_params
from crepe.models import DEFAULT_MODEL, LoadedModel, load_model
from crepe.provenance import code_version, command_line, machine, package_versions
from crepe.pruner import PruneConfig, PruneReport, prune_model
from crepe.streaming import load_capped, streamer_of
from crepe.types import SparsitySpec, parse_sparsity

MANIFEST = "crepe_manifest.json"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Budget:
    """Data budget of a run: calibration windows and evaluation windows."""

    calib_samples: int = 128
    seqlen: int = 2048
    eval_seqlen: int | None = None  # None: same as seqlen
    max_windows: int | None = None  # None: the whole split
    batch_size: int = 8  # calibration windows per forward pass
    eval_batch_size: int = 4  # perplexity windows per forward pass (logits are seqlen x vocab each)
    seed: int = 0
    calib_source: str = "auto"
    eval_source: str = "auto"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("calib_samples", "seqlen", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CrepeError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.seqlen < 2:
            raise CrepeError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.eval_seqlen is not None and self.eval_seqlen < 2:
            raise CrepeError(f"eval seqlen must be at least 2, got {self.eval_seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise CrepeError(f"max-windows must be a positive integer, got {self.max_windows}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CrepeError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def eval_len(self) -> int:
        return self.eval_seqlen or self.seqlen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_config(
    method: str,
    sparsity: str | float | SparsitySpec,
    params: dict[str, Any] | None = None,
    group: str | None = None,
    rule: str = "exact",
    *,
    refine: str | None = None,
    refine_params: dict[str, Any] | None = None,
    allocation: str | None = None,
    allocation_params: dict[str, Any] | None = None,
    block_sparsity: list[float] | tuple[float, ...] | None = None,
    targets: str | None = None,
    ignore: str | None = None,
    prune_router: bool = False,
    moe_min_tokens: int = 16,
    moe_fallback: str = "all-tokens",
) -> PruneConfig:
    """Validate everything about a prune request before any model is loaded.

    Bad names, values and combinations (allocation with N:M, channel permutation with unstructured
    sparsity, unknown refinements, ...) raise CrepeError here, before any work.
    """
    get_method(method)
    spec = sparsity if isinstance(sparsity, SparsitySpec) else parse_sparsity(sparsity)
    config = PruneConfig(
        method,
        spec,
        dict(params or {}),
        group,
        rule,
        refine=refine,
        refine_params=dict(refine_params or {}),
        allocation=allocation,
        allocation_params=dict(allocation_params or {}),
        block_sparsity=tuple(block_sparsity) if block_sparsity is not None else None,
        targets=targets or None,
        ignore=ignore or None,
        prune_router=prune_router,
        moe_min_tokens=moe_min_tokens,
        moe_fallback=moe_fallback,
    )
    config.validate()
    resolved = config.resolved_params()
    if method == "crepe":
        _check_crepe_params(resolved)
    if "a" in resolved and (not isinstance(resolved["a"], (int, float)) or not np.isfinite(resolved["a"])):
        raise CrepeError(f"activation exponent a={resolved['a']!r} must be a finite number")
    return config


def _check_crepe_params(p: dict[str, Any]) -> None:
    for key in ("alpha", "beta", "gamma"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise CrepeError(f"{key}={value!r} must be a finite number >= 0")
    if p["alpha"] == p["beta"] == p["gamma"] == 0:
        raise CrepeError("alpha, beta and gamma are all 0, which scores every weight 0; make one positive")
    from crepe.neighborhood import check_kernel_size

    check_kernel_size(p["kernel_size"])


def load_params_file(path: str | Path, method: str) -> dict[str, Any]:
    """Coefficients from a JSON file: a search result (``winner.params``), ``{"params": ...}`` or flat."""
    file = Path(path)
    raw = read_json(file, "params file")
    if isinstance(raw, dict) and isinstance(raw.get("winner"), dict):
        raw = raw["winner"]
    if isinstance(raw, dict) and isinstance(raw.get("params"), dict):
        raw = raw["params"]
    if not isinstance(raw, dict):
        raise CrepeError(f"params file {file} must hold a JSON object of parameters")
    resolve_method_params(method, raw)  # unknown names raise
    return dict(raw)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CrepeError(f"--out {path} exists and is a file; give a folder path")
    if dir_is_nonempty(path) and not overwrite:
        raise CrepeError(f"--out {path} exists and is not empty; pass --overwrite to replace it")
    return path


def _provenance() -> dict[str, Any]:
    return {
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "versions": package_versions(),
        "code": code_version(),
        "machine": machine(),
    }


def calibrate(lm: LoadedModel, budget: Budget) -> tuple[torch.Tensor, dict[str, Any]]:
    """The seeded calibration windows of ``budget`` and their provenance (for the manifest)."""
    return calibrate_tokens(lm.tokenizer, budget)


def calibrate_tokens(tokenizer: Any, budget: Budget) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`calibrate` from a tokenizer alone (no model needed)."""
    seed_everything(budget.seed)
    ids, info = data_mod.get_calibration(
        tokenizer, budget.calib_samples, budget.seqlen, budget.seed, budget.calib_source, budget.data_dir
    )
    tokens_sha = hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest()
    return ids, {
        **info.as_dict(),
        "n_samples": budget.calib_samples,
        "seqlen": budget.seqlen,
        "seed": budget.seed,
        "tokens_sha256": tokens_sha,
    }


def prune_loaded(
    lm: LoadedModel,
    config: PruneConfig,
    budget: Budget,
    blocks: str | None = None,
    progress: Progress | None = None,
    calibration: tuple[torch.Tensor, dict[str, Any]] | None = None,
) -> tuple[PruneReport, dict[str, Any]]:
    """Calibrate (unless ``calibration`` is given) and prune a loaded model in place.

    Returns the report and the data provenance. Methods without calibration get none.
    """
    seed_everything(budget.seed)
    calib_ids = None
    data_info: dict[str, Any] = {"calibration": None}
    if config.needs_calibration:
        calib_ids, data_info["calibration"] = calibration or calibrate(lm, budget)
    report = prune_model(
        lm.model,
        calib_ids,
        config,
        device=lm.info.device,
        blocks_path=blocks,
        batch_size=budget.batch_size,
        progress=(lambda i, n, _s: progress("prune", i, n)) if progress else None,
        **(streamer.hooks() if (streamer := streamer_of(lm)) else {}),
    )
    return report, data_info


def evaluate_loaded(
    lm: LoadedModel, budget: Budget, split: str = "test", progress: Progress | None = None,
    tokens: tuple[torch.Tensor, Any] | None = None,
) -> dict[str, Any]:
    """Perplexity of a loaded model on WikiText-2 ``split`` (or the configured fallback)."""
    ids, info = tokens or data_mod.get_eval_tokens(lm.tokenizer, split, budget.eval_source, budget.data_dir)
    streamer = streamer_of(lm)
    if streamer is not None:  # blocks read from the shards, one at a time
        result = streamer.perplexity(
            ids, budget.eval_len, budget.max_windows, budget.eval_batch_size, lm.info.device,
            progress=(lambda d, n: progress("eval", d, n)) if progress else None,
        )
        return {**result.as_dict(), "split": split, "data": info.as_dict()}
    result = perplexity(
        lm.model,
        ids,
        budget.eval_len,
        max_windows=budget.max_windows,
        batch_size=budget.eval_batch_size,
        device=lm.info.device,
        blockwise=lm.info.offload,
        progress=(lambda d, n: progress("eval", d, n)) if progress else None,
    )
    return {**result.as_dict(), "split": split, "data": info.as_dict()}


def save_pruned(
    lm: LoadedModel, out: Path, manifest: dict[str, Any], overwrite: bool
) -> dict[str, str]:
    """Write an HF folder (safetensors, config, tokenizer) plus the manifest, atomically."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        return _write_manifest(tmp, manifest)


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Record the sha256 of every file in ``tmp`` in ``manifest`` and write it there."""
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest["files"] = files
    write_json_atomic(tmp / MANIFEST, manifest)
    return files


def run_prune(
    model: str,
    config: PruneConfig,
    out: str | Path,
    budget: Budget,
    dtype: str = "float32",
    device: str = "auto",
    blocks: str | None = None,
    overwrite: bool = False,
    eval_split: str | None = None,
    progress: Progress | None = None,
    max_memory: str | int | None = None,
) -> dict[str, Any]:
    """Load ``model``, prune it with ``config``, save it to ``out`` with a manifest; return the manifest.

    When the weights do not fit under ``max_memory`` (default: the memory available) the model is
    streamed (:mod:`crepe.streaming`): each block is read from the shards, pruned and written to ``out``.
    """
    out_dir = check_out_dir(out, overwrite)
    started = time.perf_counter()
    lm = load_capped(model, dtype=dtype, device=device, max_memory=max_memory, blocks_path=blocks)
    streamer = streamer_of(lm)
    if streamer is not None:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            streamer.begin_output(tmp)
            report, data_info = prune_loaded(lm, config, budget, blocks, progress)
            streamer.finish_output(lm.tokenizer)
            manifest = _prune_manifest(lm, report, data_info, budget, eval_split, progress, started)
            _write_manifest(tmp, manifest)
        return manifest
    report, data_info = prune_loaded(lm, config, budget, blocks, progress)
    manifest = _prune_manifest(lm, report, data_info, budget, eval_split, progress, started)
    save_pruned(lm, out_dir, manifest, overwrite)
    return manifest


def _prune_manifest(
    lm: LoadedModel, report: PruneReport, data_info: dict[str, Any], budget: Budget, eval_split: str | None,
    progress: Progress | None, started: float,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "kind": "crepe-pruned-model",
        "model": lm.info.as_dict(),
        "prune": report.as_dict(),
        "data": data_info,
        "seed": budget.seed,
        "budget": budget.__dict__,
        **_provenance(),
    }
    if eval_split:
        manifest["evaluation"] = evaluate_loaded(lm, budget, eval_split, progress)
    manifest["timings"] = {
        "load": lm.info.load_seconds,
        **{f"prune_{k}": v for k, v in report.seconds.items()},
        "total": round(time.perf_counter() - started, 3),
    }
    return manifest


def run_eval(
    model: str,
    budget: Budget,
    split: str = "test",
    dtype: str = "float32",
    device: str = "auto",
    progress: Progress | None = None,
    max_memory: str | int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model``; streamed from its shards when it does not fit under ``max_memory``."""
    lm = load_capped(model, dtype=dtype, device=device, max_memory=max_memory)
    result = evaluate_loaded(lm, budget, split, progress)
    return {"model": lm.info.as_dict(), "perplexity": result, **_provenance()}


def run_zero_shot_job(
    model: str,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    budget: Budget | None = None,
    split: str = "test",
    dtype: str = "float32",
    device: str = "auto",
    progress: Progress | None = None,
    data_dir: str | None = None,
    pack: bool = True,
    max_memory: str | int | None = None,
) -> dict[str, Any]:
    """Load ``model`` (spec or pruned folder) and score it 0-shot on lm-eval ``tasks`` (spec §14.2).

    With a ``budget`` the same loaded model is also evaluated for perplexity on ``split``. Task names,
    ``limit`` and data files are checked before the model is loaded.
    """
    from crepe import zeroshot

    names = zeroshot.parse_tasks(tasks)
    zeroshot.check_limit(limit)
    data_dir = data_dir if data_dir is not None else (budget.data_dir if budget else None)
    zeroshot.resolve_sources(names, data_dir)  # a missing file fails here, before loading
    lm = load_capped(model, dtype=dtype, device=device, max_memory=max_memory)
    streamer = streamer_of(lm)
    result: dict[str, Any] = {"model": lm.info.as_dict()}
    result["zero_shot"] = zeroshot.run_zero_shot(
        lm.model, lm.tokenizer, names, limit, batch_size, data_dir, progress=progress, pack=pack, streamer=streamer,
        device=lm.info.device if streamer is not None else None,
    )
    if budget is not None:
        result["perplexity"] = evaluate_loaded(lm, budget, split, progress)
    return {**result, **_provenance()}


def run_compare(
    model: str,
    methods: list[str],
    patterns: list[str],
    budget: Budget,
    params: dict[str, dict[str, Any]] | None = None,
    dtype: str = "float32",
    device: str = "auto",
    split: str = "test",
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Dense plus each (method, pattern) pruned from a fresh copy, all on the same data."""
    configs = [
        build_config(m, p, (params or {}).get(m)) for p in patterns for m in methods if m != "dense"
    ]
    lm = load_model(model, dtype=dtype, device=device)
    tokens = data_mod.get_eval_tokens(lm.tokenizer, split, budget.eval_source, budget.data_dir)
    # One calibration set for every method (sampled once; identical windows by construction).
    calibration = calibrate(lm, budget) if any(c.needs_calibration for c in configs) else None
    log(f"model: {lm.info.spec} ({lm.info.architecture}, {lm.info.n_params / 1e6:.1f}M params, {lm.info.dtype}, {lm.info.device})")
    log(f"evaluation: {tokens[1].source} {split} ({tokens[1].path})")
    rows: list[dict[str, Any]] = []
    if "dense" in methods:
        res = evaluate_loaded(lm, budget, split, progress, tokens)
        rows.append({"method": "dense", "pattern": "-", "ppl": res["ppl"], "sparsity": 0.0, "prune_s": 0.0, "params": {}})
        log(f"dense: ppl {res['ppl']:.3f}")
    for config in configs:
        lm = load_model(model, dtype=dtype, device=device)  # a fresh, unpruned copy (cached: fast)
        report, _ = prune_loaded(lm, config, budget, None, progress, calibration)
        res = evaluate_loaded(lm, budget, split, progress, tokens)
        label = config.sparsity.label
        rows.append({
            "method": config.method,
            "pattern": label,
            "ppl": res["ppl"],
            "sparsity": report.sparsity,
            "nm_valid": report.nm_valid,
            "prune_s": report.seconds["total"],
            "params": config.resolved_params(),
        })
        log(f"{config.method} {label}: ppl {res['ppl']:.3f} (sparsity {report.sparsity:.4f}, prune {report.seconds['total']:.1f} s)")
    return {
        "model": lm.info.as_dict(),
        "evaluation": {"split": split, **tokens[1].as_dict(), "seqlen": budget.eval_len, "max_windows": budget.max_windows},
        "calibration": calibration[1] if calibration else None,
        "budget": budget.__dict__,
        "rows": rows,
        **_provenance(),
    }


def format_table(rows: list[dict[str, Any]], patterns: list[str]) -> str:
    """Markdown table: one row per method, one column per pattern (perplexity)."""
    labels = [parse_sparsity(p).label for p in patterns]
    methods: list[str] = []
    for row in rows:
        if row["method"] not in methods:
            methods.append(row["method"])
    lines = ["| method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for method in methods:
        cells = []
        for label in labels:
            hit = [r for r in rows if r["method"] == method and (r["pattern"] == label or r["pattern"] == "-")]
            cells.append(f"{hit[0]['ppl']:.3f}" if hit else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_MODEL",
    "MANIFEST",
    "Budget",
    "build_config",
    "calibrate",
    "check_out_dir",
    "format_table",
    "load_params_file",
    "run_compare",
    "run_eval",
    "run_prune",
    "run_zero_shot_job",
]
