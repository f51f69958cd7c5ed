"""Benchmark of N:M channel permutation (``crepe.permute``): CP and LSA time against plain N:M selection.

For each width W, a seeded random (rows x W) score matrix (uniform values times a per-channel scale,
so channels differ in importance as in real layers) is masked three ways: plain N:M selection
(``select_mask(pattern=...)``), CP (``permuted_mask(method="cp")``) and LSA (``method="lsa"``,
exact, ``blocks=1``). One warm-up call each, then ``--repeats`` interleaved rounds (nm, cp, lsa,
nm, cp, lsa, ...); the table shows median seconds and the medians of per-round ratios against the
plain selection measured in the same round. The retained score of each mask is reported as a
percentage gain over plain N:M.

    .venv/bin/python -m bench.lsa_time [--quick] [--widths 256,512,1024,2048] [--rows R] [--pattern 2:4]
"""

from __future__ import annotations

import argparse
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
from crepe.masks import select_mask
from crepe.permute import permuted_mask, retained_score
from crepe.types import parse_sparsity

FULL_WIDTHS = "256,512,1024,2048"
QUICK_WIDTHS = "256,512,1024"
KINDS = ("nm", "cp", "lsa")


def make_scores(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, width, generator=g) * (torch.rand(1, width, generator=g) * 4 + 0.1)


def run_kind(kind: str, scores: torch.Tensor, pattern) -> torch.Tensor:
    if kind == "nm":
        return select_mask(scores, pattern=pattern)
    return permuted_mask(scores, pattern, kind)[0]


def bench_width(width: int, rows: int, pattern, repeats: int, seed: int, quiet_wait: float) -> dict:
    scores = make_scores(rows, width, seed)
    retained = {}
    for kind in KINDS:  # warm-up, and the masks' retained scores
        retained[kind] = retained_score(scores, run_kind(kind, scores, pattern))
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    background, waited = [], []
    for _ in range(repeats):
        waited.append(wait_for_quiet(quiet_wait)[0] if quiet_wait > 0 else 0.0)
        snap = CpuSnap()
        for kind in KINDS:
            t0 = time.perf_counter()
            run_kind(kind, scores, pattern)
            times[kind].append(time.perf_counter() - t0)
        background.append(background_cores(snap, CpuSnap()))
    return {
        "width": width,
        "rows": rows,
        "times_s": times,
        "retained": retained,
        "background_cores_per_round": background,
        "waited_s_per_round": waited,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lsa_time", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--widths", default=None, help=f"comma-separated input widths (default {FULL_WIDTHS})")
    parser.add_argument("--rows", type=int, default=None, help="output rows (default: the width, square)")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="max seconds to wait before each round for other processes to go quiet (0 = never wait)",
    )
    args = parser.parse_args(argv)
    apply_threads(args)
    pattern = parse_sparsity(args.pattern).pattern
    if pattern is None:
        parser.error("--pattern must be N:M, e.g. 2:4")
    widths = [int(w) for w in (args.widths or (QUICK_WIDTHS if args.quick else FULL_WIDTHS)).split(",")]
    info, date, started = machine_info(), now(), time.perf_counter()

    results = []
    for width in widths:
        rows = args.rows or width
        print(f"[bench.lsa_time] {rows}x{width} {pattern}: warm-up, {args.repeats} rounds", flush=True)
        results.append(bench_width(width, rows, pattern, args.repeats, args.seed, args.quiet_wait))
    wall = time.perf_counter() - started

    rows_out, monotone = [], True
    for res in results:
        t, r = res["times_s"], res["retained"]
        monotone &= r["lsa"] >= r["cp"] >= r["nm"]
        rows_out.append(
            [
                f"{res['rows']}x{res['width']}",
                res["width"] // pattern.m,
                *(fmt_s(median(t[k])) for k in KINDS),
                f"{paired_ratio(t['cp'], t['nm']):.1f}",
                f"{paired_ratio(t['lsa'], t['nm']):.0f}",
                f"{paired_ratio(t['lsa'], t['cp']):.1f}",
                f"{100 * (r['cp'] / r['nm'] - 1):+.2f}",
                f"{100 * (r['lsa'] / r['nm'] - 1):+.2f}",
            ]
        )
    max_bg = max(max(res["background_cores_per_round"]) for res in results)
    body = "\n\n".join(
        [
            f"Pattern {pattern}; median seconds of {args.repeats} interleaved rounds per call on seeded random "
            f"scores (seed {args.seed}); ratios are medians of per-round ratios against the plain N:M "
            f"selection of the same round. `groups` = W / M, the size of LSA's assignment problems "
            f"(M of them, one per slot). Retained = gain of the mask's kept-score sum over plain N:M "
            f"(CP falls back to the identity when it would retain less). Other processes kept at most "
            f"{max_bg:.2f} cores busy during a round.",
            md_table(
                ["shape", "groups", "nm s", "cp s", "lsa s", "cp/nm", "lsa/nm", "lsa/cp", "cp retained %", "lsa retained %"],
                rows_out,
            ),
        ]
    )
    targets = [f"retained score LSA >= CP >= plain N:M on every width: {verdict(monotone)}"]
    text = section_text(
        "Channel permutation: CP and LSA time vs plain N:M",
        command_line("bench.lsa_time", argv),
        info,
        date,
        wall,
        body,
        targets,
        {"machine": info, "repeats": args.repeats, "seed": args.seed, "pattern": str(pattern), "results": results},
    )
    print(text)
    if should_write(args):
        print(f"[bench.lsa_time] updated {update_section('lsa_time', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
