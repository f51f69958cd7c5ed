"""Regenerate docs/pho.md: the proxy study, PHO per sampler and pattern, RIA/Wanda and hill climbing.

Everything for one pattern shares one loaded model and one calibration set (SearchContext), so the
methods differ only in what they choose. Per pattern:

1. dense, RIA and Wanda test perplexity (RIA also on validation: it is PHO's stage-2 anchor);
2. the proxy study (``--study-patterns``): ``--configs`` seeded configurations, every proxy and the
   validation perplexity, Spearman rho per proxy;
3. PHO with each sampler (``--trials`` proxy trials, ``--top-k`` verified + the RIA point); the
   winner's validation and test perplexity, stage-1 and stage-2 seconds;
4. PPL hill climbing from the RIA point with ``--hc-evals`` evaluations (``--hc-evals-main`` at the
   pattern used for the time comparison), on the same per-evaluation budget as stage 2.

Every sub-run is resumable (its own state.json under ``--work``): rerunning the command after an
interruption continues. The report is written at the end, atomically.

    .venv/bin/python -m bench.pho_report [--quick] [--work runs/pho-report]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import command_line, machine_info, md_table, now
from crepe.budget import Budget
from crepe.io import write_json_atomic, write_text_atomic
from crepe.search.context import SearchContext
from crepe.search.space import RIA_POINT
from crepe.types import parse_sparsity
from tasks.search_jobs import run_hill_climb, run_proxy_study, run_search

SAMPLERS = ("cmaes", "tpe", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--patterns", default="0.5,2:4,4:8")
    p.add_argument("--study-patterns", default="0.5,2:4")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=8, help="validation and test windows per evaluation")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--configs", type=int, default=16, help="proxy-study configurations per pattern")
    p.add_argument("--hc-evals", type=int, default=8, help="hill-climbing evaluations per pattern")
    p.add_argument("--hc-evals-main", type=int, default=20, help="hill-climbing evaluations at --main-pattern")
    p.add_argument("--main-pattern", default="2:4", help="pattern of the PHO vs hill-climbing time comparison")
    p.add_argument("--work", default="runs/pho-report")
    p.add_argument("--out", default="docs/pho.md")
    p.add_argument("--quick", action="store_true", help="tiny budget; writes under --work only")
    p.add_argument("--rewrite", action="store_true",
                   help="only rewrite --out from the JSON a finished run left next to it (no pruning)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared CPU, OpenMP threads waiting on each other cost 5-10x)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rewrite:
        src = Path(args.out).with_suffix(".json")
        if not src.is_file():
            raise SystemExit(f"--rewrite needs {src} from a finished run; run without --rewrite first")
        write_outputs(json.loads(src.read_text()), args, Path(args.work))
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        args.calib_samples, args.seqlen, args.max_windows = 2, 64, 2
        args.trials, args.top_k, args.configs, args.hc_evals, args.hc_evals_main = 6, 2, 4, 3, 4
        args.out = str(Path(args.work) / "pho.md")
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    study = {p.strip() for p in args.study_patterns.split(",") if p.strip()}
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    budget = Budget(calib_samples=args.calib_samples, seqlen=args.seqlen, max_windows=args.max_windows)
    work = Path(args.work)
    started = time.perf_counter()
    report: dict[str, Any] = {"created_utc": now(), "command": command_line("bench.pho_report", argv), "machine": machine_info(),
                              "budget": budget.__dict__, "settings": {k: v for k, v in vars(args).items()},
                              "patterns": {}}
    lm = None
    for pattern in patterns:
        label = parse_sparsity(pattern).label
        key = label.replace(":", "-").replace("%", "pct")
        print(f"=== {label}")
        ctx = SearchContext.create(args.model, pattern, budget)
        lm = ctx.lm
        entry: dict[str, Any] = {}
        if "dense_test" not in report:
            report["dense_test"] = ctx.evaluate_method("dense", "test")
            report["model"] = ctx.lm.info.as_dict()
            report["calibration"] = ctx.calibration[1]
        entry["wanda_test"] = ctx.evaluate_method("wanda", "test")
        entry["ria_test"] = ctx.evaluate(RIA_POINT, "test")
        entry["ria_validation"] = ctx.evaluate(RIA_POINT, "validation")
        print(f"dense {report['dense_test']:.3f}  wanda {entry['wanda_test']:.3f}  ria {entry['ria_test']:.3f}")
        if pattern in study or label in study:
            res = run_proxy_study(ctx, work / key / "proxy-study", args.configs, 0)
            entry["proxy_study"] = {"spearman": res["spearman"], "n": len(res["rows"]), "n_finite": res["n_finite"],
                                    "plots": res["plots"]}
        entry["pho"] = {}
        for sampler in samplers:
            res = run_search(ctx, work / key / f"pho-{sampler}", sampler, args.trials, args.top_k, 0)
            entry["pho"][sampler] = {"final": res["final"], "totals": res["totals"],
                                     "plots": res["plots"], "winner_index": res["winner"]["index"]}
        n_hc = args.hc_evals_main if label == parse_sparsity(args.main_pattern).label else args.hc_evals
        res = run_hill_climb(ctx, work / key / "hill-climb", n_hc)
        entry["hill_climb"] = {"final": res["final"], "totals": res["totals"], "stop_reason": res["stop_reason"],
                               "plots": res["plots"]}
        report["patterns"][label] = entry
        write_json_atomic(work / "pho_report.json", report)
    report["wall_seconds"] = time.perf_counter() - started
    assert lm is not None
    write_outputs(report, args, work)
    return 0


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _params(p: dict[str, Any]) -> str:
    return f"α={p['alpha']:.3f}, β={p['beta']:.3f}, γ={p['gamma']:.2e}"


def _constant_proxies(work: Path, key: str, names: list[str]) -> dict[str, float]:
    """Proxies that took one value over every configuration of a study (their rho is undefined)."""
    path = work / key / "proxy-study" / "proxy_study.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    out = {}
    for n in names:
        vals = {r["proxies"][n] for r in rows}
        if len(vals) == 1:
            out[n] = next(iter(vals))
    return out


def _findings(report: dict[str, Any], work: Path, study_pats: list[str], names: list[str]) -> str:
    lines = []
    for p in study_pats:
        rho = report["patterns"][p]["proxy_study"]["spearman"]["gini_pruned"]
        verdict = ("ranks configurations like perplexity" if rho is not None and rho >= 0.5 else
                   "does not predict perplexity on this model" if rho is None or abs(rho) < 0.3 else
                   "predicts perplexity only weakly")
        lines.append(f"- Proxy at {p}: gini_pruned has ρ = {_f(rho)} (the paper: 0.92-0.95), so here it {verdict}.")
        const = _constant_proxies(work, p.replace(":", "-").replace("%", "pct"), names)
        for n, v in const.items():
            lines.append(f"  `{n}` is {v:g} for every configuration at {p} (no pruned weight exceeds the outlier "
                         "threshold), so its ρ is undefined (n/a)." if n == "outlier_pruned" else
                         f"  `{n}` is {v:g} for every configuration at {p}, so its ρ is undefined (n/a).")
    ratios, within, total, beat_ria, worse_test = [], 0, 0, [], []
    for label, e in report["patterns"].items():
        hc = e["hill_climb"]
        for sampler, r in e["pho"].items():
            ratios.append((hc["totals"]["eval_seconds"] / r["totals"]["pho_seconds"], label, sampler))
            t, h = r["final"].get("test_ppl"), hc["final"].get("test_ppl")
            if t and h:
                total += 1
                within += abs(t - h) / h <= 0.01
            if r["final"]["validation_ppl"] < e["ria_validation"] - 1e-9:
                beat_ria.append(f"{sampler} at {label}")
                if t is not None and e.get("ria_test") is not None and t >= e["ria_test"]:
                    worse_test.append(f"{sampler} at {label} ({t:.2f} vs RIA {e['ria_test']:.2f})")
    if ratios:
        lo, hi = min(ratios), max(ratios)
        s = report["settings"]
        per_eval = s["top_k"] + 1
        if lo[0] >= 10:
            lines.append(f"- Time: hill climbing took {lo[0]:.1f}x to {hi[0]:.1f}x PHO's wall time: the ≥10x target is met.")
        else:
            lines.append(
            f"- Time: hill climbing took {lo[0]:.1f}x to {hi[0]:.1f}x PHO's wall time. The ≥10x target is **not met** at "
            f"this budget: PHO pays for {per_eval} full evaluations (top-{s['top_k']} + RIA) plus a few seconds of "
            f"proxy trials, hill climbing for its capped {s['hc_evals']} or {s['hc_evals_main']} evaluations, so "
            f"the ratio is about (hill-climbing evaluations) / {per_eval}. The paper's ~33x comes from an ~11 h "
            "hill climb; a hill climb run to convergence here would need more evaluations than this CPU budget "
            "allows, and the ratio grows linearly with them.")
    if total:
        lines.append(f"- Quality: PHO's test perplexity is within 1% of hill climbing's in {within} of {total} "
                     "sampler/pattern pairs (the table lists each difference).")
    lines.append("- PHO found coefficients with a lower validation perplexity than RIA in: "
                 + (", ".join(beat_ria) if beat_ria else "none") + "; elsewhere stage 2 kept the RIA point."
                 + (" The gain did not carry over to the test split for " + ", ".join(worse_test) + "."
                    if worse_test else ""))
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], args: argparse.Namespace, work: Path) -> None:
    out = Path(args.out)
    plots_dir = out.parent / "pho"
    if not args.quick:
        plots_dir.mkdir(parents=True, exist_ok=True)

    def plot(src: str, name: str) -> str:
        if args.quick:
            return src
        dst = plots_dir / name
        shutil.copyfile(src, dst)
        return dst.relative_to(out.parent).as_posix()

    pats = list(report["patterns"])
    # PHO table
    rows = []
    for label, e in report["patterns"].items():
        rows.append([label, "RIA (α=β=1, γ=0)", "-", _f(e["ria_validation"]), _f(e["ria_test"]), "-", "-"])
        rows.append([label, "Wanda", "-", "-", _f(e["wanda_test"]), "-", "-"])
        for sampler, r in e["pho"].items():
            t = r["totals"]
            rows.append([label, f"PHO {sampler}", _params(r["final"]["params"]), _f(r["final"]["validation_ppl"]),
                         _f(r["final"].get("test_ppl")), f"{t['target_norm_seconds'] + t['stage1_seconds']:.1f}",
                         f"{t['stage2_seconds']:.1f}"])
        hc = e["hill_climb"]
        rows.append([label, f"hill climbing ({hc['totals']['n_evals']} evals)", _params(hc["final"]["params"]),
                     _f(hc["final"]["validation_ppl"]), _f(hc["final"].get("test_ppl")), "-",
                     f"{hc['totals']['eval_seconds']:.1f}"])
    pho_table = md_table(["pattern", "method", "coefficients", "val PPL", "test PPL", "stage 1 s", "stage 2 / PPL s"],
                         rows)
    # time comparison
    cmp_rows = []
    for label, e in report["patterns"].items():
        hc = e["hill_climb"]
        for sampler, r in e["pho"].items():
            pho_s = r["totals"]["pho_seconds"]
            hc_s = hc["totals"]["eval_seconds"]
            dt = None
            if r["final"].get("test_ppl") and hc["final"].get("test_ppl"):
                dt = 100 * (r["final"]["test_ppl"] - hc["final"]["test_ppl"]) / hc["final"]["test_ppl"]
            pho_cpu, hc_cpu = r["totals"]["pho_cpu_seconds"], hc["totals"]["eval_cpu_seconds"]
            cmp_rows.append([label, sampler, f"{pho_s:.1f}", f"{hc_s:.1f} ({hc['totals']['n_evals']} evals)",
                             f"{hc_s / pho_s:.2f}x", f"{hc_cpu / pho_cpu:.2f}x",
                             "n/a" if dt is None else f"{dt:+.2f}%"])
    cmp_table = md_table(["pattern", "PHO sampler", "PHO wall s", "hill climbing wall s", "HC / PHO wall",
                          "HC / PHO CPU time", "PHO test PPL vs HC"], cmp_rows)
    # proxy study
    study_pats = [p for p in pats if "proxy_study" in report["patterns"][p]]
    names = ["gini_pruned", "gini_retained", "outlier", "outlier_pruned", "outlier_retained"]
    paper = {"gini_pruned": "0.95 / 0.95 / 0.92", "gini_retained": "0.90 / 0.72 / 0.66", "outlier": "0.52 / 0.28 / 0.21",
             "outlier_pruned": "0.17 / 0.78 / 0.71", "outlier_retained": "-0.27 / -0.05 / 0.22"}
    study_rows = [[n, *[_f(report["patterns"][p]["proxy_study"]["spearman"][n]) for p in study_pats], paper[n]]
                  for n in names]
    study_table = md_table(["proxy", *[f"ρ at {p}" for p in study_pats], "paper (Qwen3.5-0.8B / L2-7B / L2-13B)"],
                           study_rows)
    figs = []
    for p in study_pats:
        key = p.replace(":", "-").replace("%", "pct")
        for n in names:
            figs.append(f"![{n} at {p}]({plot(report['patterns'][p]['proxy_study']['plots'][n], f'study-{key}-{n}.png')})")
    for p in pats:
        key = p.replace(":", "-").replace("%", "pct")
        e = report["patterns"][p]
        if "cmaes" in e["pho"]:
            figs.append(f"![PHO cmaes screening at {p}]({plot(e['pho']['cmaes']['plots']['screening'], f'screening-{key}.png')})")
            figs.append(f"![PHO cmaes stage 2 at {p}]({plot(e['pho']['cmaes']['plots']['proxy_vs_ppl'], f'stage2-{key}.png')})")
        figs.append(f"![hill climbing at {p}]({plot(e['hill_climb']['plots']['hill_climb'], f'hill-climb-{key}.png')})")
    findings = _findings(report, work, study_pats, names)
    b = report["budget"]
    calib = report["calibration"]
    s = report["settings"]
    text = f"""# PHO on the embedded SmolLM2: proxy study, samplers, hill climbing

