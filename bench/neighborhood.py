"""Benchmark of ``crepe.neighborhood.neighborhood_sum``: "sat" vs "separable" vs "conv" on CPU.

For each shape, every (K, method) pair gets one warm-up call (its output is kept for the error
check), then ``--repeats`` interleaved rounds A, B, C, ... A, B, C, ... timed with
``time.perf_counter``; the tables show medians and the median of per-round ratios. Errors are
measured against a float64 reference: the same masked ``conv2d`` run on float64 input, in row chunks
(with a K//2 halo) so its im2col buffer stays small. The reference itself is checked once against
the definition (a direct sum of shifted copies) on a small matrix.

    .venv/bin/python -m bench.neighborhood [--quick] [--repeats 5] [--shapes 4096x4096,11008x4096]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

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
from crepe.neighborhood import neighborhood_kernel, neighborhood_sum

METHODS = ("sat", "separable", "conv")
FULL_SHAPES = "4096x4096,11008x4096"
QUICK_SHAPES = "512x512,1376x512"
ERR_TARGET = 1e-5
K_TOLERANCE = 0.10  # sat(K=11)/sat(K=9) within 1 +- this counts as "independent of K"


def reference_conv64(a: torch.Tensor, kernel_size: int, chunk_rows: int = 512) -> torch.Tensor:
    """Masked conv2d on float64 input, zero-padded, computed in row chunks with a halo."""
    a64 = a.to(torch.float64)
    kernel = neighborhood_kernel(kernel_size, torch.float64)[None, None]
    r = kernel_size // 2
    n = a64.shape[0]
    out = torch.empty_like(a64)
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        lo, hi = max(0, s - r), min(n, e + r)
        piece = F.pad(a64[lo:hi], (r, r, r - (s - lo), r - (hi - e)))
        out[s:e] = F.conv2d(piece[None, None], kernel)[0, 0]
    return out


def reference_direct64(a: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The definition: sum of shifted copies over the window's (K-1)^2 + 1 offsets, float64."""
    a64 = a.to(torch.float64)
    r = kernel_size // 2
    rows, cols = a64.shape
    padded = F.pad(a64, (r, r, r, r))
    out = torch.zeros_like(a64)
    for dp in range(-r, r + 1):
        for dq in range(-r, r + 1):
            if (dp == 0) != (dq == 0):  # on the centre row or column but not the centre
                continue
            out += padded[r + dp : r + dp + rows, r + dq : r + dq + cols]
    return out


