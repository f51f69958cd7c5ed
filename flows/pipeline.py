"""Prefect flows of the pipeline (issue 4, points 3, 4, 7, 8, 9): they only compose :mod:`tasks.pipeline`.

- :func:`pipeline`: resolve inputs -> calibration windows -> PHO screening -> top-k verification (one
  task per candidate, mapped: parallel with ``runner.max_workers`` threads or Dask workers) -> final
  prune -> refine -> evaluate -> release -> MLflow; ``until`` stops after search, prune or evaluate
  (no MLflow then) and ``export`` writes that step's result (the DVC stages: ``dvc.yaml``).
- :func:`search`: PHO only (screening, verification, summary, MLflow).
- :func:`evaluate_flow`: perplexity (and zero-shot) of the configured model.
- :func:`transfer`: the best PHO configuration recorded in MLflow for (source model, pattern) applied
  to target models and patterns, next to each target's RIA baseline (the paper's Table 8).

Flows take the params file and ``-S`` overrides (plain, serialisable parameters, so deployments and
schedules can pass them) and load the configuration themselves. Every task is called through
:func:`_call`, which prints ``[crepe] reused cached <task>`` or ``[crepe] computed <task> in N s``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from crepe.errors import CrepeError
from crepe.hub import is_hub_spec
from crepe.models import check_model_folder, resolve_source
from tasks import gpus as gpu_runtime
from tasks import pipeline as T
from tasks.common import limit_threads
from tasks.config import PipelineConfig, load_config
from tasks.tracking import open_tracker
from tasks.transfer import best_source_config, transfer_table

DASK_PROBE_S = 3.0
STEPS = T.STEPS  # `crepe pipeline --until STEP`; release = the whole flow


def say(text: str) -> None:
    print(f"[crepe] {text}", flush=True)


def _report(name: str, state: Any, started: float) -> None:
    if state.name == "Cached":
        say(f"reused cached {name}")
    else:
        say(f"computed {name} in {time.perf_counter() - started:.1f} s")


def _call(task: Any, *args: Any, label: str | None = None, **kwargs: Any) -> Any:
    """Run ``task`` in the flow, report whether it was cached, return its result (errors propagate)."""
    started = time.perf_counter()
    state = task(*args, return_state=True, **kwargs)
    result = state.result()  # raises the task's own exception (a CrepeError stays a CrepeError)
    _report(label or task.name, state, started)
    return result


# --- runners ------------------------------------------------------------------------------------------------


def check_dask_address(address: str, timeout: float = DASK_PROBE_S) -> None:
    """Fail in one sentence when the Dask scheduler at ``address`` does not accept TCP connections."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or 8786
    if parsed.scheme in ("inproc",):
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise CrepeError(
            f"the Dask scheduler runner.dask_address={address!r} is unreachable ({exc.__class__.__name__}: "
            f"{exc}); start it (dask scheduler) or set runner.backend: thread"
        ) from None


def task_runner(cfg: PipelineConfig, gpus: Sequence[str] | None = None) -> Any:
    """``runner.backend``: a thread pool of ``max_workers``, or prefect-dask's ``DaskTaskRunner`` on
    ``runner.dask_address`` (else a local cluster: ``max_workers`` processes with one thread each, or, when
    ``model.device`` is cuda/auto and GPUs are visible, one pinned worker per GPU, see :mod:`tasks.gpus`).
    ``gpus``: the visible GPUs' physical ids (default: this machine's)."""
    if cfg.runner.backend == "dask":
        from prefect_dask import DaskTaskRunner  # optional: only runner.backend dask needs it

        if cfg.runner.dask_address:
            return DaskTaskRunner(address=cfg.runner.dask_address)
        gpus = gpu_runtime.visible_gpus() if gpus is None else list(gpus)
        return DaskTaskRunner(**gpu_runtime.dask_cluster_spec(cfg.runner.max_workers,
                                                  gpus if gpu_runtime.spreads(cfg.model.device, len(gpus)) else []))
    return ThreadPoolTaskRunner(max_workers=cfg.runner.max_workers)


def preflight(cfg: PipelineConfig, tracking: bool = True) -> None:
    """Checks that must fail fast, before any flow starts: a local model folder exists, a hub model (and its
    revision) resolves (fetched into, or offline found in, the HF cache), MLflow (when the run ``tracking`` and
    ``tracking.enabled``) and the Dask scheduler are reachable (each failure: one CrepeError sentence)."""
    spec = cfg.model.spec
    if not spec.startswith(("embedded:", "hf:")) and (spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()):
        check_model_folder(Path(spec).expanduser())
    elif is_hub_spec(spec):
        resolve_source(spec)
    if tracking and cfg.tracking.enabled:
        open_tracker(cfg.tracking_uri(), cfg.project_root, experiment=cfg.tracking.experiment).check()
    if cfg.runner.backend == "dask" and cfg.runner.dask_address:
        check_dask_address(cfg.runner.dask_address)


