"""Calibration and evaluation text: local files, the hub, or Python's own docs as a last resort.

Calibration follows the Wanda/SparseGPT protocol (spec §1.2): a seeded RNG draws documents until
one tokenizes to *more than* ``seqlen`` tokens, then a uniform window of ``seqlen`` tokens.
Evaluation text is WikiText-2 raw joined with ``"\\n\\n"`` and tokenized once (spec §14.1).

Local data lives in a data directory: an explicit argument, else ``$CREPE_DATA_DIR``, else
``../shared/data`` (beside the working directory or the repository) when it exists. Whatever source
was used is returned as a :class:`DataInfo` (name, path, sha256) for manifests.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.io import sha256_file, sha256_text

CALIB_SOURCES = ("auto", "c4", "c4-local", "c4-hub", "pydoc")
EVAL_SOURCES = ("auto", "wikitext2", "wikitext2-local", "wikitext2-hub", "pydoc")
SPLITS = ("test", "validation")
C4_FILE = "c4/c4_en_validation_subset_2k.jsonl"
WIKITEXT_FILES = {"test": "wikitext2_raw/test.jsonl", "validation": "wikitext2_raw/validation.jsonl"}
C4_HUB_SHARD = "en/c4-train.00000-of-01024.json.gz"


@dataclass(frozen=True)
class DataInfo:
    source: str  # c4-local | c4-hub | wikitext2-local | wikitext2-hub | pydoc
    path: str
    sha256: str
    n_docs: int
    split: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _repo_shared_data() -> list[Path]:
    here = Path(__file__).resolve().parent.parent  # the repository (or site-packages)
    return [Path.cwd().parent / "shared" / "data", here.parent / "shared" / "data"]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data directory, or None when there is none (then hub or pydoc are used)."""
    explicit = data_dir if data_dir not in (None, "") else os.environ.get("CREPE_DATA_DIR") or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise CrepeError(
                f"data directory {path} does not exist; set --data-dir or CREPE_DATA_DIR to a folder "
                "holding c4/ and wikitext2_raw/, or leave both unset to use the fallbacks"
            )
        return path.resolve()
    for candidate in _repo_shared_data():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _read_jsonl_texts(path: Path) -> list[str]:
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise CrepeError(f"{path} line {n} is not a JSON object with a 'text' field") from None
    except OSError as exc:
        raise CrepeError(f"cannot read {path}: {exc.strerror}") from None
    return texts


def _hub_allowed() -> bool:
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return not any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in offline)


def _pydoc_docs() -> list[str]:
    return [topics[k] for k in sorted(topics)]


def _pydoc_part(part: str) -> tuple[list[str], DataInfo]:
    """Disjoint thirds of the stdlib topics: calibration (i%4==1), validation (i%4==0), test (rest)."""
    docs = _pydoc_docs()
    pick = {
        "calibration": lambda i: i % 4 == 1,
        "validation": lambda i: i % 4 == 0,
        "test": lambda i: i % 4 in (2, 3),
    }[part]
    chosen = [d for i, d in enumerate(docs) if pick(i)]
    info = DataInfo("pydoc", "stdlib:pydoc_data.topics", sha256_text("\0".join(chosen)), len(chosen), part)
    return chosen, info


def load_calibration_docs(source: str = "auto", data_dir: str | Path | None = None) -> tuple[list[str], DataInfo]:
    """Calibration documents and where they came from."""
    if source not in CALIB_SOURCES:
        raise CrepeError(f"unknown calibration source {source!r}; allowed: {', '.join(CALIB_SOURCES)}")
    if source == "pydoc":
        return _pydoc_part("calibration")
    errors: list[str] = []
    if source in ("auto", "c4", "c4-local"):
        root = resolve_data_dir(data_dir)
        path = root / C4_FILE if root else None
        if path is not None and path.is_file():
            docs = [d for d in _read_jsonl_texts(path) if d.strip()]
            if not docs:
                raise CrepeError(f"calibration corpus {path} is empty; it needs JSON lines with text")
            return docs, DataInfo("c4-local", str(path), sha256_file(path), len(docs))
        errors.append(f"no {C4_FILE} under {root}" if root else "no local data directory")
        if source == "c4-local":
            raise CrepeError(f"local C4 sample not found ({errors[-1]}); set --data-dir or CREPE_DATA_DIR")
    if source in ("auto", "c4", "c4-hub") and (_hub_allowed() or source == "c4-hub"):
        try:
            from datasets import load_dataset  # optional ("eval" extra) and slow to import: only for the hub

            ds = load_dataset("allenai/c4", data_files={"train": C4_HUB_SHARD}, split="train")
            docs = [d for d in ds["text"] if d.strip()]
            fingerprint = getattr(ds, "_fingerprint", "") or sha256_text("\0".join(docs[:100]))
            return docs, DataInfo("c4-hub", f"allenai/c4:{C4_HUB_SHARD}", fingerprint, len(docs))
        except Exception as exc:  # offline, missing package, hub error
            errors.append(f"allenai/c4 unavailable ({type(exc).__name__}: {str(exc)[:200]})")
            if source == "c4-hub":
                raise CrepeError(f"could not load allenai/c4 from the hub: {exc}") from None
    if source == "c4":
        raise CrepeError(f"no C4 data available: {'; '.join(errors)}")
    print(f"[crepe] calibration falls back to Python's pydoc topics ({'; '.join(errors)})")
    return _pydoc_part("calibration")


