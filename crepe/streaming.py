"""Models larger than memory: the weights stay in their safetensors shards, one decoder block at a time in RAM.

When a model's weights (at the run's dtype) do not fit under ``--max-memory`` (default: the memory the
machine has available), :func:`load_capped` builds the model on the meta device, reads the tensors
outside the decoder blocks (embeddings, final norm, head, ...) once from the shards, computes the
non-persistent buffers (rotary tables, embedding scales) as ``from_pretrained`` does, and returns a
:class:`StreamedModel`. Pruning and perplexity then call :meth:`Streamer.start_block` before a block is
used (its tensors are read from the shards) and :meth:`Streamer.end_block` after (a prune writes the
block into the output shards; the block goes back to the meta device). The output is a normal Hugging
Face folder: config, tokenizer, numbered safetensors shards (one for the tensors outside the blocks, one
per block) and the index, with the input's tensor names. Zero-shot batches (any whole-model call) go
through :meth:`Streamer.forwards` (:mod:`crepe.stream_forward`). Every operation is the one the in-memory
path runs, so masks, weights, perplexities and zero-shot scores are bit-identical to it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from crepe.blocks import find_blocks
from crepe.errors import CrepeError
from crepe.evaluate import PerplexityResult, _blockwise_logits, _windows, add_nll, make_result
from crepe.models import (
    LoadedModel,
    ModelInfo,
    dtype_name,
    load_model,
    parse_dtype,
    resolve_device,
    resolve_source,
)
from crepe.shards import Checkpoint, ShardWriter, format_size, parse_size
from crepe.stream_forward import forwards

__all__ = [
    "StreamedModel", "Streamer", "available_memory", "build_streamer", "folder_streamer", "load_capped",
    "resolve_max_memory", "streamer_of",
]


def _libc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere): freed blocks otherwise stay in the heap, fragmented, and
    the resident set creeps up by tens of MB per streamed block (measured: 1.5 -> 3.0 GB over 25 blocks)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def available_memory() -> int:
    """Bytes of memory the machine has available now (``psutil.virtual_memory().available``)."""
    return int(psutil.virtual_memory().available)


def resolve_max_memory(value: str | int | None) -> int:
    """The memory cap in bytes: ``value`` parsed (``3GB``, ``512MiB``), or what is available when None."""
    return available_memory() if value is None else parse_size(value)


def _tensor_slots(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(local name, owner, attribute) of every parameter and persistent buffer, state_dict order."""
    out = []
    for mname, mod in module.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((f"{mname}.{attr}" if mname else attr, mod, attr))
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                out.append((f"{mname}.{attr}" if mname else attr, mod, attr))
    return out


