"""Benchmark: crepe's packed zero-shot scorer against lm-eval's stock HFLM, side by side in one process.

Both run the same lm-eval evaluation (``crepe.zeroshot.run_zero_shot``, i.e. ``lm_eval.simple_evaluate`` on
crepe's task YAMLs) on the same loaded model: ``pack=True`` scores with :class:`crepe.zeroshot.scorer.PackedLM`,
``pack=False`` with lm-eval's own ``HFLM``. After one untimed warm-up of each (``--warmup`` documents),
``--repeats`` interleaved rounds packed, stock; medians of the evaluation seconds. The accuracies must be
identical: packed log-likelihoods equal HFLM's up to float rounding (about 1e-5), so only a near-tie between
two choices could flip one; when accuracies differ, the per-request log-likelihoods of both scorers are
compared and the closest-call margins printed, to explain it.

    .venv/bin/python -m bench.zeroshot_scorer [--limit 20] [--tasks boolq,hellaswag] [--threads 2] [--write]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import command_line, machine_info, md_table, median, now

DOC = Path(__file__).resolve().parent.parent / "docs" / "zeroshot.md"
HEADING = "## Packed scorer vs stock HFLM"


def _explain(lm: Any, names: list[str], limit: int, batch_size: int) -> str:
    """Per-request comparison of the two scorers, for a run whose accuracies differ."""
    from crepe import zeroshot as zs
    from crepe.zeroshot.scorer import stock_hflm

    tasks = zs.build_tasks(names, zs.resolve_sources(names))
    reqs = []
    with zs.quiet_lm_eval():
        for task in tasks.values():
            task.build_all_requests(limit=limit)
            reqs += list(task.instances)
    packed = zs.live_hflm(lm.model, lm.tokenizer, batch_size).loglikelihood(reqs)
    stock = stock_hflm(lm.model, lm.tokenizer, batch_size).loglikelihood(reqs, disable_tqdm=True)
    diff = max(abs(a[0] - b[0]) for a, b in zip(packed, stock, strict=True))
    return f"max |loglik packed - stock| over {len(reqs)} requests: {diff:.2e}"


def write_section(text: str, doc: Path = DOC) -> Path:
    """Append ``text`` (starting with HEADING) to ``doc``, replacing an earlier copy of the section."""
    old = doc.read_text() if doc.is_file() else ""
    pattern = re.compile(rf"\n{re.escape(HEADING)}\n.*?(?=\n## |\Z)", re.DOTALL)
    kept = pattern.sub("", old).rstrip("\n")
    doc.write_text((kept + "\n\n" if kept else "") + text.rstrip("\n") + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zeroshot_scorer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--tasks", default="boolq,hellaswag")
    parser.add_argument("--limit", type=int, default=20, help="documents per task (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="documents per task of the untimed warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timed rounds (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--write", action="store_true", help=f"append the result to docs/zeroshot.md ({HEADING})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started, date, info = time.perf_counter(), now(), machine_info()

    from crepe.models import load_model
    from crepe.zeroshot import lm_eval_version, parse_tasks, run_zero_shot

    names = parse_tasks(args.tasks)
    lm = load_model(args.model, device="cpu")

    def run(pack: bool, limit: int) -> dict[str, Any]:
        return run_zero_shot(lm.model, lm.tokenizer, names, limit, args.batch_size, pack=pack)

    print(f"[bench.zeroshot_scorer] {args.model}: {', '.join(names)} x {args.limit} docs; warm-up", flush=True)
    run(True, args.warmup)
    run(False, args.warmup)
    results: dict[str, list[dict[str, Any]]] = {"packed": [], "stock": []}
    for r in range(args.repeats):
        for mode in ("packed", "stock"):
            results[mode].append(run(mode == "packed", args.limit))
        print(f"[bench.zeroshot_scorer] round {r + 1}/{args.repeats}: " + ", ".join(
            f"{m} {v[-1]['throughput']['run_seconds']:.1f} s" for m, v in results.items()), flush=True)
    seconds = {m: median([x["throughput"]["run_seconds"] for x in v]) for m, v in results.items()}
    first = {m: v[0] for m, v in results.items()}
    keys = ("acc", "acc_norm")
    same = all(first["packed"]["tasks"][n][k] == first["stock"]["tasks"][n][k] for n in names for k in keys)
    rows = [[n, k, f"{100 * first['packed']['tasks'][n][k]:.1f}", f"{100 * first['stock']['tasks'][n][k]:.1f}"]
            for n in names for k in keys if first["packed"]["tasks"][n][k] is not None]
    thr = first["packed"]["throughput"]
    ratio = seconds["stock"] / seconds["packed"]
    verdict = "identical" if same else "DIFFERENT (" + _explain(lm, names, args.limit, args.batch_size) + ")"
    body = "\n\n".join([
        md_table(["task", "metric", "packed (%)", "stock HFLM (%)"], rows),
        md_table(["scorer", "evaluation seconds (median)", "speed-up vs stock"],
                 [["packed (PackedLM)", f"{seconds['packed']:.1f}", f"{ratio:.2f}"],
                  ["stock (lm-eval HFLM)", f"{seconds['stock']:.1f}", "1.00"]]),
        f"Accuracies {verdict}. The packed scorer fed the model {thr['tokens']} tokens in {thr['rows']} rows "
        f"({thr['packed_rows']} packed) where stock HFLM feeds {thr['request_tokens']} request tokens for the same "
        f"{thr['requests']} requests. Seconds are `throughput.run_seconds` (the whole `lm_eval.simple_evaluate` "
        "call, including lm-eval's own bookkeeping), task loading excluded.",
    ])
    wall = time.perf_counter() - started
    text = "\n\n".join([
        HEADING,
        f"Measured by `{command_line('bench.zeroshot_scorer', argv)}` on {date} ({wall:.0f} s wall): model "
        f"`{args.model}` (float32, CPU, {args.threads} torch threads, {info.get('cores')} cores), lm-eval "
        f"{lm_eval_version()}, {', '.join(names)}, first {args.limit} documents each, 0-shot, batch size "
        f"{args.batch_size}, {args.repeats} interleaved round(s) after a {args.warmup}-document warm-up.",
        body,
    ])
    print(text)
    if args.write:
        print(f"[bench.zeroshot_scorer] wrote {write_section(text)}")
    return 0 if same else 1


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
