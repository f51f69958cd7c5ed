"""Releases: a pruned Hugging Face folder an auditor can retrace (issue 4 §10).

A release folder holds

- the pruned model (``save_pretrained``, safetensors) and its tokenizer;
- ``README.md``: the model card (:mod:`tasks.card`);
- ``crepe_release.json``: the manifest: the caller's lineage (base model spec and content hash,
  calibration and evaluation data with sha256, the full resolved config, the PHO summary's path and
  sha256, metrics) plus what :func:`write_release` measures and records itself: the zeros of every pruned
  linear, a quick perplexity ("smoke test") with its exact settings and data hash, the code version,
  package versions, the machine, and the sha256 and size of every other file in the folder.

:func:`write_release` writes all of it into a temp folder beside ``out_dir`` and renames it into place, so
a crash never leaves a half-written release. It adds nothing time-dependent: the same model, manifest and
card fields give byte-identical files. Verification lives in :mod:`tasks.verify`; registering a release
in MLflow is :mod:`tasks.tracking`'s job.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from crepe.errors import CrepeError
from crepe.io import atomic_dir, dir_is_nonempty, read_json, sha256_file, write_json_atomic, write_text_atomic
from crepe.measure import SmokeTest, measure_layers, smoke_perplexity
from crepe.provenance import PACKAGES, code_version, machine, package_versions
from crepe.types import NMPattern, parse_sparsity
from tasks.card import CARD, CARD_FIELDS, render_model_card
from tasks.verify import RELEASE_MANIFEST, ReleaseError

RELEASE_KIND = "crepe-release"
RELEASE_VERSION = 1
RELEASE_PACKAGES = (*PACKAGES, "datasets", "lm_eval")
# Keys write_release fills in itself; a caller's manifest must not carry them.
RESERVED = ("kind", "version", "files", "sparsity", "smoke_test", "code", "versions", "machine")
UNSTRUCTURED_SLACK = 0.01  # measured overall sparsity may fall this far below the declared one
# What a streamed checkpoint contributes to the release, copied byte for byte.
STREAMED_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")


def search_reference(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "sha256", "winner"}`` of a PHO summary JSON (``crepe search`` / ``run_pho``), for the manifest."""
    if path is None:
        return None
    file = Path(path)
    summary = read_json(file, "search summary")
    winner = summary.get("winner") if isinstance(summary, dict) else None
    return {"path": str(file), "sha256": sha256_file(file), "winner": winner}


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


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise CrepeError(f"release folder {target} exists and is a file; give a folder path")
    if dir_is_nonempty(target) and not overwrite:
        raise CrepeError(f"release folder {target} exists and is not empty; pass overwrite=True to replace it")


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
    ``smoke`` (None: skip) records a quick perplexity for :func:`tasks.verify.verify_release` to compare.
    """
    _check_manifest(manifest)
    fields = dict(card_fields or {})
    unknown = sorted(set(fields) - set(CARD_FIELDS))
    if unknown:
        raise CrepeError(f"unknown model-card field {unknown[0]!r}; allowed: {', '.join(CARD_FIELDS)}")
    target = Path(out_dir)
    _check_target(target, overwrite)
    if tokenizer is None:
        raise CrepeError("a release needs the tokenizer (it is saved with the model and used by the smoke test)")

    prune = manifest["prune"]
    pattern = parse_sparsity(prune["pattern"]).pattern if prune.get("pattern") else None
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

    # transformers is heavy: imported only when a release is written
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars
    with atomic_dir(target, overwrite=overwrite) as tmp:
        if streamer is not None:
            source = Path(streamer.checkpoint.folder)
            for glob in STREAMED_FILES:
                for file in sorted(source.glob(glob)):
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


__all__ = ["RELEASE_KIND", "RELEASE_VERSION", "search_reference", "write_release"]
