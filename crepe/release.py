"""Releases: a pruned Hugging Face folder an auditor can retrace, and its verification (issue 4 §10).

A release folder holds

- the pruned model (``save_pretrained``, safetensors) and its tokenizer;
- ``README.md``: a model card (base model, method, pattern, measured sparsity, coefficients, data with
  sha256, metrics, code version, and an honest performance note: the zeros are stored in dense
  tensors, so unstructured sparsity makes the files neither smaller nor faster in standard runtimes);
- ``crepe_release.json``: the manifest: the caller's lineage (base model spec and content hash,
  calibration and evaluation data with sha256, the full resolved config, the PHO summary's path and
  sha256, metrics) plus what this module measures and records itself: the zeros of every pruned
  linear, a quick perplexity ("smoke test") with its exact settings and data hash, the code version,
  package versions, the machine, and the sha256 and size of every other file in the folder.

:func:`write_release` writes all of it into a temp folder beside ``out_dir`` and renames it into
place, so a crash never leaves a half-written release. It adds nothing time-dependent: the same model,
manifest and card fields give byte-identical files. :func:`verify_release` recomputes every hash,
re-measures every layer's zeros (and N:M validity) and re-runs the smoke test; the first problem is
raised as a :class:`ReleaseError` (one sentence naming the file or layer).

This module never imports MLflow, Prefect or DVC; registering a release is the pipeline's job.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crepe.blocks import find_blocks, model_device
from crepe.errors import CrepeError
from crepe.io import atomic_dir, dir_is_nonempty, read_json, sha256_file, write_json_atomic, write_text_atomic
from crepe.masks import measure_sparsity
from crepe.provenance import PACKAGES, code_version, machine, package_versions
from crepe.types import NMPattern, parse_sparsity
from crepe.weights import block_weights

RELEASE_MANIFEST = "crepe_release.json"
PRUNE_MANIFEST = "crepe_manifest.json"  # what ``crepe prune`` writes; verify_release accepts it too
CARD = "README.md"
RELEASE_KIND = "crepe-release"
RELEASE_VERSION = 1
RELEASE_PACKAGES = (*PACKAGES, "datasets", "lm_eval")
# Keys write_release fills in itself; a caller's manifest must not carry them.
RESERVED = ("kind", "version", "files", "sparsity", "smoke_test", "code", "versions", "machine")
CARD_FIELDS = ("title", "summary", "base_model", "license", "language", "tags", "notes")
# Hub ids of the embedded models, for the card's ``base_model:`` metadata.
HUB_IDS = {"embedded:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
UNSTRUCTURED_SLACK = 0.01  # measured overall sparsity may fall this far below the declared one


class ReleaseError(CrepeError):
    """A release that fails verification (or cannot be written): one sentence naming the file or layer."""


@dataclass(frozen=True)
class SmokeTest:
    """The quick perplexity recorded at release time and repeated by :func:`verify_release`.

    The first ``max_windows`` non-overlapping windows of ``seqlen`` tokens of ``split`` from ``source``
    (a :data:`crepe.data.EVAL_SOURCES` name), evaluated as in spec §14.1.
    """

    split: str = "validation"
    seqlen: int = 128
    max_windows: int = 4
    source: str = "auto"
    data_dir: str | None = None
    batch_size: int = 4

    def settings(self) -> dict[str, Any]:
        """The settings that must match for two smoke perplexities to be compared."""
        return {"split": self.split, "seqlen": self.seqlen, "max_windows": self.max_windows}


# --- measuring --------------------------------------------------------------------------------------


def weight_selection(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Which block weights a prune touched (``targets``, ``ignore``, ``prune_router``), from its config."""
    config = config or {}
    return {k: config.get(k) for k in ("targets", "ignore")} | {"prune_router": bool(config.get("prune_router"))}


