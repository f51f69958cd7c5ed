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

DEFAULT_LIMIT = 100
METHODS = ["dense", "wanda", "ria", "crepe"]
PATTERNS = ["0.5", "2:4"]
CHANCE = {"boolq": "62.2 (majority)", "rte": "52.7 (majority)", "mnli": "35.4 (majority)", "hellaswag": "25",
          "arc_easy": "~25", "arc_challenge": "~25"}


GUIDE = """## How this is produced

- `make zeroshot` runs `python -m flows.zeroshot_table` (offline variables set): it prunes the model with
  Wanda, RIA and CRePE at 50% and 2:4 from fresh dense copies with one shared calibration set, and scores
  dense and each pruned model in memory with `crepe.zeroshot.run_zero_shot`. Options: `--limit N`
  (documents per task), `--all-docs`, `--methods`, `--patterns`, `--tasks`, `--crepe-params
  [PATTERN=]FILE` (a PHO search result; without it CRePE uses its documented defaults), `--out`, `--json`.
- One model: `crepe eval --model MODEL_OR_FOLDER --zero-shot all [--limit N] [--batch-size B] [--json F]`
  (`--no-pack` scores every choice in its own row, bit-identical to lm-eval's `HFLM`; `--ppl` adds
  WikiText-2 perplexity on the same loaded model).
- In a pipeline: `crepe.zeroshot.run_zero_shot(model, tokenizer, tasks, limit=...)` on the live model,
  or the Prefect task `tasks.zeroshot.zero_shot_eval`, which also logs `zeroshot/<task>/acc`,
  `zeroshot/<task>/acc_norm` and `zeroshot/avg_acc` to the active MLflow run.

## Data files

The prompts, choices and metrics are lm-eval's own (its built-in task YAMLs); only the documents are
read from local files when the data directory has them (`--data-dir`, else `$CREPE_DATA_DIR`, else
`../shared/data`), and from the hub otherwise. Each file holds the official split in the hub
dataset's own schema (see each folder's SOURCE.md for origin, row counts and checksums):

| task | file in the data directory | rows | same as hub dataset / split |
|---|---|---:|---|
| boolq | `boolq/super_glue_boolq_validation.jsonl` | 3270 | `aps/super_glue` boolq / validation |
| rte | `rte/glue_rte_validation.parquet` | 277 | `nyu-mll/glue` rte / validation |
| mnli | `mnli/glue_mnli_validation_matched.jsonl` | 9815 | `nyu-mll/glue` mnli / validation_matched |
| hellaswag | `hellaswag/hellaswag_validation.jsonl` | 10042 | `Rowan/hellaswag` / validation |
| arc_easy | `arc/ARC-Easy-test.jsonl` | 2376 | `allenai/ai2_arc` ARC-Easy / test |
| arc_challenge | `arc/ARC-Challenge-test.jsonl` | 1172 | `allenai/ai2_arc` ARC-Challenge / test |

With network access a missing file is simply read from the hub. To make one for an offline machine:
`datasets.load_dataset("nyu-mll/glue", "rte", split="validation").to_parquet("DATA/rte/glue_rte_validation.parquet")`
(or `.to_json(path)`, which writes JSON lines, for the `.jsonl` files). A file whose row count differs
from the official one is refused; use `--limit` for a subset.
"""


