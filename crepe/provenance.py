"""What produced an artifact: package versions, code version, machine. Recorded in every manifest."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "accelerate")
_ROOT = Path(__file__).resolve().parent.parent


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the library's own source files (the code version when git is unavailable)."""
    digest = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for file in sorted(pkg.rglob("*.py")):
        digest.update(file.relative_to(pkg).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    if not (_ROOT / ".git").exists():
        return {}
    try:
        sha = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_sha": sha or None, "git_dirty": bool(dirty)}


def code_version() -> dict[str, Any]:
    from crepe import __version__  # here: crepe/__init__ sets it after importing its modules (cycle)

    return {"crepe_version": __version__, "source_sha256": source_hash(), **git_state()}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line() -> list[str]:
    return list(sys.argv)
