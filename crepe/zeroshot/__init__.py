"""Zero-shot accuracy with lm-evaluation-harness, offline, on a live (in-memory) model (spec §14.2).

The six tasks of the CRePE paper (BoolQ, RTE, MNLI-matched, HellaSwag, ARC-Easy, ARC-Challenge) run with
lm-eval's own task definitions, redirected to local data files (:mod:`crepe.zeroshot.sources`), through
lm-eval's public API only: ``lm_eval.simple_evaluate`` with a ``TaskManager(include_path=...)`` over
the YAMLs crepe writes to a temporary folder. The model is scored as it is in memory (no save, no
reload) by :class:`crepe.zeroshot.scorer.PackedLM`, a public ``lm_eval.api.model.LM`` (rows planned by
:mod:`crepe.zeroshot.rows`), or with ``pack=False`` by lm-eval's stock ``HFLM``. Reported: ``acc`` for
every task, ``acc_norm`` where lm-eval defines it (HellaSwag, ARC), and the unweighted mean of ``acc``
over the tasks (the Wanda/RIA convention). Tables and MLflow metrics live in :mod:`tasks.zeroshot`.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from crepe.zeroshot.rows import Row, batch_rows, plan_rows
from crepe.zeroshot.sources import (
    DEFAULT_BATCH_SIZE,
    LABELS,
    TASK_DATA,
    TASKS,
    Progress,
    TaskData,
    TaskSource,
    build_tasks,
    builtin_yaml,
    check_batch_size,
    check_limit,
    hub_offline,
    lm_eval_version,
    parse_tasks,
    quiet_lm_eval,
    read_config,
    resolve_sources,
    source_overrides,
    task_suite,
    task_yaml,
)

FEWSHOT_SEED = 1234  # simple_evaluate's default; unused at 0 shots


def live_hflm(model: Any, tokenizer: Any, batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress | None = None,
              pack: bool = True, max_length: int | None = None) -> Any:
    """crepe's :class:`~crepe.zeroshot.scorer.PackedLM` around the in-memory ``model`` (historical name)."""
    from crepe.zeroshot.scorer import PackedLM  # needs lm-eval, an optional dependency

    return PackedLM(model, tokenizer, batch_size, progress, pack, max_length)


def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(raw: dict[str, Any], names: Sequence[str], sources: dict[str, TaskSource]) -> dict[str, Any]:
    """Per-task acc / acc_norm (+ stderr), document counts, versions and the unweighted mean acc."""
    tasks: dict[str, Any] = {}
    for name in names:
        values = raw["results"][name]
        counts = raw.get("n-samples", {}).get(name, {})
        tasks[name] = {
            "acc": _metric(values, "acc"),
            "acc_stderr": _metric(values, "acc_stderr"),
            "acc_norm": _metric(values, "acc_norm"),
            "acc_norm_stderr": _metric(values, "acc_norm_stderr"),
            "n": counts.get("effective"),
            "n_total": counts.get("original"),
            "official_n": TASK_DATA[name].official_count,
            "version": raw.get("versions", {}).get(name),
            "split": TASK_DATA[name].split,
            "source": sources[name].as_dict(),
        }
    accs = [t["acc"] for t in tasks.values() if t["acc"] is not None]
    return {
        "tasks": tasks,
        "average_acc": sum(accs) / len(accs) if len(accs) == len(names) else None,
        "average_over": list(names),
        "all_six": sorted(names) == sorted(TASKS),
    }


