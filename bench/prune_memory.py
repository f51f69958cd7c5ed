"""Benchmark: peak resident memory of a whole-model prune against the model's own size (CPU).

Every measured prune runs in a fresh ``python -m bench.prune_memory --child`` process, which
imports crepe, loads the model, draws the calibration tensor and collects garbage, then reads its
RSS (the *baseline*). The loaded weights are memory-mapped and only partly resident, so it then
reads every parameter once and records the RSS again (*resident*). On Linux it then resets the process's peak-RSS counter (``5`` written to
``/proc/self/clear_refs``; this resets what ``getrusage(RUSAGE_SELF).ru_maxrss`` reports), prunes,
and reads ``ru_maxrss`` (KiB) again: the *peak during the prune*, not polluted by load-time
transients. Where the reset is not possible the peak is the whole process's ``ru_maxrss`` (the
tables say which). Model size = sum of ``numel * element_size`` over ``model.parameters()``.

    .venv/bin/python -m bench.prune_memory [--quick] [--pattern 2:4] [--n-samples 16] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

from bench._common import (
    add_common_args,
    command_line,
    machine_info,
    md_table,
    median,
    now,
    section_text,
    should_write,
    update_section,
)

METHODS = ("ria", "crepe")
MIB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from crepe.data import get_calibration
    from crepe.models import load_model
    from crepe.pruner import PruneConfig, prune_model
    from crepe.types import parse_sparsity

    loaded = load_model(args.model, device="cpu")
    calib, data_info = get_calibration(loaded.tokenizer, args.n_samples, args.seqlen, seed=0)
    model = loaded.model
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = PruneConfig(args.method, parse_sparsity(args.pattern))
    gc.collect()
    load_peak = _maxrss_kib()
    baseline_rss = _status_kib("VmRSS")  # after imports + load + calibration
    baseline_anon, baseline_file = _status_kib("RssAnon"), _status_kib("RssFile")
    # The loaded weights are memory-mapped from the safetensors cache and only partly resident:
    # read every parameter once so the second baseline holds the whole model (the prune reads
    # and writes all of them anyway).
    touched = sum(float(p.detach().abs().sum()) for p in model.parameters())
    resident_rss = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    baseline_maxrss = _maxrss_kib()  # == current RSS after a successful reset
    t0 = time.perf_counter()
    report = prune_model(model, calib, config)
    seconds = time.perf_counter() - t0
    peak = _maxrss_kib()
    print(
        json.dumps(
            {
                "method": args.method,
                "pattern": args.pattern,
                "model_bytes": model_bytes,
                "load_peak_kib": load_peak,
                "baseline_rss_kib": baseline_rss,
                "baseline_anon_kib": baseline_anon,
                "baseline_file_kib": baseline_file,
                "resident_rss_kib": resident_rss,
                "weights_abs_sum": touched,
                "baseline_maxrss_kib": baseline_maxrss,
                "peak_reset": reset,
                "peak_maxrss_kib": peak,
                "rss_after_kib": _status_kib("VmRSS"),
                "anon_after_kib": _status_kib("RssAnon"),
                "file_after_kib": _status_kib("RssFile"),
                "prune_seconds": seconds,
                "sparsity": report.sparsity,
                "calib_source": data_info.source,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


def run_child(args: argparse.Namespace, method: str, n_samples: int, seqlen: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.prune_memory",
        "--child",
        "--method",
        method,
        "--pattern",
        args.pattern,
        "--n-samples",
        str(n_samples),
        "--seqlen",
        str(seqlen),
        "--model",
        args.model,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=here, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {method} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prune_memory", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument(
        "--n-samples", type=int, default=None, help="calibration windows (default 16, quick 4)"
    )
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 256, quick 64)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per method (median reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="crepe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n_samples = args.n_samples or (4 if args.quick else 16)
    seqlen = args.seqlen or (64 if args.quick else 256)
    if args.child:
        args.n_samples, args.seqlen = n_samples, seqlen
        return child(args)

    info, date, started = machine_info(), now(), time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        for method in METHODS:
            res = run_child(args, method, n_samples, seqlen)
            runs[method].append(res)
            print(
                f"[bench.prune_memory] round {r + 1}/{args.repeats} {method}: baseline "
                f"{res['baseline_rss_kib'] / 1024:.0f} MiB, resident {res['baseline_maxrss_kib'] / 1024:.0f} MiB, "
                f"peak {res['peak_maxrss_kib'] / 1024:.0f} MiB",
                flush=True,
            )
    wall = time.perf_counter() - started

    rows, raw_summary = [], {}
    model_bytes = runs[METHODS[0]][0]["model_bytes"]
    for method in METHODS:
        rr = runs[method]
        base = median([x["baseline_rss_kib"] * 1024 for x in rr])
        resident = median([x["baseline_maxrss_kib"] * 1024 for x in rr])
        peak = median([x["peak_maxrss_kib"] * 1024 for x in rr])
        summary = {
            "model_bytes": model_bytes,
            "baseline_bytes": base,
            "resident_baseline_bytes": resident,
            "peak_bytes": peak,
            "peak_over_model": peak / model_bytes,
            "extra_over_model": (peak - base) / model_bytes,
            "extra_over_resident_over_model": (peak - resident) / model_bytes,
        }
        raw_summary[method] = summary
        rows.append(
            [
                method,
                args.pattern,
                f"{model_bytes / MIB:.0f}",
                f"{base / MIB:.0f}",
                f"{resident / MIB:.0f}",
                f"{peak / MIB:.0f}",
                f"{summary['peak_over_model']:.2f}",
                f"{summary['extra_over_model']:.2f}",
                f"{summary['extra_over_resident_over_model']:.2f}",
                "yes" if all(x["peak_reset"] for x in rr) else "no (whole-process peak)",
            ]
        )
    c, r_ = raw_summary["crepe"], raw_summary["ria"]
    first = runs[METHODS[0]][0]
    body = "\n\n".join(
        [
            f"Model `{args.model}`, float32 on CPU; pattern {args.pattern}; calibration {n_samples} x {seqlen} "
            f"tokens from `{first['calib_source']}` (seed 0) for both methods; {args.repeats} fresh "
            f"process(es) per method, {first['torch_threads']} torch threads; medians. Sizes in MiB "
            "(ru_maxrss and /proc/self/status are KiB). `baseline` = RSS after imports + load + calibration; "
            "`resident` = RSS after reading every parameter once (the loaded weights are memory-mapped from "
            "the safetensors cache and only partly resident before that); `peak` = ru_maxrss during the "
            "prune (peak counter reset right before it).",
            md_table(
                [
                    "method",
                    "pattern",
                    "model MiB",
                    "baseline MiB",
                    "resident MiB",
                    "peak MiB",
                    "peak / model",
                    "(peak - baseline) / model",
                    "(peak - resident) / model",
                    "peak reset",
                ],
                rows,
            ),
            f"CRePE vs RIA: peak {c['peak_bytes'] / MIB:.0f} vs {r_['peak_bytes'] / MIB:.0f} MiB (ratio "
            f"{c['peak_bytes'] / r_['peak_bytes']:.3f}); working memory of the prune beyond the resident model "
            f"{(c['peak_bytes'] - c['resident_baseline_bytes']) / MIB:.0f} vs "
            f"{(r_['peak_bytes'] - r_['resident_baseline_bytes']) / MIB:.0f} MiB.",
        ]
    )
    targets = [
        "(reported, no pass/fail target) peak / model and (peak - baseline) / model: "
        + "; ".join(
            f"{m} {raw_summary[m]['peak_over_model']:.2f} and {raw_summary[m]['extra_over_model']:.2f}"
            for m in METHODS
        )
    ]
    text = section_text(
        "Whole-model prune peak memory vs model size",
        command_line("bench.prune_memory", argv),
        info,
        date,
        wall,
        body,
        targets,
        {"machine": info, "summary": raw_summary, "runs": runs},
    )
    print(text)
    if should_write(args):
        print(f"[bench.prune_memory] updated {update_section('prune_memory', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
