"""What crepe sends to MLflow, as plain values: tag names, param and metric items, run keys, and what a
release manifest contributes (headline metrics, registry tags, the checked manifest path).

No MLflow import here: these are pure functions (tested without a store). MLflow validates names and
values on the server side and rejects a whole batch for one bad entry, so the few limits it enforces
(``mlflow.utils.validation``, 3.x) are met here before a batch is sent:

- keys use MLflow's name alphabet and at most 250 characters (:func:`safe_key`);
- param values are at most 6,000 characters and tag values 8,000: MLflow refuses longer ones rather
  than cutting them, so they are truncated (the whole config is always logged as
  ``config/params.json``, so nothing is lost);
- non-finite metrics are dropped (MLflow would store inf as 1.8e308) and named in a tag.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from crepe.types import parse_sparsity
from tasks.keys import canonical_json, digest

TAG_PREFIX = "crepe."
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
TRUNCATED = "...[truncated; full value in config/params.json]"
_KEY_BAD = re.compile(r"[^/\w.\- :]")


def model_slug(spec: str) -> str:
    """A short name for a model spec: ``embedded:smollm2-135m`` -> ``smollm2-135m``,
    ``hf:org/name@rev`` -> ``org-name``, ``/path/to/folder`` -> ``folder`` (the same rule as
    ``flows.config.model_slug``, repeated here because ``tasks`` must not import ``flows``)."""
    text = spec.removeprefix("embedded:").removeprefix("hf:").split("@", 1)[0]
    if text.startswith((".", "/", "~")) or "\\" in text:
        text = Path(text).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def pattern_label(pattern: str | float) -> str:
    """The canonical label of a sparsity pattern (``"2:4"``, ``"4:8"``, ``0.5`` -> ``"50%"``), as
    :func:`crepe.types.parse_sparsity` writes it; what the ``crepe.pattern`` tags hold."""
    return parse_sparsity(str(pattern)).label


def run_key(*parts: Any) -> str:
    """A deterministic 16-hex-digit key of ``parts`` (e.g. the resolved config and the code version),
    for the ``run_key`` of a parent run."""
    return digest(*parts, length=16)


def params_hash(params: Mapping[str, Any]) -> str:
    """12 hex digits of a trial's parameters: part of its nested run's ``crepe.trial_key``."""
    return hashlib.sha256(canonical_json(dict(params)).encode()).hexdigest()[:12]


def render(value: Any) -> str:
    """A param or tag value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def safe_key(key: str) -> str:
    """``key`` in MLflow's name alphabet (``/ \\w . - : space``), without ``..`` or a leading ``/``,
    at most 250 characters (a long key keeps its head and a hash of the whole)."""
    key = _KEY_BAD.sub("_", str(key)).strip("/") or "_"
    while ".." in key or "//" in key:
        key = key.replace("..", ".").replace("//", "/")
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 17] + "~" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return key


def flatten(data: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with ``sep``-joined keys: ``{"prune": {"sparsity": "2:4"}}`` ->
    ``{"prune.sparsity": "2:4"}``. Lists, tuples and scalars are leaves; an empty mapping is a leaf
    ``{}`` (so it is not silently lost)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def param_items(params: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """``params`` flattened, keys made safe, values as text (JSON for non-strings) truncated to
    MLflow's 6,000 characters; returns the params and the keys that were truncated."""
    out: dict[str, str] = {}
    truncated: list[str] = []
    for key, value in flatten(params).items():
        text = render(value)
        if len(text) > MAX_PARAM_VALUE:  # MLflow rejects the whole batch for one longer value
            text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
            truncated.append(key)
        out[safe_key(key)] = text
    return out, truncated


def metric_items(metrics: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], list[str]]:
    """Numeric leaves of ``metrics`` flattened with ``/`` (the MLflow UI groups charts by it).

    ``None`` and non-numeric leaves are dropped; booleans count as 0/1; non-finite numbers are
    dropped and returned as the second element (MLflow would store inf as 1.8e308).
    """
    out: dict[str, float] = {}
    nonfinite: list[str] = []
    for key, value in flatten(metrics, "/", prefix).items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float):
            continue
        if not math.isfinite(float(value)):
            nonfinite.append(safe_key(key))
            continue
        out[safe_key(key)] = float(value)
    return out, nonfinite


def tag_items(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags with safe keys and text values cut to MLflow's 8,000 characters (it rejects longer ones)."""
    out = {}
    for key, value in tags.items():
        text = render(value)
        out[safe_key(str(key))] = text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."
    return out


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for tags and errors."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --- release manifests ------------------------------------------------------------------------------

RELEASE_MANIFESTS = ("crepe_release.json", "crepe_manifest.json")  # crepe.release / crepe prune
_ALIAS = re.compile(r"^[\w\-]+$")


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(data: Mapping[str, Any], *paths: str) -> Any:
    return next((v for v in (_get(data, p) for p in paths) if v is not None), None)


def manifest_metrics(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Headline numbers of a release or prune manifest: ``sparsity/overall``, ``ppl/<split>`` (from the
    evaluation or the release smoke test, as ``ppl/smoke``) and any ``metrics`` block as given."""
    out: dict[str, Any] = {}
    overall = _first(manifest, "sparsity.overall", "prune.overall_sparsity")
    if overall is not None:
        out["sparsity/overall"] = overall
    ev = manifest.get("evaluation")
    if isinstance(ev, Mapping) and ev.get("ppl") is not None:
        out[f"ppl/{ev.get('split', 'eval')}"] = ev["ppl"]
    smoke = manifest.get("smoke_test")
    if isinstance(smoke, Mapping) and smoke.get("ppl") is not None:
        out["ppl/smoke"] = smoke["ppl"]
    if isinstance(manifest.get("metrics"), Mapping):
        out["metrics"] = manifest["metrics"]
    return out


def release_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``crepe.*`` registry tags read from a release (or prune) manifest: model spec and hash, method,
    pattern, declared and measured sparsity. Missing fields are left out."""
    found = {
        "model": _first(manifest, "base_model.spec", "model.spec"),
        "model_hash": _first(manifest, "base_model.content_hash", "model.content_hash"),
        "method": _first(manifest, "prune.method", "prune.config.method"),
        "pattern": _first(manifest, "prune.pattern", "prune.config.pattern"),
        "declared_sparsity": _first(manifest, "prune.sparsity", "prune.config.sparsity"),
        "sparsity": _first(manifest, "sparsity.overall", "prune.overall_sparsity"),
    }
    return {f"{TAG_PREFIX}{k}": render(v) for k, v in found.items() if v is not None}


def release_manifest(release_dir: str | Path, alias: str | None) -> Path:
    """The manifest of a release folder, after checking the folder and the registry ``alias`` (letters,
    digits, ``_``, ``-``; not ``latest`` nor ``v<N>``, which MLflow reserves); a CrepeError otherwise."""
    folder = Path(release_dir).resolve()
    manifest = next((folder / m for m in RELEASE_MANIFESTS if (folder / m).is_file()), None)
    if not folder.is_dir() or manifest is None:
        raise CrepeError(
            f"release folder {folder} has no {' or '.join(RELEASE_MANIFESTS)}; register a folder written by the "
            "release step or crepe prune"
        )
    if alias is not None and (not _ALIAS.match(alias) or alias.lower() == "latest" or re.match(r"^[vV]\d+$", alias)):
        raise CrepeError(
            f"registry alias {alias!r} is not allowed; use letters, digits, '_' and '-' (not 'latest' or v<N>), "
            "e.g. candidate or production"
        )
    return manifest
