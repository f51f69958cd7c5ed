"""The "prepare" step: resolve the base model and the data sources of a config, and record their hashes.

``crepe prepare --out data/prepared`` writes ``inputs.json``: the model (spec, kind, content hash) and
the calibration and evaluation data actually used (source, sha256, document count). Only identities go
into the file (no configuration, no machine-specific paths), so the DVC stages downstream rerun when the
model or data change and not when an unrelated parameter changes or the project moves to another machine. Resolving an embedded model converts
its GGUF once (cached under ``$CREPE_CACHE_DIR``); a hub model is fetched into (offline: found in) the HF
cache and recorded by repo id, requested revision, resolved commit and the sha256 of each of its files
(its content hash covers all of them, see :mod:`crepe.hub`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INPUTS_FILE = "inputs.json"


def prepare_inputs(cfg: Any, resolved: tuple[str, Any, str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Model and data identities of ``cfg`` (reads the data files once to hash them; loads no weights).
    ``resolved``: what :func:`crepe.models.resolve_source` returned for ``cfg.model.spec``, if known."""
    from crepe.data import load_calibration_docs, load_eval_text
    from crepe.models import resolve_source

    kind, _, digest, extra = resolved or resolve_source(cfg.model.spec)
    _, calib = load_calibration_docs(cfg.data.calib_source, cfg.data.data_dir)
    splits = sorted({cfg.eval.ppl.split, cfg.pho.verify_split} if cfg.pho.enabled else {cfg.eval.ppl.split})
    evaluation = {s: _identity(load_eval_text(s, cfg.data.eval_source, cfg.data.data_dir)[1]) for s in splits}
    model = {"spec": cfg.model.spec, "kind": kind, "content_hash": digest}
    if kind == "hub":
        model["hub"] = {k: extra[k] for k in ("repo_id", "revision", "commit", "files")}
    return {
        "model": model,
        "calibration": _identity(calib),
        "evaluation": evaluation,
    }


def _identity(info: Any) -> dict[str, Any]:
    """A data source without its machine-specific path: the same data gives the same file everywhere."""
    return {k: v for k, v in info.as_dict().items() if k != "path"}


def write_inputs(cfg: Any, out_dir: str | Path) -> Path:
    """Write :func:`prepare_inputs` to ``out_dir/inputs.json`` (the folder replaced atomically)."""
    from crepe.io import atomic_dir, write_json_atomic

    inputs = prepare_inputs(cfg)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_json_atomic(tmp / INPUTS_FILE, inputs)
    return Path(out_dir) / INPUTS_FILE
