"""Benchmark: whole-model prune time of CRePE vs RIA on the embedded SmolLM2 (CPU).

Same calibration tensor for every prune; a fresh model is loaded before each prune (pruning
mutates it) and the load is not timed. One untimed warm-up prune per method (on the first
``--warmup-samples`` windows, default 2), then for each pattern ``--repeats`` interleaved rounds
RIA, CRePE, RIA, CRePE, ... ``total`` is ``time.perf_counter`` around ``prune_model``;
``score+mask`` and ``capture`` come from ``report.seconds``. The ratio is the median over rounds
of CRePE / RIA measured in the same round. Target: CRePE / RIA <= 1.10.

The machine may be shared: before each timed prune the script waits (at most ``--quiet-wait``
seconds) until other processes use less than half a core, and it records how many cores other
processes kept busy *during* each prune (``/proc/stat`` minus this process's own CPU time).

    .venv/bin/python -m bench.prune_time [--quick] [--n-samples 16] [--seqlen 256] [--repeats 3]
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
    verdict,
    wait_for_quiet,
)

TARGET = 1.10
BASE, CANDIDATE = "ria", "crepe"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prune_time", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument(
        "--n-samples", type=int, default=None, help="calibration windows (default 16, quick 4)"
    )
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 256, quick 64)")
    parser.add_argument("--patterns", default="0.5,2:4", help="comma-separated sparsities / N:M patterns")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per pattern (each: RIA, CRePE)")
    parser.add_argument("--calib-source", default="auto", help="crepe.data calibration source (default auto)")
    parser.add_argument(
        "--warmup-samples",
        type=int,
        default=2,
        help="windows of the untimed warm-up prune per method (first N of the tensor; 0 = no warm-up)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="max seconds to wait before each timed prune for other processes to go quiet (0 = never wait)",
    )
    args = parser.parse_args(argv)
    apply_threads(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_samples = args.n_samples or (4 if args.quick else 16)
    seqlen = args.seqlen or (64 if args.quick else 256)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    info, date, started = machine_info(), now(), time.perf_counter()

    from crepe.data import get_calibration
    from crepe.models import load_model
    from crepe.pruner import PruneConfig, prune_model
    from crepe.types import parse_sparsity

    first = load_model(args.model, device="cpu")
    calib, data_info = get_calibration(first.tokenizer, n_samples, seqlen, seed=0, source=args.calib_source)
    model_info = first.info.as_dict()
    del first
    gc.collect()

    def one_prune(method: str, pattern: str, ids: torch.Tensor, quiet_wait: float) -> dict:
        model = load_model(args.model, device="cpu").model
        gc.collect()
        config = PruneConfig(method, parse_sparsity(pattern))
        waited, bg_before = wait_for_quiet(quiet_wait) if quiet_wait > 0 else (0.0, float("nan"))
        snap = CpuSnap()
        t0 = time.perf_counter()
        report = prune_model(model, ids, config)
        total = time.perf_counter() - t0
        end = CpuSnap()
        out = {
            "total": total,
            "score_and_mask": report.seconds.get("score_and_mask", float("nan")),
            "capture": report.seconds.get("capture", 0.0),
            "report_total": report.seconds.get("total", float("nan")),
            "own_cpu_s": end.own - snap.own,
            "background_cores": background_cores(snap, end),
            "steal_cores": (end.steal - snap.steal) / total,
            "waited_s": waited,
            "background_before": bg_before,
            "sparsity": report.sparsity,
            "nm_valid": report.nm_valid,
        }
        del model, report
        gc.collect()
        return out

    warmup: dict[str, dict] = {}
    if args.warmup_samples > 0:
        for method in (BASE, CANDIDATE):
            print(f"[bench.prune_time] warm-up {method} {patterns[0]}", flush=True)
            warmup[method] = one_prune(method, patterns[0], calib[: args.warmup_samples], 0.0)
    runs: dict[str, dict[str, list[dict]]] = {p: {BASE: [], CANDIDATE: []} for p in patterns}
    for pattern in patterns:
        for r in range(args.repeats):
            for method in (BASE, CANDIDATE):
                res = one_prune(method, pattern, calib, args.quiet_wait)
                runs[pattern][method].append(res)
                print(
                    f"[bench.prune_time] {pattern} round {r + 1}/{args.repeats} {method}: "
                    f"total {res['total']:.2f} s, score+mask {res['score_and_mask']:.2f} s, "
                    f"others busy {res['background_cores']:.2f} cores (waited {res['waited_s']:.0f} s)",
                    flush=True,
                )
    wall = time.perf_counter() - started

    rows, ratio_rows, all_ok, max_bg = [], [], True, 0.0
    for pattern in patterns:
        med = {}
        for method in (BASE, CANDIDATE):
            rr = runs[pattern][method]
            med[method] = {k: median([x[k] for x in rr]) for k in ("total", "score_and_mask", "capture")}
            bg = max(x["background_cores"] for x in rr)
            max_bg = max(max_bg, bg)
            rows.append(
                [
                    pattern,
                    method,
                    fmt_s(med[method]["total"]),
                    fmt_s(min(x["total"] for x in rr)),
                    fmt_s(med[method]["score_and_mask"]),
                    fmt_s(med[method]["capture"]),
                    fmt_s(med[method]["total"] - med[method]["score_and_mask"] - med[method]["capture"]),
                    f"{rr[0]['sparsity']:.4f}",
                    f"{bg:.2f}",
                ]
            )
        cand, base = runs[pattern][CANDIDATE], runs[pattern][BASE]
        tot = paired_ratio([x["total"] for x in cand], [x["total"] for x in base])
        sm = paired_ratio([x["score_and_mask"] for x in cand], [x["score_and_mask"] for x in base])
        ok = tot <= TARGET
        all_ok &= ok
        ratio_rows.append(
            [
                pattern,
                f"{tot:.3f}",
                f"{med[CANDIDATE]['total'] / med[BASE]['total']:.3f}",
                f"{min(x['total'] for x in cand) / min(x['total'] for x in base):.3f}",
                f"{sm:.2f}",
                f"{med[CANDIDATE]['score_and_mask'] - med[BASE]['score_and_mask']:+.2f}",
                verdict(ok),
            ]
        )

    n_params = model_info.get("n_params", 0)
    warm = (
        f"one untimed warm-up prune per method (on the first {args.warmup_samples} windows)"
        if warmup
        else "no warm-up"
    )
    body = "\n\n".join(
        [
            f"Model `{args.model}` ({n_params / 1e6:.1f} M parameters, float32, CPU); calibration "
            f"{n_samples} x {seqlen} tokens from `{data_info.source}` (seed 0), the same tensor for every "
            f"prune; {args.repeats} interleaved rounds per pattern after {warm}. Seconds; `forward` = "
            "total - score+mask - capture (the dense and pruned block passes, hooks, reporting); "
            "`others busy` = the most cores other processes kept busy during one of these prunes.",
            md_table(
                [
                    "pattern",
                    "method",
                    "total s (median)",
                    "total s (min)",
                    "score+mask s",
                    "capture s",
                    "forward s",
                    "sparsity",
                    "others busy",
                ],
                rows,
            ),
            "CRePE / RIA. `paired` = median of per-round ratios (the target's measure); `of medians` and "
            "`of minima` = ratios of the per-method medians and minima (the minimum is the least disturbed "
            "run).",
            md_table(
                [
                    "pattern",
                    "total, paired",
                    "total, of medians",
                    "total, of minima",
                    "score+mask, paired",
                    "score+mask extra s",
                    f"target <= {TARGET:.2f}",
                ],
                ratio_rows,
            ),
        ]
    )
    targets = [
        f"CRePE whole-model prune time <= {TARGET:.2f} x RIA's (paired total ratio, every pattern): "
        f"{verdict(all_ok)}"
        + (
            f" (other processes kept up to {max_bg:.1f} cores busy during a timed prune: treat with care)"
            if max_bg >= 0.5
            else ""
        )
    ]
    text = section_text(
        "Whole-model prune time: CRePE vs RIA",
        command_line("bench.prune_time", argv),
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
            "configs": {
                p: {m: PruneConfig(m, parse_sparsity(p)).as_dict() for m in (BASE, CANDIDATE)}
                for p in patterns
            },
            "warmup": warmup,
            "runs": runs,
        },
    )
    print(text)
    if should_write(args):
        print(f"[bench.prune_time] updated {update_section('prune_time', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
