"""What a release folder is, and its verification (``crepe verify``, issue 4 §10).

A release (:func:`tasks.release.write_release`) or a ``crepe prune`` output folder holds a manifest
(:data:`RELEASE_MANIFEST` or :data:`PRUNE_MANIFEST`) listing the sha256 of every other file and the zeros of
every pruned layer. :func:`verify_release` recomputes every hash, re-measures every layer's zeros (and N:M
validity) and re-runs the smoke-test perplexity; the first problem is raised as a :class:`ReleaseError`
(one sentence naming the file or layer).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crepe.errors import CrepeError
from crepe.io import sha256_file
from crepe.measure import SmokeTest, measure_layers, smoke_perplexity, weight_selection
from crepe.models import resolve_device
from crepe.streaming import build_streamer, folder_streamer
from crepe.types import NMPattern, parse_sparsity

RELEASE_MANIFEST = "crepe_release.json"
PRUNE_MANIFEST = "crepe_manifest.json"  # what ``crepe prune`` writes; verify_release accepts it too


class ReleaseError(CrepeError):
    """A release that fails verification (or cannot be written): one sentence naming the file or layer."""


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
    # transformers is heavy: imported only when a model must be built in memory
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging  # heavy: transformers loads with the model

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


def _tokenizer(folder: Path) -> Any:
    # transformers is heavy: imported only when the smoke test runs
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ReleaseError(f"the tokenizer in {folder} does not load ({type(exc).__name__}: {exc})") from None


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
    memory available). Raises :class:`ReleaseError` (one sentence). The report holds ``ok``, counts,
    ``overall_sparsity``, ``nm_valid``, ``ppl`` (the smoke result and whether it was compared) and ``layers``
    (name, zeros, numel, sparsity) for plots.
    """
    started = time.perf_counter()
    root = Path(folder)
    name, manifest = _read_manifest(root)
    n_files = check_files(root, name, manifest["files"])
    layers, pattern, blocks_path, selection = _recorded_layers(name, manifest)
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
    "PRUNE_MANIFEST",
    "RELEASE_MANIFEST",
    "ReleaseError",
    "check_files",
    "check_sparsity",
    "verify_release",
]
