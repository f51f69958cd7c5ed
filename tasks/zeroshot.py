"""Zero-shot results as metrics and tables: :func:`zero_shot_metrics` flattens a result of
:func:`crepe.zeroshot.run_zero_shot` into ``<prefix>/<task>/acc``, ``acc_norm``, ``n`` and ``<prefix>/avg_acc``
(the unweighted mean acc, spec §14.2) for MLflow (the pipeline's ``track`` task logs them);
:func:`format_zero_shot_table` and :func:`format_zero_shot_comparison` render markdown for the CLI and
docs/zeroshot.md. The evaluation itself is the pipeline's evaluate step (:mod:`tasks.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from crepe.zeroshot import LABELS


def zero_shot_metrics(result: dict[str, Any], prefix: str = "zeroshot") -> dict[str, float]:
    """Flat ``{prefix/task/acc: value, ..., prefix/avg_acc: value}`` for metric loggers (MLflow)."""
    metrics: dict[str, float] = {}
    for name, values in result["tasks"].items():
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            if values.get(key) is not None:
                metrics[f"{prefix}/{name}/{key}"] = float(values[key])
        if values.get("n") is not None:
            metrics[f"{prefix}/{name}/n"] = float(values["n"])
    if result.get("average_acc") is not None:
        metrics[f"{prefix}/avg_acc"] = float(result["average_acc"])
    return metrics


def _pct(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def format_zero_shot_table(result: dict[str, Any]) -> str:
    """Markdown table of one run: task, documents scored (of total), acc, acc_norm, version."""
    lines = ["| task | docs | acc | acc_norm | lm-eval task version |", "|---|---:|---:|---:|---:|"]
    for name, t in result["tasks"].items():
        docs = f"{t['n']} of {t['n_total']}" if t.get("n") != t.get("n_total") else f"{t['n']}"
        lines.append(f"| {name} | {docs} | {_pct(t['acc'])} | {_pct(t['acc_norm'])} | {t.get('version')} |")
    avg = result.get("average_acc")
    label = "average acc (6 tasks)" if result.get("all_six") else f"average acc ({len(result['tasks'])} tasks)"
    lines.append(f"| **{label}** | | **{_pct(avg)}** | | |")
    return "\n".join(lines)


def format_zero_shot_comparison(rows: Sequence[dict[str, Any]], metric: str = "acc") -> str:
    """Markdown table, one row per ``{"method", "pattern", "zero_shot": result}``, one column per task."""
    if not rows:
        return ""
    names = list(rows[0]["zero_shot"]["tasks"])
    head = "| method | pattern | " + " | ".join(LABELS.get(n, n) for n in names) + " | avg |"
    lines = [head, "|---|---|" + "---:|" * (len(names) + 1)]
    for row in rows:
        res = row["zero_shot"]
        cells = [_pct(res["tasks"][n].get(metric)) for n in names]
        values = [res["tasks"][n].get(metric) for n in names]
        avg = sum(values) / len(values) if all(v is not None for v in values) else None
        lines.append(f"| {row['method']} | {row['pattern']} | " + " | ".join(cells) + f" | {_pct(avg)} |")
    return "\n".join(lines)
