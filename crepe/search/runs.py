"""Whole-model PHO runs: the ``crepe search``, ``crepe hill-climb`` and ``crepe proxy-study`` jobs.

A :class:`SearchContext` loads the model once, samples the calibration windows once (shared by the
proxy and by every full prune, so candidates differ only in their coefficients) and keeps a copy of
the dense weights of every prunable linear. ``evaluate(params, split)`` restores the dense weights,
prunes the whole model with CRePE(params) through the sequential pipeline and returns the WikiText-2
perplexity of ``split``. Stage 2 and hill climbing select on the **validation** split; the chosen
configuration is then reported on the **test** split, which no selection ever sees.

Each job writes into an output folder:

- ``state.json``: the resumable search state, rewritten atomically after every trial, verified
  candidate or hill-climbing evaluation; rerunning the same command continues from it and gives the
  result of an uninterrupted run (a state of a different configuration is refused, naming the keys);
- ``pho.json`` / ``hill_climb.json`` / ``proxy_study.json``: the finished result (every trial with
  its parameters, proxies and time; every verified candidate; the winner; totals);
- PNG plots (matplotlib, written atomically).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crepe import data as data_mod
from crepe.blocks import find_blocks
from crepe.errors import CrepeError
from crepe.io import save_figure_atomic, write_json_atomic
from crepe.jobs import Budget, _provenance, calibrate, evaluate_loaded
from crepe.models import LoadedModel, load_model
from crepe.pruner import PruneConfig, prune_model
from crepe.search.driver import STATE_VERSION, _jsonable, load_resume_state, run_pho
from crepe.search.hillclimb import hill_climb
from crepe.search.objective import DEFAULT_TARGET, ProxyObjective, find_target, target_input_norm
from crepe.search.proxies import PROXY_NAMES
from crepe.search.samplers import SAMPLERS, cma_population_size
from crepe.search.space import RIA_POINT, SearchSpace
from crepe.types import SparsitySpec, parse_sparsity
from crepe.weights import PrunableWeight, block_weights

Progress = Callable[[str, int, int], None]
STATE_FILE = "state.json"
# CMA-ES starts at the RIA-like point alpha = beta = 1, gamma = 1e-3 with sigma 0.25 (spec §8.4).
CMA_START: dict[str, float] = {"alpha": 1.0, "beta": 1.0, "gamma": 1e-3}
CMA_SIGMA = 0.25


def cma_start_mean(space: SearchSpace) -> list[float]:
    """:data:`CMA_START` in the unit cube of ``space`` (clipped into the box when it lies outside)."""
    lo_a, hi_a = space.alpha
    lo_b, hi_b = space.beta
    lo_g, hi_g = space.log10_gamma
    coords = [
        (CMA_START["alpha"] - lo_a) / (hi_a - lo_a),
        (CMA_START["beta"] - lo_b) / (hi_b - lo_b),
        (math.log10(CMA_START["gamma"]) - lo_g) / (hi_g - lo_g),
    ]
    if space.kernel_choices:
        coords.append(0.5)
    return [min(1.0, max(0.0, c)) for c in coords]


def check_search_args(sampler: str, n_trials: int, top_k: int, dim: int = 3) -> None:
    """Fail before any model is loaded on a budget the search cannot run (one sentence each)."""
    if sampler not in SAMPLERS:
        raise CrepeError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 2:
        raise CrepeError(f"--trials {n_trials!r} must be an integer >= 2 (the default is 60)")
    if sampler == "cmaes":
        cma_population_size(n_trials, dim)  # raises when no population fits n_trials exactly
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_trials:
        raise CrepeError(f"--top-k {top_k!r} must be an integer between 1 and --trials ({n_trials})")


def _spec(sparsity: str | float | SparsitySpec) -> SparsitySpec:
    return sparsity if isinstance(sparsity, SparsitySpec) else parse_sparsity(sparsity)


@dataclass
class SearchContext:
    """A loaded model, its calibration windows and dense weights, and cached evaluation tokens."""

    lm: LoadedModel
    spec: SparsitySpec
    budget: Budget
    rule: str = "exact"
    blocks: str | None = None
    progress: Progress | None = None
    selection: dict[str, Any] = field(default_factory=dict)  # targets/ignore/prune_router/moe_* of the prune
    calibration: tuple[torch.Tensor, dict[str, Any]] | None = None
    setup_seconds: float = 0.0
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _tokens: dict[str, Any] = field(default_factory=dict, repr=False)
    _target_norm: dict[tuple[str, int], tuple[torch.Tensor, float]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        model: str,
        sparsity: str | float | SparsitySpec,
        budget: Budget,
        dtype: str = "float32",
        device: str = "auto",
        rule: str = "exact",
        blocks: str | None = None,
        progress: Progress | None = None,
        lm: LoadedModel | None = None,
        selection: Mapping[str, Any] | None = None,
    ) -> SearchContext:
        """Load ``model`` (unless ``lm`` is given), sample the calibration windows, copy the dense weights.

        The copy lives on the CPU (for a 70B-class model that is the model's size in host memory,
        the same as the offloaded model itself); restoring it is exact, bit for bit.
        """
        spec = _spec(sparsity)
        started = time.perf_counter()
        lm = lm if lm is not None else load_model(model, dtype=dtype, device=device)
        ctx = cls(lm=lm, spec=spec, budget=budget, rule=rule, blocks=blocks, progress=progress,
                  selection=dict(selection or {}))
        ctx.calibration = calibrate(lm, budget)
        for name, w in ctx._linears().items():
            ctx._dense[name] = w.matrix().detach().to("cpu", copy=True)
        ctx.setup_seconds = time.perf_counter() - started
        return ctx

    # -- weights -------------------------------------------------------------------------------
    def _linears(self) -> dict[str, PrunableWeight]:
        path, block_list = find_blocks(self.lm.model, self.blocks)
        sel = self.selection
        return {
            f"{path}.{i}.{name}": w
            for i, b in enumerate(block_list)
            for name, w in block_weights(b, f"{path}.{i}.", sel.get("targets"), sel.get("ignore"),
                                         bool(sel.get("prune_router"))).weights.items()
        }

    @torch.no_grad()
    def restore_dense(self) -> None:
        """Copy the dense weights back into every prunable linear (exact)."""
        for name, w in self._linears().items():
            w.matrix().copy_(self._dense[name])

    # -- data ----------------------------------------------------------------------------------
    def tokens(self, split: str) -> Any:
        if split not in self._tokens:
            b = self.budget
            self._tokens[split] = data_mod.get_eval_tokens(self.lm.tokenizer, split, b.eval_source, b.data_dir)
        return self._tokens[split]

    def identity(self) -> dict[str, Any]:
        """What a resume file must agree on: model content, data, budget, pattern and rule."""
        calib = self.calibration[1] if self.calibration else {}
        b = self.budget
        return {
            "model": self.lm.info.spec,
            "model_hash": self.lm.info.content_hash,
            "dtype": self.lm.info.dtype,
            "sparsity": self.spec.label,
            "rule": self.rule,
            "calibration_tokens_sha256": calib.get("tokens_sha256"),
            "eval_source": b.eval_source,
            "eval_seqlen": b.eval_len,
            "max_windows": b.max_windows,
        }

    # -- the two objectives -----------------------------------------------------------------------
    def proxy_objective(self, module: str = DEFAULT_TARGET, block: int = 0, kernel_size: int = 9) -> ProxyObjective:
        """Stage 1's objective on the dense target module (its input norms are computed once)."""
        key = (module, block)
        if key not in self._target_norm:
            self.restore_dense()
            t0 = time.perf_counter()
            norm = target_input_norm(
                self.lm.model, self.calibration[0], module, block, self.blocks, self.budget.batch_size
            )
            self._target_norm[key] = (norm, time.perf_counter() - t0)
        weight = self._dense[self._target_name(module, block)].to(self.lm.info.device)
        return ProxyObjective(weight, self._target_norm[key][0], self.spec, "layer", self.rule, kernel_size)

    def target_norm_seconds(self, module: str = DEFAULT_TARGET, block: int = 0) -> float:
        return self._target_norm[(module, block)][1] if (module, block) in self._target_norm else 0.0

    def _target_name(self, module: str, block: int) -> str:
        target = find_target(self.lm.model, module, block, self.blocks)
        for name, m in self._linears().items():
            if m.module is target.module and m.attr == target.attr and m.expert == target.expert:
                return name
        raise CrepeError(
            f"the proxy target {module!r} of block {block} is not among the weights the prune touches "
            f"(targets={self.selection.get('targets')!r}, ignore={self.selection.get('ignore')!r}); choose another target"
        )

    def prune(self, params: Mapping[str, Any]) -> Any:
        """Restore the dense weights and prune the whole model with CRePE(``params``)."""
        self.restore_dense()
        config = PruneConfig("crepe", self.spec, dict(params), None, self.rule, **self.selection)
        prog = self.progress
        return prune_model(
            self.lm.model, self.calibration[0], config, self.lm.info.device, self.blocks,
            self.budget.batch_size, (lambda i, n, _s: prog("prune", i, n)) if prog else None,
        )

    def perplexity(self, split: str) -> float:
        result = evaluate_loaded(self.lm, self.budget, split, self.progress, self.tokens(split))
        return float(result["ppl"])

    def evaluate(self, params: Mapping[str, Any], split: str = "validation") -> float:
        """Perplexity on ``split`` of the whole model pruned with CRePE(``params``)."""
        self.prune(params)
        return self.perplexity(split)

    def evaluate_method(self, method: str, split: str = "test") -> float:
        """Perplexity of a baseline (e.g. ``wanda``) with its defaults, on the same calibration data."""
        self.restore_dense()
        if method == "dense":
            return self.perplexity(split)
        config = PruneConfig(method, self.spec, {}, None, self.rule, **self.selection)
        prune_model(self.lm.model, self.calibration[0], config, self.lm.info.device, self.blocks,
                    self.budget.batch_size)
        return self.perplexity(split)


