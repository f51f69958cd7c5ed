"""Zero-shot accuracy with lm-evaluation-harness, offline, on a live (in-memory) model (spec §14.2).

The six tasks of the CRePE paper (BoolQ, RTE, MNLI-matched, HellaSwag, ARC-Easy, ARC-Challenge) run
with **lm-eval's own task definitions**: each task is built from the YAML file shipped inside the
pinned ``lm_eval`` package (prompt template, choices, target, ``process_docs``, metrics), through
lm-eval's own task factory. The only override is where the documents come from:

- a local file in the data directory (``../shared/data`` or ``--data-dir``/``$CREPE_DATA_DIR``), in
  the hub dataset's own schema, read with ``datasets``' ``json``/``parquet`` builders
  (``dataset_path``/``data_files``); splits that have no local file are switched off, which a
  0-shot run never reads;
- otherwise the hub dataset the built-in config names (needs network).

Prompts are never re-authored here. The model is wrapped in lm-eval's ``HFLM`` as it is in memory
(no save, no reload) and scored 0-shot with ``lm_eval.evaluator.evaluate``. Reported: ``acc`` for
every task, ``acc_norm`` where lm-eval defines it (HellaSwag, ARC), and the unweighted mean of
``acc`` over the tasks (the Wanda/RIA convention).

Speed: the wrapper ``LiveHFLM`` (a subclass of lm-eval's ``HFLM``)
scores the same requests, but

1. packs each document into one row: its context once, then the inputs of all its choices, with a
   block attention mask and position ids such that every choice sees exactly its context and its own
   prefix (``pack=False`` keeps lm-eval's one row per choice);
2. projects to the vocabulary only at the positions whose log-probabilities are read (lm-eval does
   it for every context token and discards them);
3. runs the model without a KV cache and tokenises each context once instead of once per choice.

Scores equal stock ``HFLM``'s bit for bit with ``pack=False`` and up to float rounding (about 1e-5)
with packing (tested).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.io import sha256_file

TASKS: tuple[str, ...] = ("boolq", "rte", "mnli", "hellaswag", "arc_easy", "arc_challenge")
DEFAULT_BATCH_SIZE = 8
Progress = Callable[[str, int, int], None]  # (stage, done, total)
LABELS = {
    "boolq": "BoolQ",
    "rte": "RTE",
    "mnli": "MNLI",
    "hellaswag": "HellaSwag",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
}


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
SPLIT_KEYS = ("training_split", "validation_split", "test_split")


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
        expanded = list(TASKS) if name == "all" else [name]
        for n in expanded:
            if n not in TASK_DATA:
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


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CrepeError(f"zero-shot batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def hub_offline() -> bool:
    """True when the hub variables forbid downloads (then a missing local file is an error)."""
    on = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in on for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _data_dir(data_dir: str | Path | None) -> Path | None:
    from crepe.data import resolve_data_dir

    explicit = data_dir not in (None, "")
    if explicit and not Path(str(data_dir)).expanduser().is_dir():
        raise CrepeError(
            f"data directory {data_dir} does not exist; give --data-dir (or CREPE_DATA_DIR) a folder holding "
            f"{', '.join(sorted({d.local_file.split('/')[0] + '/' for d in TASK_DATA.values()}))}"
        )
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


# --- lm-eval tasks ----------------------------------------------------------------------------


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise CrepeError(
            "zero-shot evaluation needs lm-eval; install it with: pip install 'lm-eval>=0.4.13' datasets "
            "(or: make setup)"
        ) from None
    return lm_eval


def builtin_yaml(name: str) -> Path:
    """The YAML file that defines task ``name`` inside the installed lm-eval package."""
    lm_eval = _import_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lm_eval.__file__).parent / "tasks"
    path = root / TASK_DATA[name].builtin_yaml
    if path.is_file() and load_yaml(path, resolve_func=False).get("task") == name:
        return path
    # The pinned lm-eval keeps the file above; other versions may move it: look it up in lm-eval's index.
    from lm_eval.tasks import TaskManager

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


def build_task(name: str, source: TaskSource) -> Any:
    """lm-eval's built-in task ``name`` (its own YAML, factory and ConfigurableTask), reading ``source``."""
    _import_lm_eval()
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    path = builtin_yaml(name)
    config = load_yaml(path, resolve_func=False, recursive=True)
    evaluated = config.get("test_split") or config.get("validation_split")
    if evaluated != TASK_DATA[name].split:
        raise RuntimeError(
            f"lm-eval {lm_eval_version()} evaluates {name} on split {evaluated!r}, crepe expects "
            f"{TASK_DATA[name].split!r}: update crepe.zeroshot.TASK_DATA"
        )
    entry = TaskIndex.entry_from_path(path)
    try:
        task = TaskFactory().build(entry, overrides=source_overrides(name, source, config) or None, registry={})
    except Exception as exc:  # datasets raises many types for unreachable hubs or bad files
        hint = (f"; without network, put the file {TASK_DATA[name].local_file} in the data directory "
                "(--data-dir or CREPE_DATA_DIR, see docs/zeroshot.md)" if source.kind == "hub" else "")
        raise CrepeError(
            f"could not load the {name} documents from {source.path} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}){hint}"
        ) from None
    task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)  # simple_evaluate's default; unused at 0 shots
    n_docs = len(task.task_docs)  # the evaluated split, after lm-eval's process_docs
    if source.kind == "local" and n_docs != TASK_DATA[name].official_count:
        raise CrepeError(
            f"{source.path} holds {n_docs} {name} documents, the official {TASK_DATA[name].split} split has "
            f"{TASK_DATA[name].official_count}; restore the complete file (see its SOURCE.md) and use --limit "
            "to score fewer documents"
        )
    return task


