"""Regenerate docs/zeroshot.md: lm-eval zero-shot accuracy of dense vs Wanda vs RIA vs CRePE (spec §14.2).

    make zeroshot            # = python -m flows.zeroshot_table (offline variables set)
    python -m flows.zeroshot_table --limit 2 --out /tmp/zs.md --json /tmp/zs.json   # a smoke run

Every pruned model starts from a fresh copy of the same dense model and uses the same calibration
windows (sampled once); each is evaluated in memory right after pruning (no save, no reload) on
lm-eval's built-in tasks with the first ``--limit`` documents of each. CRePE uses the coefficients of
a PHO search result when ``--crepe-params [PATTERN=]FILE`` gives one, else its documented defaults;
the report says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from crepe import zeroshot
from crepe.errors import CrepeError
from crepe.io import sha256_file, write_json_atomic, write_text_atomic
from crepe.types import parse_sparsity
from flows.cli_args import Parser, config_for, positive_int, progress_bars
from tasks.compare import run_compare
from tasks.params_file import load_params_file
from tasks.zeroshot_report import kept_sections, render

DEFAULT_LIMIT = 100
METHODS = ["dense", "wanda", "ria", "crepe"]
PATTERNS = ["0.5", "2:4"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m flows.zeroshot_table", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default %(default)s)")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated (default %(default)s)")
    p.add_argument("--tasks", default="all", help="zero-shot tasks (default: the six)")
    p.add_argument("--limit", type=positive_int, default=DEFAULT_LIMIT,
                   help="documents per task (default %(default)s: about 20 min on 2 idle CPU cores, see docs/zeroshot.md)")
    p.add_argument("--all-docs", action="store_true", help="score every document (hours on a CPU)")
    p.add_argument("--zs-batch-size", type=positive_int, default=8, help="zero-shot rows per forward (default 8)")
    p.add_argument("--crepe-params", action="append", default=[], metavar="[PATTERN=]FILE",
                   help="CRePE coefficients from a PHO result (winner.params) for one pattern or all; repeatable")
    p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=positive_int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-source", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="docs/zeroshot.md")
    p.add_argument("--json", default="docs/zeroshot.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rewrite", action="store_true", help="only re-render --out from the --json of a finished run")
    return p


def _crepe_params(specs: list[str], patterns: list[str]) -> dict[str, tuple[dict[str, Any], str]]:
    """pattern label -> (params, where they came from); a bare FILE applies to every pattern."""
    labels = [parse_sparsity(p).label for p in patterns]
    chosen: dict[str, tuple[dict[str, Any], str]] = {}
    for spec in specs:
        pattern, _, file = spec.rpartition("=")
        params = load_params_file(file, "crepe")
        origin = f"PHO result `{file}` (sha256 {sha256_file(file)[:12]}...)"
        targets = [parse_sparsity(pattern).label] if pattern else labels
        for label in targets:
            if label not in labels:
                raise CrepeError(f"--crepe-params names pattern {pattern!r}, which is not in --patterns {','.join(patterns)}")
            chosen[label] = (params, origin)
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Dense and every (method, pattern) through :func:`tasks.compare.run_compare`, each scored zero-shot."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if not methods or not patterns:
        raise CrepeError("--methods and --patterns need at least one entry each")
    names = zeroshot.parse_tasks(args.tasks)
    limit = None if args.all_docs else args.limit
    crepe_params = _crepe_params(args.crepe_params, patterns)
    zeroshot.resolve_sources(names, args.data_dir)  # a missing data file fails before any model work
    args.params, args.overrides = None, []
    base = config_for(args, fixed=["pho.enabled=false"])
    variants, origins = [], []
    for pattern in patterns:
        for method in (m for m in methods if m != "dense"):
            params, origin = ({}, "-")
            if method == "crepe":
                params, origin = crepe_params.get(parse_sparsity(pattern).label,
                                                  ({}, "documented defaults (docs/methods.md)"))
            variants.append(config_for(args, fixed=["pho.enabled=false", f"prune.method={method}",
                                                    f"prune.sparsity={json.dumps(pattern)}",
                                                    f"prune.params={json.dumps(params)}"]))
            origins.append(origin)
    progress = progress_bars(not args.no_progress)
    started = time.perf_counter()

    def measure(lm: Any) -> dict[str, Any]:
        return {"zero_shot": zeroshot.run_zero_shot(lm.model, lm.tokenizer, names, limit, args.zs_batch_size,
                                                    base.data_dir(), progress=progress)}

    def describe(row: dict[str, Any]) -> str:
        res = row["zero_shot"]
        return f"avg acc {100 * (res['average_acc'] or math.nan):.2f} (eval {res['throughput']['run_seconds']:.0f} s)"

    result = run_compare(base, variants, "dense" in methods, progress, lambda t: print(f"[zeroshot] {t}", flush=True),
                         measure, describe)
    for row, origin in zip(result["rows"][int("dense" in methods):], origins, strict=True):
        row["params_from"] = origin
    if "dense" in methods:
        result["rows"][0]["params_from"] = "-"
    return {"kind": "crepe-zeroshot-table", **result, "tasks": names, "limit": limit,
            "wall_seconds": round(time.perf_counter() - started, 1), "command": " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.rewrite:
            if not Path(args.json).is_file():
                raise CrepeError(f"--rewrite needs the JSON of a finished run at --json {args.json}; run without --rewrite")
            result = json.loads(Path(args.json).read_text())
        else:
            result = run(args)
    except CrepeError as exc:
        sys.stderr.write(f"crepe: error: {exc}\n")
        return 2
    write_json_atomic(args.json, result)
    old = Path(args.out).read_text() if Path(args.out).is_file() else ""
    text = render(result, args.json, kept_sections(old))
    write_text_atomic(args.out, text)
    print(text.split("## Setup")[0])
    print(f"[zeroshot] wrote {args.out} and {Path(args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
