"""Hashing and atomic writes: nothing is ever left half-written at its final path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(
    path: str | Path, exclude: tuple[str, ...] = (), memo: str | Path | None = None
) -> str:
    """Content hash of a folder: relative paths and file hashes, sorted; names in ``exclude`` skipped.

    With ``memo`` (a JSON file), a file's hash is reused while its absolute path, size and
    modification time are unchanged, so a 140 GB checkpoint is read once, not on every load.
    """
    root = Path(path).resolve()
    names = [
        f.relative_to(root).as_posix()
        for f in sorted(p for p in root.rglob("*") if p.is_file())
        if f.relative_to(root).as_posix() not in exclude and f.name not in exclude
    ]
    digest = hashlib.sha256()
    for rel, sha in sha256_files(root, names, memo).items():
        digest.update(f"{rel}\0{sha}\n".encode())
    return digest.hexdigest()


def sha256_files(root: str | Path, names: list[str], memo: str | Path | None = None) -> dict[str, str]:
    """sha256 of each file ``root/name`` (symlinks followed), in the order given, memoised as in
    :func:`sha256_folder` (the memo key is the path under ``root``, its size and modification time)."""
    base = Path(root).resolve()
    known: dict[str, str] = {}
    if memo is not None and Path(memo).is_file():
        try:
            known = json.loads(Path(memo).read_text())
        except ValueError:
            known = {}  # a damaged memo only costs a re-hash
    fresh: dict[str, str] = {}
    out: dict[str, str] = {}
    for rel in names:
        file = base / rel
        st = file.stat()
        key = f"{file}|{st.st_size}|{st.st_mtime_ns}"
        fresh[key] = known.get(key) or sha256_file(file)
        out[rel] = fresh[key]
    if memo is not None and any(k not in known for k in fresh):
        merged = {**known, **fresh}  # entries of files that no longer exist are dropped
        write_json_atomic(memo, {k: v for k, v in merged.items() if Path(k.rsplit("|", 2)[0]).exists()})
    return out


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8; see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def save_figure_atomic(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Render a matplotlib figure as PNG in memory and write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON content of ``path``; a missing file or invalid JSON is a CrepeError naming ``what``."""
    file = Path(path)
    if not file.is_file():
        raise CrepeError(f"{what} {file} does not exist")
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise CrepeError(f"{what} {file} is not valid JSON ({exc})") from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomic JSON write (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename.

    On any error the temp folder is removed and ``target`` is untouched. With ``overwrite`` an
    existing ``target`` is moved aside first and deleted only after the new one is in place.
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            if not overwrite and any(final.iterdir()):
                raise FileExistsError(final)
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_is_nonempty(path: str | Path) -> bool:
    p = Path(path)
    return p.exists() and (not p.is_dir() or any(p.iterdir()))
