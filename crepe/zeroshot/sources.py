"""The six zero-shot tasks: their names, where their documents live, and lm-eval task YAMLs that read them.

Each task keeps **lm-eval's own definition** (the YAML shipped inside the pinned ``lm_eval`` package:
prompt template, choices, target, ``process_docs``, metrics). crepe writes, into a temporary folder, one
YAML per task that includes the built-in file and changes only where the documents come from:

- a local file in the data directory (``../shared/data`` or ``--data-dir``/``$CREPE_DATA_DIR``), in the
  hub dataset's own schema, read with ``datasets``' ``json``/``parquet`` builders; splits that have no
  local file are switched off (a 0-shot run never reads them);
- otherwise the hub dataset the built-in config names (needs network).

lm-eval's public ``TaskManager(include_path=<folder>, include_defaults=False)`` then builds the tasks.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from crepe.data import resolve_data_dir
from crepe.errors import CrepeError
from crepe.io import sha256_file
from crepe.registry import Registry

SPLIT_KEYS = ("training_split", "validation_split", "test_split")
DEFAULT_BATCH_SIZE = 8
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class TaskData:
    """Where one task's documents live: lm-eval's built-in config and the local copy of its split."""

    task: str
    builtin_yaml: str  # relative to lm_eval/tasks
    hub: str  # dataset_path[/dataset_name] of the built-in config
    split: str  # the split lm-eval evaluates (test when the config has one, else validation)
    local_file: str  # relative to the data directory, same rows and schema as the hub split
    official_count: int  # documents in the official split

    @property
    def fmt(self) -> str:
        return "parquet" if self.local_file.endswith(".parquet") else "json"


TASK_DATA: dict[str, TaskData] = {
    "boolq": TaskData("boolq", "super_glue/boolq/default.yaml", "aps/super_glue boolq", "validation",
                      "boolq/super_glue_boolq_validation.jsonl", 3270),
    "rte": TaskData("rte", "glue/rte/default.yaml", "nyu-mll/glue rte", "validation",
                    "rte/glue_rte_validation.parquet", 277),
    "mnli": TaskData("mnli", "glue/mnli/default.yaml", "nyu-mll/glue mnli", "validation_matched",
                     "mnli/glue_mnli_validation_matched.jsonl", 9815),
    "hellaswag": TaskData("hellaswag", "hellaswag/hellaswag.yaml", "Rowan/hellaswag", "validation",
                          "hellaswag/hellaswag_validation.jsonl", 10042),
    "arc_easy": TaskData("arc_easy", "arc/arc_easy.yaml", "allenai/ai2_arc ARC-Easy", "test",
                         "arc/ARC-Easy-test.jsonl", 2376),
    "arc_challenge": TaskData("arc_challenge", "arc/arc_challenge.yaml", "allenai/ai2_arc ARC-Challenge", "test",
                              "arc/ARC-Challenge-test.jsonl", 1172),
}
LABELS = {"boolq": "BoolQ", "rte": "RTE", "mnli": "MNLI", "hellaswag": "HellaSwag", "arc_easy": "ARC-e",
          "arc_challenge": "ARC-c"}

TASKS = Registry("zero-shot task")
for _name, _doc in (
    ("boolq", "BoolQ: yes/no questions about a Wikipedia passage (SuperGLUE validation, 3270 documents)."),
    ("rte", "RTE: does the premise entail the hypothesis, True/False (GLUE validation, 277 documents)."),
    ("mnli", "MNLI-matched: entailment, neutral or contradiction (GLUE validation_matched, 9815 documents)."),
    ("hellaswag", "HellaSwag: pick the sensible ending of an activity description (validation, 10042 documents)."),
    ("arc_easy", "ARC-Easy: grade-school science multiple choice, easy set (test, 2376 documents)."),
    ("arc_challenge", "ARC-Challenge: grade-school science multiple choice, hard set (test, 1172 documents)."),
):
    TASKS.register(_name, _doc, obj=TASK_DATA[_name])


@dataclass(frozen=True)
class TaskSource:
    """The resolved document source of one task (recorded in every result)."""

    task: str
    kind: str  # local | hub
    path: str  # local file, or the hub dataset id
    split: str
    sha256: str = ""  # of the local file

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- validation -------------------------------------------------------------------------------


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """Task names from ``"boolq,rte"``, a list, ``"all"`` or None (all six); unknown names raise."""
    if tasks is None:
        return list(TASKS)
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise CrepeError(f"zero-shot task names must be strings, got {item!r}")
        name = item.strip().lower()
        if not name:
            continue
        for n in (list(TASKS) if name == "all" else [name]):
            if n not in TASKS:
                raise CrepeError(
                    f"unknown zero-shot task {item.strip()!r}; supported: {', '.join(TASKS)} (or all)"
                )
            if n not in names:
                names.append(n)
    if not names:
        raise CrepeError(f"no zero-shot task given; supported: {', '.join(TASKS)} (or all)")
    return names


def check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise CrepeError(f"limit must be a positive integer (documents per task), got {limit!r}")
    return limit


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CrepeError(f"zero-shot batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def hub_offline() -> bool:
    """True when the hub variables forbid downloads (then a missing local file is an error)."""
    on = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in on for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir not in (None, "") and not Path(str(data_dir)).expanduser().is_dir():
        folders = ", ".join(sorted({d.local_file.split("/")[0] + "/" for d in TASK_DATA.values()}))
        raise CrepeError(f"data directory {data_dir} does not exist; give --data-dir (or CREPE_DATA_DIR) a "
                         f"folder holding {folders}")
    return resolve_data_dir(data_dir)


def resolve_sources(tasks: Sequence[str], data_dir: str | Path | None = None) -> dict[str, TaskSource]:
    """Local file when the data directory has it, else the hub; offline without the file raises."""
    root = _data_dir(data_dir)
    offline = hub_offline()
    sources: dict[str, TaskSource] = {}
    for name in tasks:
        spec = TASK_DATA[name]
        file = root / spec.local_file if root is not None else None
        if file is not None and file.is_file():
            sources[name] = TaskSource(name, "local", str(file), spec.split, sha256_file(file))
            continue
        if offline:
            where = str(file) if file is not None else f"<data dir>/{spec.local_file}"
            form = "a parquet file" if spec.fmt == "parquet" else "one JSON object per line"
            raise CrepeError(
                f"zero-shot task {name} needs the file {where} (the {spec.official_count} rows of the {spec.hub} "
                f"{spec.split} split in the hub's schema, {form}; see docs/zeroshot.md) and the hub is offline "
                "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); copy it there, point --data-dir or CREPE_DATA_DIR at a "
                "folder that has it, or unset the offline variables to download it"
            )
        sources[name] = TaskSource(name, "hub", spec.hub, spec.split)
    return sources


# --- lm-eval task configs ---------------------------------------------------------------------


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def lm_eval_tasks_root() -> Path:
    """The folder of lm-eval's built-in task YAMLs (an ImportError becomes an install hint)."""
    try:
        import lm_eval.tasks  # optional extra: lm-eval
    except ImportError:
        raise CrepeError(
            "zero-shot evaluation needs lm-eval; install it with: pip install 'lm-eval>=0.4.13' datasets "
            "(or: make setup)"
        ) from None
    return Path(lm_eval.tasks.__file__).parent


