"""Benchmark: tokens per second of the zero-shot run vs the perplexity run on the same model (CPU).

One process, one loaded model, the same torch threads. Perplexity: the first ``--ppl-windows``
WikiText-2 test windows of ``--seqlen`` tokens, ``--ppl-batch`` windows per forward
(``crepe.evaluate.perplexity``). Zero-shot: the lm-eval requests of the first ``--limit`` documents
of every task (built once, 0-shot), scored three ways:

- ``stock``: lm-eval's own ``HFLM`` around the live model (``crepe.zeroshot.scorer.stock_hflm``);
- ``rows``: crepe's ``PackedLM`` (``crepe.zeroshot.scorer``) with ``pack=False`` (lm-eval's rows; vocabulary
  logits only where read, contexts tokenised once) - bit-identical scores;
- ``packed``: ``PackedLM`` (each context once per document, its choices in the same row).

Every mode is called through lm-eval's public model interface (``loglikelihood``).

Tokens per second counts *request tokens*: the tokens stock lm-eval feeds the model for these requests
(``(context + continuation)[:-1]`` per request; one row for one-token continuations sharing a
context), so the three zero-shot rates divide the same work and their ratios are speedups. ``model
tok/s`` counts the tokens each mode really fed the model. Perplexity tokens are windows x seqlen.
After one untimed warm-up of everything, ``--repeats`` interleaved rounds ppl, stock, rows, packed;
medians. Tokenisation of all request pairs is timed separately: stock as ``HFLM`` splits a pair (its public
``tok_encode`` on context + continuation and on the context, for every pair) and crepe's
``PackedLM.encode_requests`` (each context once).

    .venv/bin/python -m bench.zeroshot_speed [--quick] [--limit 20] [--tasks all] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from bench._common import (
    add_common_args,
    apply_threads,
    command_line,
    machine_info,
    md_table,
    median,
    now,
    section_text,
    should_write,
    update_section,
)

MODES = ("stock", "rows", "packed")


def _requests(tasks: dict[str, Any], limit: int) -> list[Any]:
    from crepe.zeroshot import quiet_lm_eval

    reqs: list[Any] = []
    with quiet_lm_eval():
        for task in tasks.values():
            task.build_all_requests(limit=limit)
            reqs += [r for r in task.instances for _ in range(r.repeats)]
    return reqs


def _stock_split(stock: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """A request pair split as lm-eval's HFLM splits it, with its public ``tok_encode``: trailing context spaces
    move to the continuation, then context + continuation and the context are each encoded (every pair)."""
    if not context:
        return [stock.prefix_token_id], stock.tok_encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = stock.tok_encode(context + continuation), stock.tok_encode(context)
    return ctx, whole[len(ctx):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zeroshot_speed", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--tasks", default="all", help="zero-shot tasks (default all six)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default 20, quick 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="zero-shot rows per forward (default 8)")
    parser.add_argument("--seqlen", type=int, default=None, help="perplexity window (default 256, quick 128)")
    parser.add_argument("--ppl-windows", type=int, default=None, help="perplexity windows (default 16, quick 2)")
    parser.add_argument("--ppl-batch", type=int, default=4, help="perplexity windows per forward (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 3, quick 1)")
    args = parser.parse_args(argv)
    apply_threads(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    limit = args.limit or (3 if args.quick else 20)
    seqlen = args.seqlen or (128 if args.quick else 256)
    windows = args.ppl_windows or (2 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    info, date, started = machine_info(), now(), time.perf_counter()

    from crepe.data import get_eval_tokens
    from crepe.evaluate import perplexity
    from crepe.models import load_model
    from crepe.zeroshot import build_tasks, parse_tasks, resolve_sources
    from crepe.zeroshot.scorer import PackedLM, stock_hflm

    lm = load_model(args.model, device="cpu")
    names = parse_tasks(args.tasks)
    sources = resolve_sources(names)
    t0 = time.perf_counter()
    tasks = build_tasks(names, sources)
    load_s = time.perf_counter() - t0
    reqs = _requests(tasks, limit)
    ids, eval_info = get_eval_tokens(lm.tokenizer, "test")
    stock = stock_hflm(lm.model, lm.tokenizer, args.batch_size)
    wrappers = {
        "stock": stock,
        "rows": PackedLM(lm.model, lm.tokenizer, args.batch_size, pack=False),
        "packed": PackedLM(lm.model, lm.tokenizer, args.batch_size, pack=True),
    }

    def run_ppl() -> tuple[float, int]:
        t = time.perf_counter()
        res = perplexity(lm.model, ids, seqlen, max_windows=windows, batch_size=args.ppl_batch)
        return time.perf_counter() - t, res.n_tokens

    def run_zs(mode: str) -> tuple[float, list[tuple[float, bool]]]:
        w = wrappers[mode]
        t = time.perf_counter()
        out = w.loglikelihood(reqs, disable_tqdm=True)
        return time.perf_counter() - t, out

    print(f"[bench.zeroshot_speed] {len(reqs)} requests from {len(names)} tasks x {limit} docs; warm-up", flush=True)
    run_ppl()
    outputs = {m: run_zs(m)[1] for m in MODES}
    live = wrappers["packed"]
    request_tokens = live.stats.request_tokens
    fed = {m: wrappers[m].stats.tokens for m in ("rows", "packed")}
    fed["stock"] = request_tokens
    times: dict[str, list[float]] = {"ppl": [], **{m: [] for m in MODES}}
    ppl_tokens = 0
    for r in range(repeats):
        dt, ppl_tokens = run_ppl()
        times["ppl"].append(dt)
        for mode in MODES:
            times[mode].append(run_zs(mode)[0])
        print(f"[bench.zeroshot_speed] round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {median(v[-1:]):.2f} s" for k, v in times.items()), flush=True)

    pairs = [r.args for r in reqs]
    t = time.perf_counter()
    for c, x in pairs:
        _stock_split(stock, c, x)
    tok_s = {"stock": time.perf_counter() - t}
    t = time.perf_counter()
    PackedLM(lm.model, lm.tokenizer, args.batch_size).encode_requests(pairs)  # a fresh scorer: no context reused
    tok_s["crepe"] = time.perf_counter() - t
    wall = time.perf_counter() - started

    ppl_rate = ppl_tokens / median(times["ppl"])
    base = [x[0] for x in outputs["stock"]]
    rows, raw_modes = [], {}
    for mode in MODES:
        sec = median(times[mode])
        rate = request_tokens / sec
        diff = max(abs(a[0] - b) for a, b in zip(outputs[mode], base))
        same = sum(a[1] == b[1] for a, b in zip(outputs[mode], outputs["stock"]))
        rows.append([mode, f"{sec:.2f}", f"{rate:.0f}", f"{fed[mode] / sec:.0f}", f"{rate / ppl_rate:.2f}",
                     f"{median(times['stock']) / sec:.2f}", f"{diff:.1e}", f"{same}/{len(reqs)}"])
        raw_modes[mode] = {"seconds": times[mode], "request_tok_s": rate, "model_tokens": fed[mode],
                           "max_abs_loglik_diff_vs_stock": diff}
    table = md_table(
        ["run", "seconds (median)", "request tok/s", "model tok/s", "tok/s ÷ perplexity tok/s", "speed-up vs stock",
         "max loglik diff vs stock", "same greedy flag"],
        [["perplexity", f"{median(times['ppl']):.2f}", f"{ppl_rate:.0f}", f"{ppl_rate:.0f}", "1.00", "", "", ""], *rows],
    )
    body = "\n\n".join([
        f"Model `{args.model}` (float32, CPU). Perplexity: {windows} windows x {seqlen} tokens of {eval_info.source} "
        f"test, {args.ppl_batch} per forward ({ppl_tokens} tokens). Zero-shot: {', '.join(names)}, first {limit} "
        f"documents each, 0-shot, {len(reqs)} lm-eval requests = {request_tokens} request tokens, {args.batch_size} "
        f"rows per forward. {repeats} interleaved rounds after a warm-up; medians. Task loading (lm-eval configs + "
        f"local files) took {load_s:.1f} s once and is not in these times.",
        table,
        f"Tokenisation of all {len(reqs)} request pairs: stock {tok_s['stock'] * 1e3:.1f} ms, crepe (each context "
        f"once) {tok_s['crepe'] * 1e3:.1f} ms.",
    ])
    print(body)
    raw = {"limit": limit, "tasks": names, "requests": len(reqs), "request_tokens": request_tokens,
           "ppl": {"tokens": ppl_tokens, "seconds": times["ppl"], "tok_s": ppl_rate}, "modes": raw_modes,
           "tokenise_s": tok_s, "task_load_s": load_s}
    if should_write(args):
        text = section_text(
            "Zero-shot vs perplexity throughput", command_line("bench.zeroshot_speed", argv), info, date, wall, body,
            ["Report the ratio zero-shot tok/s ÷ perplexity tok/s (no pass/fail target); packed scores equal stock "
             "up to float rounding and `rows` bit for bit."],
            raw,
        )
        print(f"[bench.zeroshot_speed] wrote {update_section('zeroshot_speed', text)}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