def check_reference() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(37, 53, generator=g).abs()
    for k in (3, 9, 11):
        direct = reference_direct64(a, k)
        conv = reference_conv64(a, k, chunk_rows=8)
        err = (conv - direct).abs().max().item() / direct.abs().max().item()
        assert err < 1e-13, f"float64 conv reference disagrees with the definition (K={k}, {err:.2e})"


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|x - ref| / max|ref|, max over ref > 0 of |x - ref| / ref)."""
    diff = (x.to(torch.float64) - ref).abs_()
    norm_err = diff.max().item() / ref.abs().max().item()
    pos = ref > 0
    elem_err = (diff[pos] / ref[pos]).max().item() if bool(pos.any()) else 0.0
    return norm_err, elem_err


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]  # type: ignore[misc]


def bench_shape(shape: tuple[int, int], ks: list[int], repeats: int, seed: int, quiet_wait: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=torch.float32).abs_()
    combos = [(k, m) for k in ks for m in METHODS]
    times: dict[str, list[float]] = {f"{m}@K{k}": [] for k, m in combos}
    errs: dict[str, dict[str, float]] = {}
    ref_seconds: dict[str, float] = {}
    # warm-up: one call per (K, method); keep the output for the error check
    outs: dict[tuple[int, str], torch.Tensor] = {}
    for k, m in combos:
        outs[(k, m)] = neighborhood_sum(a, k, m)
    for k in ks:
        t0 = time.perf_counter()
        ref = reference_conv64(a, k)
        ref_seconds[f"K{k}"] = time.perf_counter() - t0
        for m in METHODS:
            norm_err, elem_err = errors(outs.pop((k, m)), ref)
            errs[f"{m}@K{k}"] = {"max_abs_over_max_ref": norm_err, "max_elementwise_rel": elem_err}
        del ref
        gc.collect()
    background, waited = [], []
    for _ in range(repeats):
        waited.append(wait_for_quiet(quiet_wait)[0] if quiet_wait > 0 else 0.0)
        snap = CpuSnap()
        for k, m in combos:
            t0 = time.perf_counter()
            out = neighborhood_sum(a, k, m)
            times[f"{m}@K{k}"].append(time.perf_counter() - t0)
            del out
        background.append(background_cores(snap, CpuSnap()))
    return {
        "shape": list(shape),
        "times_s": times,
        "errors": errs,
        "reference_seconds": ref_seconds,
        "background_cores_per_round": background,
        "waited_s_per_round": waited,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.neighborhood", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--shapes", default=None, help=f"comma-separated ROWSxCOLS (default {FULL_SHAPES})")
    parser.add_argument("--ks", default="9,11", help="kernel sizes, comma-separated; the first is the base")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="max seconds to wait before each round for other processes to go quiet (0 = never wait)",
    )
    args = parser.parse_args(argv)
    apply_threads(args)
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES))
    ks = [int(k) for k in args.ks.split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    info, date, started = machine_info(), now(), time.perf_counter()
    check_reference()

    results = []
    for shape in shapes:
        print(
            f"[bench.neighborhood] {shape[0]}x{shape[1]}: warm-up, float64 reference, {repeats} rounds",
            flush=True,
        )
        results.append(bench_shape(shape, ks, repeats, args.seed, args.quiet_wait))
    wall = time.perf_counter() - started

    k0, k1 = ks[0], ks[-1]
    time_rows, k_rows, err_rows = [], [], []
    sat_vs_conv_ok, k_ok, err_ok = True, True, True
    for res in results:
        t = res["times_s"]
        label = "x".join(map(str, res["shape"]))
        for k in ks:
            sat_conv = paired_ratio(t[f"sat@K{k}"], t[f"conv@K{k}"])
            sep_conv = paired_ratio(t[f"separable@K{k}"], t[f"conv@K{k}"])
            if k == k0:
                sat_vs_conv_ok &= sat_conv <= 1.0
            time_rows.append(
                [
                    label,
                    k,
                    *(fmt_s(median(t[f"{m}@K{k}"])) for m in METHODS),
                    f"{sat_conv:.2f}",
                    f"{sep_conv:.2f}",
                ]
            )
            for m in METHODS:
                e = res["errors"][f"{m}@K{k}"]
                if m == "sat":
                    err_ok &= e["max_abs_over_max_ref"] < ERR_TARGET and e["max_elementwise_rel"] < ERR_TARGET
            err_rows.append(
                [label, k]
                + [
                    f"{res['errors'][f'{m}@K{k}'][key]:.1e}"
                    for m in METHODS
                    for key in ("max_abs_over_max_ref", "max_elementwise_rel")
                ]
                + [f"{res['reference_seconds'][f'K{k}']:.1f}"]
            )
        if k1 != k0:
            ratios = {m: paired_ratio(t[f"{m}@K{k1}"], t[f"{m}@K{k0}"]) for m in METHODS}
            k_ok &= abs(ratios["sat"] - 1.0) <= K_TOLERANCE
            k_rows.append([label, *(f"{ratios[m]:.2f}" for m in METHODS)])

    max_bg = max(max(res["background_cores_per_round"]) for res in results)
    body = "\n\n".join(
        [
            f"Median seconds of {repeats} interleaved rounds per call, float32 `|randn|` input "
            f"(seed {args.seed}); ratios are medians of per-round ratios (same round, side by side). "
            f"Each round waits (at most {args.quiet_wait:g} s) for other processes to go quiet; during the "
            f"rounds they kept at most {max_bg:.2f} cores busy.",
            md_table(
                ["shape", "K", "sat s", "separable s", "conv s", "sat/conv", "separable/conv"], time_rows
            ),
            f"Time against K: per-round ratio t(K={k1}) / t(K={k0}) of each method "
            "(1.00 = independent of K; conv does (K-1)^2+1 multiply-adds per element, separable O(K)).",
            md_table(["shape", f"sat K{k1}/K{k0}", f"separable K{k1}/K{k0}", f"conv K{k1}/K{k0}"], k_rows)
            if k_rows
            else "_(one K only)_",
            "Error against the float64 reference (the masked `conv2d` run on float64 input, in 512-row "
            "chunks with a K//2 halo; checked against the direct shifted-sum definition on a 37x53 matrix "
            "before the run). `norm` = max|x - ref| / max|ref|, `elem` = max |x - ref| / ref over ref > 0.",
            md_table(
                [
                    "shape",
                    "K",
                    "sat norm",
                    "sat elem",
                    "separable norm",
                    "separable elem",
                    "conv norm",
                    "conv elem",
                    "ref s",
                ],
                err_rows,
            ),
        ]
    )
    targets = [
        f"sat no slower than conv at K={k0} (sat/conv <= 1.00 on every shape): {verdict(sat_vs_conv_ok)}",
        f"sat time independent of K (sat K={k1}/K={k0} within 1 +- {K_TOLERANCE:.2f} on every shape): "
        f"{verdict(k_ok)}",
        f"sat relative error below {ERR_TARGET:.0e} (both measures, every shape and K): {verdict(err_ok)}",
    ]
    text = section_text(
        "Neighbourhood sum: sat vs separable vs conv",
        command_line("bench.neighborhood", argv),
        info,
        date,
        wall,
        body,
        targets,
        {"machine": info, "repeats": repeats, "seed": args.seed, "results": results},
    )
    print(text)
    if should_write(args):
        print(f"[bench.neighborhood] updated {update_section('neighborhood', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
