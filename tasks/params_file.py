"""Method parameters from a JSON file (``crepe prune --params-from``): a search result's ``winner.params``,
``{"params": ...}`` or a flat mapping, checked against the method's parameters. Light on purpose: the CLI
reads it on every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from crepe.io import read_json
from crepe.methods import resolve_method_params


def load_params_file(path: str | Path, method: str | None) -> dict[str, Any]:
    """Coefficients from a JSON file: a search result (``winner.params``), ``{"params": ...}`` or flat; the
    names are checked against ``method``'s parameters."""
    file = Path(path)
    raw = read_json(file, "params file")
    if isinstance(raw, dict) and isinstance(raw.get("winner"), dict):
        raw = raw["winner"]
    if isinstance(raw, dict) and isinstance(raw.get("params"), dict):
        raw = raw["params"]
    if not isinstance(raw, dict):
        raise CrepeError(f"params file {file} must hold a JSON object of parameters")
    if method is not None:
        resolve_method_params(method, raw)  # unknown names raise
    return dict(raw)
