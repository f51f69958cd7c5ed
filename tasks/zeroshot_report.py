"""docs/zeroshot.md: the zero-shot comparison table of dense vs pruned models, its setup, the findings computed
from the rows and how to reproduce it (``python -m flows.zeroshot_table`` runs it).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from crepe.zeroshot import LABELS, TASK_DATA
from tasks.zeroshot import format_zero_shot_comparison

KEPT_SECTIONS = ("## Packed scorer vs stock HFLM",)  # written by bench/zeroshot_scorer.py; a rerun keeps them

CHANCE = {"boolq": "62.2 (majority)", "rte": "52.7 (majority)", "mnli": "35.4 (majority)", "hellaswag": "25",
          "arc_easy": "~25", "arc_challenge": "~25"}


GUIDE = """## How this is produced

- `make zeroshot` runs `python -m flows.zeroshot_table` (offline variables set): it prunes the model with
  Wanda, RIA and CRePE at 50% and 2:4 from fresh dense copies with one shared calibration set, and scores
  dense and each pruned model in memory with `crepe.zeroshot.run_zero_shot` (`tasks.compare.run_compare`). Options: `--limit N`
  (documents per task), `--all-docs`, `--methods`, `--patterns`, `--tasks`, `--crepe-params
  [PATTERN=]FILE` (a PHO search result; without it CRePE uses its documented defaults), `--out`, `--json`.
- One model: `crepe eval --model MODEL_OR_FOLDER --zero-shot all [--limit N] [--batch-size B] [--json F]`
  (`--no-pack` scores with lm-eval's own `HFLM`; `--ppl` adds
  WikiText-2 perplexity on the same loaded model).
- In the pipeline: `eval.zero_shot.tasks` in params.yaml; the evaluate step scores the pruned folder and the
  run logs `zero_shot/<task>/acc`, `zero_shot/<task>/acc_norm` and `zero_shot/avg_acc` to MLflow. In Python:
  `crepe.zeroshot.run_zero_shot(model, tokenizer, tasks, limit=...)` on a loaded model.

## Data files

The prompts, choices and metrics are lm-eval's own (its built-in task YAMLs); only the documents are
read from local files when the data directory has them (`--data-dir`, else `$CREPE_DATA_DIR`, else
`../shared/data`), and from the hub otherwise. Each file holds the official split in the hub
dataset's own schema (see each folder's SOURCE.md for origin, row counts and checksums):

| task | file in the data directory | rows | same as hub dataset / split |
|---|---|---:|---|
| boolq | `boolq/super_glue_boolq_validation.jsonl` | 3270 | `aps/super_glue` boolq / validation |
| rte | `rte/glue_rte_validation.parquet` | 277 | `nyu-mll/glue` rte / validation |
| mnli | `mnli/glue_mnli_validation_matched.jsonl` | 9815 | `nyu-mll/glue` mnli / validation_matched |
| hellaswag | `hellaswag/hellaswag_validation.jsonl` | 10042 | `Rowan/hellaswag` / validation |
| arc_easy | `arc/ARC-Easy-test.jsonl` | 2376 | `allenai/ai2_arc` ARC-Easy / test |
| arc_challenge | `arc/ARC-Challenge-test.jsonl` | 1172 | `allenai/ai2_arc` ARC-Challenge / test |