# --- building blocks ------------------------------------------------------------------------------------------


def _inputs(cfg: PipelineConfig) -> tuple[dict, dict]:
    limit_threads(cfg)
    inputs = _call(T.resolve_inputs, cfg)
    model = inputs["model"]
    say(f"model {model['spec']} ({model['kind']}, content {model['content_hash'][:12]})")
    calib = _call(T.calibration_windows, cfg, model["path"], model["content_hash"], inputs["calibration"]["sha256"])
    return inputs, calib


def _search(cfg: PipelineConfig, inputs: dict, calib: dict) -> dict[str, Any]:
    model = inputs["model"]
    mh = model["content_hash"]
    screened = _call(T.pho_screen, cfg, model, mh, calib)
    candidates = screened["candidates"]
    eval_sha = inputs["evaluation"][cfg.pho.verify_split]["sha256"]
    started = time.perf_counter()
    futures = T.verify_candidate.map(unmapped(cfg), unmapped(model), mh, unmapped(calib), eval_sha,
                                     list(range(len(candidates))), candidates)
    verified = []
    for i, fut in enumerate(futures):
        result = fut.result()
        _report(f"verify-candidate[{i}]", fut.state, started)
        verified.append(result)
    summary = _call(T.search_summary, cfg, screened, verified)
    w = summary["winner"]
    say(f"PHO winner {w['params']} ({cfg.pho.verify_split} ppl {w['ppl']:.4f})")
    return summary


# --- flows ------------------------------------------------------------------------------------------------------


def check_until(until: str, export: str | None = None) -> None:
    """``until`` is one of :data:`STEPS`, and an ``export`` path is allowed for it (one sentence otherwise)."""
    if until not in STEPS:
        raise CrepeError(f"--until {until!r} is not a pipeline step; choose one of {', '.join(STEPS)}")
    STEPS.get(until)
    if export is not None:
        T.check_export(until, export)


def _export(cfg: PipelineConfig, until: str, export: str | None, **result: Any) -> None:
    if export is not None:
        path = _call(T.export, cfg, until, export, **result)
        say(f"exported the {until} result to {path}")


def run_pipeline(cfg: PipelineConfig, until: str = "release", export: str | None = None) -> dict[str, Any]:
    """The DAG on a loaded config (the body of :func:`pipeline`), up to and including the step ``until``
    (:data:`STEPS`; ``release``: everything, MLflow tracking included; an earlier step tracks nothing), then
    ``export`` (a path) receives that step's result (:func:`tasks.pipeline.export`). Every step is a cached
    task, so ``--until search`` then ``--until prune`` computes the search once."""
    check_until(until, export)
    inputs, calib = _inputs(cfg)
    model, mh = inputs["model"], inputs["model"]["content_hash"]
    search = _search(cfg, inputs, calib) if cfg.pho.enabled else None
    if search is None:
        say("pho.enabled is false: no search; the prune uses prune.params")
    if until == "search":
        _export(cfg, until, export, search=search)
        return {"until": until, "search": search}
    params = search["winner"]["params"] if search else {}
    pruned = _call(T.final_prune, cfg, model, mh, calib, params)
    refined = _call(T.refine, cfg, pruned)
    say(f"pruned model {refined['path']} (overall sparsity {refined['report']['overall_sparsity']:.4f})")
    if until == "prune":
        _export(cfg, until, export, pruned=refined)
        return {"until": until, "search": search, "pruned": refined}
    evaluation = _call(T.evaluate, cfg, refined, inputs["evaluation"][cfg.eval.ppl.split]["sha256"])
    say(f"{cfg.eval.ppl.split} perplexity {evaluation['ppl']['ppl']:.4f}")
    if until == "evaluate":
        _export(cfg, until, export, pruned=refined, evaluation=evaluation)
        return {"until": until, "search": search, "pruned": refined, "evaluation": evaluation}
    lineage = T.lineage(cfg, inputs, calib, refined, search, evaluation)
    released = _call(T.release, cfg, refined, lineage)
    if not T.release_is_current(released):  # the folder was removed or replaced since the cached run
        released = _call(T.release.with_options(refresh_cache=True), cfg, refined, lineage)
    say(f"release written to {released['path']} ({len(released['files'])} files; crepe verify {released['path']})")
    tracked = _call(T.track, cfg, cfg.config_hash(), inputs, search, T.run_metrics(evaluation, released), released)
    if tracked["run_id"]:
        say(f"MLflow run {tracked['run_id']} in {cfg.tracking_uri()}"
            + (f"; registered {cfg.registered_model_name()} v{tracked['version']} @{cfg.release.alias}"
               if tracked["version"] else ""))
    return {"until": until, "release": released, "evaluation": evaluation, "search": search, "tracking": tracked,
            "pruned": refined}


