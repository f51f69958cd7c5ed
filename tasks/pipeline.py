"""Prefect tasks of the pipeline (issue 4, point 2): thin wrappers over :mod:`crepe`.

Every task exchanges **paths, hashes and small dicts** only (never models or tensors), writes its
large artifacts atomically under the work folder (:func:`work_dir`) and is cached across processes by
a **content key** (:func:`content_key`):

    sha256(task name, code version of crepe/ and this file, the relevant config (sub-)section hashes,
           the content hashes passed in: model content hash, data sha256, upstream artifact sha256)

Paths never enter a key (the same content in another folder hits the cache), nor does the flow run
id, so a rerun after a crash or ``kill -9`` reuses every finished task. Results persist under
``PREFECT_LOCAL_STORAGE_PATH`` (the CLI points it at ``<project>/.prefect/storage``).

Retries: only :func:`resolve_inputs` and :func:`calibration_windows` (model download, data I/O) retry
(``retries=2``); every other task fails at once (a :class:`~crepe.errors.CrepeError` or an OOM at a
fixed size would fail again). Only :func:`track` talks to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crepe.errors import CrepeError
from crepe.io import atomic_dir, sha256_file, sha256_folder, write_json_atomic
from crepe.provenance import source_hash

WORK_ENV = "CREPE_WORK_DIR"
TASK_LOG_ENV = "CREPE_TASK_LOG"  # optional: a file each task body appends "<name>\t<pid>" to when it computes
CALIB_FILE = "calibration.pt"
SEARCH_FILE = "search.json"  # deterministic search summary (no timings): referenced by the release
PHO_FILE = "pho.json"  # the full summary in crepe search's format (timings included): MLflow
PRUNE_MANIFEST = "crepe_manifest.json"  # as `crepe prune` writes it: `crepe verify` checks the folder
EXPORT_STEPS = ("search", "prune", "evaluate")  # the steps whose result `crepe pipeline --export` writes


# --- work folder, code version, cache keys --------------------------------------------------------------


def work_dir(cfg: Any) -> Path:
    """Where tasks write their artifacts: ``$CREPE_WORK_DIR``, else ``<project>/.crepe/work``."""
    env = os.environ.get(WORK_ENV)
    return Path(env).resolve() if env else cfg.project_root / ".crepe" / "work"


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of crepe/'s sources and of this module: a code change invalidates every cached task."""
    return hashlib.sha256((source_hash() + sha256_file(__file__)).encode()).hexdigest()


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def content_key(
    sections: Sequence[str] = (),
    inputs: Sequence[str] = (),
    extra: Callable[[Any, Mapping[str, Any]], Any] | None = None,
) -> Callable[[Any, Mapping[str, Any]], str]:
    """A Prefect ``cache_key_fn``: the task name, :func:`code_version`, ``cfg.section_hash(s)`` of
    ``sections``, the values of the parameters named in ``inputs`` (hashes and small dicts, never
    paths), and ``extra(cfg, parameters)`` (finer-grained config values)."""

    def key(context: Any, parameters: Mapping[str, Any]) -> str:
        cfg = parameters["cfg"]
        payload = {
            "task": context.task.name,
            "code": code_version(),
            "sections": {s: cfg.section_hash(s) for s in sections},
            "inputs": {name: _strip_paths(parameters[name]) for name in inputs},
            "extra": extra(cfg, parameters) if extra else None,
        }
        return f"crepe-{context.task.name}-" + hashlib.sha256(_canonical(payload).encode()).hexdigest()

    return key


def _strip_paths(value: Any) -> Any:
    """A task input without its ``path`` entries (content hashes identify artifacts, folders do not)."""
    if isinstance(value, Mapping):
        return {k: _strip_paths(v) for k, v in value.items() if k != "path"}
    if isinstance(value, (list, tuple)):
        return [_strip_paths(v) for v in value]
    return value


def _digest(*parts: Any) -> str:
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:16]