def build_tasks(names: Sequence[str], sources: dict[str, TaskSource]) -> dict[str, Any]:
    with quiet_lm_eval():
        return {name: build_task(name, sources[name]) for name in names}


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's per-task tqdm bars, its INFO/WARNING chatter and ``datasets``' bars."""
    _import_lm_eval()
    import datasets
    import lm_eval.api.task as task_mod

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    bars_were_on = not datasets.are_progress_bars_disabled()
    old_tqdm = task_mod.tqdm
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        task_mod.tqdm = lambda iterable, *a, **k: iterable
        yield
    finally:
        task_mod.tqdm = old_tqdm
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


# --- the live-model wrapper -------------------------------------------------------------------


@dataclass
class Throughput:
    """Work done by the model: scored requests, forward rows, real and padded tokens, seconds.

    ``request_tokens`` is what stock lm-eval feeds the model for the same requests (one row per request
    except one-token continuations sharing a context); ``tokens`` is what crepe fed it after packing.
    """

    requests: int = 0
    rows: int = 0
    packed_rows: int = 0  # rows holding a shared context plus several continuations
    tokens: int = 0  # real tokens in the forward rows
    padded_tokens: int = 0  # rows x padded length
    request_tokens: int = 0
    scored_positions: int = 0  # positions whose vocabulary logits were computed
    model_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_seconds": round(self.model_seconds, 3)}


@dataclass
class Row:
    """One forward row: a context and the continuations scored against it.

    ``tokens`` is the context followed by each continuation minus its last token (the last token is
    only ever predicted, never an input). ``segment`` is 0 on the context and i+1 on continuation i;
    a token attends causally to the context and to earlier tokens of its own segment, so every
    continuation sees exactly ``context + its own prefix``, as in a separate row, with positions
    continuing from the context. ``segment=None`` marks a plain causal row (one request, possibly
    left-truncated like lm-eval does). ``scores`` lists (request index, continuation, indices into
    ``tokens`` whose logits predict each continuation token).
    """

    tokens: list[int]
    positions: list[int]
    segment: list[int] | None
    scores: list[tuple[int, list[int], list[int]]]

    @property
    def first_scored(self) -> int:
        return min(i for _, _, idx in self.scores for i in idx)


def plan_rows(
    requests: Sequence[tuple[Any, list[int], list[int]]], max_length: int, pack_limit: int | None
) -> list[Row]:
    """Group lm-eval ``(strings, context_enc, continuation_enc)`` requests into forward rows.

    Requests with identical context tokens share one row when ``pack_limit`` allows it (None: never)
    and the packed row fits in it; continuations with identical inputs (e.g. one-token answers) share
    their scored positions. Other requests get lm-eval's own row: ``(context + continuation)[:-1]``,
    left-truncated to ``max_length`` tokens, shared by requests with the same row (lm-eval's
    one-token-continuation cache). Rows come longest first.
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(cont) > max_length:
            raise RuntimeError(f"lm-eval request {i} has an empty context/continuation or a continuation over {max_length} tokens")
        by_context.setdefault(tuple(ctx), []).append(i)
    rows: list[Row] = []
    plain: list[int] = []
    for ctx_key, members in by_context.items():
        ctx = list(ctx_key)
        tails: dict[tuple[int, ...], int] = {}  # continuation[:-1] -> segment start
        tokens, positions, segment = list(ctx), list(range(len(ctx))), [0] * len(ctx)
        scores = []
        for i in members:
            cont = requests[i][2]
            tail = tuple(cont[:-1])
            if tail not in tails:
                tails[tail] = len(tokens)
                seg = len(tails)
                tokens += tail
                positions += range(len(ctx), len(ctx) + len(tail))
                segment += [seg] * len(tail)
            start = tails[tail]
            scores.append((i, cont, [len(ctx) - 1] + list(range(start, start + len(tail)))))
        if pack_limit is not None and len(tokens) <= min(max_length, pack_limit):
            # One distinct continuation input: the row is plain causal (the model's own mask).
            rows.append(Row(tokens, positions, segment if len(tails) > 1 else None, scores))
        else:
            plain += members
    # lm-eval's own rows, sharing one when (context + continuation)[:-1] is identical.
    by_input: dict[tuple[int, ...], list[int]] = {}
    for i in plain:
        _, ctx, cont = requests[i]
        by_input.setdefault(tuple((ctx + cont)[-(max_length + 1):][:-1]), []).append(i)
    for key, members in by_input.items():
        n = len(key)
        scores = [(i, requests[i][2], list(range(n - len(requests[i][2]), n))) for i in members]
        rows.append(Row(list(key), list(range(n)), None, scores))
    # Longest first, as lm-eval orders its batches (ties by content: deterministic).
    rows.sort(key=lambda r: (-len(r.tokens), r.tokens))
    return rows