def build_parser() -> argparse.ArgumentParser:
    from flows.cli import _Parser, _positive_int

    p = _Parser(prog="python -m flows.zeroshot_table", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default %(default)s)")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated (default %(default)s)")
    p.add_argument("--tasks", default="all", help="zero-shot tasks (default: the six)")
    p.add_argument("--limit", type=_positive_int, default=DEFAULT_LIMIT,
                   help="documents per task (default %(default)s: about 20 min on 2 idle CPU cores, see docs/zeroshot.md)")
    p.add_argument("--all-docs", action="store_true", help="score every document (hours on a CPU)")
    p.add_argument("--zs-batch-size", type=_positive_int, default=8, help="zero-shot rows per forward (default 8)")
    p.add_argument("--crepe-params", action="append", default=[], metavar="[PATTERN=]FILE",
                   help="CRePE coefficients from a PHO result (winner.params) for one pattern or all; repeatable")
    p.add_argument("--calib-samples", type=_positive_int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward (default 8)")
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
    from crepe.errors import CrepeError
    from crepe.io import sha256_file
    from crepe.jobs import load_params_file
    from crepe.types import parse_sparsity

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
    from crepe import zeroshot
    from crepe.errors import CrepeError
    from crepe.jobs import Budget, _provenance, build_config, calibrate, prune_loaded
    from crepe.models import load_model
    from crepe.scoring import get_scorer
    from flows.cli import _progress_factory

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if not methods or not patterns:
        raise CrepeError("--methods and --patterns need at least one entry each")
    names = zeroshot.parse_tasks(args.tasks)
    limit = None if args.all_docs else args.limit
    crepe_params = _crepe_params(args.crepe_params, patterns)
    configs = []
    for pattern in patterns:
        for method in methods:
            if method == "dense":
                continue
            params, origin = ({}, "-")
            if method == "crepe":
                origin = "documented defaults (docs/methods.md)"
                from crepe.types import parse_sparsity

                params, origin = crepe_params.get(parse_sparsity(pattern).label, (params, origin))
            configs.append((build_config(method, pattern, params), origin))
    zeroshot.resolve_sources(names, args.data_dir)  # a missing data file fails before any model work
    budget = Budget(calib_samples=args.calib_samples, seqlen=args.seqlen, batch_size=args.batch_size,
                    seed=args.seed, calib_source=args.calib_source, data_dir=args.data_dir)
    progress = _progress_factory(not args.no_progress)
    started = time.perf_counter()

    def evaluate(lm: Any) -> dict[str, Any]:
        return zeroshot.run_zero_shot(lm.model, lm.tokenizer, names, limit, args.zs_batch_size, args.data_dir,
                                      progress=progress)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    model_info = lm.info.as_dict()
    calibration = (calibrate(lm, budget)
                   if any(get_scorer(c.method).needs_activations for c, _ in configs) else None)
    rows: list[dict[str, Any]] = []
    if "dense" in methods:
        res = evaluate(lm)
        rows.append({"method": "dense", "pattern": "-", "sparsity": 0.0, "prune_s": 0.0, "params": {},
                     "params_from": "-", "zero_shot": res})
        print(f"[zeroshot] dense: avg acc {100 * (res['average_acc'] or math.nan):.2f} "
              f"({res['throughput']['run_seconds']:.0f} s)", flush=True)
    for config, origin in configs:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)  # fresh dense copy (cached: fast)
        report, _ = prune_loaded(lm, config, budget, None, progress, calibration)
        res = evaluate(lm)
        rows.append({"method": config.method, "pattern": config.sparsity.label, "sparsity": report.sparsity,
                     "nm_valid": report.nm_valid, "prune_s": report.seconds["total"],
                     "params": config.resolved_params(), "params_from": origin, "zero_shot": res})
        print(f"[zeroshot] {config.method} {config.sparsity.label}: avg acc {100 * (res['average_acc'] or math.nan):.2f} "
              f"(sparsity {report.sparsity:.4f}, prune {report.seconds['total']:.0f} s, "
              f"eval {res['throughput']['run_seconds']:.0f} s)", flush=True)
    return {
        "kind": "crepe-zeroshot-table",
        "model": model_info,
        "tasks": names,
        "limit": limit,
        "calibration": calibration[1] if calibration else None,
        "budget": budget.__dict__,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(sys.argv[1:]),
        **_provenance(),
    }


def _doc_row(name: str, t: dict[str, Any]) -> str:
    from crepe.zeroshot import LABELS, TASK_DATA

    src = t["source"]
    where = f"`{src['path']}` ({src['kind']}" + (f", sha256 {src['sha256'][:12]}...)" if src["sha256"] else ")")
    return (f"| {LABELS.get(name, name)} (`{name}`) | {t['n']} of {t['n_total']} | {TASK_DATA[name].split} | "
            f"{t['version']} | {where} | {CHANCE.get(name, '')} |")


def _findings(rows: list[dict[str, Any]], noise: float) -> str:
    """Per pattern: each pruned method's drop in average acc from dense, the best method, and whether the
    spread between methods exceeds ``noise`` (twice the standard error of the average, in points)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows if r["method"] != "dense"):
        pruned = [r for r in rows if r["pattern"] == pattern and r["zero_shot"]["average_acc"] is not None]
        if not pruned:
            continue
        acc = {r["method"]: 100 * r["zero_shot"]["average_acc"] for r in pruned}
        best = max(acc, key=acc.get)
        spread = max(acc.values()) - min(acc.values())
        drops = ""
        if dense is not None and dense["zero_shot"]["average_acc"] is not None:
            d = 100 * dense["zero_shot"]["average_acc"]
            drops = " (" + ", ".join(f"{m} {v - d:+.2f}" for m, v in acc.items()) + " points vs dense)"
        crepe = next((r.get("params") or {} for r in pruned if r["method"] == "crepe"), None)
        same = "ria" in acc and crepe is not None and (crepe.get("alpha"), crepe.get("beta"), crepe.get("gamma")) == (1, 1, 0)
        text = (f"- {pattern}: the highest average acc is {best} ({acc[best]:.2f}){drops}; the spread between methods "
                f"is {spread:.2f} points, {'above' if spread > noise else 'within'} the noise level of about "
                f"{noise:.1f} points.")
        if same:
            text += " CRePE is RIA here: its coefficients are the RIA point (α=β=1, γ=0), which PHO kept."
        lines.append(text)
    return "\n".join(lines)


def render(result: dict[str, Any], json_path: str) -> str:
    from crepe.zeroshot import format_zero_shot_comparison

    rows = result["rows"]
    first = rows[0]["zero_shot"]
    names = result["tasks"]
    norm_tasks = [n for n in names if first["tasks"][n]["acc_norm"] is not None]
    norm_rows = [{**r, "zero_shot": {**r["zero_shot"], "tasks": {n: r["zero_shot"]["tasks"][n] for n in norm_tasks}}}
                 for r in rows]
    model = result["model"]
    calib = result["calibration"] or {}
    limit = result["limit"]
    docs = "\n".join(_doc_row(n, first["tasks"][n]) for n in names)
    runs = "\n".join(
        f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['prune_s']:.1f} | "
        f"{r['zero_shot']['throughput']['run_seconds']:.0f} | {r['params_from']} |"
        for r in rows
    )
    n_min = min(first["tasks"][n]["n"] for n in names)
    se_task = 100 * 0.5 / math.sqrt(n_min)
    se_avg = se_task / math.sqrt(len(names))
    crepe_params = "; ".join(f"{r['pattern']}: {json.dumps(r['params'])}" for r in rows if r["method"] == "crepe") or "-"
    argv = result.get("command", " ".join(sys.argv[1:]))
    findings = _findings(rows, 2 * se_avg)
    command = f"`python -m flows.zeroshot_table {argv}`" if argv else "`make zeroshot` (`python -m flows.zeroshot_table`)"
    scope = "every document" if limit is None else f"the first {limit} documents of each task"
    return f"""# Zero-shot accuracy of pruned {model['spec']} (lm-eval {first['lm_eval_version']}, 0-shot)

