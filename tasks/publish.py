"""Step 5, publishing: the release folder (model, card, manifest), its lineage, and the MLflow record.

``release`` writes ``release.out_dir`` through :mod:`tasks.release` (deterministic: the same inputs give
byte-identical files); :func:`lineage` is what the release manifest records of the run (no machine paths,
no timings); ``track`` is the pipeline's one MLflow writer: the parent run (reopened after a crash by its
config hash), nested runs per PHO trial and candidate, metrics, the manifest and the registered release.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task

from crepe.io import sha256_file
from crepe.measure import SmokeTest
from crepe.streaming import streamer_of
from tasks.common import computed, finished, limit_threads, load, persisted
from tasks.keys import code_version, content_key, work_dir
from tasks.release import write_release
from tasks.tracking import open_tracker
from tasks.verify import RELEASE_MANIFEST
from tasks.zeroshot import zero_shot_metrics


def lineage(cfg: Any, inputs: dict, calib: dict, pruned: dict, search: dict | None,
             evaluation: dict) -> dict[str, Any]:
    """The release manifest's lineage: no machine paths of the work folder, no timings (byte-identical
    releases across reruns and work folders)."""
    ppl = evaluation["ppl"]
    metrics: dict[str, Any] = {"ppl": {"value": ppl["ppl"], "split": ppl["split"], "seqlen": ppl["seqlen"],
                                       "n_windows": ppl["n_windows"]}}
    if "zero_shot" in evaluation:
        metrics["zero_shot"] = evaluation["zero_shot"]
    work = work_dir(cfg)
    ref = None
    if search is not None:
        ref = {"path": Path(search["path"]).relative_to(work).as_posix(), "sha256": search["sha256"],
               "winner": search["winner"], "n_trials": search["n_trials"], "n_verified": search["n_verified"]}
    return {
        "base_model": {"spec": cfg.model.spec, "kind": inputs["model"]["kind"],
                       "content_hash": inputs["model"]["content_hash"],
                       **({"hub": inputs["model"]["hub"]} if "hub" in inputs["model"] else {})},
        "prune": {**pruned["prune"], **{k: pruned["report"][k] for k in ("by_kind", "skipped", "all_block_weights")
                                        if k in pruned.get("report", {})}},
        "refine": {"method": cfg.refine.method, "params": cfg.refine.params},
        "data": {"calibration": calib["info"], "evaluation": inputs["evaluation"]},
        "config": cfg.to_dict(),
        "config_sha256": cfg.config_hash(),
        "search": ref,
        "metrics": metrics,
        "pipeline": {"code_sha256": code_version(), "pruned_sha256": pruned["sha256"]},
    }


def run_metrics(evaluation: dict, released: dict | None) -> dict[str, Any]:
    """The run's metrics for MLflow: the perplexities, the released sparsity and smoke perplexity, and the
    zero-shot accuracies (``zero_shot/<task>/acc``, ...)."""
    out: dict[str, Any] = {"ppl": {evaluation["ppl"]["split"]: evaluation["ppl"]["ppl"]}}
    if released is not None:
        out["sparsity"] = {"overall": released["metrics"]["sparsity"]}
        if released["metrics"]["smoke_ppl"] is not None:
            out["ppl"]["smoke"] = released["metrics"]["smoke_ppl"]
    if "zero_shot" in evaluation:
        out["zero_shot"] = {k.removeprefix("zero_shot/"): v
                            for k, v in zero_shot_metrics(evaluation["zero_shot"], "zero_shot").items()}
    return out


@task(name="release", cache_key_fn=content_key(("release",), ("model", "lineage")), **persisted())
def release(cfg: Any, model: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """Write the release folder (``release.out_dir``) with :func:`tasks.release.write_release`: the pruned
    model, the model card and the manifest (``lineage`` + what write_release measures). Deterministic: the
    same inputs give byte-identical files. Returns ``{"path", "manifest_sha256", "files"}``."""
    started = computed("release")
    limit_threads(cfg)
    lm = load(cfg, model["path"])
    smoke = SmokeTest(source=cfg.data.eval_source, data_dir=cfg.data_dir())
    fields = {"title": f"{cfg.model_slug} pruned with {cfg.prune.method} at {cfg.prune.sparsity}"}
    out = write_release(lm.model, lm.tokenizer, cfg.release_dir(), lineage, fields, smoke=smoke, overwrite=True,
                        blocks_path=cfg.model.blocks, streamer=streamer_of(lm))
    manifest = json.loads((out / RELEASE_MANIFEST).read_text())
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    result = {"path": str(out), "manifest_sha256": sha256_file(out / RELEASE_MANIFEST), "files": files,
              "metrics": {"smoke_ppl": (manifest.get("smoke_test") or {}).get("ppl"),
                          "sparsity": manifest["sparsity"]["overall"]}}
    return finished(started, result)


def release_is_current(released: Mapping[str, Any]) -> bool:
    """The release folder still holds the manifest a (cached) release task wrote."""
    path = Path(released["path"]) / RELEASE_MANIFEST
    return path.is_file() and sha256_file(path) == released["manifest_sha256"]


@task(name="track", cache_key_fn=content_key((), ("run_key", "released", "metrics")), **persisted())
def track(cfg: Any, run_key: str, inputs: dict[str, Any], search: dict[str, Any] | None,
          metrics: dict[str, Any], released: dict[str, Any] | None) -> dict[str, Any]:
    """Log the pipeline run to MLflow (the only task that does): the parent run (reopened after a crash:
    ``run_key`` is the config hash), nested runs per PHO trial and candidate, metrics, the manifest, and
    the registered release. Returns ``{"run_id", "version"}`` (None without tracking)."""
    if not cfg.tracking.enabled:
        return {"run_id": None, "version": None}
    tracker = open_tracker(cfg.tracking_uri(), cfg.project_root, experiment=cfg.tracking.experiment)
    data_hashes = {"calibration": inputs["calibration"]["sha256"],
                   **{f"evaluation.{s}": e["sha256"] for s, e in inputs["evaluation"].items()}}
    version = None
    with tracker.pipeline_run(cfg.model.spec, f"pipeline {cfg.model_slug} {cfg.prune.sparsity}", cfg.to_dict(),
                              kind="pipeline", model_hash=inputs["model"]["content_hash"], data_hashes=data_hashes,
                              pattern=cfg.prune.sparsity, method=cfg.prune.method, run_key=run_key) as run:
        if search is not None:
            tracker.log_search(run, search["pho_json"])
        tracker.log_metrics(run, metrics)
        if released is not None:
            tracker.log_manifest(run, Path(released["path"]) / RELEASE_MANIFEST)
            if cfg.release.register_model:
                version = tracker.register_release(released["path"], cfg.registered_model_name(),
                                                   cfg.release.alias, run)
    return {"run_id": run.run_id, "version": None if version is None else version.get("version")}