def measure_layers(
    model: nn.Module, pattern: NMPattern | None, blocks_path: str | None = None,
    selection: Mapping[str, Any] | None = None, streamer: Any = None,
) -> dict[str, Any]:
    """Zeros of every pruned weight matrix in the decoder blocks (named as the pruner names them, chosen
    by the prune's ``selection``: see :func:`weight_selection`) and N:M validity. With a ``streamer``
    (:class:`crepe.streaming.Streamer`) each block is read from the shards, measured and freed."""
    path, blocks = find_blocks(model, blocks_path)
    sel = weight_selection(selection)
    layers = []
    for i, block in enumerate(blocks):
        if streamer is not None:
            streamer.start_block(i, block)
        chosen = block_weights(block, f"{path}.{i}.", sel["targets"], sel["ignore"], sel["prune_router"]).weights
        for name, w in chosen.items():
            layers.append(measure_sparsity(f"{path}.{i}.{name}", w.matrix().detach(), pattern))
        if streamer is not None:
            streamer.end_block(i, block)
    zeros = sum(layer.n_zeros for layer in layers)
    numel = sum(layer.numel for layer in layers)
    flags = [layer.nm_valid for layer in layers]
    return {
        "pattern": str(pattern) if pattern else None,
        "blocks_path": path,
        "n_linears": len(layers),
        "overall": zeros / numel if numel else 0.0,
        "total_zeros": zeros,
        "total_numel": numel,
        "nm_valid": None if pattern is None else all(flags),
        "selection": sel,
        "layers": [layer.as_dict() for layer in layers],
    }


def smoke_perplexity(model: nn.Module, tokenizer: Any, smoke: SmokeTest, streamer: Any = None,
                     device: str | None = None) -> dict[str, Any]:
    """Run ``smoke`` on ``model`` (streamed block by block with a ``streamer``); the settings, the data
    actually used (source, path, sha256) and the ppl."""
    from crepe.data import get_eval_tokens
    from crepe.evaluate import perplexity

    ids, info = get_eval_tokens(tokenizer, smoke.split, smoke.source, smoke.data_dir)
    if streamer is not None:
        result = streamer.perplexity(ids, smoke.seqlen, smoke.max_windows, smoke.batch_size, device)
    else:
        result = perplexity(model, ids, smoke.seqlen, smoke.max_windows, smoke.batch_size, device=model_device(model))
    return {
        **smoke.settings(),
        "source": smoke.source,
        "data": info.as_dict(),
        "n_windows": result.n_windows,
        "ppl": result.ppl,
    }


