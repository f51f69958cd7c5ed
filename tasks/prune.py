"""Step 3, the prune: the one code path that prunes a model and writes the pruned Hugging Face folder.

``crepe prune --out DIR`` and the pipeline's ``final-prune`` task both call :func:`prune_to_folder`, so
they write the same files and the same ``crepe_manifest.json`` for the same config. The manifest is
deterministic (no timings, no clock, no machine paths): the model's identity, the resolved prune config,
per-layer zeros, what was left dense and why, the calibration data's hashes, the code and package
versions, and the sha256 of every file. ``crepe verify`` checks a folder against it. Refinements (cp, lsa,
dsnot, r2-dsnot) and allocations run inside the sequential prune, block by block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from prefect import task

from crepe.errors import CrepeError
from crepe.io import atomic_dir, dir_is_nonempty, sha256_file, sha256_folder, write_json_atomic
from crepe.provenance import code_version, package_versions
from crepe.run import prune_loaded
from crepe.streaming import streamer_of
from tasks.common import computed, finished, limit_threads, load, persisted
from tasks.evaluate import perplexity_of
from tasks.inputs import compute_identity, load_tokens
from tasks.keys import content_key, digest, work_dir
from tasks.verify import PRUNE_MANIFEST

MANIFEST = PRUNE_MANIFEST
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """``--out`` may be new or empty, or anything with ``overwrite``; a file is refused in one sentence."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CrepeError(f"--out {path} exists and is a file; give a folder path")
    if dir_is_nonempty(path) and not overwrite:
        raise CrepeError(f"--out {path} exists and is not empty; pass --overwrite to replace it")
    return path


def _stable(value: Any) -> Any:
    """``value`` without timing entries (``seconds``): the manifest must not change from run to run."""
    if isinstance(value, Mapping):
        return {k: _stable(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def manifest_of(cfg: Any, model: Mapping[str, Any], lm: Any, report: Any,
                calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """The deterministic ``crepe_manifest.json`` of a prune (the ``files`` entry is added when written)."""
    identity = {"spec": cfg.model.spec, "kind": model.get("kind"), "content_hash": model["content_hash"],
                "dtype": cfg.model.dtype, "architecture": lm.info.architecture, "n_params": lm.info.n_params,
                "streamed": streamer_of(lm) is not None, **({"hub": model["hub"]} if "hub" in model else {})}
    return {
        "kind": "crepe-pruned-model",
        "model": identity,
        "prune": _stable(report.as_dict()),
        "data": {"calibration": dict(calibration) if calibration else None},
        "seed": cfg.calibration.seed,
        "config": {"prune": cfg.section("prune"), "refine": cfg.section("refine"),
                   "allocation": cfg.section("allocation"), "calibration": cfg.section("calibration")},
        "code": code_version(),
        "versions": package_versions(),
    }


def prune_to_folder(cfg: Any, model: Mapping[str, Any], out: str | Path, params: Mapping[str, Any] | None = None,
                    calibration: tuple[torch.Tensor, dict[str, Any]] | None = None, overwrite: bool = False,
                    eval_split: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Load ``model["path"]``, prune it with ``cfg.prune`` (``params`` overlay the method's parameters, e.g.
    the PHO winner), save the HF folder and its manifest to ``out`` atomically; return ``{"path", "sha256",
    "prune", "report", "manifest", "timings"}``. ``calibration``: the windows and their record (default:
    sampled from ``cfg``'s budget with the loaded tokenizer, :func:`crepe.run.prune_loaded`). Over ``model.max_memory`` each block is streamed from the shards and written once
    pruned. ``eval_split`` also measures the pruned model's perplexity (recorded as ``evaluation``)."""
    out_dir = check_out_dir(out, overwrite)
    config = cfg.prune_config(params)
    started = time.perf_counter()
    lm = load(cfg, model["path"])
    load_s = time.perf_counter() - started
    streamer = streamer_of(lm)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if streamer is not None:
            streamer.begin_output(tmp)
        report, record = prune_loaded(lm, config, cfg.budget(), cfg.model.blocks, progress, calibration)
        manifest = manifest_of(cfg, model, lm, report, record)
        if streamer is not None:
            streamer.finish_output(lm.tokenizer)  # later reads (the evaluation) come from the written folder
        else:
            lm.model.save_pretrained(tmp, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)
        if eval_split:
            manifest["evaluation"] = perplexity_of(lm, cfg, eval_split, progress)
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file()}
        write_json_atomic(tmp / MANIFEST, manifest)
    timings = {"load": round(load_s, 3), **{f"prune_{k}": v for k, v in report.seconds.items()},
               "total": round(time.perf_counter() - started, 3)}
    summary = {k: v for k, v in manifest["prune"].items() if k not in ("layers", "config")}
    return {"path": str(out_dir), "sha256": sha256_folder(out_dir), "prune": config.as_dict(), "report": summary,
            "manifest": manifest, "timings": timings}


def _prune_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    return {"model": compute_identity(cfg)}


@task(name="final-prune",
      cache_key_fn=content_key(("prune", "refine", "allocation"), ("model_hash", "calib", "params"), _prune_extra),
      **persisted())
def final_prune(cfg: Any, model: dict[str, Any], model_hash: str, calib: dict[str, Any],
                params: dict[str, Any]) -> dict[str, Any]:
    """:func:`prune_to_folder` into the work folder with the cached calibration windows (``params``: the
    PHO winner overlay, or {}). Returns ``{"path", "sha256", "prune", "report"}`` (no timings)."""
    started = computed("final-prune")
    limit_threads(cfg)
    out = work_dir(cfg) / "pruned" / digest(model_hash, calib["sha256"], cfg.section_hash("prune"),
                                            cfg.section_hash("refine"), cfg.section_hash("allocation"), params)
    result = prune_to_folder(cfg, model, out, params, (load_tokens(calib), calib["info"]), overwrite=True)
    return finished(started, {k: result[k] for k in ("path", "sha256", "prune", "report")})


def _refine_in_prune(cfg: Any, pruned: Mapping[str, Any]) -> dict[str, Any]:
    """cp, lsa, dsnot, r2-dsnot run inside the sequential prune (per block, on that block's calibration
    inputs), so the folder of :func:`final_prune` is already refined; this step records it."""
    return {**pruned, "refined": {"method": cfg.refine.method, "where": "in the sequential prune, block by block"}}


@task(name="refine", cache_key_fn=content_key(("refine",), ("pruned",)), **persisted())
def refine(cfg: Any, pruned: dict[str, Any]) -> dict[str, Any]:
    """The refinement step's record: ``none`` passes the pruned folder through; every refinement of
    :data:`crepe.refine.REFINES` ran inside the prune and is recorded."""
    return dict(pruned) if cfg.refine.method == "none" else _refine_in_prune(cfg, pruned)