Generated by {command} on {result['created_utc']} in {result['wall_seconds'] / 60:.0f} min; raw numbers in
`{json_path}`. Each cell is lm-eval's `acc` in percent on {scope}; `avg` is the unweighted mean over
the six tasks (the Wanda/RIA convention, spec §14.2).

## acc (%)

{format_zero_shot_comparison(rows, "acc")}

## acc_norm (%) (the tasks for which lm-eval defines it)

{format_zero_shot_comparison(norm_rows, "acc_norm")}

## Setup

- Model: `{model['spec']}` ({model['architecture']}, {model['n_params'] / 1e6:.1f}M parameters, {model['dtype']},
  content sha256 `{model['content_hash'][:16]}...`), evaluated in memory right after pruning (no save, no reload).
- Tasks: lm-eval's built-in task definitions (prompts, choices, metrics) from the installed lm-eval
  {first['lm_eval_version']}, with only the data source redirected to local copies of the official
  splits; 0-shot; `--limit` {limit if limit is not None else 'none'} takes the first documents in file order.
- Scoring: crepe's `LiveHFLM` (lm-eval's `HFLM` with each document's context scored once for all its
  choices, `packed_contexts={first['packed_contexts']}`); it equals stock `HFLM` up to float rounding.
  Rows per forward: {first['batch_size']}.
- Calibration (pruned rows): {calib.get('n_samples')} windows x {calib.get('seqlen')} tokens from
  {calib.get('source')} (`{calib.get('path')}`, sha256 `{str(calib.get('sha256'))[:16]}...`), seed {calib.get('seed')},
  the same windows for every method. Comparison groups: Wanda per output row, RIA and CRePE per layer.
- CRePE coefficients: {crepe_params}.
- Machine: {result['machine']['platform']}, {result['machine']['cpu_threads']} threads; torch
  {result['versions']['torch']}, transformers {result['versions']['transformers']}; crepe code
  `{result['code'].get('git_sha') or result['code']['source_sha256'][:16]}`.

| task | documents scored | split | lm-eval task version | data | chance / majority of the split (%) |
|---|---:|---|---:|---|---:|
{docs}

## Every run

| method | pattern | achieved sparsity | prune seconds | zero-shot seconds | CRePE coefficients from |
|---|---|---:|---:|---:|---|
{runs}

## What this shows (computed from the rows above)

{findings}

## Reading these numbers

- With {n_min} documents per task the standard error of one task's accuracy is up to
  {se_task:.1f} points (0.5 / sqrt(n)), and about {se_avg:.1f} points for the six-task average: differences
  between methods below roughly twice that are noise. `--all-docs` scores every document (hours on a CPU).
- Compare the pruned rows with this dense row, not with the papers' absolute numbers (spec §14.2:
  even the CRePE paper's dense LLaMA-2-7B row differs from standard `acc`).
- A {model['n_params'] / 1e6:.0f}M-parameter model is far from the 7B+ models of the papers: small models sit
  near chance on several of these tasks even dense (see the chance column), which compresses the
  differences between pruning methods.

""" + GUIDE


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from crepe.errors import CrepeError
    from crepe.io import write_json_atomic, write_text_atomic

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
    text = render(result, args.json)
    write_text_atomic(args.out, text)
    print(text.split("## Setup")[0])
    print(f"[zeroshot] wrote {args.out} and {Path(args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
