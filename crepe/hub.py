"""Hugging Face hub models with an identity: ``org/name[@revision]`` resolved to a cached snapshot.

:func:`resolve_hub` fetches only what a causal LM needs (configs, tokenizer files, ``*.safetensors``
and their index; ``pytorch_model*.bin`` only when the repo has no safetensors) into the HF cache
with ``huggingface_hub.snapshot_download`` (the requested revision honoured), and returns the local
snapshot folder the model is loaded from. With ``HF_HUB_OFFLINE=1`` the same call resolves from
the cache alone (a branch or tag through ``refs/``, a commit through ``snapshots/``).

A hub model's identity is its repo id, the resolved commit and the sha256 of every fetched file
(:func:`hub_identity`): two repos, or two commits of one repo, never share a content hash, and
``org/name`` and ``org/name@<its commit>`` share one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from crepe.errors import CrepeError
from crepe.io import sha256_files

HUB_SPEC = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")
CONFIG_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]
TOP_LEVEL_ONLY = ["*/*"]  # ignore_patterns: files in sub-folders (onnx/, original/, ...) are not loaded


def is_hub_spec(spec: str) -> bool:
    return HUB_SPEC.fullmatch(spec.removeprefix("hf:")) is not None


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf:org/name@rev`` or ``org/name`` -> (repo id, requested revision or None)."""
    text = spec.removeprefix("hf:")
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def hub_cache_dir() -> Path:
    """The HF hub cache huggingface_hub uses (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, read when
    huggingface_hub is imported)."""
    return Path(constants.HF_HUB_CACHE).expanduser()


def _offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` of ``patterns``; its failures become one CrepeError sentence each."""
    rev = revision or "main"
    folder = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=TOP_LEVEL_ONLY))
    except RevisionNotFoundError:
        raise CrepeError(f"revision {rev!r} does not exist in the hub repo {repo_id}; use a branch, tag or "
                         "commit of that repo") from None
    except GatedRepoError:
        raise CrepeError(f"the hub repo {repo_id} is gated; accept its terms on huggingface.co and log in "
                         "(hf auth login) first") from None
    except RepositoryNotFoundError:
        raise CrepeError(f"the hub repo {repo_id} does not exist or is private (log in with hf auth login "
                         "for a private one)") from None
    except IncompleteSnapshotError as exc:
        raise CrepeError(f"the cached snapshot of hub model {repo_id} at revision {rev!r} is incomplete "
                         f"({exc.snapshot_path}); download it again with network access") from None
    except HFValidationError:
        raise CrepeError(f"{repo_id!r} is not a valid hub repo id (org/name of letters, digits, '-', '_', '.')") \
            from None
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        if _offline():
            why = "HF_HUB_OFFLINE=1 forbids downloading it; download it once with network access or unset HF_HUB_OFFLINE"
        else:
            why = f"it could not be downloaded ({type(exc).__name__}); check the network connection"
        if not folder.is_dir():
            raise CrepeError(f"hub model {repo_id} is not in the HF cache ({folder} does not exist) and {why}") \
                from None
        raise CrepeError(f"revision {rev!r} of hub model {repo_id} is not in the HF cache {folder} (cached: "
                         f"{', '.join(cached_revisions(folder)) or 'none'}) and {why}") from None


def cached_revisions(folder: Path) -> list[str]:
    """Branch/tag names (``refs/``) and commits (``snapshots/``) of a repo folder in the HF cache."""
    refs = folder / "refs"
    names = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    snaps = folder / "snapshots"
    return names + (sorted(p.name[:12] for p in snaps.iterdir()) if snaps.is_dir() else [])


def _model_files(snapshot: Path) -> list[str]:
    """The files of ``snapshot`` a model is loaded from: configs, tokenizer, and safetensors (else bins)."""
    present = sorted(p.name for p in snapshot.iterdir() if p.is_file())
    weights = list(filter_repo_objects(present, allow_patterns=SAFETENSORS_PATTERNS))
    if not any(w.endswith(".safetensors") for w in weights):
        weights = list(filter_repo_objects(present, allow_patterns=BIN_PATTERNS))
    return sorted([*filter_repo_objects(present, allow_patterns=CONFIG_PATTERNS), *weights])


def hub_identity(repo_id: str, commit: str, files: dict[str, str]) -> str:
    """sha256 over the repo id, the commit and each file's sha256: the content hash of a hub model."""
    payload = json.dumps({"repo_id": repo_id, "commit": commit, "files": files}, sort_keys=True,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_hub(spec: str, memo: str | Path | None = None) -> tuple[Path, str, dict[str, Any]]:
    """(snapshot folder, content hash, extra) of a hub spec; ``extra`` holds ``repo_id``, ``revision``
    (as requested; None: the default branch), ``commit`` and ``files`` (name -> sha256)."""
    repo_id, revision = parse_hub_spec(spec)
    snapshot = _snapshot(repo_id, revision, CONFIG_PATTERNS + SAFETENSORS_PATTERNS)
    if not any(snapshot.glob("*.safetensors")):
        snapshot = _snapshot(repo_id, revision, CONFIG_PATTERNS + BIN_PATTERNS)
    if not (snapshot / "config.json").is_file():
        raise CrepeError(f"hub model {spec!r} has no config.json at {snapshot}, so it is not a transformers model")
    names = _model_files(snapshot)
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise CrepeError(f"hub model {spec!r} has no weight files (*.safetensors or pytorch_model*.bin) in "
                         f"{snapshot}")
    commit = snapshot.name
    files = sha256_files(snapshot, names, memo)
    extra = {"repo_id": repo_id, "revision": revision, "commit": commit, "files": files}
    return snapshot, hub_identity(repo_id, commit, files), extra
