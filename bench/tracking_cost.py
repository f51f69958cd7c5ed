"""Benchmark: what MLflow tracking costs a pipeline (sqlite store, tasks/tracking.py).

Times, on a fresh sqlite database in a temp folder: ``Tracker.check()`` (schema creation),
``log_search`` of a synthetic PHO summary with ``--trials`` trials and ``--verified`` candidates
(one nested run each: three store calls), the same ``log_search`` again (a resumed pipeline: one
lookup, nothing written), and ``best_config``. Each phase is repeated ``--repeats`` times on a new
parent run; medians are printed. Prints only (no docs section): the numbers depend on disk and load.

    .venv/bin/python -m bench.tracking_cost [--trials 60] [--verified 11] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench._common import machine_info, machine_line, md_table, median


def synthetic_pho(folder: Path, n_trials: int, n_verified: int) -> Path:
    trials = [{"index": i, "params": {"alpha": i / n_trials, "beta": 1.0, "gamma": 1e-3, "kernel_size": 9},
               "proxies": {"gini_pruned": 0.5 - i / 1000, "gini_retained": 0.4, "outlier": 0.01,
                           "outlier_pruned": 0.005, "outlier_retained": 0.006},
               "seconds": 0.03, "cpu_seconds": 0.03} for i in range(n_trials)]
    verified = [{"index": i, "params": trials[i]["params"], "ppl": 30.0 - i / 10, "seconds": 3.0, "cpu_seconds": 3.0}
                for i in range(n_verified)]
    summary = {"config": {"model": "embedded:smollm2-135m", "model_hash": "h", "sparsity": "2:4", "sampler": "cmaes"},
               "trials": trials, "verified": verified, "winner": verified[-1],
               "final": {"params": verified[-1]["params"], "validation_ppl": verified[-1]["ppl"], "test_ppl": 28.0},
               "totals": {"n_trials": n_trials, "n_verified": n_verified}}
    path = folder / "pho.json"
    path.write_text(json.dumps(summary))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracking_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--verified", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from tasks.tracking import open_tracker

    with tempfile.TemporaryDirectory(prefix="crepe-bench-mlflow-") as tmp:
        root = Path(tmp)
        pho = synthetic_pho(root, args.trials, args.verified)
        tracker = open_tracker(None, root / "project")
        t0 = time.perf_counter()
        tracker.check()
        check_s = time.perf_counter() - t0
        first, again, lookup = [], [], []
        for r in range(args.repeats):
            with tracker.pipeline_run("embedded:smollm2-135m", f"bench-{r}") as run:
                t0 = time.perf_counter()
                tracker.log_search(run, pho, artifacts=False)
                first.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                counts = tracker.log_search(run, pho, artifacts=False)
                again.append(time.perf_counter() - t0)
                assert counts["trials"] == counts["candidates"] == 0
            t0 = time.perf_counter()
            tracker.best_config("embedded:smollm2-135m", "2:4")
            lookup.append(time.perf_counter() - t0)
    n = args.trials + args.verified
    rows = [
        ["check() on a new sqlite file (MLflow schema creation, first import)", f"{check_s:.2f}"],
        [f"log_search: {args.trials} trials + {args.verified} candidates ({n} nested runs)", f"{median(first):.2f}"],
        ["per nested run", f"{median(first) / n * 1000:.0f} ms"],
        ["log_search again (resume: lookup only)", f"{median(again):.3f}"],
        ["best_config", f"{median(lookup):.3f}"],
    ]
    print(md_table(["step", "seconds (median)"], rows))
    print(f"\n{machine_line(machine_info())}; {args.repeats} repeats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
