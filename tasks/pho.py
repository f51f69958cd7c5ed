"""Step 2, PHO (spec §8): proxy screening, top-k verification by perplexity, and the search summary.

``pho-screen`` runs ``pho.n_trials`` proxy evaluations (resumable trial by trial through ``state.json``),
``verify-candidate`` prunes the whole model with one candidate and measures its ``pho.verify_split``
perplexity (one task per candidate: parallel on threads, Dask workers or one GPU each), and
``search-summary`` writes ``search.json`` (deterministic; the release references its sha256) and
``pho.json`` (``crepe search``'s format, for MLflow and ``crepe prune --params-from``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task

from crepe.errors import CrepeError
from crepe.io import sha256_file, write_json_atomic
from crepe.search.checkpoint import STATE_VERSION
from crepe.search.context import CMA_SIGMA, SearchContext, cma_start_mean
from crepe.search.driver import screen, select_candidates, winner_of
from crepe.search.space import RIA_POINT
from crepe.streaming import streamer_of
from tasks import gpus
from tasks.checkpoint import STATE_FILE, JsonCheckpoint
from tasks.common import computed, finished, limit_threads, load, persisted, task_log
from tasks.inputs import compute_identity, load_tokens, weight_selection
from tasks.keys import content_key, digest, work_dir

SEARCH_FILE = "search.json"  # deterministic search summary (no timings): referenced by the release
PHO_FILE = "pho.json"  # the full summary in crepe search's format (timings included): MLflow


def search_context(cfg: Any, model: Mapping[str, Any], calib: Mapping[str, Any], budget: Any,
                    device: str | None = None) -> Any:
    lm = load(cfg, model["path"], device)
    if streamer_of(lm) is not None:
        raise CrepeError(
            f"PHO keeps the whole model and a dense copy in memory, and {cfg.model.spec!r} does not fit under "
            f"model.max_memory ({cfg.model.max_memory or 'the memory available'}); set pho.enabled: false (with "
            "prune.params) or raise model.max_memory"
        )
    ctx = SearchContext.create(model["path"], cfg.prune.sparsity, budget, cfg.model.dtype, device or cfg.model.device,
                               cfg.prune.rule, cfg.model.blocks, lm=lm, selection=weight_selection(cfg))
    ctx.calibration = (load_tokens(calib), calib["info"])  # the exact windows of the prepare step
    return ctx


def _pho_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    p = cfg.pho
    return {"screen": [p.sampler, p.n_trials, p.top_k, p.seed, p.target, p.target_block, p.search_kernel,
                       cfg.section_hash("pho.bounds")],
            "prune": [cfg.prune.sparsity, cfg.prune.rule, cfg.prune.params], "model": compute_identity(cfg),
            "selection": weight_selection(cfg)}


@task(name="pho-screen", cache_key_fn=content_key((), ("model_hash", "calib"), _pho_extra), **persisted())
def pho_screen(cfg: Any, model: dict[str, Any], model_hash: str, calib: dict[str, Any]) -> dict[str, Any]:
    """PHO stage 1 (spec §8.3): ``pho.n_trials`` proxy evaluations, then the top-k candidates (+ RIA).

    Resumable trial by trial through ``state.json`` in its folder. Returns ``{"path"`` (trials JSON),
    ``"sha256", "candidates", "config"}``."""
    started = computed("pho-screen")
    limit_threads(cfg)
    ctx = search_context(cfg, model, calib, cfg.pho_budget())
    space = cfg.search_space()
    objective = ctx.proxy_objective(cfg.pho.target, cfg.pho.target_block, space.kernel_size)
    options = {"sigma": CMA_SIGMA, "mean": cma_start_mean(space)} if cfg.pho.sampler == "cmaes" else {}
    key = digest(model_hash, calib["sha256"], _pho_extra(cfg, {}))
    out = work_dir(cfg) / "search" / key
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_hash": model_hash, "calibration_sha256": calib["sha256"], "sparsity": ctx.spec.label,
              "rule": cfg.prune.rule, "target": cfg.pho.target, "target_block": cfg.pho.target_block}
    trials = screen(objective, space, cfg.pho.sampler, cfg.pho.n_trials, cfg.pho.seed,
                    JsonCheckpoint(out / STATE_FILE), config, None, options)
    candidates = select_candidates(trials, cfg.pho.top_k)
    path = out / "trials.json"
    write_json_atomic(path, {"config": {**config, "sampler": cfg.pho.sampler, "n_trials": cfg.pho.n_trials,
                                        "seed": cfg.pho.seed, "space": space.as_dict()},
                             "trials": [t.to_dict() for t in trials], "candidates": candidates})
    return finished(started, {"path": str(path), "sha256": sha256_file(path), "candidates": candidates})


def _verify_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    return {"split": cfg.pho.verify_split, "windows": cfg.pho.verify_max_windows, "seqlen": cfg.eval.ppl.seqlen,
            "prune": [cfg.prune.sparsity, cfg.prune.rule], "model": compute_identity(cfg),
            "eval_batch_size": cfg.eval.ppl.batch_size, "selection": weight_selection(cfg),
            "eval_source": cfg.data.eval_source}


def evaluate_candidate(ctx: Any, params: Mapping[str, Any], split: str) -> float:
    """Validation perplexity of CRePE(``params``) on the whole model (the resume test wraps this)."""
    return ctx.evaluate(dict(params), split)


@task(name="verify-candidate",
      cache_key_fn=content_key((), ("model_hash", "calib", "eval_sha256", "params"), _verify_extra), **persisted())
def verify_candidate(cfg: Any, model: dict[str, Any], model_hash: str, calib: dict[str, Any], eval_sha256: str,
                     index: int, params: dict[str, Any]) -> dict[str, Any]:
    """PHO stage 2 for one candidate: prune the whole model with CRePE(``params``) and measure the
    ``pho.verify_split`` perplexity. Returns ``{"index", "params", "ppl", "seconds"}`` (``ppl`` None
    when non-finite). On GPUs the candidate runs on ``cuda:<index mod n>`` of the GPUs it sees (one, pinned,
    in a Dask GPU worker) and holds that GPU's Prefect concurrency slot (:mod:`tasks.gpus`); without
    GPUs, on ``model.device``."""
    started = computed("verify-candidate")
    limit_threads(cfg)
    visible = gpus.visible_gpus()
    device = gpus.candidate_device(cfg.model.device, index, len(visible))
    with gpus.gpu_slot(device, visible) as gpu:
        if gpu is not None:
            task_log(f"verify-candidate-gpu\t{os.getpid()}\t{gpu}")  # 3 fields: not a task start or end
        ctx = search_context(cfg, model, calib, cfg.pho_budget(), device)
        start = time.perf_counter()
        ppl = float(evaluate_candidate(ctx, params, cfg.pho.verify_split))
    result = {"index": index, "params": dict(params), "ppl": ppl if math.isfinite(ppl) else None,
              "seconds": time.perf_counter() - start}
    return finished(started, result)


def choose_winner(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest finite perplexity (ties: candidate order), as crepe.search.driver."""
    return winner_of(list(results))


@task(name="search-summary", cache_key_fn=content_key((), ("screened", "verified")), **persisted())
def search_summary(cfg: Any, screened: dict[str, Any], verified: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``search.json`` (deterministic: no timings; the release manifest references its sha256) and
    ``pho.json`` (crepe search's format, for MLflow) beside the trials. Returns paths, sha256, winner."""
    started = computed("search-summary")
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
    return finished(started, result)
