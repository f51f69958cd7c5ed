"""Perplexity hill climbing (spec §8.3's slow baseline): coordinate search on (alpha, beta, log10 gamma).

Rule (first improvement): from the current point, for each coordinate in order (alpha, beta,
log10 gamma) try ``+step`` and then ``-step`` (clipped to the bounds); the first of the two that
lowers the perplexity is taken at once and the sweep goes on with the next coordinate from the new
point. A sweep in which no coordinate improves halves (``shrink``) every step. The search stops
when every step is below ``min_step`` ("converged"), after ``max_evals`` evaluations
("max_evals") or once ``max_seconds`` have been spent ("max_seconds"), whichever comes first;
the start point is always evaluated. Budgets are checked before each new (uncached) evaluation.

gamma = 0 (the RIA point, the default start) has no log10: the log10 gamma coordinate runs over
``[lo - 1, hi]`` of the space's ``log10_gamma`` bounds ``(lo, hi)``, and any value below ``lo``
means gamma = 0 ("off"). The default start sits at the sentinel ``lo - 1``, so ``+1`` decade
switches the neighbourhood term on at ``gamma = 10**lo``; every "off" value is the same point.

Evaluations are cached by point (coordinates rounded to 12 decimals, every "off" value one point):
a point is never paid for twice. A non-finite perplexity is recorded (``ppl`` None) and counts as
+inf. The state (every evaluation so far) goes to a :class:`~crepe.search.checkpoint.Checkpoint`
after each evaluation (default: in memory; a JSON file is ``tasks.checkpoint.JsonCheckpoint``); a resumed
call replays the deterministic search with those results as a cache, so it reaches exactly the
point where the interrupted run stopped and continues from there. ``max_evals`` and
``max_seconds`` are not part of the resume check, so a finished run can be extended.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from crepe.errors import CrepeError
from crepe.search.checkpoint import STATE_VERSION, Checkpoint, MemoryCheckpoint, jsonable
from crepe.search.space import RIA_POINT, SearchSpace

COORDS: tuple[str, ...] = ("alpha", "beta", "log10_gamma")
DEFAULT_STEPS: dict[str, float] = {"alpha": 0.5, "beta": 0.5, "log10_gamma": 1.0}
DEFAULT_MIN_STEP = 0.05
_DIGITS = 12


class _Stop(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _positive(field: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise CrepeError(f"{field} {value!r} is not a number; use a positive number") from None
    if not (math.isfinite(x) and x > 0) or isinstance(value, bool):
        raise CrepeError(f"{field} {value!r} must be a positive finite number")
    return x


def _check_budget(max_evals: Any, max_seconds: Any) -> tuple[int | None, float | None]:
    if max_evals is None and max_seconds is None:
        raise CrepeError("hill climbing needs a budget: give max_evals, max_seconds or both (positive)")
    if max_evals is not None and (
        isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1
    ):
        raise CrepeError(f"max_evals {max_evals!r} must be a positive integer (or None with max_seconds)")
    seconds = None if max_seconds is None else _positive("max_seconds", max_seconds)
    return max_evals, seconds


def hill_climb(
    evaluate: Callable[[dict], float],
    space: SearchSpace | None = None,
    start: Mapping[str, float] | None = None,
    steps: Mapping[str, float] | None = None,
    shrink: float = 0.5,
    min_step: float = DEFAULT_MIN_STEP,
    max_evals: int | None = None,
    max_seconds: float | None = None,
    checkpoint: Checkpoint | None = None,
    config: dict | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Coordinate search minimising ``evaluate(params) -> perplexity`` (see the module docstring).

    ``start`` is {alpha, beta, gamma} (default the RIA point, gamma = 0; a gamma > 0 must lie in the
    space's log10 gamma bounds), ``steps`` the initial step per coordinate (alpha and beta linear,
    log10_gamma in decades). ``evaluate`` receives {alpha, beta, gamma, kernel_size} with the
    space's fixed kernel size. ``progress(n_evals, best_ppl)`` is called after each paid evaluation.

    Returns (and saves to ``checkpoint``, default in memory) ``{"version", "config", "evaluations", "best",
    "n_evals", "seconds", "stop_reason", "steps", "current"}``; ``evaluations`` lists every paid
    evaluation ``{"index", "params", "ppl", "seconds"}`` in order and ``best`` the lowest one.
    """
    space = space if space is not None else SearchSpace()
    if space.kernel_choices:
        raise CrepeError(
            f"hill climbing searches a fixed kernel size, but the space has kernel_choices "
            f"{space.kernel_choices}; fix K with kernel_size instead"
        )
    max_evals, max_seconds = _check_budget(max_evals, max_seconds)
    step = dict(DEFAULT_STEPS)
    unknown = sorted(set(steps or {}) - set(COORDS))
    if unknown:
        raise CrepeError(f"unknown step coordinate {unknown[0]!r}; allowed: {', '.join(COORDS)}")
    step.update({k: _positive(f"step for {k}", v) for k, v in (steps or {}).items()})
    shrink = float(shrink)
    if not 0 < shrink < 1:
        raise CrepeError(f"shrink {shrink!r} must lie strictly between 0 and 1")
    min_step = _positive("min_step", min_step)

    g_lo, g_hi = space.log10_gamma
    off = g_lo - 1.0  # sentinel: any log10 gamma below g_lo means gamma = 0
    bounds = {"alpha": space.alpha, "beta": space.beta, "log10_gamma": (off, g_hi)}
    start = dict(RIA_POINT if start is None else start)
    missing = [k for k in ("alpha", "beta", "gamma") if k not in start]
    if missing:
        raise CrepeError(f"start {start!r} lacks {missing[0]!r}; give alpha, beta and gamma")
    gamma0 = float(start["gamma"])
    if gamma0 < 0 or not math.isfinite(gamma0):
        raise CrepeError(f"start gamma {gamma0!r} must be 0 (RIA) or a positive number")
    point = {
        "alpha": float(start["alpha"]),
        "beta": float(start["beta"]),
        "log10_gamma": off if gamma0 == 0 else math.log10(gamma0),
    }
    for k in COORDS:
        lo, hi = bounds[k] if k != "log10_gamma" or gamma0 == 0 else space.log10_gamma
        if not lo <= point[k] <= hi:
            name = "log10 gamma" if k == "log10_gamma" else k
            raise CrepeError(f"start {name} {point[k]!r} is outside the search bounds [{lo:g}, {hi:g}]")

    full_config = {
        **dict(config or {}),
        "method": "hill_climb",
        "space": space.as_dict(),
        "start": {k: float(start[k]) for k in ("alpha", "beta", "gamma")},
        "steps": dict(step),
        "shrink": shrink,
        "min_step": min_step,
    }
    checkpoint = MemoryCheckpoint() if checkpoint is None else checkpoint
    saved = checkpoint.load(full_config)
    evaluations: list[dict[str, Any]] = list(saved.get("evaluations", [])) if saved else []
    elapsed_before = float(saved.get("seconds", 0.0)) if saved else 0.0

    def key(p: Mapping[str, float]) -> tuple:
        z = p["log10_gamma"]
        return (round(p["alpha"], _DIGITS), round(p["beta"], _DIGITS), "off" if z < g_lo else round(z, _DIGITS))

    def params_of(p: Mapping[str, float]) -> dict[str, Any]:
        z = p["log10_gamma"]
        gamma = 0.0 if z < g_lo else 10.0**z
        return {"alpha": p["alpha"], "beta": p["beta"], "gamma": gamma, "kernel_size": space.kernel_size}

    cache: dict[tuple, float] = {}
    for e in evaluations:
        cache[tuple(e["key"])] = math.inf if e["ppl"] is None else float(e["ppl"])
    t0 = time.perf_counter()

    def summary(stop_reason: str | None, current: Mapping[str, float]) -> dict[str, Any]:
        finite = [e for e in evaluations if e["ppl"] is not None]
        best_e = min(finite, key=lambda e: (e["ppl"], e["index"])) if finite else None
        return {
            "version": STATE_VERSION,
            "config": jsonable(full_config),
            "evaluations": evaluations,
            "best": None if best_e is None else {"params": best_e["params"], "ppl": best_e["ppl"], "index": best_e["index"]},
            "n_evals": len(evaluations),
            "seconds": elapsed_before + (time.perf_counter() - t0),
            "stop_reason": stop_reason,
            "steps": dict(step),
            "current": params_of(current),
        }

    def value(p: dict[str, float]) -> float:
        k = key(p)
        if k in cache:
            return cache[k]
        if max_evals is not None and len(evaluations) >= max_evals:
            raise _Stop("max_evals")
        if (
            max_seconds is not None
            and evaluations  # the start point is always evaluated
            and elapsed_before + (time.perf_counter() - t0) >= max_seconds
        ):
            raise _Stop("max_seconds")
        params = params_of(p)
        s, cpu = time.perf_counter(), time.process_time()
        ppl = float(evaluate(dict(params)))
        seconds, cpu = time.perf_counter() - s, time.process_time() - cpu
        finite = math.isfinite(ppl)
        record: dict[str, Any] = {
            "index": len(evaluations),
            "params": params,
            "key": list(k),
            "ppl": ppl if finite else None,
            "seconds": seconds,
            "cpu_seconds": cpu,
        }
        if not finite:
            record["ppl_raw"] = repr(ppl)
        evaluations.append(record)
        cache[k] = ppl if finite else math.inf
        checkpoint.save(summary(None, p))
        if progress is not None:
            progress(len(evaluations), min(cache.values()))
        return cache[k]

    current = dict(point)
    try:
        f_cur = value(current)
        while not all(step[c] < min_step for c in COORDS):
            improved = False
            for c in COORDS:
                lo, hi = bounds[c]
                for sign in (1.0, -1.0):
                    cand = dict(current)
                    cand[c] = round(min(hi, max(lo, current[c] + sign * step[c])), _DIGITS)
                    if key(cand) == key(current):
                        continue
                    f = value(cand)
                    if f < f_cur:
                        current, f_cur, improved = cand, f, True
                        break
            if not improved:
                for c in COORDS:
                    step[c] *= shrink
        reason = "converged"
    except _Stop as stop:
        reason = stop.reason
    result = summary(reason, current)
    checkpoint.save(result)
    return result