def search_reference(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "sha256", "winner"}`` of a PHO summary JSON (``crepe search`` / ``run_pho``), for the manifest."""
    if path is None:
        return None
    file = Path(path)
    summary = read_json(file, "search summary")
    winner = summary.get("winner") if isinstance(summary, dict) else None
    return {"path": str(file), "sha256": sha256_file(file), "winner": winner}


# --- writing ----------------------------------------------------------------------------------------


def _check_manifest(manifest: Mapping[str, Any]) -> None:
    clash = [k for k in RESERVED if k in manifest]
    if clash:
        raise CrepeError(f"the release manifest must not set {clash[0]!r}: write_release records it itself")
    for key, needed in (("base_model", ("spec", "content_hash")), ("prune", ("method", "sparsity", "pattern"))):
        section = manifest.get(key)
        if not isinstance(section, Mapping) or any(k not in section for k in needed):
            raise CrepeError(
                f"the release manifest needs a {key!r} mapping with {', '.join(needed)} "
                f"(e.g. {'ModelInfo.as_dict()' if key == 'base_model' else 'PruneConfig.as_dict()'})"
            )


def _declared_pattern(prune: Mapping[str, Any]) -> NMPattern | None:
    return parse_sparsity(prune["pattern"]).pattern if prune.get("pattern") else None


def write_release(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    manifest: Mapping[str, Any],
    card_fields: Mapping[str, Any] | None = None,
    *,
    smoke: SmokeTest | None = SmokeTest(),
    overwrite: bool = False,
    blocks_path: str | None = None,
    streamer: Any = None,
) -> Path:
    """Write the release folder ``out_dir`` atomically and return its path.

    With a ``streamer`` (:class:`crepe.streaming.Streamer`; ``model`` is its meta-device model: the model
    did not fit under the memory cap) the zeros are counted and the smoke test runs block by block, and the
    weights are the streamed checkpoint's safetensors files, copied byte for byte.

    ``manifest`` is the lineage, JSON-serialisable; required: ``base_model`` (``spec``,
    ``content_hash``, ... as :meth:`crepe.models.ModelInfo.as_dict`) and ``prune`` (``method``,
    ``sparsity``, ``pattern``, ``params``, ... as :meth:`crepe.pruner.PruneConfig.as_dict`). Recommended:
    ``data`` (``calibration``/``evaluation`` with source, path, sha256), ``config`` (the full resolved
    pipeline config), ``search`` (:func:`search_reference`), ``metrics`` (e.g. ``{"ppl": {"value",
    "split", "seqlen", "n_windows", ...}}``). Any other key is kept as given. Leave time-dependent values
    (``load_seconds``, timings, dates) out when byte-identical re-releases matter (resume, caching).

    ``card_fields`` (all optional): ``title``, ``summary``, ``base_model`` (hub id for the card's
    metadata), ``license``, ``language``, ``tags`` (list), ``notes`` (markdown appended to the card).

    The model's measured sparsity must honour the declared pattern (every N:M group valid) or,
    unstructured, reach the declared fraction (within 1 point); otherwise nothing is written.
    ``smoke`` (None: skip) records a quick perplexity for :func:`verify_release` to compare.
    """
    _check_manifest(manifest)
    fields = dict(card_fields or {})
    unknown = sorted(set(fields) - set(CARD_FIELDS))
    if unknown:
        raise CrepeError(f"unknown model-card field {unknown[0]!r}; allowed: {', '.join(CARD_FIELDS)}")
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise CrepeError(f"release folder {target} exists and is a file; give a folder path")
    if dir_is_nonempty(target) and not overwrite:
        raise CrepeError(f"release folder {target} exists and is not empty; pass overwrite=True to replace it")
    if tokenizer is None:
        raise CrepeError("a release needs the tokenizer (it is saved with the model and used by the smoke test)")

    prune = manifest["prune"]
    pattern = _declared_pattern(prune)
    selection = prune.get("config") or prune  # a crepe prune manifest, or the pipeline's resolved PruneConfig
    sparsity = measure_layers(model, pattern, blocks_path or manifest.get("blocks_path"), selection, streamer)
    _check_declared(prune, pattern, sparsity)
    record: dict[str, Any] = {"kind": RELEASE_KIND, "version": RELEASE_VERSION}
    record.update(json.loads(json.dumps(dict(manifest), default=str)))  # a private, JSON-clean copy
    record["sparsity"] = sparsity
    record["smoke_test"] = smoke_perplexity(model, tokenizer, smoke, streamer) if smoke is not None else None
    record["code"] = code_version()
    record["versions"] = package_versions(RELEASE_PACKAGES)
    record["machine"] = machine()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars
    with atomic_dir(target, overwrite=overwrite) as tmp:
        if streamer is not None:
            source = Path(streamer.checkpoint.folder)
            for pattern_ in ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json"):
                for file in sorted(source.glob(pattern_)):
                    shutil.copyfile(file, tmp / file.name)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / CARD, render_model_card(record, fields))
        record["files"] = {
            p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        write_json_atomic(tmp / RELEASE_MANIFEST, record)
    return target


def _check_declared(prune: Mapping[str, Any], pattern: NMPattern | None, sparsity: Mapping[str, Any]) -> None:
    if pattern is not None:
        bad = next((layer for layer in sparsity["layers"] if not layer["nm_valid"]), None)
        if bad is not None:
            raise ReleaseError(
                f"layer {bad['name']} violates the declared {pattern} pattern (some group of {pattern.m} inputs "
                f"has fewer than {pattern.n} zeros); refusing to release it as {pattern}"
            )
        return
    declared = float(prune["sparsity"])
    if sparsity["overall"] < declared - UNSTRUCTURED_SLACK:
        raise ReleaseError(
            f"the model's measured sparsity {sparsity['overall']:.4f} is below the declared {declared:g}; "
            "refusing to release an unpruned or partly pruned model under that label"
        )


# --- the model card ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _short(sha: Any) -> str:
    return f"`{str(sha)[:16]}...`" if sha else "(none)"


def _data_line(label: str, info: Mapping[str, Any] | None) -> str:
    if not info:
        return f"- {label}: none recorded."
    extra = []
    if info.get("n_samples"):
        extra.append(f"{info['n_samples']} windows x {info.get('seqlen')} tokens, seed {info.get('seed')}")
    if info.get("split"):
        extra.append(f"split {info['split']}")
    tail = f" ({'; '.join(extra)})" if extra else ""
    return f"- {label}: {info.get('source')} `{info.get('path')}`, sha256 {_short(info.get('sha256'))}{tail}."


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


def render_model_card(record: Mapping[str, Any], fields: Mapping[str, Any]) -> str:
    """README.md of a release from its manifest ``record`` and the caller's ``fields`` (deterministic)."""
    base = record["base_model"]
    prune = record["prune"]
    sp = record["sparsity"]
    label = prune.get("pattern") or f"{float(prune['sparsity']) * 100:g}% unstructured"
    hub_id = fields.get("base_model") or HUB_IDS.get(base["spec"])
    if hub_id is None and base.get("kind") == "hub":
        hub_id = str(base["spec"]).removeprefix("hf:").split("@", 1)[0]
    tags = ["pruning", "sparsity", "crepe", f"method-{prune['method']}",
            f"{str(prune['pattern']).replace(':', 'of')}-sparsity" if prune.get("pattern") else "unstructured-sparsity",
            *list(fields.get("tags") or [])]
    front = ["---"]
    if hub_id:
        front += [f"base_model: {hub_id}",
                  "# The Hub has no 'pruned' relation: these are the base model's weights with pruned entries set to 0.",
                  "base_model_relation: finetune"]
    if fields.get("license"):
        front.append(f"license: {fields['license']}")
    if fields.get("language"):
        front.append(f"language: {fields['language']}")
    front += ["library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---"]

    params = prune.get("params") or {}
    coeffs = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "none"
    search = record.get("search")
    origin = (f"found by PHO (summary `{search.get('path')}`, sha256 {_short(search.get('sha256'))})"
              if search else "given in the configuration (no search)")
    data = record.get("data") or {}
    evaluation = data.get("evaluation")
    metrics = record.get("metrics") or {}
    rows = []
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            val = value.get("value", value.get("ppl"))
            settings = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if k not in ("value", "ppl") and
                                 not isinstance(v, (Mapping, list)))
            rows.append(f"| {name} | {_fmt(val)} | {settings} |")
        else:
            rows.append(f"| {name} | {_fmt(value)} | |")
    smoke = record.get("smoke_test")
    if smoke:
        rows.append(f"| smoke-test perplexity | {_fmt(smoke['ppl'])} | {smoke['split']} of {smoke['data']['source']}, "
                    f"{smoke['n_windows']} windows x {smoke['seqlen']} tokens (repeated by `crepe verify`) |")
    code = record["code"]
    versions = record["versions"]
    nm = ""
    if sp["pattern"]:
        nm = f" Every group of {sp['pattern'].split(':')[1]} consecutive inputs holds at least " \
             f"{sp['pattern'].split(':')[0]} zeros: {'yes' if sp['nm_valid'] else 'NO'}."
    lines = [
        *front,
        "",
        "# " + str(fields.get("title") or f"{base['spec']} pruned with {prune['method']} ({label})"),
        "",
        str(fields.get("summary") or f"`{base['spec']}` with {label} of the weights of its decoder-block linear layers "
                                     f"set to zero by the `{prune['method']}` criterion, without retraining."),
        "",
        "## What was done",
        "",
        f"- Base model: `{base['spec']}` ({base.get('architecture') or base.get('kind', '')}), content sha256 "
        f"{_short(base.get('content_hash'))}"
        + (f" (hub repo `{hub['repo_id']}` at commit `{hub['commit']}`)" if (hub := base.get("hub")) else "") + ".",
        f"- Method: `{prune['method']}`, {label}"
        + (f", comparison group `{prune['group']}`, selection rule `{prune.get('rule')}`" if prune.get("group") else "")
        + ".",
        f"- Coefficients: {coeffs}; {origin}.",
        f"- Refinement: {(record.get('refine') or {}).get('method', 'none')}; layer-wise allocation: "
        f"{(record.get('allocation') or {}).get('method', 'none')}.",
        f"- Measured sparsity: {sp['overall']:.4f} over {sp['n_linears']} pruned weight matrices of `{sp['blocks_path']}` "
        f"({sp['total_zeros']} zeros of {sp['total_numel']} weights; embeddings, norms and the output head are "
        f"not pruned).{nm}",
        *_kinds_lines(prune),
        "",
        "## Data",
        "",
        _data_line("Calibration", data.get("calibration")),
        _data_line("Evaluation", evaluation),
        "",
        "## Metrics",
        "",
        "| metric | value | settings |",
        "|---|---:|---|",
        *rows,
        "",
        "## Performance: read before deploying",
        "",
        "The pruned weights are stored as zeros inside ordinary dense tensors. **Unstructured sparsity makes "
        "the files no smaller and inference no faster in standard runtimes** (PyTorch, transformers, llama.cpp, "
        "vLLM): every zero is still stored and multiplied. An N:M pattern such as 2:4 can be accelerated by "
        "the sparse tensor cores of NVIDIA Ampere or newer GPUs, but only by runtimes that use them (for "
        "example PyTorch's `to_sparse_semi_structured`); vLLM removed its 2:4 kernels in 2026. Expect the "
        "quality numbers above, not a speed-up.",
        "",
        "## Reproduce and verify",
        "",
        f"- `crepe verify <this folder>` recomputes the sha256 of every file listed in `{RELEASE_MANIFEST}`, "
        "re-counts the zeros of every pruned layer (and the N:M groups) and re-runs the smoke-test perplexity.",
        f"- `{RELEASE_MANIFEST}` holds the full lineage: base model, data hashes"
        + (", the resolved configuration" if record.get("config") else "")
        + (", the PHO search summary" if search else "") + ", per-layer sparsity, package versions and the machine.",
        f"- Code: crepe {code.get('crepe_version')}, git {code.get('git_sha') or 'unknown'}"
        + (" (uncommitted changes)" if code.get("git_dirty") else "")
        + f", source sha256 {_short(code.get('source_sha256'))}.",
        f"- Versions: torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
        f"python {versions.get('python')}.",
    ]
    if fields.get("notes"):
        lines += ["", str(fields["notes"]).rstrip()]
    return "\n".join(lines) + "\n"