Generated by `{report['command']}` (`make pho-report`) on {report['created_utc']} in
{report['wall_seconds'] / 60:.1f} min; raw numbers in `{work / 'pho_report.json'}` (not in git),
per-run JSON (every trial, every verified candidate) under `{work}/`.

## Budget (CPU-sized, not the paper's protocol)
- Model `{report['model']['spec']}` ({report['model']['n_params'] / 1e6:.1f}M parameters, float32, CPU).
- Calibration: {calib['n_samples']} windows x {calib['seqlen']} tokens from {calib['source']}, seed {calib['seed']},
  one set shared by every prune of a pattern.
- Every perplexity: the first {b['max_windows']} non-overlapping windows of {b['seqlen']} tokens of the
  WikiText-2 **validation** split (selection) or **test** split (reporting). Selection never sees test.
- PHO: {s['trials']} proxy trials (gini_pruned of block 0's q_proj), top-{s['top_k']} + the RIA point verified;
  CMA-ES starts at α=β=1, γ=1e-3 (unit mean 0.5, 0.5, 0.4) with σ=0.25; seeds 0.
- Hill climbing: from the RIA point, steps 0.5 / 0.5 / 1 decade, halved when a sweep fails;
  {s['hc_evals_main']} evaluations at {s['main_pattern']}, {s['hc_evals']} elsewhere.
- Machine: {report['machine'].get('cpu')}, {report['machine'].get('cores')} cores. Other processes may have shared the CPU;
  times of one table were measured in the same run.

Dense test perplexity: **{report['dense_test']:.3f}**.

## Proxy study (the paper's Table 2 on this model)
{s['configs']} configurations per pattern, drawn uniformly (seed 0) from α, β ∈ [0, 2], log10 γ ∈ [−5, 0];
Spearman ρ between each proxy and the validation perplexity (positive = the proxy ranks like PPL).

{study_table}

## PHO per sampler vs RIA, Wanda and hill climbing

{pho_table}

Stage 1 includes computing the target's input norms once; stage 2 is the full prune + validation PPL of
every verified candidate. The test PPL of a chosen configuration is one more prune + evaluation.

## Hill climbing vs PHO (same run, same per-evaluation budget)

{cmp_table}

## What this shows (computed from the tables above)
{findings}

## Reading these numbers
- See the notes below the tables in `docs/results.md` on what a 135M model at 256-token windows can and
  cannot tell about 7B-scale behaviour.
- Whatever the proxy's ρ is here, stage 2 always verifies the RIA point, so PHO's validation PPL can
  never be worse than RIA's; its test PPL can (the selection is made on validation).

## Plots

{chr(10).join(figs)}
"""
    write_text_atomic(out, text)
    if not args.quick:
        write_json_atomic(out.with_suffix(".json"), report)
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
