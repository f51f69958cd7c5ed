"""The model card (``README.md``) of a release, built with huggingface_hub's ``ModelCard``.

The YAML metadata (base model, license, language, tags, pipeline tag, library) is a ``ModelCardData``; the
body states the lineage (base model, method, pattern, coefficients and where they came from, data with
sha256, measured sparsity), the metrics, and an honest performance note: the zeros are stored in dense
tensors, so unstructured sparsity makes the files neither smaller nor faster in standard runtimes.

:func:`render_model_card` is deterministic (same record and fields, same text) and never prints ``None``:
a value the record lacks reads "not recorded" or its line is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from tasks.verify import RELEASE_MANIFEST

CARD = "README.md"
CARD_FIELDS = ("title", "summary", "base_model", "license", "language", "tags", "notes")
# Hub ids of the embedded models, for the card's ``base_model:`` metadata.
HUB_IDS = {"embedded:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
MISSING = "not recorded"
# The order of the metadata keys in the card's YAML block.
METADATA_ORDER = ("base_model", "base_model_relation", "license", "language", "library_name", "pipeline_tag", "tags")

PERFORMANCE_NOTE = (
    "The pruned weights are stored as zeros inside ordinary dense tensors. **Unstructured sparsity makes "
    "the files no smaller and inference no faster in standard runtimes** (PyTorch, transformers, llama.cpp, "
    "vLLM): every zero is still stored and multiplied. An N:M pattern such as 2:4 can be accelerated by "
    "the sparse tensor cores of NVIDIA Ampere or newer GPUs, but only by runtimes that use them (for "
    "example PyTorch's `to_sparse_semi_structured`); vLLM removed its 2:4 kernels in 2026. Expect the "
    "quality numbers above, not a speed-up."
)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _short(sha: Any) -> str:
    return f"`{str(sha)[:16]}...`" if sha else MISSING


def hub_id_of(base: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
    """The base model's Hub id for the card's metadata: the caller's, an embedded model's, or a hub spec's."""
    hub_id = fields.get("base_model") or HUB_IDS.get(base["spec"])
    if hub_id is None and base.get("kind") == "hub":
        hub_id = str(base["spec"]).removeprefix("hf:").split("@", 1)[0]
    return hub_id


def card_data(record: Mapping[str, Any], fields: Mapping[str, Any]) -> ModelCardData:
    """The card's YAML metadata; absent values are left out (``ModelCardData`` drops ``None``)."""
    prune = record["prune"]
    hub_id = hub_id_of(record["base_model"], fields)
    shape = f"{str(prune['pattern']).replace(':', 'of')}-sparsity" if prune.get("pattern") else "unstructured-sparsity"
    tags = ["pruning", "sparsity", "crepe", f"method-{prune['method']}", shape, *list(fields.get("tags") or [])]
    return ModelCardData(
        base_model=hub_id,
        # The Hub has no "pruned" relation: these are the base model's weights with pruned entries set to 0.
        base_model_relation="finetune" if hub_id else None,
        license=fields.get("license") or None,
        language=fields.get("language") or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )


def _data_line(label: str, info: Mapping[str, Any] | None) -> str:
    if not info:
        return f"- {label}: {MISSING}."
    extra = []
    if info.get("n_samples"):
        extra.append(f"{info['n_samples']} windows x {_fmt(info.get('seqlen'))} tokens, seed {_fmt(info.get('seed'))}")
    if info.get("split"):
        extra.append(f"split {info['split']}")
    tail = f" ({'; '.join(extra)})" if extra else ""
    path = f" `{info['path']}`" if info.get("path") else ""
    return f"- {label}: {_fmt(info.get('source'))}{path}, sha256 {_short(info.get('sha256'))}{tail}."


def _kinds_lines(prune: Mapping[str, Any]) -> list[str]:
    """The card's lines on weight kinds (experts apart) and on every block matrix left dense."""
    lines = []
    kinds = prune.get("by_kind") or {}
    if kinds:
        lines.append("- Pruned weight kinds: " + "; ".join(
            f"{kind} {row['n_weights']} matrices at {row['sparsity']:.4f}" for kind, row in kinds.items()) + ".")
    skipped = prune.get("skipped") or []
    if skipped:
        reasons: dict[str, int] = {}
        for row in skipped:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        whole = prune.get("all_block_weights") or {}
        lines.append(f"- Left dense: {len(skipped)} block weight matrices ("
                     + "; ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
                     + (f"); sparsity over every block weight matrix {whole['sparsity']:.4f}." if whole else ")."))
    return lines


def _metric_rows(record: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, value in (record.get("metrics") or {}).items():
        if isinstance(value, Mapping):
            val = value.get("value", value.get("ppl"))
            settings = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()
                                 if k not in ("value", "ppl") and v is not None and not isinstance(v, (Mapping, list)))
            rows.append(f"| {name} | {_fmt(val)} | {settings} |")
        else:
            rows.append(f"| {name} | {_fmt(value)} | |")
    smoke = record.get("smoke_test")
    if smoke:
        rows.append(f"| smoke-test perplexity | {_fmt(smoke.get('ppl'))} | {_fmt(smoke.get('split'))} of "
                    f"{_fmt((smoke.get('data') or {}).get('source'))}, {_fmt(smoke.get('n_windows'))} windows x "
                    f"{_fmt(smoke.get('seqlen'))} tokens (repeated by `crepe verify`) |")
    return rows


