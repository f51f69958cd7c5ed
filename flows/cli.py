"""The ``crepe`` command line: prune, eval, search, hill-climb, proxy-study, demo, table, methods,
config, prepare, verify, ui.

User errors print one sentence to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_BUDGET = {"calib_samples": 32, "seqlen": 256, "max_windows": 32}
TABLE_BUDGET = {"calib_samples": 32, "seqlen": 256, "max_windows": 64}
TABLE_PATTERNS = ["0.5", "2:4", "4:8"]
TABLE_METHODS = ["dense", "magnitude", "wanda", "ria", "crepe"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one sentence, exit 2 (argparse's own convention)
        self.print_usage(sys.stderr)
        sys.stderr.write(f"crepe: error: {message}\n")
        raise SystemExit(2)


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, ">= 0")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _memory_size(text: str) -> int:
    from crepe.errors import CrepeError
    from crepe.shards import parse_size

    try:
        return parse_size(text)
    except CrepeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_max_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=_memory_size, metavar="SIZE",
                   help="host memory the model may use, e.g. 3GB or 512MiB (default: what is available); a model "
                   "whose weights do not fit is streamed from its shards one decoder block at a time")


def _progress_factory(enabled: bool) -> Callable[[str, int, int], None] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="blk" if stage == "prune" else "win",
                                     file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(stage, None)

    return update


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    from crepe.models import DEFAULT_MODEL

    p.add_argument("--model", default=default_model or DEFAULT_MODEL,
                   help="embedded:smollm2-135m (default), embedded:gemma3-270m, a hub id or a local folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def _add_budget_args(p: argparse.ArgumentParser, calib: int, seqlen: int, windows: int | None) -> None:
    g = p.add_argument_group("data budget")
    g.add_argument("--calib-samples", type=_positive_int, default=calib, help=f"calibration windows (default {calib})")
    g.add_argument("--seqlen", type=_positive_int, default=seqlen, help=f"tokens per window (default {seqlen})")
    g.add_argument("--max-windows", type=_positive_int, default=windows,
                   help="evaluate only the first N perplexity windows (default: %(default)s = all)")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward pass (default 8)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=4,
                   help="perplexity windows per forward pass (default 4; each holds seqlen x vocab logits)")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="calibration sampling seed (default 0)")
    g.add_argument("--calib-source", default="auto", help="auto, c4, c4-local, c4-hub or pydoc")
    g.add_argument("--eval-source", default="auto", help="auto, wikitext2, wikitext2-local, wikitext2-hub or pydoc")
    g.add_argument("--data-dir", default=None, help="local data folder (default: $CREPE_DATA_DIR, else ../shared/data)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method parameters (CRePE/RIA)")
    g.add_argument("--alpha", type=_float, help="CRePE row-term coefficient")
    g.add_argument("--beta", type=_float, help="CRePE column-term coefficient")
    g.add_argument("--gamma", type=_float, help="CRePE neighbourhood-term coefficient")
    g.add_argument("--kernel-size", type=int, help="CRePE neighbourhood window K (odd, default 9)")
    g.add_argument("--a", type=_float, dest="act_exponent", help="activation-norm exponent (RIA/CRePE, default 0.5)")
    g.add_argument("--params-from", help="JSON file with coefficients (e.g. a search result); flags override it")
    g.add_argument("--group", choices=["row", "layer"], help="unstructured comparison group (default: the method's own)")
    g.add_argument("--rule", choices=["exact", "threshold"], default="exact",
                   help="per-layer selection: exact counts (default) or the official <= threshold rule")


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it can be (numbers, true/false, null), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip().replace("-", "_"), value


def _add_refine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refinement and layer-wise allocation")
    g.add_argument("--refine", choices=["cp", "lsa", "dsnot", "r2-dsnot"],
                   help="cp/lsa: channel permutation (N:M only); dsnot/r2-dsnot: prune-and-grow from the method's mask")
    g.add_argument("--refine-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="refinement parameter, repeatable (e.g. skip_layer=mlp, max_cycle_time=50, reweight=prune)")
    g.add_argument("--allocation", choices=["owl", "alpha", "dlp"],
                   help="non-uniform per-block sparsity whose mean is --sparsity (unstructured only)")
    g.add_argument("--allocation-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="allocation parameter, repeatable (e.g. lambda=0.08, m=5)")
    w = p.add_argument_group("which weights (matched against full names such as model.layers.0.mlp.experts.down_proj[3])")
    w.add_argument("--targets", metavar="REGEX", help="prune only the block weights whose name matches (default: all)")
    w.add_argument("--ignore", metavar="REGEX", help="leave the block weights whose name matches dense (listed in the report)")
    w.add_argument("--prune-router", action="store_true", help="also prune MoE router/gate weights (default: left dense)")
    w.add_argument("--moe-min-tokens", type=_nonneg_int, default=16,
                   help="an expert routed fewer calibration tokens follows --moe-fallback (default 16)")
    w.add_argument("--moe-fallback", choices=["all-tokens", "magnitude"], default="all-tokens",
                   help="all-tokens: calibrate a starved expert on every token; magnitude: score it by |W| (default all-tokens)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crepe", description="Post-training pruning of LLMs with CRePE and baselines.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model and save it as a Hugging Face folder with a manifest",
                       description="Prune every linear layer of the decoder blocks, then save the model, "
                       "its tokenizer and crepe_manifest.json to --out.")
    _add_model_args(p)
    p.add_argument("--method", required=True, help="magnitude, wanda, ria, crepe or sparsegpt (see `crepe methods`)")
    p.add_argument("--sparsity", required=True, help="a fraction in [0, 1) such as 0.5, or N:M such as 2:4 or 4:8")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--blocks", help="dotted path of the decoder block list, when auto-detection fails")
    p.add_argument("--eval-split", choices=["test", "validation"], help="also measure perplexity before saving")
    _add_max_memory(p)
    _add_method_args(p)
    _add_refine_args(p)
    _add_budget_args(p, calib=128, seqlen=2048, windows=None)

    p = sub.add_parser("eval", help="WikiText-2 perplexity or lm-eval zero-shot accuracy of a model or pruned folder",
                       description="Perplexity on non-overlapping windows of the WikiText-2 raw split; with "
                       "--zero-shot, 0-shot accuracy on lm-eval's built-in tasks instead (reading local data "
                       "files from --data-dir when present, else the hub).")
    _add_model_args(p)
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--json", help="also write the result as JSON to this file")
    _add_max_memory(p)
    g = p.add_argument_group("zero-shot (lm-eval)")
    g.add_argument("--zero-shot", metavar="TASKS",
                   help="comma-separated lm-eval tasks, or all: boolq, rte, mnli, hellaswag, arc_easy, arc_challenge")
    g.add_argument("--limit", type=_positive_int, help="score only the first N documents of each task (default: all)")
    g.add_argument("--zs-batch-size", type=_positive_int,
                   help="zero-shot rows per forward pass (default: --batch-size)")
    g.add_argument("--no-pack", action="store_true",
                   help="score every choice in its own row, bit-identical to lm-eval's HFLM (about 2x slower)")
    g.add_argument("--ppl", action="store_true", help="with --zero-shot, also measure perplexity")
    _add_budget_args(p, calib=128, seqlen=2048, windows=None)

    p = sub.add_parser("demo", help="a short CPU demo: dense vs RIA vs CRePE at 2:4 on the embedded model",
                       description="Prunes the embedded SmolLM2 with RIA and CRePE at 2:4 and prints a table.")
    _add_model_args(p)
    p.add_argument("--sparsity", default="2:4", help="pattern to compare (default 2:4)")
    p.add_argument("--json", default="runs/demo/results.json", help="where to write the results (default %(default)s)")
    _add_budget_args(p, calib=DEMO_BUDGET["calib_samples"], seqlen=DEMO_BUDGET["seqlen"], windows=DEMO_BUDGET["max_windows"])

    p = sub.add_parser("table", help="regenerate docs/results.md: dense/magnitude/wanda/ria/crepe at 50%%, 2:4, 4:8",
                       description="Runs every method at every pattern on the same data and writes a markdown report.")
    _add_model_args(p)
    p.add_argument("--methods", default=",".join(TABLE_METHODS), help="comma-separated (default %(default)s)")
    p.add_argument("--patterns", default=",".join(TABLE_PATTERNS), help="comma-separated (default %(default)s)")
    p.add_argument("--out", default="docs/results.md", help="markdown report (default %(default)s)")
    p.add_argument("--json", default="docs/results.json", help="raw results (default %(default)s)")
    _add_budget_args(p, calib=TABLE_BUDGET["calib_samples"], seqlen=TABLE_BUDGET["seqlen"], windows=TABLE_BUDGET["max_windows"])

    sub.add_parser("methods", help="list the pruning methods and their default parameters")
    _add_search_parsers(sub)
    _add_config_parser(sub)
    _add_prepare_parser(sub)
    _add_verify_parser(sub)
    _add_ui_parser(sub)
    _add_pipeline_parsers(sub)
    return parser


# --- crepe config / crepe verify (issue 4: params.yaml and releases) ------------------------------------


def _add_config_parser(sub: Any) -> None:
    from flows.config import add_config_args

    p = sub.add_parser("config", help="validate params.yaml (+ -S overrides) and print the resolved configuration",
                       description="Validate the pipeline parameters and print every resolved value as YAML.")
    add_config_args(p)
    p.add_argument("--out", help="also write the resolved YAML to this file")
    p.add_argument("--hashes", action="store_true", help="print each section's sha256 (the cache keys) instead")


def cmd_config(args: argparse.Namespace) -> int:
    from flows.config import config_from_args

    cfg = config_from_args(args)
    if args.hashes:
        for name, digest in cfg.section_hashes().items():
            print(f"{name:12s} {digest}")
        print(f"{'(all)':12s} {cfg.config_hash()}")
    else:
        sys.stdout.write(cfg.dump_yaml())
    if args.out:
        cfg.write_resolved(args.out)
    return 0


def _add_prepare_parser(sub: Any) -> None:
    from flows.config import add_config_args

    p = sub.add_parser("prepare", help="resolve the model and data of params.yaml and record their hashes",
                       description="Write OUT/inputs.json: the base model's content hash and the sha256 of the "
                       "calibration and evaluation data the configuration selects (the DVC 'prepare' stage).")
    add_config_args(p)
    p.add_argument("--out", default="data/prepared", help="output folder (default %(default)s)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from flows.config import config_from_args
    from tasks.prepare import write_inputs

    cfg = config_from_args(args)
    path = write_inputs(cfg, args.out)
    print(f"[crepe] model {cfg.model.spec} and data recorded in {path}")
    return 0


def _add_verify_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help="check a release folder: file hashes, per-layer sparsity, a quick perplexity",
                       description="Recompute the sha256 of every file in the manifest, re-count the zeros of every "
                       "pruned layer (and N:M groups) and re-run the smoke-test perplexity. Exit 0 when all pass, "
                       "2 with one sentence otherwise. Also accepts a `crepe prune` output folder.")
    p.add_argument("dir", help="the release folder (holding crepe_release.json)")
    p.add_argument("--no-ppl", action="store_true", help="skip the smoke-test perplexity")
    p.add_argument("--rtol", type=_float, default=0.01,
                   help="allowed relative perplexity difference on the same data (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $CREPE_DATA_DIR, else ../shared/data)")
    p.add_argument("--json", help="also write the report (with per-layer sparsity) to this file")
    _add_max_memory(p)


def cmd_verify(args: argparse.Namespace) -> int:
    from crepe.io import write_json_atomic
    from crepe.release import verify_release

    report = verify_release(args.dir, quick_ppl=not args.no_ppl, ppl_rtol=args.rtol, device=args.device,
                            data_dir=args.data_dir, max_memory=args.max_memory)
    nm = f", every {report['pattern']} group valid" if report["pattern"] else ""
    print(f"[crepe] {report['files_checked']} files match {report['manifest']}")
    print(f"[crepe] {report['layers_checked']} pruned layers match, overall sparsity {report['overall_sparsity']:.4f}{nm}")
    ppl = report["ppl"]
    if ppl is not None:
        how = (f"within {args.rtol:.0%} of the recorded {ppl['recorded']:.4f}" if ppl["compared"]
               else f"finite; not compared: {ppl['reason']}")
        print(f"[crepe] smoke-test perplexity {ppl['ppl']:.4f} ({ppl['split']}, {ppl['max_windows']} x {ppl['seqlen']}"
              f" tokens): {how}")
    if args.json:
        write_json_atomic(args.json, report)
    print(f"[crepe] verified {args.dir}")
    return 0




def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port between 1 and 65535")
    return value


def _add_ui_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ui", help="open the MLflow UI of this project's runs on http://127.0.0.1 (localhost only)",
        description="Runs `mlflow ui` on the project's tracking store, bound to 127.0.0.1 so it is reachable "
        "from this machine only (use an SSH tunnel from elsewhere). Stop it with Ctrl-C.")
    p.add_argument("--uri", help="tracking URI (default: sqlite:///<project>/mlflow.db, the pipeline's default)")
    p.add_argument("--project", default=".", help="project folder holding mlflow.db and mlartifacts/ (default: .)")
    p.add_argument("--port", type=_port, default=5000, help="local port (default %(default)s)")


def cmd_ui(args: argparse.Namespace) -> int:
    import socket
    import subprocess

    from crepe.errors import CrepeError
    from tasks.tracking import Tracker, ui_command

    tracker = Tracker(args.uri, args.project)
    if tracker.remote:
        print(f"[crepe] {tracker.uri} is a tracking server: it serves the MLflow UI itself; open it in a browser")
        return 0
    if tracker.sqlite_path is not None and not tracker.sqlite_path.exists():
        print(f"[crepe] {tracker.sqlite_path} does not exist yet: no run has been tracked in this project")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError:
            raise CrepeError(f"port {args.port} on 127.0.0.1 is in use; pick another with --port") from None
    cmd = ui_command(tracker.uri, args.port, tracker.artifact_root)
    print(f"[crepe] MLflow UI for {tracker.uri}: http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # mlflow ui starts uvicorn as a grandchild: run it in its own process group and stop the whole
    # group on Ctrl-C or SIGTERM, so no server is left behind listening on the port.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def _stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(proc)


def _stop_group(proc: Any) -> None:
    import subprocess

    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _bounds(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (two numbers separated by a comma)")
    return (_float(parts[0]), _float(parts[1]))


def _add_search_common(p: argparse.ArgumentParser, out: str) -> None:
    _add_model_args(p)
    p.add_argument("--sparsity", required=True, help="a fraction in [0, 1) such as 0.5, or N:M such as 2:4 or 4:8")
    p.add_argument("--out", default=out, help="output folder; rerunning the same command there resumes (default %(default)s)")
    p.add_argument("--rule", choices=["exact", "threshold"], default="exact",
                   help="per-layer selection rule of the prune and the proxy (default exact)")
    p.add_argument("--blocks", help="dotted path of the decoder block list, when auto-detection fails")
    g = p.add_argument_group("search space (alpha, beta linear; gamma on a log10 scale)")
    g.add_argument("--alpha-bounds", type=_bounds, default=(0.0, 2.0), metavar="LO,HI", help="default 0,2")
    g.add_argument("--beta-bounds", type=_bounds, default=(0.0, 2.0), metavar="LO,HI", help="default 0,2")
    g.add_argument("--log10-gamma-bounds", type=_bounds, default=(-5.0, 0.0), metavar="LO,HI", help="default -5,0")
    g.add_argument("--kernel-size", type=int, default=9, help="fixed neighbourhood window K (default 9)")
    _add_budget_args(p, calib=128, seqlen=2048, windows=None)


def _add_search_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "search", help="PHO: find CRePE's alpha, beta, gamma by proxy screening + validation-PPL verification",
        description="Stage 1 scores --trials candidates by gini_pruned of one module (block 0's q_proj by "
        "default); stage 2 fully prunes the --top-k best plus the RIA point and keeps the lowest WikiText-2 "
        "validation perplexity; the winner is then reported on the test split. Writes pho.json, state.json "
        "and plots to --out; rerun the same command to resume after an interruption.")
    _add_search_common(p, "runs/search")
    p.add_argument("--sampler", default="cmaes", help="cmaes (default), tpe or random")
    p.add_argument("--trials", type=int, default=60, help="stage-1 proxy evaluations (default 60)")
    p.add_argument("--top-k", type=int, default=10, help="candidates verified by perplexity in stage 2 (default 10)")
    p.add_argument("--sigma", type=_float, default=0.25, help="CMA-ES initial step in unit-cube coordinates (default 0.25)")
    p.add_argument("--search-kernel", action="store_true", help="also search K in {3, 5, 7, 9, 11}")
    p.add_argument("--target-module", default="self_attn.q_proj", help="proxy module inside a block (default %(default)s)")
    p.add_argument("--target-block", type=_nonneg_int, default=0, help="proxy block index (default 0)")
    p.add_argument("--search-seed", type=_nonneg_int, default=None,
                   help="sampler seed (default: --seed, which also seeds the calibration sampling)")
    p.add_argument("--skip-test", action="store_true", help="do not report the winner's test perplexity")

    p = sub.add_parser(
        "hill-climb", help="the slow baseline: coordinate search on validation perplexity from the RIA point",
        description="Coordinate hill climbing over (alpha, beta, log10 gamma) with a shrinking step, every "
        "point scored by a full prune and WikiText-2 validation perplexity; the best point is reported on "
        "the test split. Resumable like search.")
    _add_search_common(p, "runs/hill-climb")
    p.add_argument("--max-evals", type=_positive_int, default=None, help="stop after N evaluations (default 30 "
                   "unless --max-seconds is given)")
    p.add_argument("--max-seconds", type=_float, default=None, help="stop after this much evaluation time")
    p.add_argument("--skip-test", action="store_true", help="do not report the best point's test perplexity")

    p = sub.add_parser(
        "proxy-study", help="how well each proxy predicts perplexity on this model (the paper's Table 2)",
        description="Samples --configs seeded configurations, computes every proxy and the validation "
        "perplexity of each, and reports Spearman's rho per proxy with one scatter plot each.")
    _add_search_common(p, "runs/proxy-study")
    p.add_argument("--configs", type=int, default=32, help="configurations to sample (default 32)")
    p.add_argument("--target-module", default="self_attn.q_proj", help="proxy module inside a block (default %(default)s)")
    p.add_argument("--target-block", type=_nonneg_int, default=0, help="proxy block index (default 0)")


def _budget(args: argparse.Namespace) -> Any:
    from crepe.jobs import Budget

    return Budget(
        calib_samples=args.calib_samples, seqlen=args.seqlen, max_windows=args.max_windows,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, seed=args.seed, calib_source=args.calib_source,
        eval_source=args.eval_source, data_dir=args.data_dir,
    )


def _method_params(args: argparse.Namespace) -> dict[str, Any]:
    from crepe.jobs import load_params_file

    params: dict[str, Any] = load_params_file(args.params_from, args.method) if args.params_from else {}
    flags = {"alpha": args.alpha, "beta": args.beta, "gamma": args.gamma,
             "kernel_size": args.kernel_size, "a": args.act_exponent}
    for key, value in flags.items():
        if value is not None:
            params[key] = value
    return params


def cmd_prune(args: argparse.Namespace) -> int:
    from crepe.jobs import build_config, run_prune

    config = build_config(args.method, args.sparsity, _method_params(args), args.group, args.rule,
                          refine=args.refine, refine_params=dict(args.refine_param),
                          allocation=args.allocation, allocation_params=dict(args.allocation_param),
                          targets=args.targets, ignore=args.ignore, prune_router=args.prune_router,
                          moe_min_tokens=args.moe_min_tokens, moe_fallback=args.moe_fallback)
    budget = _budget(args)
    extras = "".join(f" + {x}" for x in (config.refine, config.allocation) if x)
    print(f"[crepe] pruning {args.model} with {args.method}{extras} at {config.sparsity.label} -> {args.out}")
    manifest = run_prune(args.model, config, args.out, budget, args.dtype, args.device, args.blocks,
                         args.overwrite, args.eval_split, _progress_factory(not args.no_progress),
                         max_memory=args.max_memory)
    streamed = manifest["model"]["extra"].get("streamed")
    if streamed:
        print(f"[crepe] streamed block by block: {streamed['weights_bytes'] / 1e9:.2f} GB of weights > --max-memory "
              f"{streamed['max_memory'] / 1e9:.2f} GB")
    prune = manifest["prune"]
    nm = "" if prune["nm_valid"] is None else f", every {config.sparsity.pattern} group valid: {prune['nm_valid']}"
    calib = manifest["data"]["calibration"]
    if calib:
        print(f"[crepe] calibration: {calib['n_samples']} x {calib['seqlen']} tokens from {calib['source']} "
              f"({calib['path']}, sha256 {calib['sha256'][:12]}...)")
    per_layer = [layer["sparsity"] for layer in prune["layers"]]
    kinds = ", ".join(f"{row['n_weights']} {kind} {row['sparsity']:.4f}" for kind, row in prune["by_kind"].items())
    print(f"[crepe] {prune['n_linears']} weight matrices pruned ({kinds}), overall sparsity "
          f"{prune['overall_sparsity']:.4f} (per layer {min(per_layer):.4f}..{max(per_layer):.4f}){nm}")
    whole = prune["all_block_weights"]
    if prune["skipped"]:
        reasons: dict[str, int] = {}
        for row in prune["skipped"]:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        print(f"[crepe] left dense: {len(prune['skipped'])} block weight matrices ("
              + "; ".join(f"{n} {why}" for why, n in reasons.items())
              + f"); sparsity over every block weight matrix {whole['sparsity']:.4f} (skipped: see the manifest)")
    starved = [(n, i["moe"]) for n, i in ((row["name"], row.get("info", {})) for row in prune["layers"])
               if i.get("moe", {}).get("rule")]
    if starved:
        print(f"[crepe] {len(starved)} expert weight(s) got fewer than {config.moe_min_tokens} routed tokens and "
              f"were calibrated by the {config.moe_fallback} rule (recorded in the manifest)")
    if prune.get("block_sparsity"):
        ratios = prune["block_sparsity"]
        print(f"[crepe] {config.allocation or 'per-block'} sparsity per block {min(ratios):.4f}..{max(ratios):.4f}")
    if prune.get("refine_summary"):
        print(f"[crepe] {config.refine}: {json.dumps(prune['refine_summary'])}")
    if prune.get("damping_retries"):
        layers = sorted({r["layer"] for r in prune["damping_retries"]})
        print(f"[crepe] warning: SparseGPT retried the Cholesky factorisation with more damping on {len(layers)} "
              f"layer(s) ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}); see damping_retries in the manifest")
    if "evaluation" in manifest:
        ev = manifest["evaluation"]
        print(f"[crepe] {ev['split']} perplexity {ev['ppl']:.4f} ({ev['n_windows']} windows x {ev['seqlen']})")
    print(f"[crepe] saved {args.out} (manifest: {Path(args.out) / 'crepe_manifest.json'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crepe.errors import CrepeError
    from crepe.io import write_json_atomic
    from crepe.jobs import run_eval, run_zero_shot_job

    budget = _budget(args)
    progress = _progress_factory(not args.no_progress)
    if args.zero_shot is None:
        for flag, value in (("--limit", args.limit), ("--zs-batch-size", args.zs_batch_size), ("--ppl", args.ppl),
                            ("--no-pack", args.no_pack)):
            if value:
                raise CrepeError(f"{flag} applies to zero-shot evaluation; add --zero-shot TASKS (e.g. --zero-shot all)")
        result = run_eval(args.model, budget, args.split, args.dtype, args.device, progress, max_memory=args.max_memory)
    else:
        from crepe.zeroshot import format_zero_shot_table

        result = run_zero_shot_job(args.model, args.zero_shot, args.limit, args.zs_batch_size or args.batch_size,
                                   budget if args.ppl else None, args.split, args.dtype, args.device, progress,
                                   data_dir=args.data_dir, pack=not args.no_pack, max_memory=args.max_memory)
        zs = result["zero_shot"]
        sources = " and ".join(sorted({t["source"]["kind"] for t in zs["tasks"].values()}))
        scope = "all documents" if zs["limit"] is None else f"the first {zs['limit']} documents of each task"
        print(f"[crepe] zero-shot (0 shots, lm-eval {zs['lm_eval_version']}, {sources} data), {scope}:")
        print(format_zero_shot_table(zs))
    if "perplexity" in result:
        ppl = result["perplexity"]
        print(f"[crepe] data: {ppl['data']['source']} {args.split} ({ppl['data']['path']})")
        print(f"perplexity {ppl['ppl']:.4f}  ({ppl['n_windows']} of {ppl['n_windows_available']} windows x {ppl['seqlen']} tokens)")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _compare(args: argparse.Namespace, methods: list[str], patterns: list[str]) -> dict[str, Any]:
    from crepe.jobs import run_compare

    return run_compare(args.model, methods, patterns, _budget(args), None, args.dtype, args.device,
                       "test", _progress_factory(not args.no_progress))


def cmd_demo(args: argparse.Namespace) -> int:
    from crepe.io import write_json_atomic
    from crepe.jobs import format_table

    result = _compare(args, ["dense", "ria", "crepe"], [args.sparsity])
    print()
    print(format_table(result["rows"], [args.sparsity]))
    print(f"\nWikiText-2 test perplexity, first {args.max_windows} windows of {args.seqlen} tokens; "
          f"calibration {args.calib_samples} x {args.seqlen} tokens ({(result['calibration'] or {}).get('source')}).")
    write_json_atomic(args.json, result)
    print(f"[crepe] results written to {args.json}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from crepe.io import write_json_atomic, write_text_atomic
    from crepe.jobs import format_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    result = _compare(args, methods, patterns)
    table = format_table(result["rows"], patterns)
    print(table)
    write_text_atomic(args.out, render_results(result, table, args))
    write_json_atomic(args.json, result)
    print(f"[crepe] wrote {args.out} and {args.json}")
    return 0


def render_results(result: dict[str, Any], table: str, args: argparse.Namespace) -> str:
    calib = result["calibration"] or {}
    ev = result["evaluation"]
    rows = result["rows"]
    crepe_params = next((r["params"] for r in rows if r["method"] == "crepe"), {})
    times = "\n".join(
        f"| {r['method']} | {r['pattern']} | {r['ppl']:.3f} | {r['sparsity']:.4f} | {r['prune_s']:.1f} |" for r in rows
    )
    cmd = " ".join(["crepe", *sys.argv[2:]]) if sys.argv[1:2] == ["table"] else "crepe table"
    return f"""# Results: WikiText-2 perplexity of pruned {result['model']['spec']}