@flow(name="crepe-pipeline", log_prints=False, validate_parameters=False)
def pipeline(params: str | None = "params.yaml", overrides: Sequence[str] = (), until: str = "release",
             export: str | None = None) -> dict[str, Any]:
    """The pipeline on ``params`` (a params.yaml path) with ``-S`` ``overrides``, up to the step ``until``,
    whose result goes to ``export`` (see :func:`run_pipeline`)."""
    return run_pipeline(load_config(params, list(overrides)), until, export)


@flow(name="crepe-search", validate_parameters=False)
def search(params: str | None = "params.yaml", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """PHO only: screening and verification of the configured model and pattern, logged to MLflow."""
    cfg = load_config(params, list(overrides))
    if not cfg.pho.enabled:
        raise CrepeError("pho.enabled is false; the search flow needs it true (-S pho.enabled=true)")
    inputs, calib = _inputs(cfg)
    summary = _search(cfg, inputs, calib)
    _call(T.track, cfg, "search-" + cfg.config_hash(), inputs, summary, {}, None)
    return summary


@flow(name="crepe-evaluate", validate_parameters=False)
def evaluate_flow(params: str | None = "params.yaml", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Perplexity (and zero-shot, when configured) of ``model.spec`` as it is (no pruning)."""
    cfg = load_config(params, list(overrides))
    limit_threads(cfg)
    inputs = _call(T.resolve_inputs, cfg)
    model = {"path": inputs["model"]["path"], "sha256": inputs["model"]["content_hash"]}
    return _call(T.evaluate, cfg, model, inputs["evaluation"][cfg.eval.ppl.split]["sha256"])


def _target_row(cfg: PipelineConfig, label: str, params: dict | None, search: dict | None = None) -> dict[str, Any]:
    inputs, calib = _inputs(cfg)
    model, mh = inputs["model"], inputs["model"]["content_hash"]
    pruned = _call(T.final_prune, cfg, model, mh, calib, params or {}, label=f"final-prune[{label}]")
    ev = _call(T.evaluate, cfg, pruned, inputs["evaluation"][cfg.eval.ppl.split]["sha256"], label=f"evaluate[{label}]")
    return {"model": cfg.model.spec, "pattern": cfg.prune.sparsity, "config": label,
            "params": pruned["prune"]["params"] if params is not None else {},
            f"{cfg.eval.ppl.split}_ppl": ev["ppl"]["ppl"]}


@flow(name="crepe-transfer", validate_parameters=False)
def transfer(source_model: str, source_pattern: str, targets: Sequence[str], patterns: Sequence[str],
             with_pho: bool = False, params: str | None = "params.yaml", overrides: Sequence[str] = (),
             out: str = "docs/transfer.md") -> list[dict[str, Any]]:
    """Hyperparameter transfer (the paper's Table 8): for every target model and pattern, the RIA
    baseline, CRePE with the source's best PHO coefficients (from MLflow) and, with ``with_pho``, the
    target's own PHO; the table goes to ``out`` and to an MLflow run."""
    base = load_config(params, list(overrides))
    best = _call(best_source_config, base, source_model, source_pattern)
    coeffs = {k: v for k, v in best["params"].items() if k in ("alpha", "beta", "gamma", "kernel_size")}
    say(f"best {source_model} {source_pattern} configuration: {coeffs} (run {best['run_id']})")
    rows = []
    for target in targets:
        for pattern in patterns:
            common = [*overrides, f"model.spec={target}", f"prune.sparsity={pattern}"]
            ria = load_config(params, [*common, "pho.enabled=false", "prune.method=ria", "prune.params={}"])
            rows.append(_target_row(ria, "ria", None))
            moved = load_config(params, [*common, "pho.enabled=false", "prune.method=crepe"])
            rows.append(_target_row(moved, f"transfer from {source_model} {source_pattern}", coeffs))
            if with_pho:
                own = load_config(params, [*common, "pho.enabled=true", "prune.method=crepe"])
                inputs, calib = _inputs(own)
                found = _search(own, inputs, calib)
                rows.append(_target_row(own, "own PHO", found["winner"]["params"]))
    path = base.resolve_path(out)
    command = ("crepe transfer --source-model " + source_model + " --source-pattern " + source_pattern
               + " --targets " + ",".join(targets) + " --patterns " + ",".join(patterns)
               + (" --with-pho" if with_pho else "") + (f" --params {params}" if params != "params.yaml" else "")
               + "".join(f" -S {o}" for o in overrides) + f" --out {out}")
    _call(transfer_table, base, rows, str(path), source_model, source_pattern, best, command)
    say(f"transfer table written to {path}")
    return rows
