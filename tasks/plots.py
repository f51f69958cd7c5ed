"""The figures of the search jobs and reports (matplotlib, Agg backend, written atomically): screening,
proxy vs perplexity, and the per-block sparsities of a layer allocation (:func:`plot_ratios`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from crepe.errors import CrepeError  # noqa: E402
from crepe.io import save_figure_atomic  # noqa: E402


def save_figure(fig: Any, path: Path) -> None:
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")


def figure(ncols: int = 1) -> tuple[Any, Any]:
    """A new figure with ``ncols`` axes side by side (the Agg backend: no display needed)."""
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
    return fig, axes[0]


def close(fig: Any) -> None:
    plt.close(fig)


def plot_screening(trials: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """gini_pruned of every stage-1 trial, with the running best."""
    fig, (ax,) = figure()
    values = [t["proxies"]["gini_pruned"] for t in trials]
    ax.plot(range(len(values)), values, "o", ms=3.5, color="#4c72b0", label="trial")
    ax.plot(range(len(values)), np.minimum.accumulate(values), "-", color="#c44e52", label="running best")
    ax.set_xlabel("trial")
    ax.set_ylabel("gini_pruned (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    close(fig)
    return path


def plot_proxy_vs_ppl(points: Sequence[tuple[float, float]], path: Path, title: str, xlabel: str,
                      highlight: Sequence[tuple[float, float]] = ()) -> Path:
    """Scatter of proxy value against validation perplexity (log scale)."""
    fig, (ax,) = figure()
    finite = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    if finite:
        ax.scatter(*zip(*finite, strict=True), s=16, color="#4c72b0")
    for x, y in highlight:
        ax.scatter([x], [y], s=40, marker="*", color="#c44e52", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    close(fig)
    return path


def plot_ratios(
    ratios: Sequence[float], path: str | Path, target: float | None = None, title: str | None = None
) -> Path:
    """Bar chart of a layer allocation's per-block sparsities (:mod:`crepe.allocation`), written
    atomically to ``path`` (PNG); a dashed line marks ``target``. Returns ``path``."""
    values = [float(r) for r in ratios]
    if not values:
        raise CrepeError("no layer ratios to plot")
    target_path = Path(path)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(max(4.0, 0.25 * len(values) + 2), 3.2))  # object API: no pyplot state to close
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(values)), values, color="#4C72B0")
    if target is not None:
        ax.axhline(float(target), color="#C44E52", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, min(1.0, max(values) * 1.15 + 0.02))
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure_atomic(fig, target_path, dpi=100)
