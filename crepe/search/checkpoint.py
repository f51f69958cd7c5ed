"""Where the resumable searches keep their state: the :class:`Checkpoint` protocol, the check that a
saved state belongs to the current configuration, and :class:`MemoryCheckpoint` (no file).

A search (:func:`~crepe.search.driver.screen`, :func:`~crepe.search.driver.verify`,
:func:`~crepe.search.hillclimb.hill_climb`) calls ``load(config)`` once at its start and ``save(state)``
after every evaluation. The state is a JSON-serialisable dict ``{"version", "config", ...}``. A
checkpoint returns a saved state only when its ``config`` equals the caller's after a JSON round trip
(tuples and lists compare equal); one written for another configuration is refused with a
:class:`CrepeError` naming every differing key. Files on disk are the orchestration layer's business
(``tasks.checkpoint.JsonCheckpoint``); :class:`MemoryCheckpoint` serves callers that do not resume
across processes, and tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from crepe.errors import CrepeError

STATE_VERSION = 1


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from a JSON state (tuples become lists, unknown types strings)."""
    return json.loads(json.dumps(value, default=str))


class Checkpoint(Protocol):
    """The saved state of one resumable search."""

    def load(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The saved state when there is one for ``config``; None when nothing was saved yet. A state of
        another configuration raises :class:`CrepeError` (from :meth:`refuse`) naming the differing keys."""
        ...

    def save(self, state: Mapping[str, Any]) -> None:
        """Replace the saved state by ``state`` (all or nothing: an interruption keeps the previous one)."""
        ...

    def refuse(self, problem: str) -> CrepeError:
        """The error refusing the saved state because it ``problem`` (e.g. "was written for ...")."""
        ...


_MISSING = object()


def check_state(state: Any, config: Mapping[str, Any], checkpoint: Checkpoint) -> dict[str, Any]:
    """``state`` after checking it is a version-:data:`STATE_VERSION` state written for ``config``;
    otherwise ``checkpoint.refuse(...)`` is raised, naming every key of ``config`` that differs."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(
        state.get("config"), dict
    ):
        raise checkpoint.refuse(f"is not a version-{STATE_VERSION} search state")
    mine, saved = jsonable(dict(config)), state["config"]
    differing = sorted(k for k in set(mine) | set(saved) if mine.get(k, _MISSING) != saved.get(k, _MISSING))
    if differing:
        raise checkpoint.refuse(
            f"was written for a different configuration (differs in: {', '.join(differing)})"
        )
    return state


class MemoryCheckpoint:
    """A :class:`Checkpoint` in this process's memory. ``save`` keeps the state as JSON text, so a
    resumed search sees exactly what it would read back from a file (and later changes to the saved
    dict do not leak in)."""

    def __init__(self) -> None:
        self.text: str | None = None

    def load(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        return None if self.text is None else check_state(json.loads(self.text), config, self)

    def save(self, state: Mapping[str, Any]) -> None:
        self.text = json.dumps(state, default=str)

    @property
    def state(self) -> dict[str, Any] | None:
        """The last saved state (a fresh copy), None before the first ``save``."""
        return None if self.text is None else json.loads(self.text)

    def refuse(self, problem: str) -> CrepeError:
        return CrepeError(f"the in-memory search state {problem}; start again with a new MemoryCheckpoint")
