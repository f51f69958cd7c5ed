"""Cache keys and canonical JSON: the one place that decides what a cached result depends on.

A task's key is ``sha256(task name, code version, config section hashes, content hashes of its inputs,
finer config values)``. Paths never enter a key (the same content in another folder hits the cache), nor
does the flow run id, so a rerun after a crash reuses every finished task.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from crepe.io import sha256_file
from crepe.provenance import source_hash

WORK_ENV = "CREPE_WORK_DIR"
_TASKS_DIR = Path(__file__).resolve().parent
# tasks/ modules no cached result depends on (reports and the CLI-only jobs): editing them keeps the cache.
_NOT_IN_CODE_VERSION = ("transfer.py", "reports.py", "search_jobs.py", "plots.py")


def canonical_json(data: Any) -> str:
    """Sorted keys, no whitespace, ASCII: equal data gives equal text (and equal keys) in every process."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any, length: int = 16) -> str:
    """A short sha256 of ``parts`` (folder names under the work folder, run keys)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:length]


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of crepe/'s and tasks/' sources (but :data:`_NOT_IN_CODE_VERSION`): a code change invalidates
    every cached task."""
    files = sorted(p for p in _TASKS_DIR.glob("*.py") if p.name not in _NOT_IN_CODE_VERSION)
    return hashlib.sha256((source_hash() + "".join(sha256_file(p) for p in files)).encode()).hexdigest()


def work_dir(cfg: Any) -> Path:
    """Where tasks write their artifacts: ``$CREPE_WORK_DIR``, else ``<project>/.crepe/work``."""
    env = os.environ.get(WORK_ENV)
    return Path(env).resolve() if env else cfg.project_root / ".crepe" / "work"


def strip_paths(value: Any) -> Any:
    """A task input without its ``path`` entries (content hashes identify artifacts, folders do not)."""
    if isinstance(value, Mapping):
        return {k: strip_paths(v) for k, v in value.items() if k != "path"}
    if isinstance(value, (list, tuple)):
        return [strip_paths(v) for v in value]
    return value


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
            "inputs": {name: strip_paths(parameters[name]) for name in inputs},
            "extra": extra(cfg, parameters) if extra else None,
        }
        return f"crepe-{context.task.name}-" + hashlib.sha256(canonical_json(payload).encode()).hexdigest()

    return key
