"""The ``crepe search``, ``crepe hill-climb`` and ``crepe proxy-study`` jobs over a
:class:`~crepe.search.context.SearchContext`; each writes into its output folder:

- ``state.json``: the resumable state, rewritten atomically after every trial, verified candidate or
  evaluation (:class:`tasks.checkpoint.JsonCheckpoint`); rerunning the same command continues from it and gives the
  result of an uninterrupted run (a state of another configuration is refused, naming the keys);
- ``pho.json`` / ``hill_climb.json`` / ``proxy_study.json``: the finished result (every trial with its
  parameters, proxies and time; every verified candidate; the winner; totals);
- PNG plots (:mod:`tasks.plots`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from crepe.errors import CrepeError
from crepe.io import write_json_atomic
from crepe.search.checkpoint import STATE_VERSION, jsonable
from crepe.search.context import CMA_SIGMA, SearchContext, check_search_args, cma_start_mean
from crepe.search.driver import run_pho
from crepe.search.hillclimb import hill_climb
from crepe.search.objective import DEFAULT_TARGET
from crepe.search.proxies import PROXY_NAMES
from crepe.search.space import RIA_POINT, SearchSpace
from tasks.checkpoint import STATE_FILE, JsonCheckpoint
from tasks.common import provenance
from tasks.plots import close, figure, plot_proxy_vs_ppl, plot_screening, save_figure

# --- crepe search --------------------------------------------------------------------------------------


def run_search(
    ctx: SearchContext,
    out_dir: str | Path,
    sampler: str = "cmaes",
    n_trials: int = 60,
    top_k: int = 10,
    seed: int = 0,
    space: SearchSpace | None = None,
    target: str = DEFAULT_TARGET,
    target_block: int = 0,
    sigma: float = CMA_SIGMA,
    test_split: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """PHO on ``ctx``: stage 1 (proxy screening), stage 2 (validation PPL of the top-k + RIA), winner.

    Writes ``out_dir/state.json`` after every trial and candidate, then ``out_dir/pho.json`` and the
    plots ``screening.png`` and ``proxy_vs_ppl.png``. With ``test_split`` the winner is pruned once
    more and its test perplexity reported (``final``). Returns the ``pho.json`` content.
    """
    space = space or SearchSpace()
    check_search_args(sampler, n_trials, top_k, space.dim)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    objective = ctx.proxy_objective(target, target_block, space.kernel_size)
    options = {"sigma": sigma, "mean": cma_start_mean(space)} if sampler == "cmaes" else {}
    config = {**ctx.identity(), "target": target, "target_block": target_block, "kind": "pho"}
    prog = ctx.progress
    summary = run_pho(
        objective, lambda p: ctx.evaluate(p, "validation"), space, sampler, n_trials, top_k, seed,
        JsonCheckpoint(out / STATE_FILE), config, prog, RIA_POINT, options,
    )
    winner = summary["winner"]
    log(f"winner: {_fmt_params(winner['params'])} validation ppl {winner['ppl']:.4f}")
    final: dict[str, Any] = {"params": winner["params"], "validation_ppl": winner["ppl"]}
    t_test = 0.0
    if test_split:
        t0 = time.perf_counter()
        final["test_ppl"] = ctx.evaluate(winner["params"], "test")
        t_test = time.perf_counter() - t0
        log(f"winner test ppl {final['test_ppl']:.4f}")
    ria = next((r for r in summary["verified"] if _same_point(r["params"], RIA_POINT)), None)
    summary["final"] = final
    summary["ria_validation_ppl"] = None if ria is None else ria["ppl"]
    summary["totals"].update({
        "target_norm_seconds": ctx.target_norm_seconds(target, target_block),
        "setup_seconds": ctx.setup_seconds,
        "test_seconds": t_test,
        "wall_seconds_this_session": time.perf_counter() - started,
    })
    t = summary["totals"]
    t["pho_seconds"] = t["target_norm_seconds"] + t["stage1_seconds"] + t["stage2_seconds"]
    t["pho_cpu_seconds"] = t["stage1_cpu_seconds"] + t["stage2_cpu_seconds"]
    summary.update(_context_record(ctx))
    plots = {
        "screening": plot_screening(summary["trials"], out / "screening.png",
                                    f"PHO stage 1 ({sampler}, {ctx.spec.label}): {len(summary['trials'])} trials"),
        "proxy_vs_ppl": plot_proxy_vs_ppl(
            [(_proxy_of(summary["trials"], r["params"]), r["ppl"]) for r in summary["verified"]],
            out / "proxy_vs_ppl.png", f"PHO stage 2 ({sampler}, {ctx.spec.label})", "gini_pruned",
            [(_proxy_of(summary["trials"], winner["params"]), winner["ppl"])],
        ),
    }
    summary["plots"] = {k: str(v) for k, v in plots.items()}
    write_json_atomic(out / "pho.json", summary)
    return summary


def _same_point(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(k in a and float(a[k]) == float(v) for k, v in b.items())


def _proxy_of(trials: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> float:
    """The gini_pruned of the trial with ``params`` (NaN for the RIA point, which is not a trial)."""
    for t in trials:
        if t["params"] == params:
            return float(t["proxies"]["gini_pruned"])
    return float("nan")


def _fmt_params(p: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def _context_record(ctx: SearchContext) -> dict[str, Any]:
    return {
        "model": ctx.lm.info.as_dict(),
        "calibration": ctx.calibration[1] if ctx.calibration else None,
        "budget": ctx.budget.as_dict(),
        **provenance(),
    }


# --- crepe hill-climb ------------------------------------------------------------------------------------


def run_hill_climb(
    ctx: SearchContext,
    out_dir: str | Path,
    max_evals: int | None = 30,
    max_seconds: float | None = None,
    space: SearchSpace | None = None,
    start: Mapping[str, float] | None = None,
    test_split: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """PPL hill climbing from the RIA point (validation split), the best point reported on test."""
    space = space or SearchSpace()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = {**ctx.identity(), "kind": "hill_climb"}
    prog = ctx.progress
    result = hill_climb(
        lambda p: ctx.evaluate(p, "validation"), space, start, max_evals=max_evals, max_seconds=max_seconds,
        checkpoint=JsonCheckpoint(out / STATE_FILE), config=config,
        progress=(lambda n, _best: prog("hill-climb", n, max_evals)) if prog and max_evals else None,
    )
    best = result["best"]
    if best is None:
        raise CrepeError("every hill-climbing evaluation gave a non-finite perplexity; nothing can be chosen")
    log(f"hill climbing best: {_fmt_params(best['params'])} validation ppl {best['ppl']:.4f} "
        f"({result['n_evals']} evaluations, {result['stop_reason']})")
    final: dict[str, Any] = {"params": best["params"], "validation_ppl": best["ppl"]}
    t_test = 0.0
    if test_split:
        t0 = time.perf_counter()
        final["test_ppl"] = ctx.evaluate(best["params"], "test")
        t_test = time.perf_counter() - t0
        log(f"hill climbing best test ppl {final['test_ppl']:.4f}")
    result["final"] = final
    result["winner"] = {"params": best["params"], "ppl": best["ppl"]}
    result["totals"] = {
        "n_evals": result["n_evals"],
        "eval_seconds": sum(e["seconds"] for e in result["evaluations"]),
        "eval_cpu_seconds": sum(e.get("cpu_seconds", 0.0) for e in result["evaluations"]),
        "setup_seconds": ctx.setup_seconds,
        "test_seconds": t_test,
        "wall_seconds_this_session": time.perf_counter() - started,
    }
    result.update(_context_record(ctx))
    ppls = [e["ppl"] if e["ppl"] is not None else math.nan for e in result["evaluations"]]
    fig, (ax,) = figure()
    ax.plot(range(len(ppls)), ppls, "o", ms=3.5, color="#4c72b0", label="evaluation")
    ax.plot(range(len(ppls)), np.fmin.accumulate(np.array(ppls, dtype=float)), "-", color="#c44e52",
            label="running best")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"PPL hill climbing ({ctx.spec.label})", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, out / "hill_climb.png")
    close(fig)
    result["plots"] = {"hill_climb": str(out / "hill_climb.png")}
    write_json_atomic(out / "hill_climb.json", result)
    return result


# --- crepe proxy-study -------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (scipy) over the pairs where both are finite; None when undefined."""

    pairs = [(a, b) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    xs, ys = zip(*pairs, strict=True)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None  # a constant proxy (or perplexity) has no rank correlation
    rho = float(spearmanr(xs, ys).statistic)
    return rho if math.isfinite(rho) else None


def study_points(space: SearchSpace, n_configs: int, seed: int) -> list[dict[str, Any]]:
    """``n_configs`` uniform points of ``space`` (seeded numpy generator), as parameter dicts."""
    if isinstance(n_configs, bool) or not isinstance(n_configs, int) or n_configs < 3:
        raise CrepeError(f"--configs {n_configs!r} must be an integer >= 3 (a rank correlation needs 3 points)")
    rng = np.random.default_rng(seed)
    return [space.from_unit(u) for u in rng.random((n_configs, space.dim))]


def run_proxy_study(
    ctx: SearchContext,
    out_dir: str | Path,
    n_configs: int = 32,
    seed: int = 0,
    space: SearchSpace | None = None,
    target: str = DEFAULT_TARGET,
    target_block: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The paper's Table 2 on ``ctx``'s model: every proxy and the validation PPL of ``n_configs``
    seeded configurations, the Spearman rho of each proxy against PPL, one scatter plot per proxy.

    Resumable like the searches: ``state.json`` after every configuration.
    """
    space = space or SearchSpace()
    points = study_points(space, n_configs, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objective = ctx.proxy_objective(target, target_block, space.kernel_size)
    config = jsonable({**ctx.identity(), "kind": "proxy_study", "n_configs": n_configs, "seed": seed,
                        "space": space.as_dict(), "target": target, "target_block": target_block})
    checkpoint = JsonCheckpoint(out / STATE_FILE)
    state = checkpoint.load(config) or {"version": STATE_VERSION, "config": config, "rows": []}
    rows: list[dict[str, Any]] = list(state.get("rows", []))
    for i in range(len(rows), n_configs):
        params = points[i]
        t0 = time.perf_counter()
        proxies = objective(params)
        t_proxy = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = ctx.evaluate(params, "validation")
        rows.append({
            "index": i, "params": jsonable(params), "proxies": proxies,
            "ppl": ppl if math.isfinite(ppl) else None, "proxy_seconds": t_proxy,
            "ppl_seconds": time.perf_counter() - t0,
        })
        state["rows"] = rows
        checkpoint.save(state)
        if ctx.progress:
            ctx.progress("proxy-study", len(rows), n_configs)
    ppls = [r["ppl"] for r in rows]
    rho = {name: spearman([r["proxies"][name] for r in rows], ppls) for name in PROXY_NAMES}
    plots = {}
    for name in PROXY_NAMES:
        r = rho[name]
        plots[name] = str(plot_proxy_vs_ppl(
            [(row["proxies"][name], row["ppl"]) for row in rows], out / f"proxy_{name}.png",
            f"{name} vs PPL ({ctx.spec.label}): Spearman rho = {'n/a' if r is None else f'{r:.3f}'}", name,
        ))
    for name, r in rho.items():
        log(f"{name:18s} Spearman rho {'n/a' if r is None else f'{r:+.3f}'}")
    result = {
        "version": STATE_VERSION,
        "config": config,
        "rows": rows,
        "spearman": rho,
        "n_finite": sum(p is not None for p in ppls),
        "totals": {
            "proxy_seconds": sum(r["proxy_seconds"] for r in rows),
            "ppl_seconds": sum(r["ppl_seconds"] for r in rows),
            "target_norm_seconds": ctx.target_norm_seconds(target, target_block),
            "setup_seconds": ctx.setup_seconds,
        },
        "plots": plots,
        **_context_record(ctx),
    }
    write_json_atomic(out / "proxy_study.json", result)
    return result
