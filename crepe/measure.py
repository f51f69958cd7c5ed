"""Measuring a pruned model as it stands: the zeros (and N:M validity) of every pruned block weight, and a
quick perplexity ("smoke test") with its exact settings.

Pure tensor code for releases and their verification (:mod:`tasks.release`, :mod:`tasks.verify`): it reads
a loaded model (or one streamed block by block by a :class:`crepe.streaming.Streamer`) and returns plain
dicts; it writes no file and knows no manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from crepe.blocks import find_blocks, model_device
from crepe.data import get_eval_tokens
from crepe.evaluate import perplexity
from crepe.masks import measure_sparsity
from crepe.types import NMPattern
from crepe.weights import block_weights


@dataclass(frozen=True)
class SmokeTest:
    """The quick perplexity recorded at release time and repeated by ``crepe verify``.

    The first ``max_windows`` non-overlapping windows of ``seqlen`` tokens of ``split`` from ``source``
    (a :data:`crepe.data.EVAL_SOURCES` name), evaluated as in spec §14.1.
    """

    split: str = "validation"
    seqlen: int = 128
    max_windows: int = 4
    source: str = "auto"
    data_dir: str | None = None
    batch_size: int = 4

    def settings(self) -> dict[str, Any]:
        """The settings that must match for two smoke perplexities to be compared."""
        return {"split": self.split, "seqlen": self.seqlen, "max_windows": self.max_windows}


def weight_selection(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Which block weights a prune touched (``targets``, ``ignore``, ``prune_router``), from its config."""
    config = config or {}
    return {k: config.get(k) for k in ("targets", "ignore")} | {"prune_router": bool(config.get("prune_router"))}


def measure_layers(
    model: nn.Module, pattern: NMPattern | None, blocks_path: str | None = None,
    selection: Mapping[str, Any] | None = None, streamer: Any = None,
) -> dict[str, Any]:
    """Zeros of every pruned weight matrix in the decoder blocks (named as the pruner names them, chosen
    by the prune's ``selection``: see :func:`weight_selection`) and N:M validity. With a ``streamer``
    (:class:`crepe.streaming.Streamer`) each block is read from the shards, measured and freed."""
    path, blocks = find_blocks(model, blocks_path)
    sel = weight_selection(selection)
    layers = []
    for i, block in enumerate(blocks):
        if streamer is not None:
            streamer.start_block(i, block)
        chosen = block_weights(block, f"{path}.{i}.", sel["targets"], sel["ignore"], sel["prune_router"]).weights
        for name, w in chosen.items():
            layers.append(measure_sparsity(f"{path}.{i}.{name}", w.matrix().detach(), pattern))
        if streamer is not None:
            streamer.end_block(i, block)
    zeros = sum(layer.n_zeros for layer in layers)
    numel = sum(layer.numel for layer in layers)
    flags = [layer.nm_valid for layer in layers]
    return {
        "pattern": str(pattern) if pattern else None,
        "blocks_path": path,
        "n_linears": len(layers),
        "overall": zeros / numel if numel else 0.0,
        "total_zeros": zeros,
        "total_numel": numel,
        "nm_valid": None if pattern is None else all(flags),
        "selection": sel,
        "layers": [layer.as_dict() for layer in layers],
    }


def smoke_perplexity(model: nn.Module, tokenizer: Any, smoke: SmokeTest, streamer: Any = None,
                     device: str | None = None) -> dict[str, Any]:
    """Run ``smoke`` on ``model`` (streamed block by block with a ``streamer``); the settings, the data
    actually used (source, path, sha256) and the ppl."""
    ids, info = get_eval_tokens(tokenizer, smoke.split, smoke.source, smoke.data_dir)
    if streamer is not None:
        result = streamer.perplexity(ids, smoke.seqlen, smoke.max_windows, smoke.batch_size, device)
    else:
        result = perplexity(model, ids, smoke.seqlen, smoke.max_windows, smoke.batch_size, device=model_device(model))
    return {
        **smoke.settings(),
        "source": smoke.source,
        "data": info.as_dict(),
        "n_windows": result.n_windows,
        "ppl": result.ppl,
    }


__all__ = ["SmokeTest", "measure_layers", "smoke_perplexity", "weight_selection"]