def _metrics_table(record: Mapping[str, Any]) -> list[str]:
    rows = _metric_rows(record)
    if not rows:
        return ["No metrics recorded."]
    return ["| metric | value | settings |", "|---|---:|---|", *rows]


def _done_lines(record: Mapping[str, Any], label: str, hub_id: str | None) -> list[str]:
    """The "What was done" section: base model, method, coefficients, refinement, measured sparsity."""
    base, prune, sp = record["base_model"], record["prune"], record["sparsity"]
    kind = base.get("architecture") or base.get("kind")
    hub = base.get("hub")
    params = prune.get("params") or {}
    coeffs = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "none"
    search = record.get("search")
    origin = (f"found by PHO (summary `{_fmt(search.get('path'))}`, sha256 {_short(search.get('sha256'))})"
              if search else "given in the configuration (no search)")
    group = ""
    if prune.get("group"):
        group = f", comparison group `{prune['group']}`" + (f", selection rule `{prune['rule']}`" if prune.get("rule") else "")
    nm = ""
    if sp.get("pattern"):
        n, m = str(sp["pattern"]).split(":")
        nm = f" Every group of {m} consecutive inputs holds at least {n} zeros: {'yes' if sp.get('nm_valid') else 'NO'}."
    lines = [
        f"- Base model: `{base['spec']}`" + (f" ({kind})" if kind else "")
        + f", content sha256 {_short(base.get('content_hash'))}"
        + (f" (hub repo `{_fmt(hub.get('repo_id'))}` at commit `{_fmt(hub.get('commit'))}`)" if hub else "") + ".",
        f"- Method: `{prune['method']}`, {label}{group}.",
        f"- Coefficients: {coeffs}; {origin}.",
        f"- Refinement: {(record.get('refine') or {}).get('method') or 'none'}; layer-wise allocation: "
        f"{(record.get('allocation') or {}).get('method') or 'none'}.",
        f"- Measured sparsity: {sp['overall']:.4f} over {_fmt(sp.get('n_linears'))} pruned weight matrices of "
        f"`{_fmt(sp.get('blocks_path'))}` ({_fmt(sp.get('total_zeros'))} zeros of {_fmt(sp.get('total_numel'))} "
        f"weights; embeddings, norms and the output head are not pruned).{nm}",
        *_kinds_lines(prune),
    ]
    if hub_id:
        lines.append("- Hub metadata: `base_model_relation: finetune`, because the Hub has no \"pruned\" relation; "
                     "these are the base model's weights with the pruned entries set to 0.")
    return lines


def _reproduce_lines(record: Mapping[str, Any]) -> list[str]:
    code = record.get("code") or {}
    versions = record.get("versions") or {}
    recorded = [f"{name} {versions[name]}" for name in ("torch", "transformers", "python") if versions.get(name)]
    return [
        f"- `crepe verify <this folder>` recomputes the sha256 of every file listed in `{RELEASE_MANIFEST}`, "
        "re-counts the zeros of every pruned layer (and the N:M groups) and re-runs the smoke-test perplexity.",
        f"- `{RELEASE_MANIFEST}` holds the full lineage: base model, data hashes"
        + (", the resolved configuration" if record.get("config") else "")
        + (", the PHO search summary" if record.get("search") else "")
        + ", per-layer sparsity, package versions and the machine.",
        f"- Code: crepe {_fmt(code.get('crepe_version'))}, git {code.get('git_sha') or 'unknown'}"
        + (" (uncommitted changes)" if code.get("git_dirty") else "")
        + f", source sha256 {_short(code.get('source_sha256'))}.",
        f"- Versions: {', '.join(recorded) or MISSING}.",
    ]


def render_model_card(record: Mapping[str, Any], fields: Mapping[str, Any]) -> str:
    """README.md of a release from its manifest ``record`` and the caller's ``fields`` (deterministic)."""
    base, prune = record["base_model"], record["prune"]
    label = prune.get("pattern") or f"{float(prune['sparsity']) * 100:g}% unstructured"
    data = record.get("data") or {}
    body = [
        "",
        "# " + str(fields.get("title") or f"{base['spec']} pruned with {prune['method']} ({label})"),
        "",
        str(fields.get("summary") or f"`{base['spec']}` with {label} of the weights of its decoder-block linear layers "
                                     f"set to zero by the `{prune['method']}` criterion, without retraining."),
        "",
        "## What was done",
        "",
        *_done_lines(record, label, hub_id_of(base, fields)),
        "",
        "## Data",
        "",
        _data_line("Calibration", data.get("calibration")),
        _data_line("Evaluation", data.get("evaluation")),
        "",
        "## Metrics",
        "",
        *_metrics_table(record),
        "",
        "## Performance: read before deploying",
        "",
        PERFORMANCE_NOTE,
        "",
        "## Reproduce and verify",
        "",
        *_reproduce_lines(record),
    ]
    if fields.get("notes"):
        body += ["", str(fields["notes"]).rstrip()]
    metadata = card_data(record, fields).to_yaml(original_order=list(METADATA_ORDER))
    card = ModelCard(f"---\n{metadata}\n---\n" + "\n".join(body) + "\n")
    return str(card)


__all__ = ["CARD", "CARD_FIELDS", "HUB_IDS", "card_data", "render_model_card"]
