"""Config errors: :class:`ConfigError` (one located sentence), :class:`Problem` (what a schema validator
raises) and :func:`translate`, which turns any pydantic ``ValidationError`` into one ConfigError.

The translation is generic: the sentence comes from the error's type, its location, the offending input
and its context, plus the schema's own field information (description, ``X | None``, ``Literal`` choices,
the keys of a section). No field is special-cased here.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from crepe.errors import CrepeError


class ConfigError(CrepeError):
    """A bad ``params.yaml`` or ``-S`` override: one sentence naming where, what, and what is allowed.

    ``path`` is the dotted key (``""`` for the whole file), ``where`` the ``file:line:col`` or
    ``-S ...`` origin, ``problem`` the sentence without the origin; ``more`` counts further problems.
    """

    def __init__(self, problem: str, path: str = "", where: str = "", more: int = 0) -> None:
        self.problem, self.path, self.where, self.more = problem, path, where, more
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"{where}: {problem}{tail}" if where else f"{problem}{tail}")


class Problem(ValueError):
    """Raised inside a schema validator. ``path`` is the dotted key the sentence is about, relative to the
    model or field that raises it (``""``: that one); ``related`` are keys that took part (an override of
    one of them is named as the origin)."""

    def __init__(self, problem: str, path: str = "", *related: str) -> None:
        super().__init__(problem)
        self.problem, self.path, self.related = problem, path, related


class Locate(Protocol):
    def error(self, path: str, problem: str, *related: str, more: int = 0) -> ConfigError: ...


# --- small text helpers ------------------------------------------------------------------------------


def suggest(word: Any, allowed: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for a close match in ``allowed``, else ``""``."""
    match = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
            tuple: "list", type(None): "null"}.get(type(value), type(value).__name__)


def dotted(loc: Iterable[Any]) -> str:
    """``("eval", "zero_shot", "tasks", 1)`` -> ``"eval.zero_shot.tasks[1]"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def join(base: str, rel: str) -> str:
    if not rel:
        return base
    return f"{base}{rel}" if rel.startswith("[") or not base else f"{base}.{rel}"


def blame(message: str, keys: list[str], default: str) -> str:
    """The key a library message is about ("alpha=-1.0 must be ...", "kernel_size 4 is ..."), else ``default``."""
    for key in keys:
        name = re.escape(key.rpartition(".")[2])
        if re.search(rf"^{name}\b|\b{name}(=| [-\d'\"(\[])", message):
            return key
    return default


def check_names(label: str, owner: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Every key of ``params`` is a parameter of ``owner`` (``label``: the dotted params key)."""
    for key in params:
        if key not in defaults:
            raise Problem(f"unknown key '{label}.{key}': {owner} has parameters: {', '.join(defaults) or 'none'}"
                          f"{suggest(key, defaults)}", key)


# --- the schema's own field information --------------------------------------------------------------


def unwrap(annotation: Any) -> Any:
    """``X | None`` -> X, ``Annotated[X, ...]`` -> X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _nullable(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field_at(root: type[BaseModel], loc: Sequence[Any]) -> tuple[type[BaseModel] | None, Any]:
    """The model holding the last key of ``loc`` and that key's FieldInfo (``None`` where the schema has none)."""
    model: Any = root
    for i, part in enumerate(loc):
        if not _is_model(model):
            return None, None
        info = model.model_fields.get(str(part))
        if i == len(loc) - 1:
            return model, info
        if info is None:
            return None, None
        model = unwrap(info.annotation)
    return None, None


# --- one error, one sentence -------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a [low, high] pair", "dict_type": "a mapping", "int_from_float": "an integer",
    "finite_number": "a finite number",
}
_COMPARE = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def sentence(err: Mapping[str, Any], path: str, root: type[BaseModel] | None = None) -> tuple[str, str, tuple[str, ...]]:
    """(dotted path, sentence, related paths) of one pydantic error dict located at ``path``."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, Problem):
        return join(path, cause.path), cause.problem, tuple(join(path, r) for r in cause.related)
    model, info = _field_at(root, tuple(err["loc"])) if root is not None else (None, None)
    annotation = info.annotation if info is not None else None
    null = " or null" if _nullable(annotation) else ""
    hint = f" ({info.description})" if info is not None and info.description else ""
    if kind == "extra_forbidden":
        allowed = list(model.model_fields) if model is not None else []
        parent = path.rpartition(".")[0]
        scope = f"of {parent!r}" if parent else "(sections)"
        return path, f"unknown key {path!r}; allowed keys {scope}: {', '.join(allowed)}{suggest(err['loc'][-1], allowed)}", ()
    if kind == "literal_error":
        inner = unwrap(annotation)
        allowed = [str(v) for v in typing.get_args(inner)] if typing.get_origin(inner) is Literal else [ctx.get("expected", "")]
        return path, f"{path} = {show(value)} is not allowed; allowed: {', '.join(allowed)}{null}{suggest(value, allowed)}", ()
    if kind == "model_type" or (kind == "dict_type" and _is_model(unwrap(annotation))):
        keys = list(unwrap(annotation).model_fields) if annotation is not None else []
        return path, f"{path} = {show(value)} must be a section with keys: {', '.join(keys)}", ()
    if kind in _EXPECTED:
        return path, f"{path} = {show(value)} ({type_name(value)}) must be {_EXPECTED[kind]}{null}{hint}", ()
    if kind in _COMPARE:
        bound = next(iter(ctx.values()), "?")
        return path, f"{path} = {show(value)} must be {_COMPARE[kind]} {bound}", ()
    if kind == "value_error":
        return path, f"{path} = {show(value)}: {cause if cause is not None else err['msg']}", ()
    if kind == "missing":
        return path, f"{path} is required", ()
    return path, f"{path} = {show(value)}: {err['msg']}", ()


def translate(exc: ValidationError, locate: Locate, root: type[BaseModel] | None = None) -> ConfigError:
    """The first error of ``exc`` as a located :class:`ConfigError` (the others are counted)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path, problem, related = sentence(first, dotted(first["loc"]), root)
    return locate.error(path, problem, *related, more=len(errors) - 1)


def as_problem(exc: ValidationError, name: str, path: str) -> Problem:
    """A ValidationError met inside a validator (a method parameter checked against its default's type) as
    a :class:`Problem`: the sentence names ``name`` (the full dotted key), the location is ``path`` (relative)."""
    first = exc.errors(include_url=False)[0]
    _, problem, _ = sentence(first, join(name, dotted(first["loc"])))
    return Problem(problem, join(path, dotted(first["loc"])))
