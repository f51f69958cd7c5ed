"""Benchmark: whole-model prune time of every method relative to Wanda, on the embedded SmolLM2 (CPU).

Methods are ``name`` or ``name+refinement`` (``wanda+dsnot``: Wanda's mask refined by DSnoT). Same
calibration tensor for every prune; a fresh model is loaded before each prune (pruning mutates it)
and the load is not timed. One untimed warm-up prune per method on the first ``--warmup-samples``
windows, then ``--repeats`` interleaved rounds (wanda, m1, m2, ..., wanda, m1, ...). ``total`` is
``time.perf_counter`` around ``prune_model``; ``score+mask`` and ``capture`` come from
``report.seconds`` (for SparseGPT, score+mask is the OBS reconstruction). The ratio is the median
over rounds of method / Wanda measured in the same round. No target: SparseGPT and DSnoT are
expected to be slower; the table says by how much.

    .venv/bin/python -m bench.method_time [--quick] [--n-samples 16] [--seqlen 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from bench._common import (
    CpuSnap,
    add_common_args,
    apply_threads,
    background_cores,
    command_line,
    fmt_s,
    machine_info,
    md_table,
    median,
    now,
    paired_ratio,
    section_text,
    should_write,
    update_section,
    wait_for_quiet,
)

BASE = "wanda"
DEFAULT_METHODS = "magnitude,ria,crepe,sparsegpt,wanda+dsnot,wanda+r2-dsnot"


def parse_method(spec: str) -> tuple[str, str | None]:
    method, _, refine = spec.partition("+")
    return method.strip(), (refine.strip() or None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.method_time", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--n-samples", type=int, default=None, help="calibration windows (default 16, quick 2)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 256, quick 32)")
    parser.add_argument("--patterns", default="0.5", help="comma-separated sparsities / N:M patterns (default 0.5)")
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated, compared with {BASE} (default {DEFAULT_METHODS})"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per pattern (default 3, quick 1)")
    parser.add_argument("--calib-source", default="auto", help="crepe.data calibration source (default auto)")
    parser.add_argument(
        "--warmup-samples", type=int, default=2, help="windows of the untimed warm-up prune per method (0 = none)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="max seconds to wait before each timed prune for other processes to go quiet (default 20, quick 0)",
    )
    args = parser.parse_args(argv)
    apply_threads(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_samples = args.n_samples or (2 if args.quick else 16)
    seqlen = args.seqlen or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 20.0)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    others = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != BASE]
    methods = [BASE, *others]
    info, date, started = machine_info(), now(), time.perf_counter()

    from crepe.data import get_calibration
    from crepe.models import load_model
    from crepe.prune_config import build_config
    from crepe.pruner import prune_model

    configs = {
        (m, p): build_config(parse_method(m)[0], p, refine=parse_method(m)[1]) for m in methods for p in patterns
    }  # every name and combination is checked before the first load
    first = load_model(args.model, device="cpu")
    calib, data_info = get_calibration(first.tokenizer, n_samples, seqlen, seed=0, source=args.calib_source)
    model_info = first.info.as_dict()
    del first
    gc.collect()

    def one_prune(method: str, pattern: str, ids: torch.Tensor, wait: float) -> dict:
        model = load_model(args.model, device="cpu").model
        gc.collect()
        waited, bg_before = wait_for_quiet(wait) if wait > 0 else (0.0, float("nan"))
        snap = CpuSnap()
        t0 = time.perf_counter()
        report = prune_model(model, ids, configs[(method, pattern)])
        total = time.perf_counter() - t0
        end = CpuSnap()
        out = {
            "total": total,
            "score_and_mask": report.seconds.get("score_and_mask", float("nan")),
            "capture": report.seconds.get("capture", 0.0),
            "background_cores": background_cores(snap, end),
            "waited_s": waited,
            "background_before": bg_before,
            "sparsity": report.sparsity,
            "refine_summary": report.refine_summary(),
            "damping_retries": len(report.damping_retries),
        }
        del model, report
        gc.collect()
        return out

    warmup: dict[str, dict] = {}
    if args.warmup_samples > 0:
        for method in methods:
            print(f"[bench.method_time] warm-up {method} {patterns[0]}", flush=True)
            warmup[method] = one_prune(method, patterns[0], calib[: args.warmup_samples], 0.0)
    runs: dict[str, dict[str, list[dict]]] = {p: {m: [] for m in methods} for p in patterns}
    for pattern in patterns:
        for r in range(repeats):
            for method in methods:
                res = one_prune(method, pattern, calib, quiet_wait)
                runs[pattern][method].append(res)
                print(
                    f"[bench.method_time] {pattern} round {r + 1}/{repeats} {method}: total {res['total']:.2f} s, "
                    f"score+mask {res['score_and_mask']:.2f} s, others busy {res['background_cores']:.2f} cores",
                    flush=True,
                )
    wall = time.perf_counter() - started

    rows, max_bg = [], 0.0
    for pattern in patterns:
        base = runs[pattern][BASE]
        for method in methods:
            rr = runs[pattern][method]
            bg = max(x["background_cores"] for x in rr)
            max_bg = max(max_bg, bg)
            rows.append(
                [
                    pattern,
                    method,
                    fmt_s(median([x["total"] for x in rr])),
                    fmt_s(min(x["total"] for x in rr)),
                    fmt_s(median([x["score_and_mask"] for x in rr])),
                    fmt_s(median([x["capture"] for x in rr])),
                    f"{paired_ratio([x['total'] for x in rr], [x['total'] for x in base]):.2f}",
                    f"{min(x['total'] for x in rr) / min(x['total'] for x in base):.2f}",
                    f"{rr[0]['sparsity']:.4f}",
                    f"{bg:.2f}",
                ]
            )
    n_params = model_info.get("n_params", 0)
    body = "\n\n".join(
        [
            f"Model `{args.model}` ({n_params / 1e6:.1f} M parameters, float32, CPU); calibration {n_samples} x "
            f"{seqlen} tokens from `{data_info.source}` (seed 0), the same tensor for every prune; {repeats} "
            f"interleaved rounds per pattern after one untimed warm-up per method. `x wanda` = median over rounds "
            "of the method's total / Wanda's total in the same round (`of minima`: ratio of the least disturbed "
            "runs). `others busy` = the most cores other processes kept busy during one of these prunes.",
            md_table(
                [
                    "pattern",
                    "method",
                    "total s (median)",
                    "total s (min)",
                    "score+mask s",
                    "capture s",
                    "x wanda (paired)",
                    "x wanda (of minima)",
                    "sparsity",
                    "others busy",
                ],
                rows,
            ),
        ]
    )
    targets = [
        "none (informational): SparseGPT and DSnoT-type refinements trade prune time for quality"
        + (f"; other processes kept up to {max_bg:.1f} cores busy during a timed prune" if max_bg >= 0.5 else "")
    ]
    text = section_text(
        f"Whole-model prune time per method, relative to {BASE}",
        command_line("bench.method_time", argv),
        info,
        date,
        wall,
        body,
        targets,
        {
            "machine": info,
            "model": {k: model_info.get(k) for k in ("spec", "content_hash", "n_params", "dtype", "device")},
            "calibration": {"n_samples": n_samples, "seqlen": seqlen, **data_info.as_dict()},
            "torch_threads": torch.get_num_threads(),
            "configs": {f"{m} {p}": c.as_dict() for (m, p), c in configs.items()},
            "warmup": warmup,
            "runs": runs,
        },
    )
    print(text)
    if should_write(args):
        print(f"[bench.method_time] updated {update_section('method_time', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