Generated by `{cmd}` (`make table`) on {result['created_utc']}; raw numbers in `{args.json}`.

{table}

## Budget (CPU-sized, not the paper's protocol)
- Model: `{result['model']['spec']}` ({result['model']['architecture']}, {result['model']['n_params'] / 1e6:.1f}M
  parameters, {result['model']['dtype']}, content sha256 `{result['model']['content_hash'][:16]}...`).
- Calibration: {calib.get('n_samples')} windows x {calib.get('seqlen')} tokens from {calib.get('source')}
  (`{calib.get('path')}`, sha256 `{str(calib.get('sha256'))[:16]}...`), seed {calib.get('seed')}.
- Evaluation: {ev['source']} {ev['split']} split, the first {ev['max_windows']} non-overlapping windows of
  {ev['seqlen']} tokens (the paper uses every window of 2048 tokens).
- Coefficients: CRePE {json.dumps(crepe_params)} (the documented defaults, docs/methods.md).
- Comparison groups: magnitude, RIA, CRePE per layer; Wanda per output row (each method's official one).
- Machine: {result['machine']['platform']}, {result['machine']['cpu_threads']} threads; torch
  {result['versions']['torch']}, transformers {result['versions']['transformers']}; crepe code
  `{result['code'].get('git_sha') or result['code']['source_sha256'][:16]}`.

## Every run

| method | pattern | ppl | achieved sparsity | prune seconds |
|---|---|---:|---:|---:|
{times}

## Reading these numbers
- The dense row is repeated in every column as the reference. Sparsity is measured on the
  weights after pruning, over the decoder-block linears only.
- CRePE runs with its documented default coefficients, not searched ones; PHO (issue 3)
  picks per-model coefficients on the validation split.
- A 135M-parameter model at a 256-token context loses far more to pruning than the 7B+ models of
  the papers; rankings between close methods on it need not match the published ones.
- Prune seconds are wall-clock on a shared CPU; speed comparisons live in docs/benchmarks.md.

## More results (each regenerated by its own command)
- [pho.md](pho.md) (`make pho-report`): the proxy study, PHO with each sampler at 50%, 2:4 and 4:8,
  next to RIA, Wanda and hill climbing.
- [extensions.md](extensions.md) (`make extensions`): channel permutation and LSA, OWL / AlphaPruning /
  DLP, DSnoT and R²-DSnoT, each composed with the scorers, and where they agree with the paper.
- [zeroshot.md](zeroshot.md) (`make zeroshot`): lm-eval zero-shot accuracy of dense, Wanda, RIA and
  CRePE (PHO-selected coefficients) at 50% and 2:4.
"""


def cmd_methods(_args: argparse.Namespace) -> int:
    from crepe.methods import all_methods
    from crepe.pruner import ALLOCATIONS
    from crepe.refine import REFINE_DOCS, refine_defaults

    for name, s in all_methods().items():
        params = ", ".join(f"{k}={v}" for k, v in s.defaults.items()) or "-"
        calib = "needs calibration" if s.needs_activations else "no calibration"
        print(f"{name:10s} group={s.default_group:5s} {calib:17s} params: {params}\n           {s.doc}")
    print("\nrefinements (--refine):")
    for name, doc in REFINE_DOCS.items():
        params = ", ".join(f"{k}={v}" for k, v in refine_defaults(name).items()) or "see crepe.permute"
        print(f"{name:10s} {doc}\n           params: {params}")
    print(f"\nallocations (--allocation, unstructured only): {', '.join(ALLOCATIONS)} (see crepe.allocation)")
    return 0


def _space(args: argparse.Namespace, search_kernel: bool = False) -> Any:
    from crepe.search.space import KERNEL_CHOICES, SearchSpace

    return SearchSpace(args.alpha_bounds, args.beta_bounds, args.log10_gamma_bounds, args.kernel_size,
                       KERNEL_CHOICES if search_kernel else None)


def _search_context(args: argparse.Namespace) -> Any:
    from crepe.search.runs import SearchContext
    from crepe.types import parse_sparsity

    spec = parse_sparsity(args.sparsity)
    budget = _budget(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from crepe.errors import CrepeError

        raise CrepeError(f"--out {out} exists and is a file; give a folder path")
    print(f"[crepe] loading {args.model}; calibration {args.calib_samples} x {args.seqlen} tokens")
    ctx = SearchContext.create(args.model, spec, budget, args.dtype, args.device, args.rule, args.blocks,
                               _progress_factory(not args.no_progress))
    calib = ctx.calibration[1]
    print(f"[crepe] calibration from {calib['source']} ({calib['path']}); results -> {out}")
    return ctx


def cmd_search(args: argparse.Namespace) -> int:
    from crepe.search.runs import check_search_args, run_search

    space = _space(args, args.search_kernel)
    check_search_args(args.sampler, args.trials, args.top_k, space.dim)
    if args.sigma <= 0:
        from crepe.errors import CrepeError

        raise CrepeError(f"--sigma {args.sigma!r} must be a positive number (unit-cube coordinates)")
    ctx = _search_context(args)
    seed = args.seed if args.search_seed is None else args.search_seed
    result = run_search(ctx, args.out, args.sampler, args.trials, args.top_k, seed, space,
                        args.target_module, args.target_block, args.sigma, not args.skip_test)
    t = result["totals"]
    print(f"[crepe] stage 1: {t['n_trials']} trials in {t['stage1_seconds']:.1f} s "
          f"(+{t['target_norm_seconds']:.1f} s input norms); stage 2: {t['n_verified']} candidates in "
          f"{t['stage2_seconds']:.1f} s")
    print(f"[crepe] wrote {Path(args.out) / 'pho.json'}; apply it with: crepe prune --method crepe "
          f"--sparsity {args.sparsity} --params-from {Path(args.out) / 'pho.json'} --out DIR")
    return 0


def cmd_hill_climb(args: argparse.Namespace) -> int:
    from crepe.search.runs import run_hill_climb

    space = _space(args)
    max_evals = args.max_evals if args.max_evals or args.max_seconds else 30
    if args.max_seconds is not None and args.max_seconds <= 0:
        from crepe.errors import CrepeError

        raise CrepeError(f"--max-seconds {args.max_seconds!r} must be a positive number")
    ctx = _search_context(args)
    result = run_hill_climb(ctx, args.out, max_evals, args.max_seconds, space, None, not args.skip_test)
    print(f"[crepe] {result['n_evals']} evaluations in {result['totals']['eval_seconds']:.1f} s; "
          f"wrote {Path(args.out) / 'hill_climb.json'}")
    return 0


def cmd_proxy_study(args: argparse.Namespace) -> int:
    from crepe.search.runs import run_proxy_study, study_points

    space = _space(args)
    study_points(space, args.configs, args.seed)  # validates --configs before loading anything
    ctx = _search_context(args)
    run_proxy_study(ctx, args.out, args.configs, args.seed, space, args.target_module, args.target_block)
    print(f"[crepe] wrote {Path(args.out) / 'proxy_study.json'} and one plot per proxy")
    return 0


# --- crepe pipeline / transfer / schedule (issue 4: Prefect flows) ---------------------------------------


def _add_pipeline_parsers(sub: Any) -> None:
    from flows.config import add_config_args

    p = sub.add_parser("pipeline", help="run the whole pipeline (Prefect flow): PHO, prune, evaluate, release, MLflow",
                       description="Resolve the model and data, PHO screening, top-k verification, final prune, "
                       "refine, evaluate, write the release folder and log everything to MLflow. Finished tasks are "
                       "cached by content: rerunning the same command (after a crash, too) reuses them. With "
                       "--until STEP it stops after that step and --export writes the step's result (the DVC "
                       "stages of dvc.yaml do this); only the whole run logs to MLflow.")
    add_config_args(p)
    p.add_argument("--refresh", action="store_true", help="recompute every task (ignore the cache)")
    p.add_argument("--until", choices=["search", "prune", "evaluate", "release"], default=None,
                   help="stop after this step (default: release, the whole pipeline; only it logs to MLflow)")
    p.add_argument("--export", metavar="PATH",
                   help="with --until search|prune|evaluate: write that step's result to PATH atomically "
                   "(search: a folder with pho.json; prune: the pruned model folder; evaluate: a metrics JSON)")
    p = sub.add_parser("transfer", help="apply the best PHO configuration of a source model to target models/patterns",
                       description="Looks up the best PHO configuration recorded in MLflow for (source model, "
                       "pattern) and evaluates it on every target model and pattern next to the target's RIA "
                       "baseline (and its own PHO with --with-pho); writes the table to --out and MLflow.")
    add_config_args(p)
    p.add_argument("--source-model", required=True, help="model spec whose PHO result is transferred")
    p.add_argument("--source-pattern", required=True, help="pattern of that PHO result (2:4, 4:8, 0.5)")
    p.add_argument("--targets", required=True, help="comma-separated target model specs")
    p.add_argument("--patterns", required=True, help="comma-separated target patterns")
    p.add_argument("--with-pho", action="store_true", help="also run each target's own PHO")
    p.add_argument("--out", default="docs/transfer.md", help="markdown table (default %(default)s)")
    p = sub.add_parser("schedule", help="serve the pipeline on a cron schedule (Prefect serve; Ctrl-C stops)",
                       description="Validates the parameters and the cron expression, then serves the pipeline "
                       "flow as a Prefect deployment with that schedule until interrupted.")
    add_config_args(p)
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--name", default="crepe-pipeline-scheduled", help="deployment name (default %(default)s)")


def _flow_setup(args: argparse.Namespace, tracking: bool = True) -> Any:
    """Validate the config and run the fail-fast checks before Prefect starts; set Prefect's env defaults."""
    from flows.config import config_from_args
    from flows.runtime import prefect_env

    cfg = config_from_args(args)
    prefect_env(cfg.project_root)
    from flows.pipeline import preflight

    preflight(cfg, tracking=tracking)
    if os.environ.get("PREFECT_API_URL"):  # a Prefect server that is down would stall the flow's start
        check_prefect_api(os.environ["PREFECT_API_URL"])
    return cfg


def cmd_pipeline(args: argparse.Namespace) -> int:
    from crepe.errors import CrepeError

    if args.export is not None and args.until is None:
        raise CrepeError("--export needs --until search, prune or evaluate (the step whose result it writes)")
    until = args.until or "release"
    cfg = _flow_setup(args, tracking=until == "release")  # sets Prefect's environment: import prefect after it
    from contextlib import nullcontext

    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.pipeline import check_until, pipeline, task_runner

    export = None
    if args.export is not None:
        check_until(until, args.export)  # before the flow starts: a refused path costs nothing
        export = str(Path(args.export).expanduser().absolute())  # the flow may run elsewhere (a deployment)

    flow = pipeline.with_options(task_runner=task_runner(cfg))
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}) if args.refresh else nullcontext():
        flow(args.params, list(args.overrides), until, export)
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    cfg = _flow_setup(args)
    from crepe.errors import CrepeError
    from flows.pipeline import task_runner, transfer

    if not cfg.tracking.enabled:
        raise CrepeError("crepe transfer reads the best configuration from MLflow; set tracking.enabled: true")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if not targets or not patterns:
        raise CrepeError("--targets and --patterns each need at least one comma-separated value")
    flow = transfer.with_options(task_runner=task_runner(cfg))
    flow(args.source_model, args.source_pattern, targets, patterns, args.with_pho, args.params,
         list(args.overrides), args.out)
    return 0


