"""One registry per axis: a name -> :class:`Entry` mapping that the CLI, config validation and docs read.

Every axis of crepe (scorers, updates, refinements, allocations, samplers, proxies, zero-shot tasks,
pipeline steps) keeps exactly one :class:`Registry`. It behaves as a read-only mapping, so
``name in REFINES``, ``", ".join(REFINES)`` and ``REFINES[name].defaults`` all work, and
:meth:`Registry.get` fails with one sentence naming the bad value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from crepe.errors import CrepeError

PATTERNS = ("any", "nm", "unstructured")


@dataclass(frozen=True)
class Entry:
    """One registered name: its defaults, the sparsity patterns it supports, a one-line doc and the object
    it stands for (a function, a class, a task; ``None`` for a name whose logic lives in the caller)."""

    name: str
    doc: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    patterns: str = "any"
    obj: Any = None
    check: Callable[[dict[str, Any]], None] | None = None  # validates resolved params; raises CrepeError

    def resolve(self, params: Mapping[str, Any] | None, axis: str = "") -> dict[str, Any]:
        """The defaults overlaid with ``params``; an unknown name or a bad value raises CrepeError."""
        return resolve_params(f"{axis or 'entry'} {self.name!r}", self.defaults, params, self.check)


def resolve_params(what: str, defaults: Mapping[str, Any], params: Mapping[str, Any] | None,
                   check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``defaults`` overlaid with ``params`` (``what`` names the owner in the message, e.g. "method 'crepe'");
    an unknown name raises CrepeError listing the known ones, and ``check`` validates the result."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise CrepeError(f"{what} has no parameter {unknown[0]!r}; its parameters: {allowed}")
    full = {**defaults, **params}
    if check is not None:
        check(full)
    return full


class Registry(Mapping[str, Entry]):
    """Names of one axis in registration order. ``axis`` names it in messages ("refinement", "sampler")."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, doc: str = "", *, defaults: Mapping[str, Any] | None = None,
                 patterns: str = "any", obj: Any = None,
                 check: Callable[[dict[str, Any]], None] | None = None) -> Entry:
        """Add ``name``; registering a name twice is a programming error (ValueError)."""
        if not name or name in self._entries:
            raise ValueError(f"bad or duplicate {self.axis} name {name!r}")
        if patterns not in PATTERNS:
            raise ValueError(f"{self.axis} {name!r}: patterns must be one of {PATTERNS}, got {patterns!r}")
        entry = Entry(name, doc, dict(defaults or {}), patterns, obj, check)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:  # type: ignore[override]  # a known name or one sentence
        if name not in self._entries:
            raise CrepeError(f"unknown {self.axis} {name!r}; allowed: {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}, {list(self._entries)})"

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-clean row per entry (``crepe methods`` and the docs tables)."""
        return [{"name": e.name, "patterns": e.patterns, "defaults": dict(e.defaults), "doc": e.doc}
                for e in self._entries.values()]