def run_zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: str | Iterable[str] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    pack: bool = True,
    streamer: Any = None,
) -> dict[str, Any]:
    """Evaluate the in-memory causal LM ``model`` 0-shot on lm-eval ``tasks`` (default: the six).

    With a ``streamer`` (:class:`crepe.streaming.Streamer`, ``model`` is its meta-device model) the decoder
    blocks are read from the shards one at a time per group of batches, with the same scores.

    ``limit`` scores only the first N documents of each task (lm-eval's ``--limit``); None scores all.
    ``device`` moves the model there for the run (and back); None runs it where its weights are.
    ``pack=True`` (default) scores with crepe's packed scorer (each context shared by its choices; equal to
    stock ``HFLM`` up to float rounding, about 2x faster); ``pack=False`` with lm-eval's own ``HFLM``
    (a streamed model, which ``HFLM`` cannot run, gets crepe's scorer with lm-eval's one row per request,
    bit-identical to ``HFLM``). Returns ``tasks`` (per task: acc, acc_norm or None, stderrs, ``n`` scored,
    ``n_total`` available, lm-eval task version, document source), ``average_acc`` (unweighted mean
    acc), the settings, ``lm_eval_version`` and ``throughput``. Inputs are validated before any work.
    """
    names = parse_tasks(tasks)
    limit = check_limit(limit)
    batch_size = check_batch_size(batch_size)
    sources = resolve_sources(names, data_dir)
    started = time.perf_counter()
    with task_suite(names, sources) as (manager, task_objs):
        load_seconds = time.perf_counter() - started
        home = next(model.parameters()).device
        target = torch.device(device) if device is not None else home
        was_training = model.training
        moves = target != home and streamer is None
        if moves:
            model.to(target)
        model.eval()
        try:
            lm, scorer = _scorer(model, tokenizer, batch_size, progress, pack, streamer, target)
            run_started = time.perf_counter()
            raw = _evaluate(lm, manager, [task_objs[n] for n in names], limit)
            run_seconds = time.perf_counter() - run_started
        finally:
            if moves:
                model.to(home)
            model.train(was_training)
    result = summarize(raw, names, sources)
    stats = lm.stats.as_dict() if scorer != "hflm" else dict.fromkeys(_throughput_keys())  # HFLM counts nothing
    result.update({
        "num_fewshot": 0,
        "limit": limit,
        "batch_size": batch_size,
        "packed_contexts": scorer == "packed",
        "scorer": scorer,
        "device": str(target),
        "lm_eval_version": lm_eval_version(),
        "datasets_version": _version("datasets"),
        "harness": ("lm_eval.simple_evaluate on " + ("lm-eval's HFLM(pretrained=<in-memory model>)" if scorer == "hflm"
                    else "crepe's PackedLM (an lm_eval.api.model.LM)") + ", built-in task YAMLs"),
        "throughput": {
            **stats,
            "load_seconds": round(load_seconds, 3),
            "run_seconds": round(run_seconds, 3),
            "tokens_per_second": (round(stats["tokens"] / run_seconds, 1)
                                  if stats["tokens"] is not None and run_seconds > 0 else None),
        },
    })
    return result


def _scorer(model: Any, tokenizer: Any, batch_size: int, progress: Progress | None, pack: bool, streamer: Any,
            target: torch.device) -> tuple[Any, str]:
    """The lm-eval model to run and its kind: ``packed``, ``rows`` (crepe's, unpacked) or ``hflm`` (stock)."""
    from crepe.zeroshot.scorer import PackedLM, stock_hflm  # needs lm-eval, an optional dependency

    if not pack and streamer is None:
        return stock_hflm(model, tokenizer, batch_size), "hflm"
    lm = PackedLM(model, tokenizer, batch_size, progress, pack, streamer=streamer, device=target)
    return lm, "packed" if pack else "rows"


def _throughput_keys() -> list[str]:
    from crepe.zeroshot.scorer import Throughput  # needs lm-eval, an optional dependency

    return list(Throughput().as_dict())


def _evaluate(lm: Any, manager: Any, task_objs: list[Any], limit: int | None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on prepared tasks: 0 shots, no sample logs, the caller's RNG untouched."""
    import lm_eval  # optional extra: only zero-shot evaluation needs lm-eval

    with quiet_lm_eval():
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=task_objs, task_manager=manager, limit=limit, log_samples=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=FEWSHOT_SEED,
        )
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not rank 0)")
    return raw


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "LABELS",
    "TASKS",
    "TASK_DATA",
    "Progress",
    "Row",
    "TaskData",
    "TaskSource",
    "batch_rows",
    "build_tasks",
    "builtin_yaml",
    "check_batch_size",
    "check_limit",
    "hub_offline",
    "live_hflm",
    "lm_eval_version",
    "parse_tasks",
    "plan_rows",
    "quiet_lm_eval",
    "read_config",
    "resolve_sources",
    "run_zero_shot",
    "source_overrides",
    "summarize",
    "task_suite",
    "task_yaml",
]