def limit_threads(cfg: Any) -> int:
    """Torch intra-op threads for a task: the cores shared among ``runner.max_workers`` workers."""
    import torch

    n = max(1, (os.cpu_count() or 1) // max(1, cfg.runner.max_workers))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _computed(name: str) -> tuple[str, float]:
    """Record that a task body started (``$CREPE_TASK_LOG``: a ``name<TAB>pid`` line; tests and the
    overhead benchmark read it); pass the returned token to :func:`_finished`."""
    _task_log(f"{name}\t{os.getpid()}")
    return name, time.perf_counter()


def _finished(started: tuple[str, float], result: Any) -> Any:
    """Record the compute seconds of a task body (a ``name<TAB>pid<TAB>seconds<TAB>end unix time`` line);
    return ``result``."""
    name, t0 = started
    _task_log(f"{name}\t{os.getpid()}\t{time.perf_counter() - t0:.4f}\t{time.time():.4f}")
    return result


def _task_log(line: str) -> None:
    path = os.environ.get(TASK_LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry I/O-like failures only; a CrepeError (bad input, unsupported model) or
    an out-of-memory error would fail the same way again."""
    import torch

    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as err:  # noqa: BLE001 - we only classify it
            exc = err
    return not isinstance(exc, (CrepeError, MemoryError, torch.OutOfMemoryError))


def _persisted(**options: Any) -> dict[str, Any]:
    return {"persist_result": True, "cache_result_in_memory": False, **options}


def _load_tokens(calib: Mapping[str, Any]) -> Any:
    import torch

    path = Path(calib["path"])
    if not path.is_file() or sha256_file(path) != calib["sha256"]:
        raise CrepeError(
            f"cached calibration windows {path} are missing or changed; rerun with --refresh to rebuild the cache"
        )
    return torch.load(path, weights_only=True)


_LOAD_LOCK = threading.Lock()


def _load(cfg: Any, model_path: str, device: str | None = None) -> Any:
    """Load a model folder (on ``device``, default ``model.device``); one load at a time per process
    (transformers' meta-device initialisation is process-global, so two threads loading at once corrupt
    each other: "Cannot copy out of meta tensor")."""
    from crepe.streaming import load_capped

    with _LOAD_LOCK:  # over model.max_memory: a streamed model (blocks read from the shards when used)
        return load_capped(model_path, dtype=cfg.model.dtype, device=device or cfg.model.device,
                           max_memory=cfg.model.max_memory, blocks_path=cfg.model.blocks)


def _search_context(cfg: Any, model: Mapping[str, Any], calib: Mapping[str, Any], budget: Any,
                    device: str | None = None) -> Any:
    from crepe.search.runs import SearchContext
    from crepe.streaming import streamer_of

    lm = _load(cfg, model["path"], device)
    if streamer_of(lm) is not None:
        raise CrepeError(
            f"PHO keeps the whole model and a dense copy in memory, and {cfg.model.spec!r} does not fit under "
            f"model.max_memory ({cfg.model.max_memory or 'the memory available'}); set pho.enabled: false (with "
            "prune.params) or raise model.max_memory"
        )
    ctx = SearchContext.create(model["path"], cfg.prune.sparsity, budget, cfg.model.dtype, device or cfg.model.device,
                               cfg.prune.rule, cfg.model.blocks, lm=lm, selection=weight_selection(cfg))
    ctx.calibration = (_load_tokens(calib), calib["info"])  # the exact windows of the prepare step
    return ctx


# --- 1. model and data ---------------------------------------------------------------------------------


@task(name="resolve-inputs", retries=2, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NO_CACHE)
def resolve_inputs(cfg: Any) -> dict[str, Any]:
    """Resolve (convert or download) the base model and hash the data the config selects.

    Returns ``{"model": {"spec", "kind", "path", "content_hash"[, "hub"]}, "calibration": {...sha256},
    "evaluation": {split: {...sha256}}}`` (never cached: this *is* the content identity)."""
    from crepe.models import resolve_source
    from tasks.prepare import prepare_inputs

    limit_threads(cfg)
    resolved = resolve_source(cfg.model.spec)
    inputs = prepare_inputs(cfg, resolved)
    inputs["model"]["path"] = str(resolved[1])
    return inputs


def _calib_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    return {"calib_source": cfg.data.calib_source}


@task(name="calibration-windows", retries=2, retry_delay_seconds=2, retry_condition_fn=transient,
      cache_key_fn=content_key(("calibration",), ("model_hash", "data_sha256"), _calib_extra), **_persisted())
def calibration_windows(cfg: Any, model_path: str, model_hash: str, data_sha256: str) -> dict[str, Any]:
    """The seeded calibration windows (spec §1.2) tokenized once and saved as a tensor file.

    Returns ``{"path", "sha256", "info"}`` (``info``: source, sha256, n_samples, seqlen, seed, tokens
    sha256; no machine paths)."""
    import torch
    from transformers import AutoTokenizer

    from crepe.jobs import calibrate_tokens

    started = _computed("calibration-windows")
    limit_threads(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)  # the windows need the tokenizer only, never the weights
    ids, info = calibrate_tokens(tokenizer, cfg.budget())
    info = {k: v for k, v in info.items() if k != "path"}
    key = _digest(model_hash, data_sha256, cfg.section_hash("calibration"))
    out = work_dir(cfg) / "calibration" / key
    with atomic_dir(out, overwrite=True) as tmp:
        torch.save(ids.contiguous(), tmp / CALIB_FILE)
    path = out / CALIB_FILE
    return _finished(started, {"path": str(path), "sha256": sha256_file(path), "info": info})


# --- 2. PHO ---------------------------------------------------------------------------------------------


def weight_selection(cfg: Any) -> dict[str, Any]:
    """Which block weights every prune of the run touches, and the MoE calibration rule (``prune.*``)."""
    p = cfg.prune
    return {"targets": p.targets, "ignore": p.ignore, "prune_router": p.prune_router,
            "moe_min_tokens": p.moe_min_tokens, "moe_fallback": p.moe_fallback}


def compute_identity(cfg: Any) -> dict[str, Any]:
    """What the numbers of a compute task depend on beyond its inputs: dtype, block path, the resolved
    device kind (cpu/cuda kernels round differently) and the calibration batch size (chunked sums)."""
    from crepe.models import resolve_device

    try:
        device = resolve_device(cfg.model.device).type
    except CrepeError:  # e.g. cuda on a machine without it: the key names it; loading then fails in one sentence
        device = str(cfg.model.device)
    return {"dtype": cfg.model.dtype, "blocks": cfg.model.blocks, "device": device,
            "calib_batch_size": cfg.calibration.batch_size}


def _pho_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    p = cfg.pho
    return {"screen": [p.sampler, p.n_trials, p.top_k, p.seed, p.target, p.target_block, p.search_kernel,
                       cfg.section_hash("pho.bounds")],
            "prune": [cfg.prune.sparsity, cfg.prune.rule, cfg.prune.params], "model": compute_identity(cfg),
            "selection": weight_selection(cfg)}


@task(name="pho-screen", cache_key_fn=content_key((), ("model_hash", "calib"), _pho_extra), **_persisted())
def pho_screen(cfg: Any, model: dict[str, Any], model_hash: str, calib: dict[str, Any]) -> dict[str, Any]:
    """PHO stage 1 (spec §8.3): ``pho.n_trials`` proxy evaluations, then the top-k candidates (+ RIA).

    Resumable trial by trial through ``state.json`` in its folder. Returns ``{"path"`` (trials JSON),
    ``"sha256", "candidates", "config"}``."""
    from crepe.search.driver import screen, select_candidates
    from crepe.search.runs import CMA_SIGMA, cma_start_mean

    started = _computed("pho-screen")
    limit_threads(cfg)
    ctx = _search_context(cfg, model, calib, cfg.pho_budget())
    space = cfg.search_space()
    objective = ctx.proxy_objective(cfg.pho.target, cfg.pho.target_block, space.kernel_size)
    options = {"sigma": CMA_SIGMA, "mean": cma_start_mean(space)} if cfg.pho.sampler == "cmaes" else {}
    key = _digest(model_hash, calib["sha256"], _pho_extra(cfg, {}))
    out = work_dir(cfg) / "search" / key
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_hash": model_hash, "calibration_sha256": calib["sha256"], "sparsity": ctx.spec.label,
              "rule": cfg.prune.rule, "target": cfg.pho.target, "target_block": cfg.pho.target_block}
    trials = screen(objective, space, cfg.pho.sampler, cfg.pho.n_trials, cfg.pho.seed, out / "state.json",
                    config, None, options)
    candidates = select_candidates(trials, cfg.pho.top_k)
    path = out / "trials.json"
    write_json_atomic(path, {"config": {**config, "sampler": cfg.pho.sampler, "n_trials": cfg.pho.n_trials,
                                        "seed": cfg.pho.seed, "space": space.as_dict()},
                             "trials": [t.to_dict() for t in trials], "candidates": candidates})
    return _finished(started, {"path": str(path), "sha256": sha256_file(path), "candidates": candidates})


def _verify_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    return {"split": cfg.pho.verify_split, "windows": cfg.pho.verify_max_windows, "seqlen": cfg.eval.ppl.seqlen,
            "prune": [cfg.prune.sparsity, cfg.prune.rule], "model": compute_identity(cfg),
            "eval_batch_size": cfg.eval.ppl.batch_size, "selection": weight_selection(cfg),
            "eval_source": cfg.data.eval_source}


def evaluate_candidate(ctx: Any, params: Mapping[str, Any], split: str) -> float:
    """Validation perplexity of CRePE(``params``) on the whole model (the resume test wraps this)."""
    return ctx.evaluate(dict(params), split)


@task(name="verify-candidate",
      cache_key_fn=content_key((), ("model_hash", "calib", "eval_sha256", "params"), _verify_extra), **_persisted())
def verify_candidate(cfg: Any, model: dict[str, Any], model_hash: str, calib: dict[str, Any], eval_sha256: str,
                     index: int, params: dict[str, Any]) -> dict[str, Any]:
    """PHO stage 2 for one candidate: prune the whole model with CRePE(``params``) and measure the
    ``pho.verify_split`` perplexity. Returns ``{"index", "params", "ppl", "seconds"}`` (``ppl`` None
    when non-finite). On GPUs the candidate runs on ``cuda:<index mod n>`` of the GPUs it sees (one, pinned,
    in a Dask GPU worker) and holds that GPU's Prefect concurrency slot (:mod:`tasks.gpus`); without
    GPUs, on ``model.device``."""
    from tasks.gpus import candidate_device, gpu_slot, visible_gpus

    started = _computed("verify-candidate")
    limit_threads(cfg)
    visible = visible_gpus()
    device = candidate_device(cfg.model.device, index, len(visible))
    with gpu_slot(device, visible) as gpu:
        if gpu is not None:
            _task_log(f"verify-candidate-gpu\t{os.getpid()}\t{gpu}")  # 3 fields: not a task start or end
        ctx = _search_context(cfg, model, calib, cfg.pho_budget(), device)
        start = time.perf_counter()
        ppl = float(evaluate_candidate(ctx, params, cfg.pho.verify_split))
    result = {"index": index, "params": dict(params), "ppl": ppl if math.isfinite(ppl) else None,
              "seconds": time.perf_counter() - start}
    return _finished(started, result)


def choose_winner(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest finite perplexity (ties: candidate order), as crepe.search.driver."""
    from crepe.search.driver import _winner

    return _winner(list(results))


@task(name="search-summary", cache_key_fn=content_key((), ("screened", "verified")), **_persisted())
def search_summary(cfg: Any, screened: dict[str, Any], verified: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``search.json`` (deterministic: no timings; the release manifest references its sha256) and
    ``pho.json`` (crepe search's format, for MLflow) beside the trials. Returns paths, sha256, winner."""
    from crepe.search.driver import STATE_VERSION
    from crepe.search.space import RIA_POINT

    started = _computed("search-summary")
    trials_doc = json.loads(Path(screened["path"]).read_text())
    winner = choose_winner(verified)
    out = Path(screened["path"]).parent
    ria = next((r for r in verified if all(float(r["params"].get(k, math.nan)) == v for k, v in RIA_POINT.items())),
               None)
    stable = {
        "config": trials_doc["config"],
        "trials": [{k: t[k] for k in ("index", "params", "proxies")} for t in trials_doc["trials"]],
        "candidates": screened["candidates"],
        "verified": [{k: r[k] for k in ("index", "params", "ppl")} for r in verified],
        "winner": {k: winner[k] for k in ("index", "params", "ppl")},
        "verify": {"split": cfg.pho.verify_split, "max_windows": cfg.pho.verify_max_windows},
    }
    write_json_atomic(out / SEARCH_FILE, stable)
    pho = {
        "version": STATE_VERSION,
        "config": {**trials_doc["config"], "model": cfg.model.spec, "top_k": cfg.pho.top_k, "kind": "pho"},
        "trials": trials_doc["trials"],
        "candidates": screened["candidates"],
        "verified": list(verified),
        "winner": dict(winner),
        "ria_validation_ppl": None if ria is None else ria["ppl"],
        "final": {"params": winner["params"], "validation_ppl": winner["ppl"]},
        "totals": {"n_trials": len(trials_doc["trials"]), "n_verified": len(verified),
                   "stage1_seconds": sum(t["seconds"] for t in trials_doc["trials"]),
                   "stage2_seconds": sum(r["seconds"] for r in verified)},
    }
    write_json_atomic(out / PHO_FILE, pho)
    result = {"path": str(out / SEARCH_FILE), "sha256": sha256_file(out / SEARCH_FILE), "pho_json": str(out / PHO_FILE),
              "winner": stable["winner"], "n_trials": len(stable["trials"]), "n_verified": len(verified)}
    return _finished(started, result)


# --- 3. prune, refine ------------------------------------------------------------------------------------


def _prune_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    return {"model": compute_identity(cfg)}


@task(name="final-prune",
      cache_key_fn=content_key(("prune", "refine", "allocation"), ("model_hash", "calib", "params"), _prune_extra),
      **_persisted())
def final_prune(cfg: Any, model: dict[str, Any], model_hash: str, calib: dict[str, Any],
                params: dict[str, Any]) -> dict[str, Any]:
    """Prune the base model with ``prune`` (``params``: the PHO winner overlay, or {}; ``refine`` and
    ``allocation`` are applied inside the sequential prune, see ``PipelineConfig.prune_config``), save the HF folder
    atomically under the work folder with a deterministic ``crepe_manifest.json`` (per-layer zeros and file
    hashes as ``crepe prune`` records them, so ``crepe verify`` accepts the folder). Returns ``{"path", "sha256"`` (folder content hash), ``"prune"``
    (the resolved PruneConfig), ``"report"`` (sparsity, no timings)``}``."""
    from crepe.jobs import prune_loaded
    from crepe.streaming import streamer_of

    started = _computed("final-prune")
    limit_threads(cfg)
    config = cfg.prune_config(params)
    lm = _load(cfg, model["path"])
    streamer = streamer_of(lm)  # over model.max_memory: each block is written to the shards once pruned
    out = work_dir(cfg) / "pruned" / _digest(model_hash, calib["sha256"], cfg.section_hash("prune"),
                                             cfg.section_hash("refine"), cfg.section_hash("allocation"), params)
    with atomic_dir(out, overwrite=True) as tmp:
        if streamer is not None:
            streamer.begin_output(tmp)
        report, _ = prune_loaded(lm, config, cfg.budget(), cfg.model.blocks, None,
                                 (_load_tokens(calib), calib["info"]))
        full = report.as_dict()
        summary = {k: v for k, v in full.items() if k not in ("seconds", "layers", "config")}
        manifest = {
            "kind": "crepe-pruned-model",
            "model": {"spec": cfg.model.spec, "content_hash": model_hash, "dtype": cfg.model.dtype,
                      **({"hub": model["hub"]} if "hub" in model else {})},
            "prune": {**summary, "config": full["config"],
                      "layers": [{k: layer[k] for k in ("name", "kind", "shape", "zeros", "numel", "sparsity",
                                                        "nm_valid")} for layer in full["layers"]]},
            "data": {"calibration": calib["info"]},
            "seed": cfg.calibration.seed,
        }
        if streamer is not None:
            streamer.finish_output(lm.tokenizer)
        else:
            lm.model.save_pretrained(tmp, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file()}
        write_json_atomic(tmp / PRUNE_MANIFEST, manifest)  # deterministic: no timings, no machine paths
    result = {"path": str(out), "sha256": sha256_folder(out), "prune": config.as_dict(), "report": summary}
    return _finished(started, result)


def _refine_in_prune(cfg: Any, pruned: Mapping[str, Any]) -> dict[str, Any]:
    """cp, lsa, dsnot, r2-dsnot run inside the sequential prune (per block, on that block's calibration
    inputs: ``PipelineConfig.prune_config`` passes ``refine`` to :func:`crepe.pruner.prune_model`), so the
    folder of :func:`final_prune` is already refined; this step records it."""
    out = dict(pruned)
    out["refined"] = {"method": cfg.refine.method, "where": "in the sequential prune, block by block"}
    return out


def _refine_none(cfg: Any, pruned: Mapping[str, Any]) -> dict[str, Any]:
    return dict(pruned)


def refiners() -> dict[str, Callable[[Any, Mapping[str, Any]], dict[str, Any]]]:
    """``refine.method`` -> fn(cfg, pruned) -> pruned-like dict: ``none`` passes through; every method of
    :data:`crepe.refine.REFINES` (the pruner applies them in-block) is recorded; a post-hoc
    refinement (a new folder written atomically) would register itself in :data:`REFINERS`."""
    from crepe.refine import REFINES

    return {**{name: _refine_in_prune for name in REFINES}, "none": _refine_none,
            **REFINERS}


# Post-hoc refinements (after the prune, on the saved folder): none yet; see :func:`refiners`.
REFINERS: dict[str, Callable[[Any, Mapping[str, Any]], dict[str, Any]]] = {}


@task(name="refine", cache_key_fn=content_key(("refine",), ("pruned",)), **_persisted())
def refine(cfg: Any, pruned: dict[str, Any]) -> dict[str, Any]:
    """The configured refinement step (registry :func:`refiners`)."""
    table = refiners()
    if cfg.refine.method not in table:
        raise CrepeError(f"refine.method {cfg.refine.method!r} is not available; allowed: {', '.join(table)}")
    return table[cfg.refine.method](cfg, pruned)


# --- 4. evaluate -------------------------------------------------------------------------------------------


def _eval_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    zs = cfg.eval.zero_shot
    return {"ppl": cfg.section_hash("eval.ppl"), "source": cfg.data.eval_source,
            "zero_shot": cfg.section_hash("eval.zero_shot") if zs.tasks else None,
            "model": {**compute_identity(cfg), "calib_batch_size": None}}


@task(name="evaluate", cache_key_fn=content_key((), ("model", "eval_sha256"), _eval_extra), **_persisted())
def evaluate(cfg: Any, model: dict[str, Any], eval_sha256: str) -> dict[str, Any]:
    """Perplexity (spec §14.1, ``eval.ppl``) and, when ``eval.zero_shot.tasks`` is set, lm-eval zero-shot
    accuracy (spec §14.2) of the model folder ``model["path"]``. Returns a JSON-clean dict without timings."""
    from crepe.jobs import evaluate_loaded

    started = _computed("evaluate")
    limit_threads(cfg)
    lm = _load(cfg, model["path"])
    ppl = evaluate_loaded(lm, cfg.budget(), cfg.eval.ppl.split)
    ppl.pop("seconds", None)
    ppl["data"] = {k: v for k, v in ppl.get("data", {}).items() if k != "path"}
    result: dict[str, Any] = {"ppl": ppl}
    zs = cfg.eval.zero_shot
    if zs.tasks:
        from crepe.streaming import streamer_of
        from crepe.zeroshot import run_zero_shot

        out = run_zero_shot(lm.model, lm.tokenizer, list(zs.tasks), zs.limit, zs.batch_size, cfg.data_dir(),
                            streamer=streamer_of(lm))
        result["zero_shot"] = json.loads(json.dumps(out, default=str))
    return _finished(started, result)


# --- 5. release and tracking ----------------------------------------------------------------------------------


@task(name="release", cache_key_fn=content_key(("release",), ("model", "lineage")), **_persisted())
def release(cfg: Any, model: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """Write the release folder (``release.out_dir``) with :func:`crepe.release.write_release`: the pruned
    model, the model card and the manifest (``lineage`` + what write_release measures). Deterministic: the
    same inputs give byte-identical files. Returns ``{"path", "manifest_sha256", "files"}``."""
    from crepe.release import RELEASE_MANIFEST, SmokeTest, write_release
    from crepe.streaming import streamer_of

    started = _computed("release")
    limit_threads(cfg)
    lm = _load(cfg, model["path"])
    smoke = SmokeTest(source=cfg.data.eval_source, data_dir=cfg.data_dir())
    fields = {"title": f"{cfg.model_slug} pruned with {cfg.prune.method} at {cfg.prune.sparsity}"}
    out = write_release(lm.model, lm.tokenizer, cfg.release_dir(), lineage, fields, smoke=smoke, overwrite=True,
                        blocks_path=cfg.model.blocks, streamer=streamer_of(lm))
    manifest = json.loads((out / RELEASE_MANIFEST).read_text())
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    result = {"path": str(out), "manifest_sha256": sha256_file(out / RELEASE_MANIFEST), "files": files,
              "metrics": {"smoke_ppl": (manifest.get("smoke_test") or {}).get("ppl"),
                          "sparsity": manifest["sparsity"]["overall"]}}
    return _finished(started, result)


def release_is_current(released: Mapping[str, Any]) -> bool:
    """The release folder still holds the manifest a (cached) release task wrote."""
    from crepe.release import RELEASE_MANIFEST

    path = Path(released["path"]) / RELEASE_MANIFEST
    return path.is_file() and sha256_file(path) == released["manifest_sha256"]


@task(name="track", cache_key_fn=content_key((), ("run_key", "released", "metrics")), **_persisted())
def track(cfg: Any, run_key: str, inputs: dict[str, Any], search: dict[str, Any] | None,
          metrics: dict[str, Any], released: dict[str, Any] | None) -> dict[str, Any]:
    """Log the pipeline run to MLflow (the only task that does): the parent run (reopened after a crash:
    ``run_key`` is the config hash), nested runs per PHO trial and candidate, metrics, the manifest, and
    the registered release. Returns ``{"run_id", "version"}`` (None without tracking)."""
    from tasks.tracking import Tracker

    if not cfg.tracking.enabled:
        return {"run_id": None, "version": None}
    tracker = Tracker(cfg.tracking_uri(), cfg.project_root, experiment=cfg.tracking.experiment)
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
            from crepe.release import RELEASE_MANIFEST

            tracker.log_manifest(run, Path(released["path"]) / RELEASE_MANIFEST)
            if cfg.release.register_model:
                version = tracker.register_release(released["path"], cfg.registered_model_name(),
                                                   cfg.release.alias, run)
    return {"run_id": run.run_id, "version": None if version is None else version.get("version")}


# --- 6. export: ``crepe pipeline --until STEP --export PATH`` (the DVC stages' outputs) ---------------------

_EXPORT_MARKER = {"search": PHO_FILE, "prune": PRUNE_MANIFEST}  # what an earlier export of the step holds


def check_export(step: str, path: str | Path) -> Path:
    """The absolute path ``crepe pipeline --until STEP --export PATH`` may write, else a CrepeError in one
    sentence: search and prune write a folder (new, empty, or an earlier export of the same step, which is
    replaced), evaluate a JSON file. Checked before the flow starts and again when exporting."""
    if step not in EXPORT_STEPS:
        raise CrepeError(f"--export applies to --until {', '.join(EXPORT_STEPS)}; --until {step} has nothing to "
                         "export" + (" (its folder is release.out_dir: -S release.out_dir=PATH)" if step == "release"
                                     else ""))
    target = Path(path).expanduser().absolute()
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CrepeError(f"--export {path} cannot be written: {blocker} is a file, not a folder")
    if step == "evaluate":
        if target.is_dir():
            raise CrepeError(f"--export {path} is a folder; --until evaluate writes a JSON file such as "
                             "data/metrics/eval.json")
        return target
    if target.exists() and not target.is_dir():
        raise CrepeError(f"--export {path} is a file; --until {step} writes a folder")
    marker = _EXPORT_MARKER[step]
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise CrepeError(f"--export {path} is a non-empty folder without {marker}, so not an earlier --until {step} "
                         "export; remove it or choose another path")
    return target


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


def _cached_file(path: str | Path, sha256: str | None = None) -> Path:
    file = Path(path)
    if not file.is_file() or (sha256 is not None and sha256_file(file) != sha256):
        raise CrepeError(f"the cached result {file} is missing or changed; rerun with --refresh to rebuild it")
    return file


def no_search_summary(cfg: Any) -> dict[str, Any]:
    """The ``pho.json`` of a search step with ``pho.enabled: false``: no search ran, the prune uses
    ``prune.params`` (``crepe prune --params-from`` reads them from ``params``)."""
    return {"kind": "pho", "enabled": False, "winner": None, "params": dict(cfg.prune.params),
            "config": {"model": cfg.model.spec, "method": cfg.prune.method, "sparsity": cfg.prune.sparsity},
            "note": "pho.enabled is false: no search ran; the prune uses prune.params"}


def evaluation_metrics(evaluation: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics JSON of ``--until evaluate --export``: ``perplexity`` (and ``zero_shot``) as ``crepe eval
    --json`` writes them, the achieved sparsity and the pruned folder's content hash; no timings."""
    out: dict[str, Any] = {"perplexity": dict(evaluation["ppl"]),
                           "sparsity": pruned["report"]["overall_sparsity"], "pruned_sha256": pruned["sha256"]}
    if "zero_shot" in evaluation:
        out["zero_shot"] = evaluation["zero_shot"]
    return out


@task(name="export", cache_policy=NO_CACHE)
def export(cfg: Any, step: str, path: str, search: dict[str, Any] | None = None, pruned: dict[str, Any] | None = None,
           evaluation: dict[str, Any] | None = None) -> str:
    """Write the result of ``step`` to ``path``, atomically (a temp sibling renamed into place: an interrupted
    export leaves the previous one intact): search -> a folder with ``pho.json`` (what ``crepe prune
    --params-from`` reads) and ``search.json``; prune -> a copy of the pruned HF folder with its manifest
    (checked against the cached content hash); evaluate -> the metrics JSON (:func:`evaluation_metrics`)."""
    target = check_export(step, path)
    if step == "search":
        with atomic_dir(target, overwrite=True) as tmp:
            if search is None:
                write_json_atomic(tmp / PHO_FILE, no_search_summary(cfg))
            else:
                shutil.copyfile(_cached_file(search["pho_json"]), tmp / PHO_FILE)
                shutil.copyfile(_cached_file(search["path"], search["sha256"]), tmp / SEARCH_FILE)
    elif step == "prune":
        assert pruned is not None
        src = Path(pruned["path"])
        if not src.is_dir():
            raise CrepeError(f"the cached pruned model {src} is missing; rerun with --refresh to rebuild it")
        with atomic_dir(target, overwrite=True) as tmp:
            _copy_tree(src, tmp)
            if sha256_folder(tmp) != pruned["sha256"]:
                raise CrepeError(f"the cached pruned model {src} changed since it was written; rerun with --refresh")
    else:
        assert evaluation is not None and pruned is not None
        write_json_atomic(target, evaluation_metrics(evaluation, pruned))
    return str(target)
