"""Forward rows of the packed scorer: which tokens go into which row, and the padded batch tensors.

:func:`plan_rows` groups lm-eval requests ``(strings, context tokens, continuation tokens)`` into rows:
requests sharing a context share one row (context once, then every continuation's inputs, with a block
mask so each continuation sees only the context and its own prefix); the rest get lm-eval's own row,
``(context + continuation)[:-1]``. :func:`batch_rows` pads rows into ``input_ids``/``position_ids``,
the 4D additive mask (packed rows only) and ``keep``, the positions whose logits are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


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
