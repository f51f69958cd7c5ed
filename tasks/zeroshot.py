"""Prefect task for the pipeline's evaluate step: lm-eval zero-shot on the in-memory model, to MLflow.

The model is scored where it lives (no save, no reload) by :func:`crepe.zeroshot.run_zero_shot`;
metrics go to the active MLflow run as ``<prefix>/<task>/acc``, ``<prefix>/<task>/acc_norm``,
``<prefix>/<task>/n`` and ``<prefix>/avg_acc`` (unweighted mean acc, spec §14.2), the settings as
params and the whole result as the artifact ``<prefix>.json``.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crepe.models import LoadedModel
from crepe.zeroshot import DEFAULT_BATCH_SIZE, run_zero_shot, zero_shot_metrics


def log_zero_shot(result: dict[str, Any], prefix: str = "zeroshot") -> dict[str, float]:
    """Log a zero-shot result to the active MLflow run (if any); return the metrics."""
    import mlflow

    metrics = zero_shot_metrics(result, prefix)
    if mlflow.active_run() is None:
        return metrics
    mlflow.log_metrics(metrics)
    mlflow.log_params({
        f"{prefix}.tasks": ",".join(result["tasks"]),
        f"{prefix}.limit": "all" if result["limit"] is None else result["limit"],
        f"{prefix}.num_fewshot": result["num_fewshot"],
        f"{prefix}.lm_eval_version": result["lm_eval_version"],
        f"{prefix}.packed_contexts": result["packed_contexts"],
    })
    mlflow.log_dict(result, f"{prefix}.json")
    return metrics


# Models are not hashable inputs: never cache this task.
@task(name="zero-shot-eval", cache_policy=NO_CACHE)
def zero_shot_eval(
    lm: LoadedModel,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    data_dir: str | None = None,
    pack: bool = True,
    prefix: str = "zeroshot",
) -> dict[str, Any]:
    """Score the in-memory ``lm`` 0-shot on lm-eval ``tasks`` and log the metrics to MLflow."""
    result = run_zero_shot(lm.model, lm.tokenizer, tasks, limit, batch_size, data_dir, pack=pack)
    log_zero_shot(result, prefix)
    return result
