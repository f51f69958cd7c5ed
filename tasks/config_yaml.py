"""Reading params files: ruamel.yaml with YAML 1.2 scalars, ``-S`` overrides, and the :class:`Locator`
that turns a dotted key into ``file:line:col`` (or the ``-S ...`` override that set it).

YAML 1.2, as DVC reads it: ``2:4`` is the string "2:4" (YAML 1.1 would read the integer 124), ``1e-3`` is
a float (1.1: a string), ``011`` is eleven, and only ``true``/``false`` are booleans (1.1: also yes/no/on/
off). Duplicate keys are errors naming the first occurrence's line. Syntax errors are one sentence with
``file:line:col``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, MappingNode, Node, SequenceNode
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from tasks.config_errors import ConfigError, type_name

Marks = dict[str, tuple[int, int]]  # dotted key -> (line, column), both 1-based
PROJECT_MARKERS = ("dvc.yaml", ".dvc", ".git")


def _yaml() -> YAML:
    return YAML(typ="safe", pure=True)  # pure: the same scanner, resolver and messages everywhere


def _positions(node: Node | None, prefix: str, out: Marks) -> tuple[str, str] | None:
    """Fill ``out`` with the position of every key under ``node``; return the first duplicate key as
    (``line:col``, sentence), else None."""
    if isinstance(node, MappingNode):
        seen: dict[tuple[str, Any], int] = {}
        for key_node, value_node in node.value:
            line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                return f"{line}:{col}", f"duplicate key {str(key_node.value)!r} (first at line {seen[ident]})"
            seen[ident] = line
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = (line, col)
            found = _positions(value_node, path, out)
            if found:
                return found
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = (item.start_mark.line + 1, item.start_mark.column + 1)
            found = _positions(item, path, out)
            if found:
                return found
    return None


def parse_yaml(text: str, origin: str = "<string>") -> tuple[Any, Marks]:
    """``text`` parsed with YAML 1.2 scalars, and the position of every key; syntax errors and duplicate keys
    raise :class:`ConfigError` at ``origin:line:column`` (for an ``-S`` value: its column)."""
    override = origin.startswith("-S ")
    try:
        yaml = _yaml()
        node = yaml.compose(io.StringIO(text))
        marks: Marks = {}
        duplicate = _positions(node, "", marks)
        if duplicate:
            at, what = duplicate
            raise ConfigError(f"malformed YAML: {what}",
                              where=f"{origin} (column {at.split(':')[1]})" if override else f"{origin}:{at}")
        data = yaml.constructor.construct_document(node) if node is not None else None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        if override:  # a one-line value: its column, and how to pass a plain string
            where = f"{origin} (column {mark.column + 1})" if mark else origin
            what += "; quote a string value that starts with [ or { or holds ': ', e.g. -S 'key=\"{model}-x\"'"
        else:
            where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        raise ConfigError(f"malformed YAML: {what}", where=where) from None
    except YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", where=origin) from None
    return data, marks


def read_params(path: str | Path) -> tuple[Any, Marks]:
    """The parsed params file and its key positions; a missing or unreadable file is a ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"params file {str(path)!r} does not exist" + ("" if not file.exists() else " as a file")
            + "; pass --params PATH (the default is params.yaml at the project root)"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read params file {str(path)!r} ({exc})") from None
    return parse_yaml(text, str(path))


def project_root_of(params_file: str | Path) -> Path:
    """The project a params file belongs to: its nearest ancestor folder holding ``dvc.yaml``, ``.dvc``
    or ``.git`` (so ``profiles/paper.yaml`` shares the project's MLflow db and data/), else its folder."""
    folder = Path(params_file).resolve().parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in PROJECT_MARKERS):
            return candidate
    return folder


# --- -S overrides ------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prune.sparsity=0.6"`` -> (["prune", "sparsity"], 0.6); the value is a YAML 1.2 scalar or flow list."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. prune.sparsity=0.6", where="-S")
    parsed, _ = parse_yaml(value, f"-S {text}") if value.strip() else (None, {})
    return [p.strip() for p in parts], parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Set each ``-S`` override in ``raw`` (in order, the last wins); returns dotted path -> the override."""
    set_by: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"{path!r} is a value, not a section, so {'.'.join(parts)!r} cannot be set", path, f"-S {text}"
                )
            node = child
        node[parts[-1]] = value
        set_by[".".join(parts)] = text
    return set_by


def with_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A plain deep copy of ``data`` with ``overrides`` applied, and who set what (:func:`apply_overrides`)."""

    def plain(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: plain(v) for k, v in node.items()}
        return [plain(v) for v in node] if isinstance(node, list) else node

    raw = plain(data)
    return raw, apply_overrides(raw, overrides)


# --- where a key came from ---------------------------------------------------------------------------


def _parent(path: str) -> str:
    return path[: path.rindex("[")] if path.endswith("]") else path.rpartition(".")[0]


@dataclass
class Locator:
    """Where each key of a config came from: the file's key positions and the ``-S`` overrides."""

    origin: str
    marks: Marks
    set_by: dict[str, str]

    def where(self, path: str, *related: str) -> str:
        """``-S text`` when an override set ``path``, one of ``related``, a parent or a child of them;
        else ``file:line:col`` of the nearest key of ``path`` that exists in the file; else the file."""
        for candidate in (path, *related):
            for key, text in self.set_by.items():
                if key == candidate or key.startswith((candidate + ".", candidate + "[")) \
                        or candidate.startswith((key + ".", key + "[")):
                    return f"-S {text}"
        probe = path
        while probe:
            if probe in self.marks:
                line, col = self.marks[probe]
                return f"{self.origin}:{line}:{col}"
            probe = _parent(probe)
        return self.origin

    def error(self, path: str, problem: str, *related: str, more: int = 0) -> ConfigError:
        """A :class:`ConfigError` at ``path``; ``related`` paths took part (an override of one is named)."""
        return ConfigError(problem, path, self.where(path, *related), more)

    def check_keys(self, node: Any, prefix: str = "") -> None:
        """Every mapping key is a string (YAML also allows ``1:`` or ``true:``)."""
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    scope = repr(prefix) if prefix else "the top level"
                    raise self.error(prefix, f"key {key!r} ({type_name(key)}) under {scope} must be a string; "
                                     "quote it or use a name")
                self.check_keys(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                self.check_keys(item, f"{prefix}[{i}]")
