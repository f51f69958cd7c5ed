"""The front door in tests: prune or evaluate a model folder through the same configuration and tasks the CLI
and the pipeline use (``tasks.config`` -> ``tasks.prune`` / ``tasks.evaluate``), without a Prefect flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.config import load_config
from tasks.evaluate import evaluate_folder
from tasks.inputs import resolve
from tasks.prune import prune_to_folder

# the small budget the model-level tests share: 4 x 32 calibration tokens, 4 windows of 32 for perplexity
SMALL = ("data.calib_source=pydoc", "data.eval_source=pydoc", "calibration.samples=4", "calibration.seqlen=32",
         "calibration.batch_size=4", "eval.ppl.seqlen=32", "eval.ppl.max_windows=4")


def config(model: str | Path, method: str, sparsity: str, *overrides: str, budget: tuple[str, ...] = SMALL,
           max_memory: str | int | None = None, dtype: str = "float32") -> Any:
    """The validated configuration ``crepe prune --model MODEL --method METHOD --sparsity SPARSITY`` builds."""
    sets = [f"model.spec={json.dumps(str(model))}", f"model.dtype={dtype}", f"prune.method={method}",
            f"prune.sparsity={json.dumps(sparsity)}", "pho.enabled=false", *budget, *overrides]
    if max_memory is not None:  # model.max_memory is a string: a byte count becomes "123456"
        sets.append(f"model.max_memory={json.dumps(str(max_memory))}")
    return load_config(None, sets)


def prune(cfg: Any, out: str | Path, eval_split: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``crepe prune`` on ``cfg``: the folder at ``out`` and its manifest (returned)."""
    return prune_to_folder(cfg, resolve(cfg)["model"], out, overwrite=overwrite, eval_split=eval_split)["manifest"]


def evaluate(cfg: Any, model: str | Path | None = None, ppl: bool = True, zero_shot: bool = False) -> dict[str, Any]:
    """``crepe eval`` on ``cfg`` (``model``: a folder instead of ``model.spec``): ``{"model": the loaded model's
    info, "ppl"?, "zero_shot"?}`` (zero-shot settings: ``eval.zero_shot.*``)."""
    return evaluate_folder(cfg, str(model or cfg.model.spec), ppl=ppl, zero_shot=zero_shot)


def perplexity(cfg: Any, model: str | Path | None = None) -> dict[str, Any]:
    """``crepe eval`` on ``cfg`` (``model``: a folder instead of ``model.spec``): the perplexity record."""
    return evaluate(cfg, model)["ppl"]
