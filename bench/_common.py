"""Shared helpers of the benchmarks: machine facts, markdown tables, the docs/benchmarks.md sections."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTIONS = ("neighborhood", "prune_time", "prune_memory", "proxy_time")

DOC_TEMPLATE = """# Benchmarks

Three scripts in `bench/` measure what the targets of the CRePE implementation are about: the cost
of the 2-D neighbourhood sum, the whole-model prune time of CRePE against RIA, and the peak memory
of a whole-model prune against the model's own size. Run them from the repository root:

```bash
make bench        # = .venv/bin/python -m bench.neighborhood && .venv/bin/python -m bench.prune_time \\
                  #   && .venv/bin/python -m bench.prune_memory   (offline env vars set)
.venv/bin/python -m bench.neighborhood --quick   # small shapes, seconds; prints only
```

Each script prints a markdown table; in full mode (or with `--write`) it also replaces its own
section below (between the `bench:NAME` markers) with the table, the exact command, the date, the
machine and the raw per-repeat numbers. `--no-write` prints only; `--threads N` sets torch's
thread count. Every target is a *ratio* of two things measured side by side in the same run
(warm-up call first, then interleaved repeats A, B, A, B, ... and medians), never an absolute time,
because other processes may share the CPU.

"""


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes; prints only unless --write")
    parser.add_argument(
        "--write", action="store_true", help="update docs/benchmarks.md (default in full mode)"
    )
    parser.add_argument("--no-write", action="store_true", help="never touch docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def should_write(args: argparse.Namespace) -> bool:
    return not args.no_write and (args.write or not args.quick)


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", "-m", module, *map(shlex.quote, argv)])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "crepe"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{head}{' (crepe/ has uncommitted changes)' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu": _cpu_model(),
        "ram_gib": _ram_gib(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "commit": _git_commit(),
    }


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("loadavg_at_start")
    return (
        f"{info['cores']} cores ({info['cpu']}), {info['ram_gib']} GiB RAM, torch {info['torch']}, "
        f"{info['torch_threads']} torch threads, Python {info['python']}"
        + (f", load average at start {load[0]:.2f}" if load else "")
    )


def now() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repeats of num[r] / den[r] (both measured in the same repeat)."""
    return median([a / b for a, b in zip(num, den)])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class CpuSnap:
    """System-wide busy and steal CPU-seconds (``/proc/stat``) and this process's own CPU-seconds."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.busy, self.steal = _proc_stat()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.own = ru.ru_utime + ru.ru_stime


def _proc_stat() -> tuple[float, float]:
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def background_cores(a: CpuSnap, b: CpuSnap) -> float:
    """Average number of cores other processes kept busy between two snapshots (ours subtracted)."""
    wall = b.t - a.t
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / wall) if wall > 0 else float("nan")


def wait_for_quiet(max_wait: float, threshold: float = 0.5, probe: float = 1.0) -> tuple[float, float]:
    """Sleep until other processes use < ``threshold`` cores over ``probe`` s, for at most ``max_wait`` s.

    Returns (seconds waited, background cores in the last probe). Other sessions may share this
    machine; with 2 cores one busy neighbour makes torch's OpenMP threads wait on each other and a
    prune can take 3-10x longer, which no number of repeats averages away cheaply.
    """
    start = time.perf_counter()
    while True:
        a = CpuSnap()
        time.sleep(probe)
        bg = background_cores(a, CpuSnap())
        waited = time.perf_counter() - start
        if bg < threshold or waited >= max_wait:
            return waited, bg


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def compact_json(raw: dict[str, Any]) -> str:
    """One line per top-level key (and per item of a top-level list), floats to 5 digits."""
    lines = []
    for key, value in raw.items():
        value = _round(value)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            inner = ",\n".join("  " + json.dumps(v) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{inner}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def section_text(
    title: str,
    command: str,
    info: dict[str, Any],
    date: str,
    wall_s: float,
    body: str,
    targets: Sequence[str],
    raw: dict[str, Any],
) -> str:
    parts = [
        f"## {title}",
        "",
        f"- Command: `{command}`",
        f"- Date: {date}; wall time of the script {wall_s:.0f} s",
        f"- Machine: {machine_line(info)}",
        f"- Commit: {info['commit']}",
        "",
        body.strip(),
        "",
        "Targets:",
        "",
        *[f"- {t}" for t in targets],
        "",
        "<details><summary>Raw numbers (JSON)</summary>",
        "",
        "```json",
        compact_json(raw),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(parts)


def update_section(name: str, text: str, doc: Path = DOC) -> Path:
    """Replace (or add) the ``bench:NAME`` section of docs/benchmarks.md, keeping everything else."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    content = (
        doc.read_text()
        if doc.is_file()
        else DOC_TEMPLATE
        + "\n".join(
            f"<!-- bench:{s}:start -->\n_(not run yet: `.venv/bin/python -m bench.{s}`)_\n<!-- bench:{s}:end -->\n"
            for s in SECTIONS
        )
    )
    if start in content and end in content:
        head, rest = content.split(start, 1)
        _, tail = rest.split(end, 1)
        content = head + block + tail
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    os.replace(tmp, doc)
    return doc


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"