def check_cron(expr: str) -> str:
    """``expr`` if Prefect's CronSchedule accepts it, else a CrepeError in one sentence."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from crepe.errors import CrepeError

    try:
        CronSchedule(cron=expr)
    except (ValidationError, ValueError, TypeError):
        raise CrepeError(f"--cron {expr!r} is not a valid cron expression; use five fields "
                         '"minute hour day-of-month month day-of-week", e.g. "0 3 * * 1"') from None
    return expr


def check_prefect_api(url: str | None, timeout: float = 3.0) -> str:
    """A schedule needs a Prefect server with its scheduler (the temporary server has none): ``url`` must
    be set and accept TCP connections; otherwise a CrepeError in one sentence."""
    import socket
    from urllib.parse import urlparse

    from crepe.errors import CrepeError

    if not url:
        raise CrepeError("crepe schedule needs a running Prefect server (the temporary one does not run schedules): "
                         "start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except (OSError, TypeError) as exc:
        raise CrepeError(f"the Prefect server PREFECT_API_URL={url!r} is unreachable ({exc.__class__.__name__}); "
                         "start it with `prefect server start` or fix the URL") from None
    return url


def cmd_schedule(args: argparse.Namespace) -> int:
    check_cron(args.cron)
    _flow_setup(args)
    from prefect.settings import get_current_settings

    from flows.pipeline import pipeline

    api = get_current_settings().api.url
    check_prefect_api(str(api) if api else None)

    print(f"[crepe] serving the pipeline on cron {args.cron!r} (Ctrl-C stops)", flush=True)
    pipeline.serve(name=args.name, cron=args.cron,
                   parameters={"params": str(Path(args.params).resolve()), "overrides": list(args.overrides)})
    return 0


COMMANDS = {"search": cmd_search, "hill-climb": cmd_hill_climb, "proxy-study": cmd_proxy_study,
            "prune": cmd_prune, "eval": cmd_eval, "demo": cmd_demo, "table": cmd_table, "methods": cmd_methods,
            "config": cmd_config, "prepare": cmd_prepare, "verify": cmd_verify, "ui": cmd_ui,
            "pipeline": cmd_pipeline, "transfer": cmd_transfer, "schedule": cmd_schedule}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from crepe import __version__

        print(f"crepe {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    from crepe.errors import CrepeError

    try:
        return COMMANDS[args.command](args)
    except CrepeError as exc:
        sys.stderr.write(f"crepe: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("search", "hill-climb", "proxy-study")
        sys.stderr.write("crepe: interrupted" + ("; rerun the same command to resume\n" if resumable else "\n"))
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
