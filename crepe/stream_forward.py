"""Any whole-model call with the decoder blocks streamed from the shards (zero-shot batches, ...).

:func:`forwards` takes the items to evaluate (e.g. lm-eval batches) and a ``run(item)`` that calls the
model as if it were in memory. Per group of items that fits in the memory left, every ``run`` goes once up
to block 0 while each block's call arguments are recorded (block 0's inputs, masks, rotary tables, ...),
the blocks run one at a time over the group (each read from the shards once), and every ``run`` goes
again with pass-through blocks for the final norm and head. Each block sees exactly the inputs of an
in-memory forward, so the results are bit-identical to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from crepe.blocks import _Stop, non_blocks_on, patched_forwards, run_block


def forwards(
    streamer: Any, items: Iterable[Any], run: Callable[[Any], Any], n_tokens: Callable[[Any], int],
    dev: torch.device, budget: int,
) -> Iterator[tuple[Any, Any]]:
    """``(item, run(item))`` for every item, where ``run`` calls the whole model of ``streamer`` (a
    :class:`crepe.streaming.Streamer`; e.g. one zero-shot batch) on ``dev``, with the blocks streamed. Per group
    of items (as many tokens as their hidden states fit in ``budget`` bytes), every ``run`` goes once up to block 0 while each block's call arguments
    are recorded, the blocks run one at a time over the group, then every ``run`` goes again with
    pass-through blocks (final norm, head): each block sees exactly the inputs of an in-memory forward."""
    itemsize = next(iter(streamer.model.parameters())).element_size()
    per_token = 4 * int(streamer.model.config.get_text_config().hidden_size) * max(itemsize, 4)
    group: list[Any] = []
    tokens = 0
    for item in items:
        n = n_tokens(item)
        if group and (tokens + n) * per_token > budget:
            yield from _forward_group(streamer, group, run, dev)
            group, tokens = [], 0
        group.append(item)
        tokens += n
    if group:
        yield from _forward_group(streamer, group, run, dev)


@torch.no_grad()
def _forward_group(
    streamer: Any, items: list[Any], run: Callable[[Any], Any], dev: torch.device
) -> Iterator[tuple[Any, Any]]:
    blocks, last = streamer.blocks, len(streamer.blocks) - 1
    hidden: list[torch.Tensor] = []
    args: list[list[tuple]] = [[] for _ in blocks]
    kwargs: list[list[dict]] = [[] for _ in blocks]
    tuple_output: list[bool] = []

    def record(i: int, original: Any) -> Any:
        def fn(*a: Any, **kw: Any) -> Any:
            h = a[0] if a else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h)
                if not tuple_output:  # learn the block's output type once (block 0 runs for real)
                    result = original(*a, **kw) if a else original(h, **kw)
                    tuple_output.append(isinstance(result, (tuple, list)))
            args[i].append(tuple(a[1:]))
            kwargs[i].append(dict(kw))
            if i == last:
                raise _Stop
            return (h,) if tuple_output[0] else h
        return fn

    streamer.start_block(0, blocks[0])
    with non_blocks_on(streamer.model, blocks, dev), patched_forwards(blocks, record):
        blocks[0].to(dev)
        try:
            for item in items:
                try:
                    run(item)
                except _Stop:
                    pass
        finally:
            blocks[0].to("cpu")
    for i, block in enumerate(blocks):
        if i:
            streamer.start_block(i, block)
        block.to(dev)
        hidden = [run_block(block, h, args[i][c], kwargs[i][c]) for c, h in enumerate(hidden)]
        block.to("cpu")
        streamer.end_block(i, block)
    current = [0]

    def passthrough(i: int, original: Any) -> Any:
        def fn(*a: Any, **kw: Any) -> Any:
            h = hidden[current[0]] if i == last else (a[0] if a else kw["hidden_states"])
            return (h,) if tuple_output[0] else h
        return fn

    with non_blocks_on(streamer.model, blocks, dev), patched_forwards(blocks, passthrough):
        for c, item in enumerate(items):
            current[0] = c
            yield item, run(item)
