"""The searches' resumable state on disk: :class:`JsonCheckpoint`, a
:class:`~crepe.search.checkpoint.Checkpoint` kept in one JSON file (``state.json`` in a job's folder).

Every ``save`` rewrites the whole file atomically (:func:`crepe.io.write_json_atomic`), so a process
killed at any moment leaves the previous state whole; rerunning the same job continues from it. A
missing file means "nothing saved yet"; an unreadable file, or one of another version or
configuration, is refused with a :class:`CrepeError` that names the file and says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from crepe.io import write_json_atomic
from crepe.search.checkpoint import check_state

STATE_FILE = "state.json"  # the resumable state of a search folder


class JsonCheckpoint:
    """A search state kept in the JSON file ``path`` (written atomically after every evaluation)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JsonCheckpoint({str(self.path)!r})"

    def load(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The state saved in the file when it was written for ``config``; None when there is no file."""
        if not self.path.exists():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            raise self.refuse("is not a readable JSON state file") from None
        return check_state(state, config, self)

    def save(self, state: Mapping[str, Any]) -> None:
        write_json_atomic(self.path, state)

    def refuse(self, problem: str) -> CrepeError:
        return CrepeError(f"resume file {str(self.path)!r} {problem}; delete it or use another --out")
