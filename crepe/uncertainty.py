"""Seeded bootstrap confidence intervals over evaluation windows (issue 13, point 4).

Perplexity is ``exp(mean per-token NLL)`` and every window holds the same number of tokens, so the
perplexity of a resample of windows is ``exp(mean of the resampled per-window mean NLLs)``. Intervals
are 95% percentile intervals of the resampled means, mapped through ``exp`` (monotone, so a ratio CI
excludes 1 exactly when the CI of the mean NLL difference excludes 0). Resampling uses a
``numpy.random.Generator`` seeded with ``seed``: the same inputs and seed give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from crepe.errors import CrepeError

N_BOOT = 2000
_PERCENTILES = (2.5, 97.5)
_CHUNK_VALUES = 1 << 20  # resampled values drawn per step, so long evaluations stay small in memory


def _vector(nll: Sequence[float] | np.ndarray, what: str = "window NLLs") -> np.ndarray:
    x = np.asarray(nll, dtype=np.float64)
    if x.ndim != 1:
        raise CrepeError(f"the {what} must be one number per window, got an array of shape {x.shape}")
    if x.shape[0] < 2:
        raise CrepeError(f"a bootstrap needs at least 2 windows, got {x.shape[0]}")
    return x


def _resampled_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the rows of ``x`` ((n,) or (n, k): the same
    window indices for every column, i.e. a paired resample); shape (n_boot,) or (n_boot, k)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise CrepeError(f"n_boot must be a positive integer, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    step = max(1, _CHUNK_VALUES // n)
    parts = []
    for start in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - start), n))
        parts.append(x[idx].mean(axis=1))
    return np.concatenate(parts, axis=0)


def _interval(means: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(means, _PERCENTILES)
    return float(lo), float(hi)


def _exp(v: float) -> float:
    try:
        return math.exp(v)
    except OverflowError:
        return float("inf")


def perplexity_ci(window_nll: Sequence[float] | np.ndarray, n_boot: int = N_BOOT,
                  seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of ``exp(mean(window_nll))`` (``window_nll``: the mean per-token NLL of
    each window, in order). Fewer than 2 windows is an error. A non-finite window NLL gives ``(inf, inf)``,
    as the perplexity itself is then reported as ``inf``."""
    x = _vector(window_nll)
    if not np.isfinite(x).all():
        return float("inf"), float("inf")
    lo, hi = _interval(_resampled_means(x, n_boot, seed))
    return _exp(lo), _exp(hi)


def paired_bootstrap(nll_a: Sequence[float] | np.ndarray, nll_b: Sequence[float] | np.ndarray,
                     n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of two models evaluated on the same windows (per-window mean NLLs ``nll_a`` and
    ``nll_b``, in the same window order): every resample draws the same window indices for both.

    Returns ``mean_diff`` (mean of ``a - b``), ``diff_ci95``, ``ratio`` (``ppl_a / ppl_b =
    exp(mean_diff)``), ``ratio_ci95``, and ``real``: True when the difference CI excludes 0 (the same as the ratio CI
    excluding 1), i.e. the difference is outside the noise of the windows.
    """
    a = _vector(nll_a, "window NLLs of model a")
    b = _vector(nll_b, "window NLLs of model b")
    if a.shape[0] != b.shape[0]:
        raise CrepeError(f"a paired bootstrap needs the same windows for both models, got {a.shape[0]} "
                         f"and {b.shape[0]} window NLLs")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise CrepeError("a paired bootstrap needs finite window NLLs; one of the models has an infinite or NaN one")
    diff = a - b
    lo, hi = _interval(_resampled_means(diff, n_boot, seed))
    mean_diff = float(diff.mean())
    return {
        "n_windows": int(diff.shape[0]),
        "n_boot": n_boot,
        "seed": seed,
        "mean_diff": mean_diff,
        "diff_ci95": [lo, hi],
        "ratio": _exp(mean_diff),
        "ratio_ci95": [_exp(lo), _exp(hi)],
        "real": bool(lo > 0.0 or hi < 0.0),
    }
