"""Decoder blocks of any HF causal LM: discovery, input capture and block-at-a-time execution.

Capture runs the model once per chunk of inputs with every block's ``forward`` temporarily replaced
by a recorder: block 0's recorder keeps the incoming hidden state, and every block's recorder keeps
the exact positional and keyword arguments it was called with (position embeddings, masks, cache
position, ...). Replaying a block with its own recorded kwargs matters: Gemma-3, Qwen-2/3 and
Mistral-style models give sliding-window and full-attention layers different masks and rotary
tables. Only the non-block modules (embeddings, rotary tables, final norm, head) and one block
at a time need to sit on the compute device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crepe.errors import CrepeError


def _resolve_attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if part.isascii() and part.isdigit():
            try:
                obj = obj[int(part)]
            except (IndexError, TypeError, KeyError):
                obj = None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            raise CrepeError(f"model has no attribute path {path!r} (failed at {part!r})")
    return obj


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder blocks as (dotted path, ModuleList), found generically or from ``path``.

    Generic rule: among the ``nn.ModuleList``s whose children all belong to one of the model's
    ``_no_split_modules`` classes (or, failing that, are all of one class that contains
    ``nn.Linear``s), take the one with the most parameters (the text decoder in multimodal models).
    """
    if path:
        blocks = _resolve_attr(model, path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise CrepeError(f"{path!r} is not a non-empty nn.ModuleList of decoder blocks")
        return path, blocks
    names = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    fallback: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child).__name__ for child in module}
        size = sum(p.numel() for p in module.parameters())
        if classes <= names:  # one block class, or several (Jamba: attention and Mamba layers)
            candidates.append((size, name, module))
        elif len(classes) == 1 and any(isinstance(m, nn.Linear) for m in module[0].modules()):
            fallback.append((size, name, module))
    chosen = candidates or fallback
    if not chosen:
        raise CrepeError(
            f"could not find the decoder blocks of {type(model).__name__}; pass the dotted path of "
            "its block list explicitly (e.g. --blocks model.layers)"
        )
    _, name, blocks = max(chosen, key=lambda c: c[0])
    return name, blocks


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def non_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Temporarily move every parameter and buffer outside ``blocks`` to ``device``."""
    inside = {id(m) for m in blocks.modules()}
    moved: list[tuple[nn.Module, str, str, torch.device]] = []
    for module in model.modules():
        if id(module) in inside:
            continue
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                if tensor is not None and tensor.device != device:
                    moved.append((module, kind, key, tensor.device))
                    if kind == "_parameters":
                        tensor.data = tensor.data.to(device)
                    else:
                        module._buffers[key] = tensor.to(device)
    try:
        yield
    finally:
        for module, kind, key, original in moved:
            tensor = getattr(module, kind)[key]
            if kind == "_parameters":
                tensor.data = tensor.data.to(original)
            else:
                module._buffers[key] = tensor.to(original)


@contextmanager
def patched_forwards(blocks: nn.ModuleList, make: Any) -> Iterator[None]:
    """Replace each block's ``forward`` with ``make(index, original_forward)`` for the duration."""
    saved = []
    for i, block in enumerate(blocks):
        had_own = "forward" in block.__dict__
        saved.append((block, had_own, block.__dict__.get("forward")))
        block.forward = make(i, block.forward)
    try:
        yield
    finally:
        for block, had_own, own in saved:
            if had_own:
                block.forward = own
            else:
                del block.forward


class _Stop(Exception):
    """Raised by the last recorder to end a capture forward early (the head is not needed)."""


@dataclass
class BlockInputs:
    """Inputs of block 0 per chunk, and the call arguments each block receives per chunk."""

    hidden: list[torch.Tensor]
    args: list[list[tuple[Any, ...]]] = field(default_factory=list)  # [block][chunk] extra positionals
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [block][chunk]
    tuple_output: bool = False  # blocks return (hidden, ...) instead of a tensor


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> BlockInputs:
    """Run ``input_ids`` (n, seqlen) through the model up to the blocks, recording every block call."""
    n_blocks = len(blocks)
    out = BlockInputs(hidden=[], args=[[] for _ in blocks], kwargs=[[] for _ in blocks])
    probe = {"done": False}

    def make(i: int, original: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                out.hidden.append(hidden)
                if not probe["done"]:  # learn the block's output type once
                    probe["done"] = True
                    result = original(*args, **kwargs) if args else original(hidden, **kwargs)
                    out.tuple_output = isinstance(result, (tuple, list))
            out.args[i].append(tuple(args[1:]))
            out.kwargs[i].append(dict(kwargs))
            if i == n_blocks - 1:
                raise _Stop
            return (hidden,) if out.tuple_output else hidden

        return record

    home = next(blocks[0].parameters()).device
    with non_blocks_on(model, blocks, device), patched_forwards(blocks, make):
        blocks[0].to(device)  # the one-off output-type probe runs block 0
        try:
            for chunk in input_ids.split(batch_size):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            blocks[0].to(home)
    return out


def run_block(
    block: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """One block call replaying its recorded arguments; returns the output hidden state."""
    result = block(hidden, *args, **kwargs)
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def finish_from_hidden(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    final_hidden: list[torch.Tensor],
    batch_size: int,
    device: torch.device,
    tuple_output: bool,
) -> Iterator[torch.Tensor]:
    """Logits per chunk from precomputed last-block outputs: the model runs with pass-through blocks."""
    chunk_index = {"i": 0}
    n_blocks = len(blocks)

    def make(i: int, original: Any) -> Any:
        def passthrough(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == n_blocks - 1:
                hidden = final_hidden[chunk_index["i"]]
            return (hidden,) if tuple_output else hidden

        return passthrough

    with non_blocks_on(model, blocks, device), patched_forwards(blocks, make):
        for c, chunk in enumerate(input_ids.split(batch_size)):
            chunk_index["i"] = c
            yield model(input_ids=chunk.to(device), use_cache=False).logits
