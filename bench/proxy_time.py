"""Benchmark: the cost of PHO's proxy (stage 1) against one full evaluation (stage 2).

1. SmolLM2 (embedded): the block-0 q_proj input norms are computed once from the calibration
   windows; then one proxy evaluation (CRePE scores, the pattern's mask, all five proxies) is timed
   ``--repeats`` times at 50% and 2:4, and a whole stage 1 (``--trials`` cmaes trials, the
   ``crepe search`` sampler settings) is timed end to end. Target: stage 1 with 60 trials < 10 s.
2. A synthetic 4096x4096 matrix (LLaMA-7B's q_proj shape) with random cached norms: the time of one
   proxy evaluation (the paper reports about 6 s per trial for 7B on a GPU, overhead included).
3. Side by side in the same run: one stage-2 evaluation (full prune + validation perplexity with
   the same budget) and the ratio stage-2 evaluation / proxy evaluation, which is what makes PHO
   cheap: the ratio, not the absolute time, is the portable number.

    .venv/bin/python -m bench.proxy_time [--quick] [--trials 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench._common import (
    add_common_args,
    apply_threads,
    command_line,
    machine_info,
    md_table,
    median,
    now,
    section_text,
    should_write,
    update_section,
)
from crepe.budget import Budget
from crepe.search.context import CMA_SIGMA, SearchContext, cma_start_mean
from crepe.search.driver import screen
from crepe.search.objective import ProxyObjective
from crepe.search.space import SearchSpace
from crepe.types import parse_sparsity

PARAMS = {"alpha": 1.2, "beta": 0.8, "gamma": 1e-3, "kernel_size": 9}


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_time", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--synthetic", type=int, default=4096, help="side of the synthetic square matrix")
    args = parser.parse_args(argv)
    apply_threads(args)
    if args.quick:
        args.trials, args.repeats, args.calib_samples, args.seqlen, args.max_windows = 12, 2, 2, 64, 2
        args.synthetic = 1024
    info, date, started = machine_info(), now(), time.perf_counter()
    budget = Budget(calib_samples=args.calib_samples, seqlen=args.seqlen, max_windows=args.max_windows)
    rows, raw = [], {}
    stage1_s = None
    for pattern in ("0.5", "2:4"):
        ctx = SearchContext.create("embedded:smollm2-135m", pattern, budget)
        objective = ctx.proxy_objective()
        label = ctx.spec.label
        per_trial = time_calls(lambda objective=objective: objective(PARAMS), args.repeats)
        space = SearchSpace()
        t0 = time.perf_counter()
        trials = screen(objective, space, "cmaes", args.trials, 0,
                        sampler_options={"sigma": CMA_SIGMA, "mean": cma_start_mean(space)})
        s1 = time.perf_counter() - t0 + ctx.target_norm_seconds()
        t0 = time.perf_counter()
        ctx.evaluate(PARAMS, "validation")
        full = time.perf_counter() - t0
        raw[label] = {"proxy_s": per_trial, "stage1_s": s1, "norm_s": ctx.target_norm_seconds(),
                      "full_eval_s": full, "n_trials": len(trials)}
        if label == "50%":
            stage1_s = s1
        rows.append([f"SmolLM2 q_proj {tuple(objective.weight.shape)}", label, f"{median(per_trial) * 1e3:.1f}",
                     f"{s1:.2f} ({len(trials)} trials)", f"{full:.1f}", f"{full / median(per_trial):.0f}x"])
        print(rows[-1], flush=True)
    n = args.synthetic
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, n, generator=g)
    norm = torch.rand(n, generator=g) * 10
    for pattern in ("0.5", "2:4"):
        obj = ProxyObjective(weight, norm, parse_sparsity(pattern))
        per_trial = time_calls(lambda obj=obj: obj(PARAMS), max(2, args.repeats // 2))
        raw[f"synthetic {n} {pattern}"] = {"proxy_s": per_trial}
        rows.append([f"synthetic {n}x{n}", parse_sparsity(pattern).label, f"{median(per_trial) * 1e3:.0f}",
                     f"~{median(per_trial) * args.trials:.0f} (estimated, {args.trials} trials)", "-", "-"])
        print(rows[-1], flush=True)
    wall = time.perf_counter() - started
    table = md_table(["matrix", "pattern", "one proxy evaluation ms", "stage 1 s", "one stage-2 evaluation s",
                      "stage-2 eval / proxy eval"], rows)
    body = (f"Budget: calibration {args.calib_samples} x {args.seqlen} tokens, validation perplexity on "
            f"{args.max_windows} windows of {args.seqlen} tokens; proxy = CRePE scores (K = 9) + mask + five "
            f"proxies in float64; medians of {args.repeats} calls after a warm-up. Stage 1 includes "
            f"computing the input norms once.\n\n{table}")
    ok = stage1_s is not None and stage1_s < 10.0
    targets = [f"stage 1 with {args.trials} trials on SmolLM2 at 50% under 10 s: "
               f"{'PASS' if ok else 'FAIL'} ({stage1_s:.2f} s)"]
    print(body)
    print(targets[0])
    if should_write(args):
        text = section_text("PHO proxy cost (stage 1) vs a full evaluation (stage 2)",
                            command_line("bench.proxy_time", argv), info, date, wall, body, targets, raw)
        update_section("proxy_time", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
