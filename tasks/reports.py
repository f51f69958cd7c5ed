"""Tables as files: rows of dicts rendered as markdown or CSV and written atomically.

The one place that turns result rows into report text (the transfer table today). Columns are the
rows' keys in first-seen order; nested values are canonical JSON; markdown prints floats with 4
decimals, right-aligns numeric columns and shows a missing value as ``-``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from crepe.io import write_json_atomic, write_text_atomic
from tasks.keys import canonical_json

TABLE_SUFFIXES = (".md", ".markdown", ".csv", ".json")


def _cell(value: Any, markdown: bool) -> str:
    if value is None:
        return "-" if markdown else ""
    if isinstance(value, float) and markdown:
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping | list | tuple):
        return canonical_json(value)
    return str(value)


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rows' keys in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of ``rows`` (columns in first-seen key order; numbers right-aligned)."""
    cols = columns(rows)
    if not cols:
        return "(no rows)\n"
    numeric = {c for c in cols if all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows)}
    head = "| " + " | ".join(cols) + " |"
    rule = "|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|"
    body = ["| " + " | ".join(_cell(r.get(c), True).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def render_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as CSV text with a header line (missing values empty, nested values as JSON)."""
    cols = columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_cell(r.get(c), False) for c in cols])
    return buf.getvalue()


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path, preamble: str = "") -> Path:
    """Write ``rows`` to ``path`` atomically, in the format its suffix names: ``.md`` (markdown, after
    ``preamble``: a heading, the context, a summary), ``.csv`` or ``.json`` (the rows as a list)."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise CrepeError(f"table path {out} must end in .md, .csv or .json")
    rows = [dict(r) for r in rows]
    if suffix == ".json":
        write_json_atomic(out, rows)
    elif suffix == ".csv":
        write_text_atomic(out, render_csv(rows))
    else:
        write_text_atomic(out, preamble + render_markdown(rows))
    return out
