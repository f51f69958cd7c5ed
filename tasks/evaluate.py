"""Step 4, the evaluation: WikiText-2 perplexity (spec §14.1) and lm-eval zero-shot accuracy (spec §14.2).

``crepe eval`` and the pipeline's ``evaluate`` task call the same functions: :func:`perplexity_of` on a
loaded model (in memory, offloaded, or streamed block by block from its shards) and
:func:`evaluate_folder` on a model folder or spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from prefect import task

from crepe import zeroshot
from crepe.run import evaluate_loaded
from crepe.streaming import streamer_of
from tasks.common import computed, finished, limit_threads, load, persisted
from tasks.inputs import compute_identity
from tasks.keys import content_key

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def perplexity_of(lm: Any, cfg: Any, split: str, progress: Progress | None = None,
                  max_windows: Any = "eval") -> dict[str, Any]:
    """Perplexity of a loaded model on ``split`` with ``eval.ppl`` (``max_windows`` other than ``"eval"``
    replaces ``eval.ppl.max_windows``): the result's fields plus ``split`` and the data record (no path)."""
    result = evaluate_loaded(lm, cfg.budget(max_windows), split, progress)
    result["data"] = {k: v for k, v in result["data"].items() if k != "path"}
    return result


def zero_shot_of(lm: Any, cfg: Any, progress: Progress | None = None, pack: bool = True) -> dict[str, Any]:
    """lm-eval 0-shot accuracy of a loaded model on ``eval.zero_shot`` (JSON-clean)."""
    zs = cfg.eval.zero_shot
    streamer = streamer_of(lm)
    out = zeroshot.run_zero_shot(lm.model, lm.tokenizer, list(zs.tasks), zs.limit, zs.batch_size, cfg.data_dir(),
                                 progress=progress, pack=pack, streamer=streamer,
                                 device=lm.info.device if streamer is not None else None)
    return json.loads(json.dumps(out, default=str))


def evaluate_folder(cfg: Any, model_path: str, split: str | None = None, ppl: bool = True,
                    zero_shot: bool | None = None, progress: Progress | None = None, pack: bool = True) -> dict[str, Any]:
    """Load ``model_path`` and measure what is asked: perplexity on ``split`` (default ``eval.ppl.split``)
    and, with ``zero_shot`` (default: when ``eval.zero_shot.tasks`` is set), zero-shot accuracy.
    Returns ``{"model": identity, "ppl"?: ..., "zero_shot"?: ...}``; no timings."""
    lm = load(cfg, model_path)
    result: dict[str, Any] = {"model": {k: v for k, v in lm.info.as_dict().items() if k != "load_seconds"}}
    if ppl:
        result["ppl"] = perplexity_of(lm, cfg, split or cfg.eval.ppl.split, progress)
    if zero_shot if zero_shot is not None else bool(cfg.eval.zero_shot.tasks):
        result["zero_shot"] = zero_shot_of(lm, cfg, progress, pack)
    return result


def _eval_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    zs = cfg.eval.zero_shot
    return {"ppl": cfg.section_hash("eval.ppl"), "source": cfg.data.eval_source,
            "zero_shot": cfg.section_hash("eval.zero_shot") if zs.tasks else None,
            "model": {**compute_identity(cfg), "calib_batch_size": None}}


@task(name="evaluate", cache_key_fn=content_key((), ("model", "eval_sha256"), _eval_extra), **persisted())
def evaluate(cfg: Any, model: dict[str, Any], eval_sha256: str) -> dict[str, Any]:
    """Perplexity (``eval.ppl``) and, when ``eval.zero_shot.tasks`` is set, zero-shot accuracy of the model
    folder ``model["path"]``. Returns ``{"ppl", "zero_shot"?}`` without timings."""
    started = computed("evaluate")
    limit_threads(cfg)
    result = evaluate_folder(cfg, model["path"])
    result.pop("model")
    result["ppl"].pop("seconds", None)
    return finished(started, result)
