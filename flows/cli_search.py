"""``crepe search``, ``crepe hill-climb`` and ``crepe proxy-study``: the configuration from ``--params``, the
flags (sugar for ``-S pho.*`` and ``prune.*``) and ``-S``, then the job in :mod:`tasks.search_jobs` on a
:class:`~crepe.search.context.SearchContext`. Each job resumes from its ``state.json`` when rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from crepe.search.context import SearchContext
from crepe.search.samplers import SAMPLERS
from flows.cli_args import (
    add_budget_args,
    add_config_args,
    add_model_args,
    check_folder_out,
    config_for,
    nonneg_int,
    number,
    positive_int,
    progress_bars,
)
from tasks.inputs import weight_selection


def _bounds(text: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (two numbers separated by a comma)")
    return [number(parts[0]), number(parts[1])]


def _add_common(p: argparse.ArgumentParser, out: str) -> None:
    add_config_args(p, default=None)
    add_model_args(p)
    p.add_argument("--sparsity", required=True, help="a fraction in [0, 1) such as 0.5, or N:M such as 2:4 or 4:8")
    p.add_argument("--out", default=out, help="output folder; rerunning the same command there resumes (default %(default)s)")
    p.add_argument("--rule", choices=["exact", "threshold"],
                   help="per-layer selection rule of the prune and the proxy (default exact)")
    g = p.add_argument_group("search space (alpha, beta linear; gamma on a log10 scale; -S pho.bounds.*)")
    g.add_argument("--alpha-bounds", type=_bounds, metavar="LO,HI", help="default 0,2")
    g.add_argument("--beta-bounds", type=_bounds, metavar="LO,HI", help="default 0,2")
    g.add_argument("--log10-gamma-bounds", type=_bounds, metavar="LO,HI", help="default -5,0")
    g.add_argument("--kernel-size", type=int, help="fixed neighbourhood window K (default 9)")
    add_budget_args(p)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "search", help="PHO: find CRePE's alpha, beta, gamma by proxy screening + validation-PPL verification",
        description="Stage 1 scores --trials candidates by gini_pruned of one module (block 0's q_proj by "
        "default); stage 2 fully prunes the --top-k best plus the RIA point and keeps the lowest WikiText-2 "
        "validation perplexity; the winner is then reported on the test split. Writes pho.json, state.json "
        "and plots to --out; rerun the same command to resume after an interruption.")
    _add_common(p, "runs/search")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="cmaes (default), tpe or random (-S pho.sampler)")
    p.add_argument("--trials", type=int, help="stage-1 proxy evaluations (-S pho.n_trials)")
    p.add_argument("--top-k", type=int, help="candidates verified by perplexity in stage 2 (-S pho.top_k)")
    p.add_argument("--sigma", type=number, default=0.25, help="CMA-ES initial step in unit-cube coordinates (default 0.25)")
    p.add_argument("--search-kernel", action="store_true", default=None, help="also search K in {3, 5, 7, 9, 11}")
    _add_target(p)
    p.add_argument("--search-seed", type=nonneg_int, default=None,
                   help="sampler seed (default: --seed, which also seeds the calibration sampling)")
    p.add_argument("--skip-test", action="store_true", help="do not report the winner's test perplexity")

    p = sub.add_parser(
        "hill-climb", help="the slow baseline: coordinate search on validation perplexity from the RIA point",
        description="Coordinate hill climbing over (alpha, beta, log10 gamma) with a shrinking step, every "
        "point scored by a full prune and WikiText-2 validation perplexity; the best point is reported on "
        "the test split. Resumable like search.")
    _add_common(p, "runs/hill-climb")
    p.add_argument("--max-evals", type=positive_int, default=None, help="stop after N evaluations (default 30 "
                   "unless --max-seconds is given)")
    p.add_argument("--max-seconds", type=number, default=None, help="stop after this much evaluation time")
    p.add_argument("--skip-test", action="store_true", help="do not report the best point's test perplexity")

    p = sub.add_parser(
        "proxy-study", help="how well each proxy predicts perplexity on this model (the paper's Table 2)",
        description="Samples --configs seeded configurations, computes every proxy and the validation "
        "perplexity of each, and reports Spearman's rho per proxy with one scatter plot each.")
    _add_common(p, "runs/proxy-study")
    p.add_argument("--configs", type=int, default=32, help="configurations to sample (default 32)")
    _add_target(p)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-module", help="proxy module inside a block (default self_attn.q_proj; -S pho.target)")
    p.add_argument("--target-block", type=nonneg_int, help="proxy block index (default 0; -S pho.target_block)")


_SEARCH_FLAGS = {"sampler": "pho.sampler", "trials": "pho.n_trials", "top_k": "pho.top_k",
                 "search_kernel": "pho.search_kernel", "target_module": "pho.target", "target_block": "pho.target_block",
                 "alpha_bounds": "pho.bounds.alpha", "beta_bounds": "pho.bounds.beta",
                 "log10_gamma_bounds": "pho.bounds.log10_gamma", "kernel_size": "prune.params.kernel_size"}


def search_config(args: argparse.Namespace, enabled: bool) -> Any:
    """The configuration of a search job: CRePE at ``--sparsity``, ``pho.*`` from the flags."""
    flags = {f"{key}={json.dumps(getattr(args, attr))}": f"--{attr.replace('_', '-')} {_typed(getattr(args, attr))}"
             for attr, key in _SEARCH_FLAGS.items() if getattr(args, attr, None) is not None}
    seed = getattr(args, "search_seed", None)
    if seed is None:
        seed = args.seed  # the sampler follows the calibration seed unless told otherwise
    if seed is not None:
        flags[f"pho.seed={seed}"] = f"--search-seed {seed}"
    return config_for(args, fixed=["prune.method=crepe", f"pho.enabled={json.dumps(enabled)}", *flags],
                      more_flags=flags)


def _typed(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _context(cfg: Any, out: Path, args: argparse.Namespace) -> SearchContext:
    b = cfg.budget()
    print(f"[crepe] loading {cfg.model.spec}; calibration {b.calib_samples} x {b.seqlen} tokens")
    ctx = SearchContext.create(cfg.model.spec, cfg.prune.sparsity, b, cfg.model.dtype, cfg.model.device,
                               cfg.prune.rule, cfg.model.blocks, progress_bars(not args.no_progress),
                               selection=weight_selection(cfg))
    calib = ctx.calibration[1]
    print(f"[crepe] calibration from {calib['source']} (sha256 {calib['sha256'][:12]}...); results -> {out}")
    return ctx


def cmd_search(args: argparse.Namespace) -> int:
    out = check_folder_out(args.out)
    if args.sigma <= 0:
        raise CrepeError(f"--sigma {args.sigma!r} must be a positive number (unit-cube coordinates)")
    from tasks.search_jobs import run_search  # heavy (matplotlib, scipy): only the search commands need it

    cfg = search_config(args, enabled=True)
    p = cfg.pho
    result = run_search(_context(cfg, out, args), out, p.sampler, p.n_trials, p.top_k, p.seed, cfg.search_space(),
                        p.target, p.target_block, args.sigma, not args.skip_test)
    t = result["totals"]
    print(f"[crepe] stage 1: {t['n_trials']} trials in {t['stage1_seconds']:.1f} s "
          f"(+{t['target_norm_seconds']:.1f} s input norms); stage 2: {t['n_verified']} candidates in "
          f"{t['stage2_seconds']:.1f} s")
    print(f"[crepe] wrote {out / 'pho.json'}; apply it with: crepe prune --method crepe "
          f"--sparsity {args.sparsity} --params-from {out / 'pho.json'} --out DIR")
    return 0


def cmd_hill_climb(args: argparse.Namespace) -> int:
    out = check_folder_out(args.out)
    max_evals = args.max_evals if args.max_evals or args.max_seconds else 30
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise CrepeError(f"--max-seconds {args.max_seconds!r} must be a positive number")
    # heavy (matplotlib, scipy): only the search commands need it
    from tasks.search_jobs import run_hill_climb

    cfg = search_config(args, enabled=False)
    result = run_hill_climb(_context(cfg, out, args), out, max_evals, args.max_seconds, cfg.search_space(), None,
                            not args.skip_test)
    print(f"[crepe] {result['n_evals']} evaluations in {result['totals']['eval_seconds']:.1f} s; "
          f"wrote {out / 'hill_climb.json'}")
    return 0


def cmd_proxy_study(args: argparse.Namespace) -> int:
    from tasks.search_jobs import (  # heavy (matplotlib, scipy): only this command
        run_proxy_study,
        study_points,
    )

    out = check_folder_out(args.out)
    cfg = search_config(args, enabled=False)
    space = cfg.search_space()
    study_points(space, args.configs, cfg.pho.seed)  # validates --configs before loading anything
    run_proxy_study(_context(cfg, out, args), out, args.configs, cfg.pho.seed, space, cfg.pho.target,
                    cfg.pho.target_block)
    print(f"[crepe] wrote {out / 'proxy_study.json'} and one plot per proxy")
    return 0
