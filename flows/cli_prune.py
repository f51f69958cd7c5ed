"""``crepe prune``, ``crepe eval``, ``crepe demo``, ``crepe table`` and ``crepe methods``: thin doors into the
tasks. ``crepe prune`` is the pipeline's prune step (:func:`tasks.prune.prune_to_folder`) on the configuration
its flags describe, so it writes the same folder and manifest as ``crepe pipeline --until prune``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from crepe.allocation import ALLOCATORS
from crepe.errors import CrepeError
from crepe.io import write_json_atomic, write_text_atomic
from crepe.methods import all_methods
from crepe.refine import REFINES
from crepe.search.proxies import PROXY_NAMES
from crepe.search.samplers import SAMPLERS
from crepe.updates import UPDATES
from crepe.zeroshot import TASKS as ZERO_SHOT_TASKS
from flows.cli_args import (
    FLAG_KEYS,
    add_budget_args,
    add_config_args,
    add_method_args,
    add_model_args,
    add_refine_args,
    config_for,
    positive_int,
    progress_bars,
)
from tasks.common import provenance
from tasks.compare import format_table, render_results, run_compare
from tasks.evaluate import evaluate_folder
from tasks.inputs import resolve
from tasks.prune import check_out_dir, prune_to_folder
from tasks.steps import STEPS
from tasks.zeroshot import format_zero_shot_table

TABLE_PATTERNS = ["0.5", "2:4", "4:8"]
TABLE_METHODS = ["dense", "magnitude", "wanda", "ria", "crepe"]
DEMO_BUDGET = ["calibration.samples=32", "calibration.seqlen=256", "eval.ppl.seqlen=256", "eval.ppl.max_windows=32"]
TABLE_BUDGET = ["calibration.samples=32", "calibration.seqlen=256", "eval.ppl.seqlen=256", "eval.ppl.max_windows=64"]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a model and save it as a Hugging Face folder with a manifest",
                       description="Prune every weight matrix of the decoder blocks, then save the model, its "
                       "tokenizer and crepe_manifest.json to --out (the pipeline's prune step on the configuration "
                       "the flags describe: --params file, flags, then -S).")
    add_config_args(p, default=None)
    add_model_args(p)
    add_method_args(p)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--eval-split", choices=["test", "validation"], help="also measure perplexity before saving")
    add_refine_args(p)
    add_budget_args(p)

    p = sub.add_parser("eval", help="WikiText-2 perplexity or lm-eval zero-shot accuracy of a model or pruned folder",
                       description="Perplexity on non-overlapping windows of the WikiText-2 raw split; with "
                       "--zero-shot, 0-shot accuracy on lm-eval's tasks instead (reading local data files from "
                       "--data-dir when present, else the hub).")
    add_config_args(p, default=None)
    add_model_args(p)
    p.add_argument("--split", choices=["test", "validation"], help="perplexity split (default test; -S eval.ppl.split)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    g = p.add_argument_group("zero-shot (lm-eval)")
    g.add_argument("--zero-shot", metavar="TASKS",
                   help=f"comma-separated lm-eval tasks, or all: {', '.join(ZERO_SHOT_TASKS)}")
    g.add_argument("--limit", type=positive_int, help="score only the first N documents of each task (default: all)")
    g.add_argument("--zs-batch-size", type=positive_int, help="zero-shot rows per forward pass (default: --batch-size, "
                   "else eval.zero_shot.batch_size)")
    g.add_argument("--no-pack", action="store_true",
                   help="score every choice in its own row, as lm-eval's HFLM does (about 2x slower)")
    g.add_argument("--ppl", action="store_true", help="with --zero-shot, also measure perplexity")
    add_budget_args(p)

    p = sub.add_parser("demo", help="a short CPU demo: dense vs RIA vs CRePE at 2:4 on the embedded model",
                       description="Prunes the embedded SmolLM2 with RIA and CRePE at 2:4 and prints a table "
                       "(32 x 256 calibration tokens, 32 evaluation windows unless the flags say otherwise).")
    add_config_args(p, default=None)
    add_model_args(p)
    p.add_argument("--sparsity", default="2:4", help="pattern to compare (default 2:4)")
    p.add_argument("--json", default="runs/demo/results.json", help="where to write the results (default %(default)s)")
    add_budget_args(p)

    p = sub.add_parser("table", help="regenerate docs/results.md: dense/magnitude/wanda/ria/crepe at 50%%, 2:4, 4:8",
                       description="Runs every method at every pattern on the same data and writes a markdown report.")
    add_config_args(p, default=None)
    add_model_args(p)
    p.add_argument("--methods", default=",".join(TABLE_METHODS), help="comma-separated (default %(default)s)")
    p.add_argument("--patterns", default=",".join(TABLE_PATTERNS), help="comma-separated (default %(default)s)")
    p.add_argument("--out", default="docs/results.md", help="markdown report (default %(default)s)")
    p.add_argument("--json", default="docs/results.json", help="raw results (default %(default)s)")
    add_budget_args(p)

    p = sub.add_parser("methods", help="list every registry: methods, refinements, allocations, samplers, ...")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="print the registries as JSON")
    how.add_argument("--markdown", action="store_true", help="print them as the markdown tables of docs/methods.md")


def cmd_prune(args: argparse.Namespace) -> int:
    check_out_dir(args.out, args.overwrite)  # before anything is loaded
    cfg = config_for(args, fixed=["pho.enabled=false"])
    extras = "".join(f" + {x}" for x in (cfg.refine.method, cfg.allocation.method) if x != "none")
    extras += f" + update {cfg.prune.update}" if cfg.prune.update != "none" else ""
    print(f"[crepe] pruning {cfg.model.spec} with {cfg.prune.method}{extras} at {cfg.sparsity_spec().label} "
          f"-> {args.out}")
    inputs = resolve(cfg)
    result = prune_to_folder(cfg, inputs["model"], args.out, overwrite=args.overwrite, eval_split=args.eval_split,
                             progress=progress_bars(not args.no_progress))
    _print_prune(cfg, result["manifest"], result["timings"], args.out)
    return 0


def _print_prune(cfg: Any, manifest: dict[str, Any], timings: dict[str, Any], out: str) -> None:
    prune = manifest["prune"]
    if manifest["model"]["streamed"]:
        print(f"[crepe] streamed block by block: the weights do not fit under model.max_memory "
              f"({cfg.model.max_memory or 'the memory available'})")
    pattern = prune["config"]["pattern"]
    nm = "" if prune["nm_valid"] is None else f", every {pattern} group valid: {prune['nm_valid']}"
    calib = manifest["data"]["calibration"]
    if calib:
        print(f"[crepe] calibration: {calib['n_samples']} x {calib['seqlen']} tokens from {calib['source']} "
              f"(sha256 {calib['sha256'][:12]}...)")
    per_layer = [layer["sparsity"] for layer in prune["layers"]]
    kinds = ", ".join(f"{row['n_weights']} {kind} {row['sparsity']:.4f}" for kind, row in prune["by_kind"].items())
    print(f"[crepe] {prune['n_linears']} weight matrices pruned ({kinds}), overall sparsity "
          f"{prune['overall_sparsity']:.4f} (per layer {min(per_layer):.4f}..{max(per_layer):.4f}){nm}")
    if prune["skipped"]:
        reasons: dict[str, int] = {}
        for row in prune["skipped"]:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        print(f"[crepe] left dense: {len(prune['skipped'])} block weight matrices ("
              + "; ".join(f"{n} {why}" for why, n in reasons.items())
              + f"); sparsity over every block weight matrix {prune['all_block_weights']['sparsity']:.4f} "
              "(skipped: see the manifest)")
    starved = [row["name"] for row in prune["layers"] if row.get("info", {}).get("moe", {}).get("rule")]
    if starved:
        print(f"[crepe] {len(starved)} expert weight(s) got fewer than {cfg.prune.moe_min_tokens} routed tokens and "
              f"were calibrated by the {cfg.prune.moe_fallback} rule (recorded in the manifest)")
    if prune.get("block_sparsity"):
        ratios = prune["block_sparsity"]
        print(f"[crepe] {cfg.allocation.method} sparsity per block {min(ratios):.4f}..{max(ratios):.4f}")
    if prune.get("update_summary"):
        print(f"[crepe] update {cfg.prune.update}: {json.dumps(prune['update_summary'])}")
    if prune.get("refine_summary"):
        print(f"[crepe] {cfg.refine.method}: {json.dumps(prune['refine_summary'])}")
    if prune.get("damping_retries"):
        layers = sorted({r["layer"] for r in prune["damping_retries"]})
        print(f"[crepe] warning: SparseGPT retried the Cholesky factorisation with more damping on {len(layers)} "
              f"layer(s) ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}); see damping_retries in the "
              "manifest")
    if "evaluation" in manifest:
        ev = manifest["evaluation"]
        print(f"[crepe] {ev['split']} perplexity {ev['ppl']:.4f} ({_ci_text(ev)}{ev['n_windows']} windows x "
              f"{ev['seqlen']})")
    print(f"[crepe] took {timings['total']:.1f} s (load {timings['load']:.1f} s)")
    print(f"[crepe] saved {out} (manifest: {Path(out) / 'crepe_manifest.json'})")


def _ci_text(ev: dict[str, Any]) -> str:
    """``"95% CI lo-hi over "`` for a perplexity record with a bootstrap CI, else ``""`` (one window)."""
    ci = ev.get("ci95")
    return f"95% CI {ci[0]:.4f}-{ci[1]:.4f} over " if ci else ""


def cmd_eval(args: argparse.Namespace) -> int:
    flags: dict[str, str] = {}
    if args.split:
        flags[f"eval.ppl.split={args.split}"] = f"--split {args.split}"
    if args.zero_shot is None:
        for flag, value in (("--limit", args.limit), ("--zs-batch-size", args.zs_batch_size), ("--ppl", args.ppl),
                            ("--no-pack", args.no_pack)):
            if value:
                raise CrepeError(f"{flag} applies to zero-shot evaluation; add --zero-shot TASKS (e.g. --zero-shot all)")
    else:
        names = list(ZERO_SHOT_TASKS) if args.zero_shot.strip() == "all" else \
            [t.strip() for t in args.zero_shot.split(",") if t.strip()]
        flags[f"eval.zero_shot.tasks={json.dumps(names)}"] = f"--zero-shot {args.zero_shot}"
        if args.limit is not None:
            flags[f"eval.zero_shot.limit={args.limit}"] = f"--limit {args.limit}"
        zs_batch = args.zs_batch_size if args.zs_batch_size is not None else args.batch_size
        if zs_batch is not None:  # --batch-size stands for both when --zs-batch-size is not given
            flags[f"eval.zero_shot.batch_size={zs_batch}"] = f"--zs-batch-size {zs_batch}"
    cfg = config_for(args, fixed=["pho.enabled=false", *flags], more_flags=flags)
    zero_shot = args.zero_shot is not None
    result = evaluate_folder(cfg, cfg.model.spec, ppl=not zero_shot or args.ppl, zero_shot=zero_shot,
                             progress=progress_bars(not args.no_progress), pack=not args.no_pack)
    out: dict[str, Any] = {"model": result["model"]}
    if zero_shot:
        zs = out["zero_shot"] = result["zero_shot"]
        sources = " and ".join(sorted({t["source"]["kind"] for t in zs["tasks"].values()}))
        scope = "all documents" if zs["limit"] is None else f"the first {zs['limit']} documents of each task"
        print(f"[crepe] zero-shot (0 shots, lm-eval {zs['lm_eval_version']}, {sources} data), {scope}:")
        print(format_zero_shot_table(zs))
    if "ppl" in result:
        ppl = out["perplexity"] = result["ppl"]
        print(f"[crepe] data: {ppl['data']['source']} {ppl['split']} (sha256 {ppl['data']['sha256'][:12]}...)")
        print(f"perplexity {ppl['ppl']:.4f}  ({_ci_text(ppl)}{ppl['n_windows']} of {ppl['n_windows_available']} "
              f"windows x {ppl['seqlen']} tokens)")
    if args.json:
        write_json_atomic(args.json, {**out, **provenance()})
    return 0


def _compare(args: argparse.Namespace, methods: list[str], patterns: list[str], budget: list[str]) -> dict[str, Any]:
    """Dense and every (method, pattern) on one model and one budget: ``budget`` (the command's small
    defaults) applies to each key whose flag was not given."""
    given = {key for attr, keys in FLAG_KEYS.items() if getattr(args, attr, None) is not None for key in keys}
    defaults = [o for o in budget if o.split("=", 1)[0] not in given]
    base = config_for(args, fixed=["pho.enabled=false", *defaults])
    variants = [config_for(args, fixed=["pho.enabled=false", *defaults, f"prune.method={m}",
                                        f"prune.sparsity={json.dumps(p)}"])
                for p in patterns for m in methods if m != "dense"]
    return run_compare(base, variants, "dense" in methods, progress_bars(not args.no_progress))


def cmd_demo(args: argparse.Namespace) -> int:
    result = _compare(args, ["dense", "ria", "crepe"], [args.sparsity], DEMO_BUDGET)
    print()
    print(format_table(result["rows"], [args.sparsity]))
    ev, calib = result["evaluation"], result["calibration"] or {}
    print(f"\nWikiText-2 test perplexity, first {ev['max_windows']} windows of {ev['seqlen']} tokens; "
          f"calibration {calib.get('n_samples')} x {calib.get('seqlen')} tokens ({calib.get('source')}).")
    write_json_atomic(args.json, result)
    print(f"[crepe] results written to {args.json}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    result = _compare(args, methods, patterns, TABLE_BUDGET)
    table = format_table(result["rows"], patterns)
    print(table)
    command = " ".join(["crepe", *sys.argv[2:]]) if sys.argv[1:2] == ["table"] else "crepe table"
    write_text_atomic(args.out, render_results(result, table, command, args.json))
    write_json_atomic(args.json, result)
    print(f"[crepe] wrote {args.out} and {args.json}")
    return 0


REGISTRIES = {"weight updates (--update, prune.update)": UPDATES,
              "refinements (--refine, refine.method)": REFINES,
              "allocations (--allocation, allocation.method; unstructured only)": ALLOCATORS,
              "samplers (pho.sampler)": SAMPLERS, "proxies (crepe proxy-study)": PROXY_NAMES,
              "zero-shot tasks (eval.zero_shot.tasks, --zero-shot)": ZERO_SHOT_TASKS,
              "pipeline steps (crepe pipeline --until)": STEPS}


def registries() -> dict[str, list[dict[str, Any]]]:
    """Every registry as JSON-clean rows: the methods (scorers and updates) first."""
    methods = [{"name": n, "kind": getattr(m, "kind", "score"), "group": m.default_group,
                "calibration": m.needs_activations, "defaults": dict(m.defaults), "doc": m.doc}
               for n, m in all_methods().items()]
    return {"methods (--method, prune.method)": methods, **{k: r.rows() for k, r in REGISTRIES.items()}}


def registries_markdown() -> str:
    """One markdown table per registry (the "Registries" section of docs/methods.md)."""
    out = []
    for title, rows in registries().items():
        out += [f"**{title}**", "", "| name | applies to | defaults | what |", "|---|---|---|---|"]
        for row in rows:
            scope = (f"group {row['group']}, {'calibrated' if row['calibration'] else 'no calibration'}"
                     if "group" in row else {"any": "any pattern", "nm": "N:M only",
                                             "unstructured": "unstructured only"}[row["patterns"]])
            defaults = ", ".join(f"`{k}={v}`" for k, v in row["defaults"].items()) or "-"
            out.append(f"| `{row['name']}` | {scope} | {defaults} | {row['doc'].replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def cmd_methods(args: argparse.Namespace) -> int:
    tables = registries()
    if args.json:
        print(json.dumps(tables, indent=2, default=str))
        return 0
    if args.markdown:
        sys.stdout.write(registries_markdown())
        return 0
    for title, rows in tables.items():
        print(f"{title}:")
        for row in rows:
            params = ", ".join(f"{k}={v}" for k, v in row["defaults"].items()) or "-"
            extra = (f" group={row['group']:5s} {'needs calibration' if row['calibration'] else 'no calibration':17s}"
                     if "group" in row else f" patterns={row['patterns']}")
            print(f"  {row['name']:16s}{extra} params: {params}\n  {'':16s}{row['doc']}")
        print()
    return 0