# --- plots ------------------------------------------------------------------------------------------


def _save_figure(fig: Any, path: Path) -> None:
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")


def _figure(ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
    return fig, axes[0]


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_screening(trials: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """gini_pruned of every stage-1 trial, with the running best."""
    fig, (ax,) = _figure()
    values = [t["proxies"]["gini_pruned"] for t in trials]
    ax.plot(range(len(values)), values, "o", ms=3.5, color="#4c72b0", label="trial")
    ax.plot(range(len(values)), np.minimum.accumulate(values), "-", color="#c44e52", label="running best")
    ax.set_xlabel("trial")
    ax.set_ylabel("gini_pruned (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    _close(fig)
    return path


def plot_proxy_vs_ppl(points: Sequence[tuple[float, float]], path: Path, title: str, xlabel: str,
                      highlight: Sequence[tuple[float, float]] = ()) -> Path:
    """Scatter of proxy value against validation perplexity (log scale)."""
    fig, (ax,) = _figure()
    finite = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    if finite:
        ax.scatter(*zip(*finite, strict=True), s=16, color="#4c72b0")
    for x, y in highlight:
        ax.scatter([x], [y], s=40, marker="*", color="#c44e52", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=10)
    _save_figure(fig, path)
    _close(fig)
    return path


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
        out / STATE_FILE, config, prog, RIA_POINT, options,
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
        "budget": ctx.budget.__dict__,
        **_provenance(),
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
        state_path=out / STATE_FILE, config=config,
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
    fig, (ax,) = _figure()
    ax.plot(range(len(ppls)), ppls, "o", ms=3.5, color="#4c72b0", label="evaluation")
    ax.plot(range(len(ppls)), np.fmin.accumulate(np.array(ppls, dtype=float)), "-", color="#c44e52",
            label="running best")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"PPL hill climbing ({ctx.spec.label})", fontsize=10)
    ax.legend(fontsize=8)
    _save_figure(fig, out / "hill_climb.png")
    _close(fig)
    result["plots"] = {"hill_climb": str(out / "hill_climb.png")}
    write_json_atomic(out / "hill_climb.json", result)
    return result


# --- crepe proxy-study -------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (scipy) over the pairs where both are finite; None when undefined."""
    from scipy.stats import spearmanr

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
    config = _jsonable({**ctx.identity(), "kind": "proxy_study", "n_configs": n_configs, "seed": seed,
                        "space": space.as_dict(), "target": target, "target_block": target_block})
    state = load_resume_state(out / STATE_FILE, config) or {"version": STATE_VERSION, "config": config, "rows": []}
    rows: list[dict[str, Any]] = list(state.get("rows", []))
    for i in range(len(rows), n_configs):
        params = points[i]
        t0 = time.perf_counter()
        proxies = objective(params)
        t_proxy = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = ctx.evaluate(params, "validation")
        rows.append({
            "index": i, "params": _jsonable(params), "proxies": proxies,
            "ppl": ppl if math.isfinite(ppl) else None, "proxy_seconds": t_proxy,
            "ppl_seconds": time.perf_counter() - t0,
        })
        state["rows"] = rows
        write_json_atomic(out / STATE_FILE, state)
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
