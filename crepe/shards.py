"""Safetensors checkpoints read and written one tensor at a time, and memory sizes.

A model folder holds ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.
:class:`Checkpoint` parses only the headers (names, dtypes, shapes, byte ranges) and reads a tensor
with a plain positioned read into a fresh tensor. It deliberately does not memory-map the shards: pages
of a mapping stay resident (and count in the process's RSS) for as long as the mapping is open, which
would defeat a memory cap. :class:`ShardWriter` writes the safetensors format directly from tensor
memory (no serialised copy) and the index ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from crepe.errors import CrepeError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of ``3GB`` (10^9), ``512MiB`` / ``512M`` (2^20), ``1.5GB`` or a plain integer; one sentence on error."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise CrepeError(
                f"memory size {text!r} is not understood; give a number with a unit such as 3GB, 512MiB or 64G"
            )
        value, unit = float(m.group(1)), m.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise CrepeError(f"memory size {text!r} must be positive")
    return size


def format_size(n: int) -> str:
    """``n`` bytes as a short decimal size (``1.23 GB``, ``456.7 MB``)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Size in memory, at ``dtype`` when this is a floating-point tensor."""
        target = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        return self.numel * target.itemsize


def read_header(file: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of one safetensors file; one sentence when it is corrupt."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CrepeError(f"weight file {file} is truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > file.stat().st_size:  # e.g. a Git LFS pointer instead of the weights
                raise CrepeError(f"weight file {file} has a corrupt header (not a safetensors file; a Git LFS pointer?)")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CrepeError(f"cannot read weight file {file}: {exc.strerror}") from None
    except ValueError:
        raise CrepeError(f"weight file {file} has a corrupt header") from None
    return 8 + n, header


class Checkpoint:
    """The tensors of a safetensors model folder: names, dtypes, shapes and where their bytes are."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                raise CrepeError(f"{index} is not a valid safetensors index (no weight_map)") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise CrepeError(f"{self.folder} holds no safetensors weights, which reading a model shard by shard needs")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            file = self.folder / name
            if not file.is_file():
                raise CrepeError(f"shard {name} listed in {index} is missing from {self.folder}")
            start, header = read_header(file)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in ST_DTYPES:
                    raise CrepeError(f"tensor {key} in {file} has dtype {meta['dtype']}, which crepe cannot read")
                b, e = meta["data_offsets"]
                self.entries[key] = TensorEntry(file, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), start + b, start + e)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, dtype: torch.dtype | None = None, names: list[str] | None = None) -> int:
        """Bytes the tensors (all, or ``names``) take in memory at ``dtype`` (floating tensors only)."""
        keys = self.entries if names is None else names
        return sum(self.entries[k].nbytes(dtype) for k in keys)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh CPU tensor holding ``name`` (cast to ``dtype`` when given)."""
        entry = self.entries.get(name)
        if entry is None:
            raise CrepeError(f"the checkpoint in {self.folder} has no tensor {name!r}")
        out = torch.empty(entry.shape, dtype=entry.dtype)
        view = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
        if view is not None:
            if view.nbytes != entry.end - entry.start:
                raise CrepeError(f"tensor {name} in {entry.file} has {entry.end - entry.start} bytes, expected {view.nbytes}")
            with open(entry.file, "rb") as fh:
                fh.seek(entry.start)
                if fh.readinto(memoryview(view)) != view.nbytes:
                    raise CrepeError(f"weight file {entry.file} is truncated (tensor {name})")
        return out if dtype is None or out.dtype == dtype else out.to(dtype)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` (CPU) as one safetensors file straight from their memory; return the data bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    order = sorted(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in TORCH_TO_ST:
            raise CrepeError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return offset  # no fsync, as save_pretrained: the output folder appears by one rename (atomic_dir)


class ShardWriter:
    """Numbered shards ``model-0000i-of-0000n.safetensors`` plus the index, written into ``folder``."""

    def __init__(self, folder: Path, n_shards: int) -> None:
        self.folder = Path(folder)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        clash = sorted(set(tensors) & set(self.weight_map))
        if clash:
            raise RuntimeError(f"internal error: tensor {clash[0]} written twice")
        file = self.name(k)
        self.total += write_safetensors(self.folder / file, tensors)
        self.weight_map.update(dict.fromkeys(tensors, file))

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