# --- verifying ------------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> tuple[str, dict[str, Any]]:
    if not folder.is_dir():
        raise ReleaseError(f"release folder {folder} does not exist" + (" as a folder" if folder.exists() else ""))
    for name in (RELEASE_MANIFEST, PRUNE_MANIFEST):
        file = folder / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise ReleaseError(f"manifest {file} is not readable JSON ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
                raise ReleaseError(f"manifest {file} has no 'files' table; it is not a crepe manifest")
            return name, data
    raise ReleaseError(f"{folder} has no {RELEASE_MANIFEST} (nor {PRUNE_MANIFEST}); it is not a crepe release")


def _recorded_sha(entry: Any) -> str:
    return entry["sha256"] if isinstance(entry, Mapping) else str(entry)


def check_files(folder: Path, manifest_name: str, files: Mapping[str, Any]) -> int:
    """Every listed file exists with its recorded sha256 and nothing else is in the folder."""
    problems: list[str] = []
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {manifest_name}
    for rel in sorted(files):
        if rel not in on_disk:
            problems.append(f"file {rel!r} listed in {manifest_name} is missing from {folder}")
    for rel in sorted(on_disk - set(files)):
        problems.append(f"file {rel!r} in {folder} is not listed in {manifest_name} (added after the release)")
    for rel in sorted(set(files) & on_disk):
        actual, recorded = sha256_file(folder / rel), _recorded_sha(files[rel])
        if actual != recorded:
            problems.append(f"file {rel!r} in {folder} was modified: its sha256 is {actual[:16]}... but "
                            f"{manifest_name} records {recorded[:16]}...")
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ReleaseError(problems[0] + more)
    return len(files)


def _recorded_layers(
    manifest_name: str, manifest: Mapping[str, Any]
) -> tuple[list[dict], NMPattern | None, str | None, dict[str, Any]]:
    if manifest_name == RELEASE_MANIFEST:
        sp = manifest.get("sparsity") or {}
        pattern = sp.get("pattern")
        selection = sp.get("selection") or weight_selection((manifest.get("prune") or {}).get("config"))
        return (list(sp.get("layers") or []), parse_sparsity(pattern).pattern if pattern else None,
                sp.get("blocks_path"), selection)
    prune = manifest.get("prune") or {}
    pattern = (prune.get("config") or {}).get("pattern")
    return (list(prune.get("layers") or []), parse_sparsity(pattern).pattern if pattern else None,
            prune.get("blocks_path"), weight_selection(prune.get("config")))


def check_sparsity(
    model: nn.Module, layers: list[dict], pattern: NMPattern | None, blocks_path: str | None,
    selection: Mapping[str, Any] | None = None, streamer: Any = None,
) -> dict:
    """Each recorded layer has exactly its recorded zeros (and valid N:M groups); no layer is unrecorded."""
    measured = measure_layers(model, pattern, blocks_path, selection, streamer)
    by_name = {layer["name"]: layer for layer in measured["layers"]}
    if not layers:
        raise ReleaseError("the manifest records no pruned layers, so their sparsity cannot be verified")
    recorded_names = {layer["name"] for layer in layers}
    for layer in layers:
        now = by_name.get(layer["name"])
        if now is None:
            raise ReleaseError(f"layer {layer['name']} recorded in the manifest does not exist in the released model")
        if now["zeros"] != layer["zeros"] or now["numel"] != layer["numel"]:
            raise ReleaseError(
                f"layer {layer['name']} has {now['zeros']} zeros of {now['numel']} weights (sparsity "
                f"{now['sparsity']:.4f}) but the manifest records {layer['zeros']} of {layer['numel']} "
                f"({layer['zeros'] / max(layer['numel'], 1):.4f})"
            )
        if pattern is not None and not now["nm_valid"]:
            raise ReleaseError(f"layer {layer['name']} violates the {pattern} pattern: some group of {pattern.m} "
                               f"inputs has fewer than {pattern.n} zeros")
    extra = sorted(set(by_name) - recorded_names)
    if extra:
        raise ReleaseError(f"the released model has layer {extra[0]} that the manifest does not record")
    return measured


def _load(folder: Path, device: str | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from crepe.models import resolve_device

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise ReleaseError(f"the model in {folder} does not load ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    model.eval()
    return model.to(resolve_device(device or "auto")), tokenizer


def verify_release(
    folder: str | Path,
    quick_ppl: bool = True,
    *,
    ppl_rtol: float = 0.01,
    device: str | None = None,
    data_dir: str | None = None,
    max_memory: str | int | None = None,
) -> dict[str, Any]:
    """Verify a release folder (or a ``crepe prune`` output folder); return a report, raise on the first problem.

    1. every file listed in the manifest exists and has its recorded sha256; no unlisted file exists;
    2. every recorded pruned linear has exactly its recorded number of zeros (and, for N:M, every group
       is valid); the model has no unrecorded prunable linear;
    3. with ``quick_ppl``: the smoke-test perplexity is finite and, when the same data (same sha256) and
       settings are available, within ``ppl_rtol`` (relative) of the recorded value.

    The zeros are counted block by block from the safetensors shards (the model is never built in memory);
    the smoke test streams the blocks too when the weights do not fit under ``max_memory`` (default: the
    memory available). Raises :class:`ReleaseError` (one sentence). The report holds ``ok``, counts, ``overall_sparsity``,
    ``nm_valid``, ``ppl`` (the smoke result and whether it was compared) and ``layers`` (name, zeros,
    numel, sparsity) for plots.
    """
    started = time.perf_counter()
    root = Path(folder)
    name, manifest = _read_manifest(root)
    n_files = check_files(root, name, manifest["files"])
    layers, pattern, blocks_path, selection = _recorded_layers(name, manifest)
    from crepe.streaming import build_streamer, folder_streamer

    try:
        shards = build_streamer(root, None, 2**62, blocks_path, resident=False)
    except CrepeError as exc:
        raise ReleaseError(f"the model in {root} cannot be read ({exc})") from None
    loaded = None
    renamed = shards.unreadable()
    if renamed is None:
        measured = check_sparsity(shards.model, layers, pattern, blocks_path, selection, shards)
    else:  # names converted on load (fused MoE experts): count on the loaded model, if it fits
        if folder_streamer(root, max_memory, blocks_path) is not None:
            raise ReleaseError(
                f"the model in {root} stores {renamed!r} under another name (transformers converts "
                "it on load), so it cannot be verified block by block, and it does not fit under --max-memory; "
                "raise --max-memory"
            )
        loaded = _load(root, device)
        measured = check_sparsity(loaded[0], layers, pattern, blocks_path, selection)
    ppl = None
    if quick_ppl:
        streamer = folder_streamer(root, max_memory, blocks_path) if loaded is None else None
        model, tokenizer = (streamer.model, _tokenizer(root)) if streamer else (loaded or _load(root, device))
        ppl = _check_smoke(model, tokenizer, manifest.get("smoke_test"), ppl_rtol, data_dir, streamer, device)
    return {
        "ok": True,
        "folder": str(root),
        "manifest": name,
        "files_checked": n_files,
        "layers_checked": len(layers),
        "pattern": str(pattern) if pattern else None,
        "overall_sparsity": measured["overall"],
        "nm_valid": measured["nm_valid"],
        "ppl": ppl,
        "seconds": round(time.perf_counter() - started, 3),
        "layers": [{k: layer[k] for k in ("name", "zeros", "numel", "sparsity")} for layer in measured["layers"]],
    }


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ReleaseError(f"the tokenizer in {folder} does not load ({type(exc).__name__}: {exc})") from None


def _check_smoke(
    model: nn.Module, tokenizer: Any, recorded: Mapping[str, Any] | None, rtol: float, data_dir: str | None,
    streamer: Any = None, device: str | None = None,
) -> dict[str, Any]:
    if recorded:
        smoke = SmokeTest(recorded["split"], int(recorded["seqlen"]), int(recorded["max_windows"]),
                          recorded.get("source", "auto"), data_dir)
    else:
        smoke = SmokeTest(data_dir=data_dir)
    try:
        now = smoke_perplexity(model, tokenizer, smoke, streamer, device)
    except CrepeError as exc:
        raise ReleaseError(f"the smoke-test perplexity could not run ({exc})") from None
    if not math.isfinite(now["ppl"]):
        raise ReleaseError(f"the smoke-test perplexity is not finite ({now['ppl']}); the released weights are broken")
    result: dict[str, Any] = {"ppl": now["ppl"], "recorded": None, "compared": False, **smoke.settings(),
                              "data": now["data"]}
    if not recorded:
        result["reason"] = "no smoke test recorded in the manifest"
        return result
    result["recorded"] = recorded["ppl"]
    same_data = now["data"].get("sha256") == (recorded.get("data") or {}).get("sha256")
    same_windows = now["n_windows"] == recorded.get("n_windows")
    if not (same_data and same_windows):
        result["reason"] = ("different evaluation data than at release time (sha256 differs)" if not same_data
                            else "a different number of windows than at release time")
        return result
    result["compared"] = True
    if abs(now["ppl"] - recorded["ppl"]) > rtol * recorded["ppl"]:
        raise ReleaseError(
            f"the smoke-test perplexity {now['ppl']:.4f} differs from the recorded {recorded['ppl']:.4f} by more "
            f"than {rtol:.0%} on the same data and settings ({smoke.split}, {now['n_windows']} x {smoke.seqlen} tokens)"
        )
    return result


__all__ = [
    "CARD",
    "RELEASE_MANIFEST",
    "ReleaseError",
    "SmokeTest",
    "check_files",
    "check_sparsity",
    "measure_layers",
    "render_model_card",
    "search_reference",
    "smoke_perplexity",
    "verify_release",
    "write_release",
]

