"""``crepe config``, ``prepare``, ``verify``, ``ui``, ``pipeline``, ``transfer`` and ``schedule``: the commands
that run the flows or inspect what they wrote. Each validates its input and fails fast (one sentence, exit 2)
before any flow starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect.client.schemas.schedules import CronSchedule
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, get_current_settings, temporary_settings
from pydantic import ValidationError

from crepe.errors import CrepeError
from crepe.io import write_json_atomic
from flows.cli_args import add_config_args, number
from flows.pipeline import check_until, pipeline, preflight, task_runner, transfer
from flows.runtime import prefect_env
from tasks.config import load_config
from tasks.inputs import write_inputs
from tasks.steps import STEPS
from tasks.tracking_store import TrackingLocation, ui_command
from tasks.verify import verify_release


def add_parsers(sub: Any) -> None:
    _add_config_parser(sub)
    _add_prepare_parser(sub)
    _add_verify_parser(sub)
    _add_ui_parser(sub)
    _add_pipeline_parsers(sub)


def _add_config_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="validate params.yaml (+ -S overrides) and print the resolved configuration",
                       description="Validate the pipeline parameters and print every resolved value as YAML.")
    add_config_args(p)
    p.add_argument("--out", help="also write the resolved YAML to this file")
    p.add_argument("--hashes", action="store_true", help="print each section's sha256 (the cache keys) instead")


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.params, args.overrides)
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
    p = sub.add_parser("prepare", help="resolve the model and data of params.yaml and record their hashes",
                       description="Write OUT/inputs.json: the base model's content hash and the sha256 of the "
                       "calibration and evaluation data the configuration selects (the DVC 'prepare' stage).")
    add_config_args(p)
    p.add_argument("--out", default="data/prepared", help="output folder (default %(default)s)")


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(args.params, args.overrides)
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
    p.add_argument("--rtol", type=number, default=0.01,
                   help="allowed relative perplexity difference on the same data (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $CREPE_DATA_DIR, else ../shared/data)")
    p.add_argument("--json", help="also write the report (with per-layer sparsity) to this file")
    p.add_argument("--max-memory", metavar="SIZE", help="host memory the model may use, e.g. 3GB (default: what is available)")


def cmd_verify(args: argparse.Namespace) -> int:
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
    tracker = TrackingLocation(args.uri, args.project)
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


# --- crepe pipeline / transfer / schedule (issue 4: Prefect flows) ---------------------------------------


def _add_pipeline_parsers(sub: Any) -> None:
    p = sub.add_parser("pipeline", help="run the whole pipeline (Prefect flow): PHO, prune, evaluate, release, MLflow",
                       description="Resolve the model and data, PHO screening, top-k verification, final prune, "
                       "refine, evaluate, write the release folder and log everything to MLflow. Finished tasks are "
                       "cached by content: rerunning the same command (after a crash, too) reuses them. With "
                       "--until STEP it stops after that step and --export writes the step's result (the DVC "
                       "stages of dvc.yaml do this); only the whole run logs to MLflow.")
    add_config_args(p)
    p.add_argument("--refresh", action="store_true", help="recompute every task (ignore the cache)")
    p.add_argument("--until", choices=list(STEPS), default=None,
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
    cfg = load_config(args.params, args.overrides)
    prefect_env(cfg.project_root)
    preflight(cfg, tracking=tracking)
    if os.environ.get("PREFECT_API_URL"):  # a Prefect server that is down would stall the flow's start
        check_prefect_api(os.environ["PREFECT_API_URL"])
    return cfg


def cmd_pipeline(args: argparse.Namespace) -> int:
    if args.export is not None and args.until is None:
        raise CrepeError("--export needs --until search, prune or evaluate (the step whose result it writes)")
    until = args.until or "release"
    cfg = _flow_setup(args, tracking=until == "release")  # sets Prefect's environment: import prefect after it
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
    try:
        CronSchedule(cron=expr)
    except (ValidationError, ValueError, TypeError):
        raise CrepeError(f"--cron {expr!r} is not a valid cron expression; use five fields "
                         '"minute hour day-of-month month day-of-week", e.g. "0 3 * * 1"') from None
    return expr


def check_prefect_api(url: str | None, timeout: float = 3.0) -> str:
    """A schedule needs a Prefect server with its scheduler (the temporary server has none): ``url`` must
    be set and accept TCP connections; otherwise a CrepeError in one sentence."""
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
    api = get_current_settings().api.url
    check_prefect_api(str(api) if api else None)

    print(f"[crepe] serving the pipeline on cron {args.cron!r} (Ctrl-C stops)", flush=True)
    pipeline.serve(name=args.name, cron=args.cron,
                   parameters={"params": str(Path(args.params).resolve()), "overrides": list(args.overrides)})
    return 0