With network access a missing file is simply read from the hub. To make one for an offline machine:
`datasets.load_dataset("nyu-mll/glue", "rte", split="validation").to_parquet("DATA/rte/glue_rte_validation.parquet")`
(or `.to_json(path)`, which writes JSON lines, for the `.jsonl` files). A file whose row count differs
from the official one is refused; use `--limit` for a subset.
"""


def kept_sections(old: str) -> str:
    """The :data:`KEPT_SECTIONS` of an earlier docs/zeroshot.md (each up to the next ``## `` heading)."""
    parts = []
    for heading in KEPT_SECTIONS:
        if heading in old:
            body = old.split(heading, 1)[1]
            nxt = body.find("\n## ")
            parts.append("\n" + heading + (body if nxt < 0 else body[:nxt]).rstrip() + "\n")
    return "".join(parts)


def _doc_row(name: str, t: dict[str, Any]) -> str:
    src = t["source"]
    where = f"`{src['path']}` ({src['kind']}" + (f", sha256 {src['sha256'][:12]}...)" if src["sha256"] else ")")
    return (f"| {LABELS.get(name, name)} (`{name}`) | {t['n']} of {t['n_total']} | {TASK_DATA[name].split} | "
            f"{t['version']} | {where} | {CHANCE.get(name, '')} |")


def findings(rows: list[dict[str, Any]], noise: float) -> str:
    """Per pattern: each pruned method's drop in average acc from dense, the best method, and whether the
    spread between methods exceeds ``noise`` (twice the standard error of the average, in points)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows if r["method"] != "dense"):
        pruned = [r for r in rows if r["pattern"] == pattern and r["zero_shot"]["average_acc"] is not None]
        if not pruned:
            continue
        acc = {r["method"]: 100 * r["zero_shot"]["average_acc"] for r in pruned}
        best = max(acc, key=acc.get)
        spread = max(acc.values()) - min(acc.values())
        drops = ""
        if dense is not None and dense["zero_shot"]["average_acc"] is not None:
            d = 100 * dense["zero_shot"]["average_acc"]
            drops = " (" + ", ".join(f"{m} {v - d:+.2f}" for m, v in acc.items()) + " points vs dense)"
        crepe = next((r.get("params") or {} for r in pruned if r["method"] == "crepe"), None)
        same = "ria" in acc and crepe is not None and (crepe.get("alpha"), crepe.get("beta"), crepe.get("gamma")) == (1, 1, 0)
        text = (f"- {pattern}: the highest average acc is {best} ({acc[best]:.2f}){drops}; the spread between methods "
                f"is {spread:.2f} points, {'above' if spread > noise else 'within'} the noise level of about "
                f"{noise:.1f} points.")
        if same:
            text += " CRePE is RIA here: its coefficients are the RIA point (α=β=1, γ=0), which PHO kept."
        lines.append(text)
    return "\n".join(lines)


def render(result: dict[str, Any], json_path: str, keep: str = "") -> str:
    """docs/zeroshot.md from a finished run (``keep``: sections of the old file to carry over)."""
    rows = result["rows"]
    first = rows[0]["zero_shot"]
    names = result["tasks"]
    norm_tasks = [n for n in names if first["tasks"][n]["acc_norm"] is not None]
    norm_rows = [{**r, "zero_shot": {**r["zero_shot"], "tasks": {n: r["zero_shot"]["tasks"][n] for n in norm_tasks}}}
                 for r in rows]
    model = result["model"]
    calib = result["calibration"] or {}
    limit = result["limit"]
    docs = "\n".join(_doc_row(n, first["tasks"][n]) for n in names)
    runs = "\n".join(
        f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['prune_s']:.1f} | "
        f"{r['zero_shot']['throughput']['run_seconds']:.0f} | {r['params_from']} |"
        for r in rows
    )
    n_min = min(first["tasks"][n]["n"] for n in names)
    se_task = 100 * 0.5 / math.sqrt(n_min)
    se_avg = se_task / math.sqrt(len(names))
    crepe_params = "; ".join(f"{r['pattern']}: {json.dumps(r['params'])}" for r in rows if r["method"] == "crepe") or "-"
    argv = result.get("command", " ".join(sys.argv[1:]))
    found = findings(rows, 2 * se_avg)
    scoring = (f"crepe's `PackedLM` (a public `lm_eval.api.model.LM` that scores each document's context once for "
               f"all its choices, scorer `{first['scorer']}`); it gives stock `HFLM`'s accuracies (see \"Packed scorer "
               "vs stock HFLM\" below)." if first.get("scorer") else
               "crepe's `LiveHFLM` of the version that made this run (lm-eval's `HFLM` with each document's context "
               f"scored once for all its choices, `packed_contexts={first['packed_contexts']}`), which equals stock "
               "`HFLM` up to float rounding; today's scorer is `PackedLM` (see \"Packed scorer vs stock HFLM\" below).")
    command = f"`python -m flows.zeroshot_table {argv}`" if argv else "`make zeroshot` (`python -m flows.zeroshot_table`)"
    scope = "every document" if limit is None else f"the first {limit} documents of each task"
    return f"""# Zero-shot accuracy of pruned {model['spec']} (lm-eval {first['lm_eval_version']}, 0-shot)

Generated by {command} on {result['created_utc']} in {result['wall_seconds'] / 60:.0f} min; raw numbers in
`{json_path}`. Each cell is lm-eval's `acc` in percent on {scope}; `avg` is the unweighted mean over
the six tasks (the Wanda/RIA convention, spec §14.2).

## acc (%)

{format_zero_shot_comparison(rows, "acc")}

## acc_norm (%) (the tasks for which lm-eval defines it)

{format_zero_shot_comparison(norm_rows, "acc_norm")}

## Setup

- Model: `{model['spec']}` ({model['architecture']}, {model['n_params'] / 1e6:.1f}M parameters, {model['dtype']},
  content sha256 `{model['content_hash'][:16]}...`), evaluated in memory right after pruning (no save, no reload).
- Tasks: lm-eval's built-in task definitions (prompts, choices, metrics) from the installed lm-eval
  {first['lm_eval_version']}, with only the data source redirected to local copies of the official
  splits; 0-shot; `--limit` {limit if limit is not None else 'none'} takes the first documents in file order.
- Scoring: {scoring}
  Rows per forward: {first['batch_size']}.
- Calibration (pruned rows): {calib.get('n_samples')} windows x {calib.get('seqlen')} tokens from
  {calib.get('source')} (sha256 `{str(calib.get('sha256'))[:16]}...`), seed {calib.get('seed')},
  the same windows for every method. Comparison groups: Wanda per output row, RIA and CRePE per layer.
- CRePE coefficients: {crepe_params}.
- Machine: {result['machine']['platform']}, {result['machine']['cpu_threads']} threads; torch
  {result['versions']['torch']}, transformers {result['versions']['transformers']}; crepe code
  `{result['code'].get('git_sha') or result['code']['source_sha256'][:16]}`.

| task | documents scored | split | lm-eval task version | data | chance / majority of the split (%) |
|---|---:|---|---:|---|---:|
{docs}

## Every run

| method | pattern | achieved sparsity | prune seconds | zero-shot seconds | CRePE coefficients from |
|---|---|---:|---:|---:|---|
{runs}

## What this shows (computed from the rows above)

{found}

## Reading these numbers

- With {n_min} documents per task the standard error of one task's accuracy is up to
  {se_task:.1f} points (0.5 / sqrt(n)), and about {se_avg:.1f} points for the six-task average: differences
  between methods below roughly twice that are noise. `--all-docs` scores every document (hours on a CPU).
- Compare the pruned rows with this dense row, not with the papers' absolute numbers (spec §14.2:
  even the CRePE paper's dense LLaMA-2-7B row differs from standard `acc`).
- A {model['n_params'] / 1e6:.0f}M-parameter model is far from the 7B+ models of the papers: small models sit
  near chance on several of these tasks even dense (see the chance column), which compresses the
  differences between pruning methods.

""" + GUIDE + keep
