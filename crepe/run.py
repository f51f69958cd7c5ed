"""Prune or evaluate a loaded model within a data budget: the calibration windows, the sequential pruner and
the perplexity, on a model in memory, offloaded block by block, or streamed from its shards.

Every caller (the pipeline's tasks, ``crepe prune``/``eval``, the comparison tables, the search context)
goes through these two functions, so a model is calibrated, pruned and measured the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from crepe.budget import Budget, calibration_windows, seed_everything
from crepe.data import get_eval_tokens
from crepe.evaluate import perplexity
from crepe.models import LoadedModel
from crepe.pruner import PruneConfig, PruneReport, prune_model
from crepe.streaming import streamer_of

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def prune_loaded(
    lm: LoadedModel,
    config: PruneConfig,
    budget: Budget,
    blocks: str | None = None,
    progress: Progress | None = None,
    calibration: tuple[torch.Tensor, dict[str, Any]] | None = None,
) -> tuple[PruneReport, dict[str, Any] | None]:
    """Prune ``lm`` in place with ``config``; calibrate on ``calibration`` (the windows and their record) or,
    when not given and the method needs them, on the budget's seeded windows. Returns the report and the
    calibration record (None for a method without calibration)."""
    seed_everything(budget.seed)
    if config.needs_calibration and calibration is None:
        calibration = calibration_windows(lm.tokenizer, budget)
    if not config.needs_calibration:
        calibration = None
    streamer = streamer_of(lm)
    report = prune_model(
        lm.model, calibration[0] if calibration else None, config, device=lm.info.device, blocks_path=blocks,
        batch_size=budget.batch_size, progress=(lambda i, n, _s: progress("prune", i, n)) if progress else None,
        **(streamer.hooks() if streamer is not None else {}),
    )
    return report, calibration[1] if calibration else None


def evaluate_loaded(lm: LoadedModel, budget: Budget, split: str = "test", progress: Progress | None = None,
                    tokens: tuple[torch.Tensor, Any] | None = None) -> dict[str, Any]:
    """Perplexity of ``lm`` on WikiText-2 ``split`` (or the configured fallback source): the result's fields,
    ``split`` and the data record (``tokens``: already tokenized ids and their record)."""
    ids, info = tokens or get_eval_tokens(lm.tokenizer, split, budget.eval_source, budget.data_dir)
    tick = (lambda d, n: progress("eval", d, n)) if progress else None
    streamer = streamer_of(lm)
    if streamer is not None:  # blocks read from the shards, one at a time
        result = streamer.perplexity(ids, budget.eval_len, budget.max_windows, budget.eval_batch_size,
                                     lm.info.device, progress=tick)
    else:
        result = perplexity(lm.model, ids, budget.eval_len, max_windows=budget.max_windows,
                            batch_size=budget.eval_batch_size, device=lm.info.device, blockwise=lm.info.offload,
                            progress=tick)
    return {**result.as_dict(), "split": split, "data": info.as_dict()}