class _TagTolerantLoader(yaml.SafeLoader):
    """A safe YAML loader that reads ``!function`` (and any other ``!tag``) values as None."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_config(path: Path) -> dict[str, Any]:
    """A task YAML as a dict, its ``include`` chain merged in (the including file wins); tags read as None."""
    config = yaml.load(Path(path).read_text(), Loader=_TagTolerantLoader) or {}  # noqa: S506 - a SafeLoader
    parent = config.pop("include", None)
    if parent is None:
        return config
    return {**read_config(Path(path).parent / parent), **config}


def builtin_yaml(name: str) -> Path:
    """The YAML file that defines task ``name`` inside the installed lm-eval package."""
    path = lm_eval_tasks_root() / TASK_DATA[name].builtin_yaml
    if path.is_file() and re.search(rf"^task:\s*{re.escape(name)}\s*$", path.read_text(), re.MULTILINE):
        return path
    # The pinned lm-eval keeps the file above; other versions may move it: look it up in lm-eval's index.
    from lm_eval.tasks import TaskManager  # optional extra: lm-eval

    entry = TaskManager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise RuntimeError(f"lm-eval {lm_eval_version()} has no built-in task {name!r}")
    return Path(entry.yaml_path)


def source_overrides(name: str, source: TaskSource, config: dict[str, Any]) -> dict[str, Any]:
    """Config overrides that redirect a built-in task to ``source`` (empty for the hub).

    Only data-location keys change: ``dataset_path``/``dataset_name``/``dataset_kwargs`` point at the
    local file, and split keys naming splits that have no local file are switched off (0-shot reads
    only the evaluated split).
    """
    if source.kind == "hub":
        return {}
    fmt = "parquet" if source.path.endswith(".parquet") else "json"
    overrides: dict[str, Any] = {
        "dataset_path": fmt,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {source.split: source.path}},
    }
    for key in SPLIT_KEYS:
        if config.get(key) is not None and config.get(key) != source.split:
            overrides[key] = None
    return overrides


def task_yaml(name: str, source: TaskSource) -> dict[str, Any]:
    """crepe's YAML for task ``name``: include the built-in file, 0 shots, documents from ``source``."""
    path = builtin_yaml(name)
    config = read_config(path)
    evaluated = config.get("test_split") or config.get("validation_split")
    if evaluated != TASK_DATA[name].split:
        raise RuntimeError(
            f"lm-eval {lm_eval_version()} evaluates {name} on split {evaluated!r}, crepe expects "
            f"{TASK_DATA[name].split!r}: update crepe.zeroshot.TASK_DATA"
        )
    return {"include": str(path), "task": name, "num_fewshot": 0, **source_overrides(name, source, config)}


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's and ``datasets``' loggers at ERROR and ``datasets``' progress bars off, restored after."""
    import datasets  # optional extra: datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    bars_were_on = not datasets.are_progress_bars_disabled()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def task_suite(names: Sequence[str], sources: dict[str, TaskSource]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(TaskManager, {name: Task})`` over crepe's YAMLs in a temporary folder (removed on exit).

    Every local file must hold its official document count (a truncated copy is refused)."""
    lm_eval_tasks_root()
    from lm_eval.tasks import TaskManager  # optional extra: lm-eval

    with tempfile.TemporaryDirectory(prefix="crepe-zeroshot-") as folder, quiet_lm_eval():
        for name in names:
            text = yaml.safe_dump(task_yaml(name, sources[name]), sort_keys=False)
            (Path(folder) / f"crepe_{name}.yaml").write_text(text)
        manager = TaskManager(include_path=folder, include_defaults=False)
        tasks: dict[str, Any] = {}
        for name in names:
            tasks[name] = _load(manager, name, sources[name])
        yield manager, tasks


def _load(manager: Any, name: str, source: TaskSource) -> Any:
    try:
        task = manager.load([name])["tasks"][name]
    except Exception as exc:  # datasets raises many types for unreachable hubs or bad files
        hint = (f"; without network, put the file {TASK_DATA[name].local_file} in the data directory "
                "(--data-dir or CREPE_DATA_DIR, see docs/zeroshot.md)" if source.kind == "hub" else "")
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CrepeError(f"could not load the {name} documents from {source.path} ({type(exc).__name__}: "
                         f"{first}){hint}") from None
    n_docs = len(task.eval_docs)  # the evaluated split, after lm-eval's process_docs
    if source.kind == "local" and n_docs != TASK_DATA[name].official_count:
        raise CrepeError(
            f"{source.path} holds {n_docs} {name} documents, the official {TASK_DATA[name].split} split has "
            f"{TASK_DATA[name].official_count}; restore the complete file (see its SOURCE.md) and use --limit "
            "to score fewer documents"
        )
    return task


def build_tasks(names: Sequence[str], sources: dict[str, TaskSource]) -> dict[str, Any]:
    """lm-eval ``Task`` objects for ``names`` (built through :func:`task_suite`, loaded and checked)."""
    with task_suite(names, sources) as (_, tasks):
        return tasks
