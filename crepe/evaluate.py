"""Perplexity under the standard protocol (spec §14.1).

Non-overlapping windows of ``seqlen`` tokens (remainder dropped), mean cross-entropy over the
``seqlen - 1`` shifted predictions of each window computed in float32, ``nll = loss * seqlen``,
``ppl = exp(sum(nll) / (n_windows * seqlen))``. The x seqlen / (seqlen - 1) mismatch is part of
the published protocol and kept so numbers are comparable. The result also keeps each window's mean
NLL (``nll / seqlen``, so ``ppl == exp(mean(window_nll))``) and a seeded 95% bootstrap CI over windows
(:mod:`crepe.uncertainty`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crepe.blocks import capture_inputs, find_blocks, finish_from_hidden, run_block
from crepe.errors import CrepeError
from crepe.uncertainty import perplexity_ci


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_windows: int
    n_windows_available: int
    seqlen: int
    n_tokens: int
    seconds: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window, in window order
    ci95: tuple[float, float] | None = None  # bootstrap CI of ppl over windows; None below 2 windows

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95) if self.ci95 is not None else None  # as it reads back from JSON
        return out


def make_result(nll: torch.Tensor, per_window: list[float], available: int, seqlen: int,
                started: float) -> PerplexityResult:
    """The :class:`PerplexityResult` of summed NLL ``nll`` and per-window NLLs ``per_window`` (``loss *
    seqlen`` each, in window order); the in-memory and the streamed evaluation share it."""
    n = len(per_window)
    value = float(torch.exp(nll / (n * seqlen)))
    if not math.isfinite(value):
        value = float("inf")
    window_nll = [w / seqlen for w in per_window]
    ci95 = perplexity_ci(window_nll) if n >= 2 else None
    return PerplexityResult(value, float(nll), n, available, seqlen, n * seqlen,
                            round(time.perf_counter() - started, 3), window_nll, ci95)


def _windows(input_ids: torch.Tensor, seqlen: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    ids = input_ids.reshape(-1)
    if seqlen < 2:
        raise CrepeError(f"seqlen must be at least 2, got {seqlen}")
    available = ids.numel() // seqlen
    if available == 0:
        raise CrepeError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    if max_windows is not None and max_windows < 1:
        raise CrepeError(f"max_windows must be >= 1, got {max_windows}")
    n = available if max_windows is None else min(available, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen), available


def _window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Per-window ``mean CE * seqlen`` in float32; logits (b, seqlen, vocab), windows (b, seqlen)."""
    b, seqlen = windows.shape
    shift_logits = logits[:, :-1, :].to(torch.float32)
    targets = windows[:, 1:].to(logits.device)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).reshape(b, seqlen - 1)
    return loss.mean(dim=1) * seqlen


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current device>`` are one device (``torch.device`` equality says they differ)."""

    def index(d: torch.device) -> int | None:
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return a.type == b.type and index(a) == index(b)


@torch.no_grad()
def add_nll(
    nll: torch.Tensor, done: int, windows: torch.Tensor, batch_size: int, logits_iter: Iterator[torch.Tensor],
    progress: Callable[[int, int], None] | None, total: int, per_window: list[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Add the float64 NLL of ``windows`` (chunks of ``batch_size``, logits from ``logits_iter``) to ``nll``;
    ``done`` counts windows for ``progress(done, total)``; ``per_window`` gets each window's NLL appended."""
    for chunk, logits in zip(windows.split(batch_size), logits_iter):
        chunk_nll = _window_nll(logits, chunk).to(torch.float64).cpu()
        nll += chunk_nll.sum()
        if per_window is not None:
            per_window.extend(chunk_nll.tolist())
        done += chunk.shape[0]
        if progress:
            progress(done, total)
    return nll, done


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    blockwise: bool | None = None,
    blocks_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream ``input_ids`` ((1, N) or (N,)).

    ``max_windows`` evaluates only the first windows (a budget for CPU runs). ``blockwise=True``
    (the default when the weights are not on ``device``) moves one decoder block at a time to the
    device, as in pruning, so models larger than the accelerator can be evaluated.
    """
    started = time.perf_counter()
    windows, available = _windows(input_ids, seqlen, max_windows)
    if batch_size < 1:
        raise CrepeError(f"batch_size must be >= 1, got {batch_size}")
    weights_on = next(model.parameters()).device
    dev = torch.device(device) if device is not None else weights_on
    if blockwise is None:
        blockwise = not same_device(dev, weights_on)
    logits_iter: Iterator[torch.Tensor]
    if blockwise:
        logits_iter = _blockwise_logits(model, windows, batch_size, dev, blocks_path)
    else:
        logits_iter = (
            model(input_ids=chunk.to(dev), use_cache=False).logits
            for chunk in windows.split(batch_size)
        )
    per_window: list[float] = []
    nll, _ = add_nll(torch.zeros((), dtype=torch.float64), 0, windows, batch_size, logits_iter, progress,
                     windows.shape[0], per_window)
    return make_result(nll, per_window, available, seqlen, started)


def _blockwise_logits(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, blocks_path: str | None,
    on_block_start: Callable[[int, nn.Module], None] | None = None,
    on_block_end: Callable[[int, nn.Module], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Logits per chunk, one block at a time; the hooks load and free a streamed block (block 0 before capture)."""
    _, blocks = find_blocks(model, blocks_path)
    if on_block_start is not None:
        on_block_start(0, blocks[0])  # the capture's output-type probe runs block 0
    inputs = capture_inputs(model, blocks, windows, batch_size, device)
    hidden = inputs.hidden
    for i, block in enumerate(blocks):
        if on_block_start is not None and i > 0:
            on_block_start(i, block)
        home = next(block.parameters()).device
        block.to(device)
        hidden = [run_block(block, h, inputs.args[i][c], inputs.kwargs[i][c]) for c, h in enumerate(hidden)]
        block.to(home)
        if on_block_end is not None:
            on_block_end(i, block)
    yield from finish_from_hidden(model, blocks, windows, hidden, batch_size, device, inputs.tuple_output)
