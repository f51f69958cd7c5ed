"""docs/architectures.md: which decoder families crepe prunes, with which methods, and what it refuses.

Every family of :mod:`bench.families` (tiny seeded models from the pinned transformers' own
configs) is pruned with every method at 50 % unstructured, 2:4 and 4:8 sparsity; each cell is
verified (exact counts per the method's rule, N:M validity, finite logits), not assumed. Refused
families get the refusal sentence and, where one exists, the ``--ignore`` / ``--blocks`` options
that make them prunable, also computed. Run from the repository root::

    .venv/bin/python -m bench.architectures            # writes docs/architectures.md
    .venv/bin/python -m bench.architectures --no-write # prints only
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architectures.md"
COMMAND = "python -m bench.architectures  # or: make architectures"
METHODS = ("magnitude", "wanda", "ria", "crepe", "sparsegpt")
SPARSITIES = ("0.5", "2:4", "4:8")
CALIB_N, CALIB_SEQLEN = 4, 16


@dataclass
class FamilyResult:
    name: str
    model_type: str
    model_class: str = ""
    blocks: str = ""
    kinds: Counter = field(default_factory=Counter)  # pruned matrices per kind (all blocks)
    dense: list[str] = field(default_factory=list)  # left dense by default: "name (kind): reason"
    refused: str | None = None  # the CrepeError sentence
    workaround: str | None = None  # options that make a refused family prunable
    cells: dict[tuple[str, str], str] = field(default_factory=dict)  # (method, sparsity) -> "ok" | error
    warnings: list[str] = field(default_factory=list)


def _local(name: str, path: str) -> str:
    """``model.layers.3.mlp.gate`` -> ``mlp.gate`` (block-relative, the same in every block)."""
    return re.sub(rf"^{re.escape(path)}\.\d+\.", "", name)


def _dense_rows(report: Any, path: str) -> list[str]:
    rows: Counter = Counter()
    for row in report.skipped:
        rows[(_local(row["name"], path), row["kind"], row["reason"])] += 1
    return [f"`{n}` x{c} ({k})" if k == "router" and why.startswith("router/gate weights are not pruned")
            else f"`{n}` x{c} ({k}: {why})" for (n, k, why), c in sorted(rows.items())]


def _check_cell(model: nn.Module, report: Any, sparsity: str, ids: torch.Tensor) -> str:
    import crepe

    spec = crepe.parse_sparsity(sparsity)
    for layer in report.layers:
        if layer.n_zeros < report.mask_pruned[layer.name]:
            return f"{layer.name}: fewer zeros than pruned"
        if spec.pattern is not None and layer.nm_valid is not True:
            return f"{layer.name}: invalid {spec.pattern}"
    if abs(report.sparsity - spec.sparsity) > 1e-3:
        return f"sparsity {report.sparsity:.4f}"
    with torch.no_grad():
        if not torch.isfinite(model(input_ids=ids).logits).all():
            return "non-finite logits"
    return "ok"


def _router_like_pruned(report: Any, path: str, n_experts: int) -> list[str]:
    """Pruned matrices with one output per expert (or a single output) in an MoE block: routers."""
    names = {_local(layer.name, path) for layer in report.layers if layer.shape[0] in (n_experts, 1)}
    return sorted(names)


def _workaround(family: str, ids: torch.Tensor, message: str) -> str | None:
    """The --ignore / --blocks options under which the family prunes (wanda 2:4), found by retrying."""
    import crepe
    from bench.families import build_family

    ignore: list[str] = []
    blocks: str | None = None
    for _ in range(12):
        if "could not find the decoder blocks" in message and blocks is None:
            model = build_family(family)
            lists = [(sum(p.numel() for p in m.parameters()), n) for n, m in model.named_modules()
                     if isinstance(m, nn.ModuleList) and len(m)]
            blocks = max(lists)[1] if lists else None
            if blocks is None:
                return None
        else:
            match = re.search(r"block weight (\S+) \(", message)
            if match is None:
                return None
            local = re.sub(r"^.*?\.\d+\.", "", match.group(1))
            ignore.append(re.escape(local) + "$")
        model = build_family(family)
        config = crepe.PruneConfig("wanda", crepe.parse_sparsity("2:4"), ignore="|".join(ignore) or None)
        try:
            crepe.prune_model(model, ids, config, blocks_path=blocks, batch_size=CALIB_N)
        except crepe.CrepeError as exc:
            message = str(exc)
            continue
        except Exception as exc:  # the model itself fails: no workaround to offer
            return f"none (with those options: {type(exc).__name__}: {str(exc)[:100]})"
        opts = ([f"`--blocks {blocks}`"] if blocks else []) + ([f"`--ignore '{'|'.join(ignore)}'`"] if ignore else [])
        return " ".join(opts)
    return None


def run_family(name: str, ids: torch.Tensor) -> FamilyResult:
    import crepe
    from bench.families import FAMILIES, N_EXPERTS, build_family
    from crepe.blocks import find_blocks

    family = FAMILIES[name]
    result = FamilyResult(name, family.model_type)
    model = build_family(name)
    result.model_class = type(model).__name__
    try:
        path, _ = find_blocks(model)
        result.blocks = path
    except crepe.CrepeError:
        pass
    for method in METHODS:
        for sparsity in SPARSITIES:
            pruned = copy.deepcopy(model)
            config = crepe.PruneConfig(method, crepe.parse_sparsity(sparsity))
            try:
                report = crepe.prune_model(pruned, ids, config, batch_size=CALIB_N)
            except crepe.CrepeError as exc:
                if result.refused is None:
                    result.refused = str(exc)
                result.cells[(method, sparsity)] = "refused"
                continue
            except Exception as exc:  # a crash is a finding: record it, keep going
                result.cells[(method, sparsity)] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
                continue
            result.cells[(method, sparsity)] = _check_cell(pruned, report, sparsity, ids)
            if not result.kinds:
                result.kinds = Counter(report.kinds.values())
                result.dense = _dense_rows(report, report.blocks_path)
                if family.moe:
                    routers = _router_like_pruned(report, report.blocks_path, N_EXPERTS)
                    if routers:
                        result.warnings.append(
                            "pruned although router-shaped (one output per expert): "
                            + ", ".join(f"`{r}`" for r in routers)
                        )
    if result.refused is not None:
        result.workaround = _workaround(name, ids, result.refused)
    return result


def _cell(result: FamilyResult, method: str) -> str:
    marks = []
    for sparsity in SPARSITIES:
        value = result.cells.get((method, sparsity), "")
        marks.append("ok" if value == "ok" else ("refused" if value == "refused" else f"FAIL ({value})"))
    if all(m == "ok" for m in marks):
        return "ok, router pruned (see notes)" if result.warnings else "ok"
    if all(m == "refused" for m in marks):
        return "refused"
    return " / ".join(marks)


def _notes_line(n: int) -> str:
    if not n:
        return ""
    return f" Read the notes of {n} pruned famil{'y' if n == 1 else 'ies'}: a router-shaped matrix was pruned."


def render(results: list[FamilyResult]) -> str:
    import transformers

    import crepe

    supported = [r for r in results if r.refused is None and all(v == "ok" for v in r.cells.values())]
    refused = [r for r in results if r.refused is not None]
    other = [r for r in results if r not in supported and r not in refused]
    lines = [
        "# Architectures",
        "",
        f"Generated by `{COMMAND}`; do not edit by hand.",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, crepe {crepe.__version__}. "
        f"Every family is a tiny seeded model built from the pinned transformers' own configuration class "
        f"(`bench/families.py`: hidden 64, 2 decoder layers, vocab 128; mixture-of-experts families with "
        f"4 experts, top-2), calibrated on {CALIB_N} x {CALIB_SEQLEN} random tokens and pruned with every "
        f"method at {', '.join(SPARSITIES)}. A cell is `ok` when the prune ran and was verified: every "
        "pruned matrix holds its exact count of zeros, every N:M group is valid, the overall sparsity is "
        "the target and the logits are finite. `tests/test_architectures.py` checks the same matrix in "
        "more depth (independent weight inventory, untouched non-pruned tensors, save/reload with identical "
        "logits, routed-token statistics).",
        "",
        f"**{len(supported)} famil{'y' if len(supported) == 1 else 'ies'} pruned** with every method and pattern, "
        f"**{len(refused)} refused** "
        f"(a CrepeError naming the weight, before any weight changes)"
        + (f", {len(other)} with failures" if other else "") + "."
        + _notes_line(sum(1 for r in supported if r.warnings)),
        "",
        "## Method x pattern",
        "",
        f"Each cell covers {', '.join(SPARSITIES)}; `ok` means all of them passed.",
        "",
        "| family | model class | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for r in results:
        lines.append(f"| {r.name} | `{r.model_class}` | " + " | ".join(_cell(r, m) for m in METHODS) + " |")
    lines += [
        "",
        "## Weight kinds and what stays dense",
        "",
        "Counts are over both blocks of the tiny model, as the pruner classifies them (`crepe/weights.py`): "
        "`linear` (nn.Linear and subclasses), `conv1d` (GPT-2 Conv1D, seen transposed), `expert` (one "
        "matrix per expert: a slice of a fused 3-D parameter or a per-expert linear), `router` (left dense "
        "unless `prune_router`: `router/gate weights are not pruned by default`). Embeddings, norms, biases "
        "and the LM head are never pruned. `xN`: the matrix appears in N blocks.",
        "",
        "| family | blocks | linear | conv1d | expert | left dense by default | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    from bench.families import FAMILIES

    for r in results:
        if r.refused is not None:
            continue
        notes = "; ".join([FAMILIES[r.name].note] * bool(FAMILIES[r.name].note) + r.warnings)
        lines.append(
            f"| {r.name} | `{r.blocks}` | {r.kinds.get('linear', 0)} | {r.kinds.get('conv1d', 0)} | "
            f"{r.kinds.get('expert', 0)} | {'<br>'.join(r.dense) or '-'} | {notes or '-'} |"
        )
    if refused:
        lines += [
            "",
            "## Refused families",
            "",
            "crepe refuses a model holding a weight tensor of two or more dimensions that it cannot prune "
            "(a convolution, a state-space tensor, ...) rather than skip it silently. The workaround "
            "column is computed: the options under which `wanda` 2:4 then prunes the rest of the model.",
            "",
            "| family | refusal | workaround |",
            "|---|---|---|",
        ]
        for r in refused:
            reason = (r.refused or "").replace("|", "\\|")
            workaround = (r.workaround or "none found").replace("|", "\\|")
            lines.append(f"| {r.name} | {reason} | {workaround} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the markdown, leave docs/ alone")
    parser.add_argument("--families", default=None, help="comma-separated subset (implies --no-write)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from bench.families import FAMILIES, random_ids

    names = args.families.split(",") if args.families else list(FAMILIES)
    ids = random_ids(CALIB_N, CALIB_SEQLEN, seed=1234)
    started = time.perf_counter()
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(run_family(name, ids))
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    text = render(results)
    if args.no_write or args.families:
        print(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(REPO)} ({len(results)} families, {seconds:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
