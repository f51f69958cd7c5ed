"""What every task shares: torch threads per worker, the compute log, retry rules, result persistence and
the one-at-a-time model loader.

Tasks exchange paths, content hashes and small dicts only; models and tensors never cross a cached-task
boundary. Only :mod:`tasks.inputs` retries (model download, data I/O); a :class:`~crepe.errors.CrepeError` or
an out-of-memory error would fail the same way again.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.provenance import code_version, command_line, machine, package_versions
from crepe.streaming import load_capped

TASK_LOG_ENV = "CREPE_TASK_LOG"  # optional: a file each task body appends "<name>\t<pid>" to when it computes
_LOAD_LOCK = threading.Lock()


def limit_threads(cfg: Any) -> int:
    """Torch intra-op threads for a task: the cores shared among ``runner.max_workers`` workers."""
    n = max(1, (os.cpu_count() or 1) // max(1, cfg.runner.max_workers))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def computed(name: str) -> tuple[str, float]:
    """Record that a task body started (``$CREPE_TASK_LOG``: a ``name<TAB>pid`` line; tests and the
    overhead benchmark read it); pass the returned token to :func:`finished`."""
    task_log(f"{name}\t{os.getpid()}")
    return name, time.perf_counter()


def finished(started: tuple[str, float], result: Any) -> Any:
    """Record the compute seconds of a task body (``name<TAB>pid<TAB>seconds<TAB>end unix time``); return
    ``result``."""
    name, t0 = started
    task_log(f"{name}\t{os.getpid()}\t{time.perf_counter() - t0:.4f}\t{time.time():.4f}")
    return result


def task_log(line: str) -> None:
    path = os.environ.get(TASK_LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry I/O-like failures only; a CrepeError (bad input, unsupported model) or
    an out-of-memory error would fail the same way again."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as err:  # noqa: BLE001 - we only classify it
            exc = err
    return not isinstance(exc, (CrepeError, MemoryError, torch.OutOfMemoryError))


def persisted(**options: Any) -> dict[str, Any]:
    """Task options of a cached task: results persisted to storage, not kept in memory."""
    return {"persist_result": True, "cache_result_in_memory": False, **options}


def load(cfg: Any, model_path: str, device: str | None = None) -> Any:
    """Load a model folder (on ``device``, default ``model.device``); one load at a time per process
    (transformers' meta-device initialisation is process-global, so two threads loading at once corrupt
    each other: "Cannot copy out of meta tensor"). Over ``model.max_memory`` the model is streamed."""
    with _LOAD_LOCK:
        return load_capped(model_path, dtype=cfg.model.dtype, device=device or cfg.model.device,
                           max_memory=cfg.model.max_memory, blocks_path=cfg.model.blocks)


def provenance() -> dict[str, Any]:
    """When, by which command, with which code and packages, on which machine (run records, not manifests:
    these change from run to run)."""
    return {"created_utc": datetime.now(UTC).isoformat(timespec="seconds"), "command": command_line(),
            "versions": package_versions(), "code": code_version(), "machine": machine()}
