"""Benchmark: orchestration overhead of ``crepe pipeline`` and the time of a fully cached rerun (issue 4).

Runs ``crepe pipeline`` (a subprocess, as a user would) twice in a fresh temp project holding a copy of
``--params`` (default: the project's ``params.yaml``, the CPU profile on the embedded SmolLM2) plus
``-S`` overrides:

1. cold: every task computes. **Overhead** = wall time minus the time during which at least one task
   body was computing (the union of their intervals from ``$CREPE_TASK_LOG``, so candidates verified in
   parallel count once), as a share of the wall time (target < 15 %). It includes the Prefect
   temporary server's start, imports, flow/task bookkeeping, result persistence, and the model loads
   each task does for itself.
2. warm: the same command again, everything cached (target < 30 s).

Prints a markdown table (no docs section: the numbers depend on the load of a shared machine).

    .venv/bin/python -m bench.pipeline_overhead                           # the CPU profile (minutes)
    .venv/bin/python -m bench.pipeline_overhead -S pho.n_trials=4 -S pho.top_k=1 -S calibration.samples=4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, machine_info, machine_line, md_table


def run(project: Path, params: str, overrides: list[str], log: Path) -> float:
    env = {**os.environ, "CREPE_TASK_LOG": str(log), "PREFECT_LOGGING_LEVEL": "WARNING",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "CREPE_WORK_DIR"):
        env.pop(key, None)  # the project's own (flows/runtime.py)
    args = [sys.executable, "-m", "flows.cli", "pipeline", "--params", params]
    for o in overrides:
        args += ["-S", o]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"crepe pipeline failed with status {proc.returncode}")
    return wall


def task_intervals(log: Path) -> list[tuple[str, float, float]]:
    """(name, start, end) unix times of every finished task body in ``log``."""
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = line.split("\t")
        if len(fields) == 4:
            end = float(fields[3])
            out.append((fields[0], end - float(fields[2]), end))
    return out


def task_seconds(log: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, start, end in task_intervals(log):
        out[name] = out.get(name, 0.0) + end - start
    return out


def busy_seconds(intervals: list[tuple[str, float, float]]) -> float:
    """Length of the union of the intervals: the time at least one task body was computing (parallel
    candidates count once)."""
    total, reach = 0.0, float("-inf")
    for _, start, end in sorted(intervals, key=lambda x: x[1]):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="override (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temp project and print its path")
    args = parser.parse_args(argv)
    project = Path(tempfile.mkdtemp(prefix="crepe-overhead-"))
    (project / ".git").mkdir()  # the project root marker (keeps MLflow and the cache inside)
    shutil.copy(args.params, project / "params.yaml")
    try:
        cold_log, warm_log = project / "cold.log", project / "warm.log"
        cold = run(project, "params.yaml", args.overrides, cold_log)
        tasks = task_seconds(cold_log)
        warm = run(project, "params.yaml", args.overrides, warm_log)
        compute = busy_seconds(task_intervals(cold_log))
        rows = [[name, f"{sec:.1f}"] for name, sec in tasks.items()]
        rows += [["**task compute (union of busy intervals)**", f"{compute:.1f}"], ["**cold wall time**", f"{cold:.1f}"],
                 ["**overhead**", f"{cold - compute:.1f} s = {(cold - compute) / cold:.1%} (target < 15%)"],
                 ["**fully cached rerun**", f"{warm:.1f} s (target < 30 s); recomputed: "
                                            f"{', '.join(task_seconds(warm_log)) or 'nothing'}"]]
        print(md_table(["step", "seconds"], rows))
        print(f"\n{machine_line(machine_info())}; overrides: {' '.join(args.overrides) or 'none'}")
    finally:
        if args.keep:
            print(f"project kept in {project}")
        else:
            shutil.rmtree(project, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