def _assign(owner: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in owner._parameters:
        param = nn.Parameter(tensor, requires_grad=False)
        param._is_hf_initialized = True  # transformers' init functions leave it alone
        owner._parameters[attr] = param
    else:
        owner._buffers[attr] = tensor


def _slot_bytes(slots: list[tuple[str, nn.Module, str]]) -> int:
    """Bytes of the distinct tensors in ``slots`` (a tied head counts once)."""
    tensors = {id(t): t for t in (getattr(o, a) for _, o, a in slots)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Streamer:
    """Reads block tensors from a checkpoint on demand and (optionally) writes pruned blocks out."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, blocks_path: str | None, cap: int) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.path, self.blocks = find_blocks(model, blocks_path)
        self.cap = cap
        self.writer: ShardWriter | None = None
        self.block_bytes = [_slot_bytes(_tensor_slots(b)) for b in self.blocks]
        inside = {id(m) for m in self.blocks.modules()}
        self.outside = [(n, o, a) for n, o, a in _tensor_slots(model) if id(o) not in inside]
        self.resident_bytes = _slot_bytes(self.outside)

    def unreadable(self) -> str | None:
        """The first block tensor the checkpoint does not hold under the model's own name, or None.

        transformers 5 converts some layouts on load (fused MoE experts are stored per expert in the
        checkpoint), so such a model cannot be read block by block from its shards.
        """
        for i, block in enumerate(self.blocks):
            for name, _, _ in _tensor_slots(block):
                if f"{self.path}.{i}.{name}" not in self.checkpoint:
                    return f"{self.path}.{i}.{name}"
        return None

    # --- memory -------------------------------------------------------------------------------------

    def check_cap(self, dtype: torch.dtype) -> None:
        """One sentence when one block, or the resident tensors plus one block, do not fit under the cap."""
        big = max(self.block_bytes)
        i = self.block_bytes.index(big)
        if big > self.cap:
            raise CrepeError(
                f"--max-memory {format_size(self.cap)} is smaller than one decoder block of this model "
                f"({self.path}.{i} holds {format_size(big)} at {dtype_name(dtype)}); raise --max-memory"
            )
        if self.resident_bytes + big > self.cap:
            raise CrepeError(
                f"--max-memory {format_size(self.cap)} cannot hold the tensors outside the decoder blocks "
                f"({format_size(self.resident_bytes)}) plus one block ({format_size(big)}) at {dtype_name(dtype)}; "
                f"raise it to at least {format_size(self.resident_bytes + big)}"
            )

    def windows_per_pass(self, seqlen: int, batch_size: int) -> int:
        """Perplexity windows whose hidden states fit in the memory left beside the resident tensors and a block."""
        config = self.model.config.get_text_config()
        itemsize = next(iter(self.model.parameters())).element_size()
        per_window = 4 * seqlen * int(config.hidden_size) * max(itemsize, 4)  # inputs, outputs, temporaries
        free = self.cap - self.resident_bytes - 2 * max(self.block_bytes)
        n = max(free // per_window, batch_size)
        return int(n - n % batch_size)

    # --- blocks ---------------------------------------------------------------------------------------

    def start_block(self, i: int, block: nn.Module) -> None:
        """Read block ``i``'s parameters and persistent buffers from the checkpoint (at their model dtype)."""
        for name, owner, attr in _tensor_slots(block):
            current = getattr(owner, attr)
            if not current.is_meta:
                continue
            full = f"{self.path}.{i}.{name}"
            if full not in self.checkpoint:
                raise CrepeError(
                    f"the checkpoint in {self.checkpoint.folder} has no tensor {full!r}; reading a model shard by "
                    "shard needs checkpoint names equal to the model's parameter names"
                )
            tensor = self.checkpoint.read(full, current.dtype)
            if tuple(tensor.shape) != tuple(current.shape):
                raise CrepeError(f"tensor {full} has shape {tuple(tensor.shape)} in the checkpoint but the model "
                                 f"expects {tuple(current.shape)}")
            _assign(owner, attr, tensor)

    def end_block(self, i: int, block: nn.Module) -> None:
        """Write block ``i`` to the output shards when writing, then free it (back to the meta device)."""
        if self.writer is not None:
            self.writer.write(i + 1, {f"{self.path}.{i}.{n}": getattr(o, a).detach() for n, o, a in _tensor_slots(block)})
        for _, owner, attr in _tensor_slots(block):
            _assign(owner, attr, torch.empty_like(getattr(owner, attr), device="meta"))
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)  # hand the freed block back to the OS

    def hooks(self) -> dict[str, Any]:
        return {"on_block_start": self.start_block, "on_block_end": self.end_block}

    # --- output -----------------------------------------------------------------------------------------

    def begin_output(self, folder: Path) -> None:
        """Start writing a pruned copy into ``folder``: the tensors outside the blocks go to the first shard."""
        self.writer = ShardWriter(folder, len(self.blocks) + 1)
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(f"{self.path}.") or id(tensor) in seen:
                continue  # blocks are written one by one; a tied copy (lm_head = embeddings) once
            seen.add(id(tensor))
            tensors[name] = tensor.detach()
        self.writer.write(0, tensors)

    def finish_output(self, tokenizer: Any) -> None:
        """Index, config, generation config and tokenizer; later reads come from the written folder."""
        if self.writer is None:
            raise RuntimeError("internal error: finish_output without begin_output")
        writer, self.writer = self.writer, None
        if len(writer.weight_map) < len(self.outside) or len(set(writer.weight_map.values())) != writer.n_shards:
            raise RuntimeError("internal error: the streamed prune did not write every block")
        writer.finish()
        self.model.config.save_pretrained(writer.folder)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None and self.model.can_generate():
            generation.save_pretrained(writer.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.folder)
        self.checkpoint = Checkpoint(writer.folder)

    # --- perplexity -------------------------------------------------------------------------------------

    @torch.no_grad()
    def perplexity(
        self, input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 4,
        device: torch.device | str | None = None, windows_per_pass: int | None = None, progress: Any = None,
    ) -> PerplexityResult:
        """:func:`crepe.evaluate.perplexity` with every block read from the shards once per pass of windows."""
        started = time.perf_counter()
        windows, available = _windows(input_ids, seqlen, max_windows)
        if batch_size < 1:
            raise CrepeError(f"batch_size must be >= 1, got {batch_size}")
        dev = resolve_device(device if device is not None else "cpu")
        per_pass = windows_per_pass or self.windows_per_pass(seqlen, batch_size)
        per_pass = max(per_pass - per_pass % batch_size, batch_size)  # the same forward chunks as in memory
        nll = torch.zeros((), dtype=torch.float64)
        done = 0
        per_window: list[float] = []
        for group in windows.split(per_pass):
            logits_iter = _blockwise_logits(self.model, group, batch_size, dev, self.path,
                                            self.start_block, self.end_block)
            nll, done = add_nll(nll, done, group, batch_size, logits_iter, progress, windows.shape[0], per_window)
        return make_result(nll, per_window, available, seqlen, started)


    # --- any forward (zero-shot batches) ----------------------------------------------------------------

    def forwards(
        self, items: Iterable[Any], run: Callable[[Any], Any], n_tokens: Callable[[Any], int],
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """``(item, run(item))`` for every item, ``run`` being a whole-model call: see :func:`crepe.stream_forward.forwards`."""
        budget = max(self.cap - self.resident_bytes - 2 * max(self.block_bytes), 0)
        return forwards(self, items, run, n_tokens, resolve_device(device if device is not None else "cpu"), budget)


@dataclass
class StreamedModel(LoadedModel):
    """A :class:`LoadedModel` whose decoder blocks live in the shards; ``streamer`` moves them."""

    streamer: Streamer | None = None


def build_streamer(
    folder: str | Path, dtype: torch.dtype | None, cap: int, blocks_path: str | None = None, resident: bool = True
) -> Streamer:
    """The model of ``folder`` on the meta device with its non-block tensors read in (dtype None: config's;
    ``resident=False``: only the blocks will be read, e.g. to count zeros)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # heavy (seconds): lazy

    root = Path(folder)
    checkpoint = Checkpoint(root)
    try:
        config = AutoConfig.from_pretrained(root)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        raise CrepeError(f"could not build the model of {root} ({type(exc).__name__}: {exc})") from None
    try:
        model.generation_config = GenerationConfig.from_pretrained(root)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
    model.eval()
    model.config.use_cache = False
    streamer = Streamer(model, checkpoint, blocks_path, cap)
    streamer.check_cap(dtype)
    if not resident:
        return streamer
    missing: set[str] = set()
    for name, owner, attr in streamer.outside:
        current = getattr(owner, attr)
        if name in checkpoint:
            _assign(owner, attr, checkpoint.read(name, current.dtype))
        else:
            missing.add(name)
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    for name in sorted(missing):
        if model.get_parameter_or_buffer(name).is_meta:
            raise CrepeError(f"the checkpoint in {root} has no tensor {name!r}, which the model needs")
    owners = {}
    for name, buffer in model.named_non_persistent_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[attr] = torch.empty_like(buffer, device="cpu")
        owners[owner_name] = owner
    for owner in owners.values():
        model._init_weights(owner)  # rotary tables, embedding scales: computed from the config, as on load
    return streamer


def load_capped(
    spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device | None = "auto",
    max_memory: str | int | None = None, blocks_path: str | None = None,
) -> LoadedModel:
    """:func:`crepe.models.load_model` when the weights fit under ``max_memory``, else a :class:`StreamedModel`."""
    torch_dtype = parse_dtype(dtype)
    cap = resolve_max_memory(max_memory)
    dev = resolve_device(device)
    started = time.perf_counter()
    kind, where, digest, extra = resolve_source(spec)
    folder = Path(where)
    if not list(folder.glob("*.safetensors")):
        stored = sum(f.stat().st_size for f in folder.glob("*.bin"))
        if stored > cap:
            raise CrepeError(
                f"{spec!r} stores its weights as .bin files ({format_size(stored)}, more than --max-memory "
                f"{format_size(cap)}) and only safetensors shards can be read block by block; convert it to "
                "safetensors or raise --max-memory"
            )
        return load_model(spec, dtype=dtype, device=device)
    need = Checkpoint(folder).nbytes(torch_dtype)
    if need <= cap:
        return load_model(spec, dtype=dtype, device=device)
    streamer = build_streamer(folder, torch_dtype, cap, blocks_path)
    if (renamed := streamer.unreadable()) is not None:
        raise CrepeError(
            f"{spec!r} ({format_size(need)}) does not fit under --max-memory {format_size(cap)}, and its checkpoint "
            f"stores {renamed!r} under another name (transformers converts it on load, e.g. fused MoE experts), "
            "so it cannot be read block by block; raise --max-memory"
        )
    from transformers import AutoTokenizer  # heavy (seconds): lazy

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise CrepeError(f"could not load the tokenizer of {spec!r} ({type(exc).__name__}: {exc})") from None
    model = streamer.model
    info = ModelInfo(
        spec=spec, kind=kind, path=str(folder), content_hash=digest, dtype=dtype_name(torch_dtype), device=str(dev),
        offload=dev.type != "cpu", architecture=(model.config.architectures or [type(model).__name__])[0],
        n_params=sum(p.numel() for p in model.parameters()), load_seconds=round(time.perf_counter() - started, 3),
        extra={**extra, "streamed": {"max_memory": cap, "weights_bytes": need, "resident_bytes": streamer.resident_bytes,
                                     "largest_block_bytes": max(streamer.block_bytes)}},
    )
    return StreamedModel(model, tokenizer, info, streamer)


def streamer_of(lm: Any) -> Streamer | None:
    """The :class:`Streamer` of a streamed model, None for one held in memory."""
    return getattr(lm, "streamer", None)


def folder_streamer(folder: str | Path, max_memory: str | int | None = None, blocks_path: str | None = None) -> Streamer | None:
    """A streamer for a saved model folder (at its config's dtype) when its weights do not fit under
    ``max_memory`` (default: the memory available); None when it fits or has no safetensors weights."""
    root = Path(folder)
    cap = resolve_max_memory(max_memory)
    if not list(root.glob("*.safetensors")):
        return None
    from transformers import AutoConfig  # heavy (seconds): lazy

    dtype = getattr(AutoConfig.from_pretrained(root), "dtype", None)
    dtype = parse_dtype(dtype) if isinstance(dtype, (str, torch.dtype)) else None
    if Checkpoint(root).nbytes(dtype) <= cap:
        return None
    return build_streamer(root, dtype, cap, blocks_path)