def sample_calibration(
    tokenizer: Any, docs: list[str], n_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens, shape (n_samples, seqlen), as in spec §1.2."""
    if n_samples < 1 or seqlen < 2:
        raise CrepeError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}

    def tokens(i: int) -> list[int]:
        if i not in cache:
            cache[i] = tokenizer(docs[i], verbose=False)["input_ids"]
        return cache[i]

    windows = []
    for _ in range(n_samples):
        draws = 0
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = tokens(i)
            if len(ids) > seqlen:
                break
            draws += 1
            # After many fruitless draws, check once whether any document is long enough at all
            # (tokenizing the whole corpus) instead of looping forever on a corpus of short texts.
            if draws == 50 * len(docs) and not any(len(tokens(j)) > seqlen for j in range(len(docs))):
                longest = max(len(tokens(j)) for j in range(len(docs)))
                raise CrepeError(
                    f"no calibration document has more than seqlen={seqlen} tokens (longest: "
                    f"{longest}); use a smaller --seqlen or a corpus with longer documents"
                )
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def get_calibration(
    tokenizer: Any,
    n_samples: int,
    seqlen: int,
    seed: int = 0,
    source: str = "auto",
    data_dir: str | Path | None = None,
) -> tuple[torch.Tensor, DataInfo]:
    docs, info = load_calibration_docs(source, data_dir)
    return sample_calibration(tokenizer, docs, n_samples, seqlen, seed), info


def load_eval_text(
    split: str = "test", source: str = "auto", data_dir: str | Path | None = None
) -> tuple[str, DataInfo]:
    """WikiText-2 raw ``split`` joined with "\\n\\n" (the rows of the HF dataset), and its origin."""
    if split not in SPLITS:
        raise CrepeError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if source not in EVAL_SOURCES:
        raise CrepeError(f"unknown evaluation source {source!r}; allowed: {', '.join(EVAL_SOURCES)}")
    errors: list[str] = []
    if source == "pydoc":
        docs, info = _pydoc_part(split)
        return "\n\n".join(docs), info
    if source in ("auto", "wikitext2", "wikitext2-local"):
        root = resolve_data_dir(data_dir)
        path = root / WIKITEXT_FILES[split] if root else None
        if path is not None and path.is_file():
            rows = _read_jsonl_texts(path)
            if not any(r.strip() for r in rows):
                raise CrepeError(f"evaluation corpus {path} is empty")
            return "\n\n".join(rows), DataInfo("wikitext2-local", str(path), sha256_file(path), len(rows), split)
        errors.append(f"no {WIKITEXT_FILES[split]} under {root}" if root else "no local data directory")
        if source == "wikitext2-local":
            raise CrepeError(f"local WikiText-2 not found ({errors[-1]}); set --data-dir or CREPE_DATA_DIR")
    if source in ("auto", "wikitext2", "wikitext2-hub") and (_hub_allowed() or source == "wikitext2-hub"):
        try:
            from datasets import load_dataset  # optional ("eval" extra) and slow to import: only for the hub

            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            rows = list(ds["text"])
            text = "\n\n".join(rows)
            return text, DataInfo("wikitext2-hub", f"wikitext/wikitext-2-raw-v1:{split}", sha256_text(text), len(rows), split)
        except Exception as exc:
            errors.append(f"wikitext unavailable on the hub ({type(exc).__name__}: {str(exc)[:200]})")
            if source == "wikitext2-hub":
                raise CrepeError(f"could not load wikitext from the hub: {exc}") from None
    if source == "wikitext2":
        raise CrepeError(f"no WikiText-2 data available: {'; '.join(errors)}")
    print(f"[crepe] evaluation falls back to Python's pydoc topics ({'; '.join(errors)})")
    docs, info = _pydoc_part(split)
    return "\n\n".join(docs), info


def get_eval_tokens(
    tokenizer: Any, split: str = "test", source: str = "auto", data_dir: str | Path | None = None
) -> tuple[torch.Tensor, DataInfo]:
    """The evaluation text tokenized once, shape (1, n_tokens)."""
    text, info = load_eval_text(split, source, data_dir)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    return ids, info
