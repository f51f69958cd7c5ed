"""Step 1, the inputs: the base model's identity, the data's hashes and the seeded calibration windows.

``resolve_inputs`` is never cached: it *is* the content identity every later key is built from (model:
spec, kind, content hash, hub snapshot; data: source and sha256). ``crepe prepare`` writes the same
identities to ``inputs.json`` for DVC. ``calibration_windows`` tokenizes the windows once and saves them as a
tensor file under the work folder; ``crepe prune`` samples the same windows with the loaded tokenizer
(:func:`crepe.budget.calibration_windows`, which :func:`calibration_tokens` also calls).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoTokenizer

from crepe.budget import calibration_windows as calibration_windows_of
from crepe.data import load_calibration_docs, load_eval_text
from crepe.errors import CrepeError
from crepe.io import atomic_dir, sha256_file, write_json_atomic
from crepe.models import resolve_device, resolve_source
from tasks.common import computed, finished, limit_threads, persisted, transient
from tasks.keys import content_key, digest, work_dir

INPUTS_FILE = "inputs.json"
CALIB_FILE = "calibration.pt"


def prepare_inputs(cfg: Any, resolved: tuple[str, Any, str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Model and data identities of ``cfg`` (reads the data files once to hash them; loads no weights).
    ``resolved``: what :func:`crepe.models.resolve_source` returned for ``cfg.model.spec``, if known."""
    kind, _, content, extra = resolved or resolve_source(cfg.model.spec)
    _, calib = load_calibration_docs(cfg.data.calib_source, cfg.data.data_dir)
    splits = sorted({cfg.eval.ppl.split, cfg.pho.verify_split} if cfg.pho.enabled else {cfg.eval.ppl.split})
    evaluation = {s: _identity(load_eval_text(s, cfg.data.eval_source, cfg.data.data_dir)[1]) for s in splits}
    model = {"spec": cfg.model.spec, "kind": kind, "content_hash": content}
    if kind == "hub":
        model["hub"] = {k: extra[k] for k in ("repo_id", "revision", "commit", "files")}
    return {"model": model, "calibration": _identity(calib), "evaluation": evaluation}


def _identity(info: Any) -> dict[str, Any]:
    """A data source without its machine-specific path: the same data gives the same file everywhere."""
    return {k: v for k, v in info.as_dict().items() if k != "path"}


def write_inputs(cfg: Any, out_dir: str | Path) -> Path:
    """Write :func:`prepare_inputs` to ``out_dir/inputs.json`` (the folder replaced atomically)."""
    inputs = prepare_inputs(cfg)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_json_atomic(tmp / INPUTS_FILE, inputs)
    return Path(out_dir) / INPUTS_FILE


def resolve(cfg: Any) -> dict[str, Any]:
    """Resolve (convert or download) the base model and hash the data the config selects: ``{"model":
    {"spec", "kind", "path", "content_hash"[, "hub"]}, "calibration": {...sha256}, "evaluation": {split: ...}}``."""
    resolved = resolve_source(cfg.model.spec)
    inputs = prepare_inputs(cfg, resolved)
    inputs["model"]["path"] = str(resolved[1])
    return inputs


@task(name="resolve-inputs", retries=2, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NO_CACHE)
def resolve_inputs(cfg: Any) -> dict[str, Any]:
    """:func:`resolve` as a task (never cached: this *is* the content identity)."""
    limit_threads(cfg)
    return resolve(cfg)


def calibration_tokens(cfg: Any, model_path: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The seeded calibration windows of ``cfg`` (spec §1.2) and their provenance: source, sha256, n_samples,
    seqlen, seed, tokens sha256 (no machine paths). Needs the tokenizer only, never the weights."""
    return calibration_windows_of(AutoTokenizer.from_pretrained(model_path), cfg.budget())


def _calib_extra(cfg: Any, _p: Mapping[str, Any]) -> Any:
    return {"calib_source": cfg.data.calib_source}


@task(name="calibration-windows", retries=2, retry_delay_seconds=2, retry_condition_fn=transient,
      cache_key_fn=content_key(("calibration",), ("model_hash", "data_sha256"), _calib_extra), **persisted())
def calibration_windows(cfg: Any, model_path: str, model_hash: str, data_sha256: str) -> dict[str, Any]:
    """:func:`calibration_tokens` saved as a tensor file. Returns ``{"path", "sha256", "info"}``."""
    started = computed("calibration-windows")
    limit_threads(cfg)
    ids, info = calibration_tokens(cfg, model_path)
    out = work_dir(cfg) / "calibration" / digest(model_hash, data_sha256, cfg.section_hash("calibration"))
    with atomic_dir(out, overwrite=True) as tmp:
        torch.save(ids.contiguous(), tmp / CALIB_FILE)
    path = out / CALIB_FILE
    return finished(started, {"path": str(path), "sha256": sha256_file(path), "info": info})


def load_tokens(calib: Mapping[str, Any]) -> torch.Tensor:
    """The windows a :func:`calibration_windows` result points at, checked against its sha256."""
    path = Path(calib["path"])
    if not path.is_file() or sha256_file(path) != calib["sha256"]:
        raise CrepeError(
            f"cached calibration windows {path} are missing or changed; rerun with --refresh to rebuild the cache"
        )
    return torch.load(path, weights_only=True)


def weight_selection(cfg: Any) -> dict[str, Any]:
    """What every prune of the run shares beyond the method (``prune.*``): which block weights it touches,
    the MoE calibration rule and the weight update (PHO verifies its candidates with the same update)."""
    p = cfg.prune
    return {"targets": p.targets, "ignore": p.ignore, "prune_router": p.prune_router,
            "moe_min_tokens": p.moe_min_tokens, "moe_fallback": p.moe_fallback,
            "update": p.update, "update_params": dict(p.update_params)}


def compute_identity(cfg: Any) -> dict[str, Any]:
    """What the numbers of a compute task depend on beyond its inputs: dtype, block path, the resolved
    device kind (cpu/cuda kernels round differently) and the calibration batch size (chunked sums)."""
    try:
        device = resolve_device(cfg.model.device).type
    except CrepeError:  # e.g. cuda on a machine without it: the key names it; loading then fails in one sentence
        device = str(cfg.model.device)
    return {"dtype": cfg.model.dtype, "blocks": cfg.model.blocks, "device": device,
            "calib_batch_size": cfg.calibration.batch_size}