def batch_rows(rows: Sequence[Row], device: torch.device, mask_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``position_ids``, the 4D additive mask (when any row is packed, else
    none: the model's own causal mask) and ``keep`` (per-row positions whose logits are needed)."""
    length = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    firsts = [r.first_scored for r in rows]
    width = max(len(r.tokens) - f for r, f in zip(rows, firsts))
    keep = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (row, first) in enumerate(zip(rows, firsts)):
        n = len(row.tokens)
        ids[b, :n] = torch.tensor(row.tokens)
        pos[b, :n] = torch.tensor(row.positions)
        keep[b] = torch.clamp(torch.arange(first, first + width), max=length - 1)
    out = {"input_ids": ids.to(device), "position_ids": pos.to(device), "keep": keep.to(device)}
    if any(r.segment is not None for r in rows):
        assert mask_dtype is not None
        allowed = torch.zeros(len(rows), length, length, dtype=torch.bool)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for b, row in enumerate(rows):
            n = len(row.tokens)
            seg = torch.tensor(row.segment if row.segment is not None else [0] * n)
            same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)
            allowed[b, :n, :n] = same & causal[:n, :n]
            allowed[b, n:, n:] = torch.eye(length - n, dtype=torch.bool)  # padding attends to itself
        mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
        out["attention_mask"] = mask[:, None].to(device)
    return out


def _make_live_hflm() -> type:
    _import_lm_eval()
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM

    class LiveHFLM(HFLM):
        """lm-eval's ``HFLM`` around an in-memory causal LM, with the overheads named in the module doc removed.

        ``pack=False`` keeps lm-eval's own rows (one per request, one-token continuations sharing
        a context sharing one), still scoring only the positions that are read.
        """

        def __init__(self, model: Any, tokenizer: Any, batch_size: int, progress: Progress | None = None,
                     pack: bool = True, max_length: int | None = None):
            # lm-eval may set a pad token on the tokenizer: give it a copy, not the caller's object.
            super().__init__(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                             max_length=max_length)
            self.progress = progress
            self.stats = Throughput()
            self._context_cache: dict[str, list[int]] = {}
            forward = inspect.signature(type(model).forward).parameters
            self._keep_arg = "logits_to_keep" in forward  # tried once; falls back to full logits
            self._cache_arg = "use_cache" in forward
            config = model.config
            self._pack_limit: int | None = None
            custom_masks = getattr(config, "_attn_implementation", None) in ("eager", "sdpa")
            if pack and custom_masks and "position_ids" in forward and "attention_mask" in forward:
                window = getattr(config, "sliding_window", None)  # a custom mask replaces sliding windows
                self._pack_limit = min(self.max_length, window) if isinstance(window, int) and window > 0 else self.max_length

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            self._context_cache.clear()
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self._context_cache.clear()

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """lm-eval's pair encoding, with each (space-stripped) context tokenised once, not per choice."""
            if self.backend != "causal":
                return super()._encode_pair(context, continuation)
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces > 0:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            whole_enc = self.tok_encode(context + continuation)
            context_enc = self._context_cache.get(context)
            if context_enc is None:
                context_enc = self._context_cache[context] = self.tok_encode(context)
            return list(context_enc), whole_enc[len(context_enc):]

        def _scored_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            """Logits at ``batch["keep"]`` positions of each row, (rows, width, vocab)."""
            keep = batch["keep"]
            kwargs: dict[str, Any] = {"position_ids": batch["position_ids"]}
            if "attention_mask" in batch:
                kwargs["attention_mask"] = batch["attention_mask"]
            if self._cache_arg:
                kwargs["use_cache"] = False
            with (
                torch.no_grad(),
                torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                               enabled=self.mixed_precision_dtype is not None),
            ):
                if self._keep_arg:
                    try:
                        logits = self.model(batch["input_ids"], logits_to_keep=keep, **kwargs).logits
                        if logits.shape[:2] == keep.shape:
                            return logits
                    except torch.OutOfMemoryError:
                        raise
                    except (TypeError, IndexError, RuntimeError):
                        pass
                    self._keep_arg = False  # this model cannot take per-row positions
                logits = self.model(batch["input_ids"], **kwargs).logits
            return torch.take_along_dim(logits, keep[..., None], dim=1)

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            if self.backend != "causal" or self.batch_size == "auto":
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            max_length = self.max_length
            self.stats.requests += len(requests)
            self.stats.request_tokens += sum(
                min(len(c) + len(x) - 1, max_length)
                for c, x in {(tuple(c), tuple(x[:-1])): (c, x) for _, c, x in requests}.values()
            )
            rows = plan_rows(requests, max_length, self._pack_limit if self.logits_cache else None)
            mask_dtype = next(self.model.parameters()).dtype
            if mask_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                mask_dtype = torch.float32
            res: list[tuple[float, bool] | None] = [None] * len(requests)
            done = 0
            step = override_bs or self.batch_size
            # Packed rows (custom mask) and plain rows (the model's own causal/sliding masks) never share a batch.
            packed = [r for r in rows if r.segment is not None]
            plain = [r for r in rows if r.segment is None]
            chunks = [part[lo: lo + step] for part in (packed, plain) for lo in range(0, len(part), step)]
            batches = ((chunk, batch_rows(chunk, self.device, mask_dtype)) for chunk in chunks)
            streamer = getattr(self, "streamer", None)  # a streamed model: blocks read from the shards per group
            scored = (streamer.forwards(batches, lambda cb: self._scored_logits(cb[1]), lambda cb: cb[1]["input_ids"].numel(),
                                        self.device)
                      if streamer is not None else ((cb, self._scored_logits(cb[1])) for cb in batches))
            while True:
                started = time.perf_counter()
                try:
                    (chunk, batch), logits = next(scored)
                except StopIteration:
                    break
                logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                self.stats.model_seconds += time.perf_counter() - started
                self.stats.rows += len(chunk)
                self.stats.packed_rows += sum(r.segment is not None for r in chunk)
                self.stats.tokens += sum(len(r.tokens) for r in chunk)
                self.stats.padded_tokens += batch["input_ids"].numel()
                self.stats.scored_positions += batch["keep"].numel()
                for row, lp in zip(chunk, logprobs, strict=True):
                    first = row.first_scored
                    for i, cont, idx in row.scores:
                        lp_i = lp[torch.tensor(idx, device=lp.device) - first]  # (len(cont), vocab)
                        cont_t = torch.tensor(cont, dtype=torch.long, device=lp.device)
                        greedy = bool((lp_i.argmax(dim=-1) == cont_t).all())
                        answer = (float(lp_i.gather(1, cont_t[:, None]).sum()), greedy)
                        res[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                        done += 1
                if self.progress:
                    self.progress("zero-shot", done, len(requests))
            assert all(r is not None for r in res)
            return res  # type: ignore[return-value]

    return LiveHFLM


def live_hflm(model: Any, tokenizer: Any, batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress | None = None,
              pack: bool = True, max_length: int | None = None) -> Any:
    """lm-eval's HF wrapper around the in-memory ``model`` (see ``LiveHFLM`` and the module doc).

    ``max_length`` overrides lm-eval's context length (default: from the model config)."""
    with quiet_lm_eval():
        return _make_live_hflm()(model, tokenizer, _check_batch_size(batch_size), progress, pack, max_length)


# --- the run ----------------------------------------------------------------------------------


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
    tasks: str | Iterable[str] | None = TASKS,
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
    ``pack=False`` scores every choice in its own row, bit-identical to lm-eval's ``HFLM``; the
    default shares each context across its choices (equal up to float rounding, about 2x faster).
    Returns ``tasks`` (per task: acc, acc_norm or None, stderrs, ``n`` scored, ``n_total`` available,
    lm-eval task version, document source), ``average_acc`` (unweighted mean acc), the settings,
    ``lm_eval_version`` and ``throughput``. Inputs are validated before any work.
    """
    names = parse_tasks(tasks)
    limit = check_limit(limit)
    batch_size = _check_batch_size(batch_size)
    sources = resolve_sources(names, data_dir)
    started = time.perf_counter()
    task_objs = build_tasks(names, sources)
    load_seconds = time.perf_counter() - started
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    was_training = model.training
    moves = target != home and streamer is None
    if moves:
        model.to(target)
    try:
        lm = live_hflm(model, tokenizer, batch_size, progress, pack)
        if streamer is not None:
            lm.streamer = streamer
            lm._device = target  # inputs go where the streamed blocks run
        from lm_eval import evaluator

        run_started = time.perf_counter()
        with quiet_lm_eval():
            raw = evaluator.evaluate(lm=lm, task_dict={"tasks": task_objs}, limit=limit, log_samples=False)
        run_seconds = time.perf_counter() - run_started
    finally:
        if moves:
            model.to(home)
        model.train(was_training)
    stats = lm.stats
    result = summarize(raw, names, sources)
    result.update({
        "num_fewshot": 0,
        "limit": limit,
        "batch_size": batch_size,
        "packed_contexts": pack,
        "device": str(target),
        "lm_eval_version": lm_eval_version(),
        "datasets_version": _version("datasets"),
        "harness": "lm_eval.evaluator.evaluate on HFLM(pretrained=<in-memory model>), built-in task YAMLs",
        "throughput": {
            **stats.as_dict(),
            "load_seconds": round(load_seconds, 3),
            "run_seconds": round(run_seconds, 3),
            "tokens_per_second": round(stats.tokens / run_seconds, 1) if run_seconds > 0 else None,
        },
    })
    return result


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def zero_shot_metrics(result: dict[str, Any], prefix: str = "zeroshot") -> dict[str, float]:
    """Flat ``{prefix/task/acc: value, ..., prefix/avg_acc: value}`` for metric loggers (MLflow)."""
    metrics: dict[str, float] = {}
    for name, values in result["tasks"].items():
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            if values.get(key) is not None:
                metrics[f"{prefix}/{name}/{key}"] = float(values[key])
        if values.get("n") is not None:
            metrics[f"{prefix}/{name}/n"] = float(values["n"])
    if result.get("average_acc") is not None:
        metrics[f"{prefix}/avg_acc"] = float(result["average_acc"])
    return metrics


# --- reports ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def format_zero_shot_table(result: dict[str, Any]) -> str:
    """Markdown table of one run: task, documents scored (of total), acc, acc_norm, version."""
    lines = ["| task | docs | acc | acc_norm | lm-eval task version |", "|---|---:|---:|---:|---:|"]
    for name, t in result["tasks"].items():
        docs = f"{t['n']} of {t['n_total']}" if t.get("n") != t.get("n_total") else f"{t['n']}"
        lines.append(f"| {name} | {docs} | {_pct(t['acc'])} | {_pct(t['acc_norm'])} | {t.get('version')} |")
    avg = result.get("average_acc")
    label = "average acc (6 tasks)" if result.get("all_six") else f"average acc ({len(result['tasks'])} tasks)"
    lines.append(f"| **{label}** | | **{_pct(avg)}** | | |")
    return "\n".join(lines)


def format_zero_shot_comparison(rows: Sequence[dict[str, Any]], metric: str = "acc") -> str:
    """Markdown table, one row per ``{"method", "pattern", "zero_shot": result}``, one column per task."""
    if not rows:
        return ""
    names = list(rows[0]["zero_shot"]["tasks"])
    head = "| method | pattern | " + " | ".join(LABELS.get(n, n) for n in names) + " | avg |"
    lines = [head, "|---|---|" + "---:|" * (len(names) + 1)]
    for row in rows:
        res = row["zero_shot"]
        cells = [_pct(res["tasks"][n].get(metric)) for n in names]
        values = [res["tasks"][n].get(metric) for n in names]
        avg = sum(values) / len(values) if all(v is not None for v in values) else None
        lines.append(f"| {row['method']} | {row['pattern']} | " + " | ".join(cells) + f" | {_pct(avg)} |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "TASKS",
    "TASK_DATA",
    "TaskData",
    "TaskSource",
    "Throughput",
    "build_task",
    "build_tasks",
    "builtin_yaml",
    "check_limit",
    "format_zero_shot_comparison",
    "format_zero_shot_table",
    "hub_offline",
    "live_hflm",
    "lm_eval_version",
    "parse_tasks",
    "resolve_sources",
    "run_zero_shot",
    "source_overrides",
    "summarize",
    "zero_shot_metrics",
]
