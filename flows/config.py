"""The pipeline's configuration: ``params.yaml`` validated into typed, frozen config objects.

One file holds every knob of every stage (issue 4, point 1). Sections, in order:
``model``, ``data``, ``calibration``, ``prune``, ``pho``, ``refine``, ``allocation``, ``eval``,
``tracking``, ``runner``, ``release``. Every key has a default (the CPU-sized profile that ships as
``params.yaml``), so a file may hold only what it changes; ``profiles/paper.yaml`` holds the paper's
settings.

Loading is two phases:

1. **Structure and types** (pydantic 2, strict: no silent ``"16" -> 16`` or ``true -> 1``): unknown
   keys, wrong types and out-of-range numbers, each reported with its full dotted path, the
   offending value and what is allowed.
2. **Meaning**: registry names (methods, samplers, refinements, allocations, zero-shot tasks) and
   impossible combinations (an N:M pattern with a comparison group or a layer-wise allocation,
   ``top_k > n_trials``, PHO on a method other than CRePE, ...). The same validators as the library
   (:func:`crepe.types.parse_sparsity`, :func:`crepe.jobs.build_config`, :class:`crepe.search.SearchSpace`,
   :data:`crepe.search.SAMPLERS`) produce the messages, so the CLI and the pipeline agree.

Every failure is a :class:`ConfigError` (a :class:`~crepe.errors.CrepeError`): one line, prefixed with
``file:line:column`` of the offending key (or the ``-S`` override that set it).

YAML is read with YAML 1.2 scalar rules, as DVC does: ``2:4`` is the string "2:4" (PyYAML's YAML 1.1
would read the integer 124), ``1e-3`` is a float (1.1: a string), and only ``true``/``false`` are
booleans (1.1: also yes/no/on/off). Duplicate keys are errors.

Overrides ``-S section.key=value`` (repeatable) are applied to the raw mapping before validation;
values are parsed as YAML scalars (or flow lists such as ``[0, 2]``).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import re
import string
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from crepe.data import CALIB_SOURCES, EVAL_SOURCES, SPLITS
from crepe.errors import CrepeError
from crepe.models import DEFAULT_MODEL, EMBEDDED
from crepe.types import parse_sparsity

DEFAULT_PARAMS = "params.yaml"
SECTIONS: tuple[str, ...] = (
    "model", "data", "calibration", "prune", "pho", "refine", "allocation", "eval", "tracking", "runner", "release",
)


class ConfigError(CrepeError):
    """A bad ``params.yaml`` or ``-S`` override: one sentence naming where, what, and what is allowed.

    ``path`` is the dotted key (``""`` for the whole file), ``where`` the ``file:line:col`` or
    ``-S ...`` origin, ``problem`` the sentence without the origin; ``more`` counts further problems.
    """

    def __init__(self, problem: str, path: str = "", where: str = "", more: int = 0) -> None:
        self.problem, self.path, self.where, self.more = problem, path, where, more
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"{where}: {problem}{tail}" if where else f"{problem}{tail}")


# --- registries of the stages that arrive later (one entry each) --------------------------------------


@dataclass(frozen=True)
class StageMethod:
    """One refinement or allocation method: its parameters (with defaults) and the patterns it supports.

    ``patterns`` is ``"any"``, ``"nm"`` (N:M only, e.g. channel permutation) or ``"unstructured"``
    (layer-wise ratios: OWL, AlphaPruning, DLP).
    """

    name: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    patterns: Literal["any", "nm", "unstructured"] = "any"
    doc: str = ""


REFINE_METHODS: dict[str, StageMethod] = {
    "none": StageMethod("none", {}, "any", "no refinement after the prune"),
}
ALLOCATION_METHODS: dict[str, StageMethod] = {
    "none": StageMethod("none", {}, "any", "the same sparsity for every layer"),
}


def _register_extensions() -> None:
    """The extensions (issue 5), one registry entry each, with the library's own defaults."""
    from crepe.allocation import ALLOCATOR_DEFAULTS
    from crepe.permute import PERMUTE_DEFAULTS
    from crepe.refine import REFINE_DOCS, refine_defaults

    for name in ("cp", "lsa"):
        REFINE_METHODS[name] = StageMethod(name, dict(PERMUTE_DEFAULTS[name]), "nm", REFINE_DOCS.get(name, ""))
    for name in ("dsnot", "r2-dsnot"):
        REFINE_METHODS[name] = StageMethod(name, refine_defaults(name), "any", REFINE_DOCS.get(name, ""))
    for name, defaults in ALLOCATOR_DEFAULTS.items():
        ALLOCATION_METHODS[name] = StageMethod(name, dict(defaults), "unstructured", f"{name} layer-wise sparsity")


_register_extensions()
# Names that are planned and get a "not available yet" message instead of "unknown" (none left).
PLANNED_REFINE: tuple[str, ...] = ()
PLANNED_ALLOCATION: tuple[str, ...] = ()


def register_refine(method: StageMethod) -> StageMethod:
    """Make ``method`` a valid ``refine.method`` (the extensions add cp, lsa, dsnot, r2-dsnot here)."""
    REFINE_METHODS[method.name] = method
    return method


def register_allocation(method: StageMethod) -> StageMethod:
    """Make ``method`` a valid ``allocation.method`` (the extensions add owl, alpha, dlp here)."""
    ALLOCATION_METHODS[method.name] = method
    return method


# Zero-shot tasks with local data under ../shared/data (spec §14.2, the CRePE paper's six).
ZERO_SHOT_TASKS: tuple[str, ...] = ("boolq", "rte", "mnli", "hellaswag", "arc_easy", "arc_challenge")

TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
DASK_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


# --- YAML 1.2 scalars, duplicate keys, key positions ----------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans, integers and floats; duplicate keys raise."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_BOOL, _INT, _FLOAT = ("tag:yaml.org,2002:" + t for t in ("bool", "int", "float"))
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    if digits.startswith("0o"):
        return sign * int(digits[2:], 8)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    return sign * int(digits, 10)  # YAML 1.2: "010" is ten, not octal eight


_Loader.add_constructor(_INT, _construct_int)


def _mark(mark: Any) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _key_marks(node: yaml.Node | None, prefix: str = "", out: dict[str, tuple[int, int]] | None = None) -> dict:
    """Dotted key path -> (line, column) of that key in the file (1-based)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = _mark(key_node.start_mark)
            _key_marks(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = _mark(item.start_mark)
            _key_marks(item, path, out)
    return out


def parse_yaml(text: str, origin: str = "<string>") -> tuple[Any, dict[str, tuple[int, int]]]:
    """``text`` parsed with YAML 1.2 scalars, and the position of every key; syntax errors raise
    :class:`ConfigError` with ``origin:line:column``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        if origin.startswith("-S "):  # a one-line override value: a column, and how to pass a plain string
            where = f"{origin} (column {mark.column + 1})" if mark else origin
            what += "; quote a string value that starts with [ or { or holds ': ', e.g. -S 'key=\"{model}-x\"'"
        else:
            where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        raise ConfigError(f"malformed YAML: {what}", where=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", where=origin) from None
    finally:
        loader.dispose()
    return data, _key_marks(node)


# --- value helpers ----------------------------------------------------------------------------------


def _canonical_sparsity(value: Any) -> Any:
    """``0.5``, ``"0.5"``, ``"50%"`` -> ``"0.5"``; ``"2:4"`` -> ``"2:4"`` (errors: parse_sparsity's)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value  # the str type check reports it
    spec = parse_sparsity(value)
    return str(spec.pattern) if spec.pattern else repr(spec.sparsity)


def _pair(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) != 2:
            raise ValueError(f"{value!r} is not a [low, high] pair")
        return tuple(value)
    return value


Sparsity = Annotated[str, BeforeValidator(_canonical_sparsity)]
Bounds = Annotated[tuple[float, float], BeforeValidator(_pair)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class ModelSection(_Section):
    """The base model (issue 4 §2 "resolve/download model")."""

    spec: str = Field(DEFAULT_MODEL, description="embedded:NAME, a hub id (org/name[@rev]) or a local folder")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype while pruning")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    blocks: str | None = Field(None, description="dotted path of the decoder block list (null: auto-detect)")
    max_memory: str | None = Field(
        None, description="host-memory cap such as 3GB: a model over it is streamed block by block (null: what is free)")

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            from crepe.shards import parse_size

            try:
                parse_size(value)
            except CrepeError as exc:
                raise ValueError(str(exc)) from None
        return value


class DataSection(_Section):
    data_dir: str | None = Field(None, description="local data folder (null: $CREPE_DATA_DIR, else ../shared/data)")
    calib_source: Literal[CALIB_SOURCES] = Field("auto", description="calibration corpus")  # type: ignore[valid-type]
    eval_source: Literal[EVAL_SOURCES] = Field("auto", description="perplexity corpus")  # type: ignore[valid-type]


class CalibrationSection(_Section):
    """Spec §1.2: seeded windows of ``seqlen`` tokens from documents longer than ``seqlen``."""

    samples: PosInt = Field(16, description="calibration windows")
    seqlen: Annotated[int, Field(ge=2)] = Field(256, description="tokens per window")
    batch_size: PosInt = Field(8, description="windows per forward pass")
    seed: NonNegInt = Field(0, description="sampling seed")


class PruneSection(_Section):
    """The final prune. ``params`` are resolved against the method's defaults at load time."""

    method: str = Field("crepe", description="a scorer of crepe.scoring.SCORERS")
    sparsity: Sparsity = Field("2:4", description='a fraction in [0, 1) such as 0.5, or N:M such as "2:4"')
    group: Literal["row", "layer"] | None = Field(None, description="unstructured comparison group (null: the method's)")
    rule: Literal["exact", "threshold"] = Field("exact", description="unstructured selection rule")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (PHO replaces alpha/beta/gamma)")
    targets: str | None = Field(None, description="regex over full block-weight names: prune only matches (null: all)")
    ignore: str | None = Field(None, description="regex over full block-weight names: leave matches dense (reported)")
    prune_router: bool = Field(False, description="also prune MoE router/gate weights")
    moe_min_tokens: NonNegInt = Field(16, description="an expert routed fewer calibration tokens follows moe_fallback")
    moe_fallback: Literal["all-tokens", "magnitude"] = Field(
        "all-tokens", description="all-tokens: calibrate a starved expert on every token; magnitude: score it by |W|")


class BoundsSection(_Section):
    """PHO's box (spec §8.4); gamma is searched on a log10 scale."""

    alpha: Bounds = (0.0, 2.0)
    beta: Bounds = (0.0, 2.0)
    log10_gamma: Bounds = (-5.0, 0.0)


class PhoSection(_Section):
    """Proxy-based hyperparameter optimisation (spec §8.3): screening then verification of the top_k."""

    enabled: bool = Field(True, description="search CRePE's coefficients before the final prune")
    sampler: str = Field("cmaes", description="cmaes, tpe or random")
    n_trials: Annotated[int, Field(ge=2)] = Field(20, description="stage-1 proxy evaluations")
    top_k: PosInt = Field(3, description="candidates verified by perplexity (plus the RIA point)")
    seed: NonNegInt = Field(0, description="sampler seed")
    target: str = Field("self_attn.q_proj", description="the proxy's linear inside the target block")
    target_block: NonNegInt = Field(0, description="the proxy's block index")
    bounds: BoundsSection = Field(default_factory=BoundsSection)
    search_kernel: bool = Field(False, description="also search K in {3,5,7,9,11} (default: fixed K)")
    verify_split: Literal[SPLITS] = Field("validation", description="stage-2 perplexity split")  # type: ignore[valid-type]
    verify_max_windows: PosInt | None = Field(16, description="stage-2 windows per candidate (null: all)")


class RefineSection(_Section):
    method: str = Field("none", description="refinement after the prune (registry: REFINE_METHODS)")
    params: dict[str, Any] = Field(default_factory=dict)


class AllocationSection(_Section):
    method: str = Field("none", description="layer-wise sparsity allocation (registry: ALLOCATION_METHODS)")
    params: dict[str, Any] = Field(default_factory=dict)


class PplSection(_Section):
    """Spec §14.1: non-overlapping windows of ``seqlen`` tokens; the remainder is dropped."""

    split: Literal[SPLITS] = "test"  # type: ignore[valid-type]
    seqlen: Annotated[int, Field(ge=2)] = 256
    max_windows: PosInt | None = Field(16, description="first N windows (null: the whole split)")
    batch_size: PosInt = 4


class ZeroShotSection(_Section):
    """Spec §14.2 (lm-eval, 0-shot, ``acc``); an empty task list turns zero-shot evaluation off."""

    tasks: list[str] = Field(default_factory=list)
    limit: PosInt | None = Field(None, description="examples per task (null: all)")
    batch_size: PosInt = 8
    num_fewshot: NonNegInt = 0


class EvalSection(_Section):
    ppl: PplSection = Field(default_factory=PplSection)
    zero_shot: ZeroShotSection = Field(default_factory=ZeroShotSection)


class TrackingSection(_Section):
    enabled: bool = Field(True, description="log runs to MLflow")
    uri: str = Field("sqlite:///mlflow.db", description="tracking URI; a relative sqlite path is under the project")
    experiment: str = Field("crepe-{model}", description="experiment name; {model} is the base model's slug")


class RunnerSection(_Section):
    backend: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(None, description="scheduler address (null: a local cluster)")
    max_workers: PosInt = 2


class ReleaseSection(_Section):
    out_dir: str = Field("data/release", description="release folder (relative: under the project)")
    register_model: bool = Field(True, description="register the release in the MLflow model registry")
    model_name: str = Field("crepe-{model}-{pattern}", description="registered name; {model}, {method}, {pattern}")
    alias: str = Field("candidate", description="registry alias set on the new version")


_SECTION_TYPES: dict[str, type[_Section]] = {
    "model": ModelSection, "data": DataSection, "calibration": CalibrationSection, "prune": PruneSection,
    "pho": PhoSection, "refine": RefineSection, "allocation": AllocationSection, "eval": EvalSection,
    "tracking": TrackingSection, "runner": RunnerSection, "release": ReleaseSection,
}


def canonical_json(data: Any) -> str:
    """Sorted keys, no whitespace, ASCII: equal data gives equal text in every process."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def model_slug(spec: str) -> str:
    """A short name for a model spec: ``embedded:smollm2-135m`` -> ``smollm2-135m``,
    ``hf:org/name@rev`` -> ``org-name``, ``/path/to/folder`` -> ``folder``."""
    text = spec.removeprefix("embedded:").removeprefix("hf:").split("@", 1)[0]
    if text.startswith((".", "/", "~")) or "\\" in text:
        text = Path(text).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def pattern_slug(sparsity: str) -> str:
    """``"2:4"`` -> ``"2of4"``, ``"0.5"`` -> ``"50pct"`` (registry- and path-friendly)."""
    if ":" in sparsity:
        return sparsity.replace(":", "of")
    return f"{float(sparsity) * 100:g}pct".replace(".", "p")


class PipelineConfig(_Section):
    """The whole validated ``params.yaml``; build it with :func:`load_config` or :meth:`from_mapping`."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    prune: PruneSection = Field(default_factory=PruneSection)
    pho: PhoSection = Field(default_factory=PhoSection)
    refine: RefineSection = Field(default_factory=RefineSection)
    allocation: AllocationSection = Field(default_factory=AllocationSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    runner: RunnerSection = Field(default_factory=RunnerSection)
    release: ReleaseSection = Field(default_factory=ReleaseSection)

    _source: str | None = PrivateAttr(default=None)
    _overrides: tuple[str, ...] = PrivateAttr(default=())
    _root: Path = PrivateAttr(default_factory=Path.cwd)

    # -- construction
    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any] | None,
        overrides: Sequence[str] = (),
        origin: str = "",
        marks: Mapping[str, tuple[int, int]] | None = None,
        root: str | Path | None = None,
    ) -> PipelineConfig:
        """Validate a raw mapping (plus ``-S`` overrides); resolve method parameters."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"the file must be a mapping of sections ({', '.join(SECTIONS)}), not a {type(data).__name__}",
                where=origin,
            )
        raw = _deep_copy(data)
        set_by = apply_overrides(raw, overrides)
        _empty_sections(raw, cls)
        locate = _Locator(origin, dict(marks or {}), set_by)
        _check_keys(raw, "", locate)
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise _translate(exc, locate) from None
        cfg = _check_meaning(cfg, locate)
        cfg._source, cfg._overrides = (origin if origin and origin != "<defaults>" else None), tuple(overrides)
        cfg._root = Path(root).resolve() if root is not None else Path.cwd()
        return cfg

    def __eq__(self, other: object) -> bool:
        """Equal when every resolved value is equal (where it was loaded from does not count)."""
        return isinstance(other, PipelineConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable dict fields: use config_hash()

    # -- identity
    def to_dict(self) -> dict[str, Any]:
        """Every resolved value as JSON-compatible data (the content of a resolved params file)."""
        return self.model_dump(mode="json")

    def section(self, name: str) -> Any:
        """A section or sub-section by dotted name (``"prune"``, ``"eval.ppl"``)."""
        node: Any = self
        for i, part in enumerate(name.split(".")):
            fields = type(node).model_fields if isinstance(node, BaseModel) else {}
            if part not in fields or not isinstance(getattr(node, part), BaseModel):
                done = ".".join(name.split(".")[:i])
                allowed = [k for k, f in fields.items() if isinstance(getattr(node, k), BaseModel)]
                raise ConfigError(
                    f"no section {name!r}" + (f" ({done!r} has sub-sections: {', '.join(allowed) or 'none'})" if done
                                              else f"; sections: {', '.join(SECTIONS)}")
                )
            node = getattr(node, part)
        return node

    def section_hash(self, name: str) -> str:
        """sha256 of the canonical JSON of ``{"section": name, "values": ...}``: a cache key that changes
        only when that (sub-)section's resolved values change (two equal sections of different names differ)."""
        payload = {"section": name, "values": self.section(name).model_dump(mode="json")}
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()

    def config_hash(self) -> str:
        """sha256 of the whole resolved configuration."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()

    def section_hashes(self) -> dict[str, str]:
        return {name: self.section_hash(name) for name in SECTIONS}

    def dump_yaml(self) -> str:
        """The resolved configuration as YAML (loads back to an equal config)."""
        header = "# Resolved crepe pipeline configuration"
        if self._source:
            header += f" (from {self._source}"
            header += f" with -S {' -S '.join(self._overrides)})" if self._overrides else ")"
        return header + "\n" + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def write_resolved(self, path: str | Path) -> Path:
        """Write :meth:`dump_yaml` atomically to ``path``."""
        from crepe.io import write_text_atomic

        write_text_atomic(path, self.dump_yaml())
        return Path(path)

    @property
    def source(self) -> str | None:
        """The file this config was loaded from (None when built from a mapping)."""
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    @property
    def project_root(self) -> Path:
        """Relative paths of the config (release.out_dir, a sqlite tracking URI) are resolved against this:
        the project holding the params file (see :func:`project_root_of`), or the working directory."""
        return self._root

    # -- derived objects for the stages
    def resolve_path(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self._root / p

    @property
    def model_slug(self) -> str:
        return model_slug(self.model.spec)

    def sparsity_spec(self) -> Any:
        """The :class:`crepe.types.SparsitySpec` of ``prune.sparsity``."""
        return parse_sparsity(self.prune.sparsity)

    def prune_config(self, params: Mapping[str, Any] | None = None) -> Any:
        """The :class:`crepe.pruner.PruneConfig` of ``prune`` (``params`` e.g. the PHO winner overlay)."""
        from crepe.jobs import build_config

        refine, allocation = self.refine.method, self.allocation.method
        return build_config(
            self.prune.method, self.prune.sparsity, {**self.prune.params, **dict(params or {})},
            self.prune.group, self.prune.rule,
            refine=None if refine == "none" else refine,
            refine_params=dict(self.refine.params) if refine != "none" else None,
            allocation=None if allocation == "none" else allocation,
            allocation_params=dict(self.allocation.params) if allocation != "none" else None,
            targets=self.prune.targets, ignore=self.prune.ignore, prune_router=self.prune.prune_router,
            moe_min_tokens=self.prune.moe_min_tokens, moe_fallback=self.prune.moe_fallback,
        )

    def budget(self, max_windows: Any = "eval") -> Any:
        """The :class:`crepe.jobs.Budget` of calibration and the final evaluation (``eval.ppl``);
        ``max_windows`` other than ``"eval"`` replaces ``eval.ppl.max_windows`` (see :meth:`pho_budget`)."""
        from crepe.jobs import Budget

        c, p = self.calibration, self.eval.ppl
        return Budget(
            calib_samples=c.samples, seqlen=c.seqlen, eval_seqlen=p.seqlen,
            max_windows=p.max_windows if max_windows == "eval" else max_windows,
            batch_size=c.batch_size, eval_batch_size=p.batch_size, seed=c.seed,
            calib_source=self.data.calib_source, eval_source=self.data.eval_source, data_dir=self.data_dir(),
        )

    def data_dir(self) -> str | None:
        """``data.data_dir`` with a relative path resolved under the project (None: crepe's default lookup)."""
        return str(self.resolve_path(self.data.data_dir)) if self.data.data_dir else None

    def pho_budget(self) -> Any:
        """The :class:`crepe.jobs.Budget` of PHO's stage 2: ``pho.verify_max_windows`` windows of
        ``eval.ppl.seqlen`` tokens (on ``pho.verify_split``, which the caller passes to the evaluation)."""
        return self.budget(max_windows=self.pho.verify_max_windows)

    def search_space(self) -> Any:
        """The :class:`crepe.search.SearchSpace` of ``pho.bounds`` (K fixed at prune.params.kernel_size)."""
        from crepe.search import KERNEL_CHOICES, SearchSpace

        b = self.pho.bounds
        kernel = self.prune.params.get("kernel_size", 9)
        return SearchSpace(b.alpha, b.beta, b.log10_gamma, kernel,
                           KERNEL_CHOICES if self.pho.search_kernel else None)

    def experiment_name(self) -> str:
        return self.tracking.experiment.format(model=self.model_slug)

    def tracking_uri(self) -> str:
        """``tracking.uri`` with a relative ``sqlite:///`` path made absolute under the project."""
        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            rel = uri.removeprefix("sqlite:///")
            if rel and not rel.startswith(":memory:"):
                return f"sqlite:///{(self._root / rel).as_posix()}"
        return uri

    def registered_model_name(self) -> str:
        return self.release.model_name.format(
            model=self.model_slug, method=self.prune.method, pattern=pattern_slug(self.prune.sparsity)
        )

    def release_dir(self) -> Path:
        return self.resolve_path(self.release.out_dir)


# --- loading --------------------------------------------------------------------------------------


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read, validate and resolve ``path`` (None: the built-in defaults) with ``-S`` ``overrides``.

    Raises :class:`ConfigError` (one line, ``file:line:col: ...``) for a missing or malformed file,
    unknown keys, wrong types and impossible combinations.
    """
    if path is None:
        return PipelineConfig.from_mapping({}, overrides, origin="<defaults>", root=Path.cwd())
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
    data, marks = parse_yaml(text, str(path))
    return PipelineConfig.from_mapping(data, overrides, origin=str(path), marks=marks, root=project_root_of(file))


PROJECT_MARKERS = ("dvc.yaml", ".dvc", ".git")


def project_root_of(params_file: str | Path) -> Path:
    """The project a params file belongs to: its nearest ancestor folder holding ``dvc.yaml``, ``.dvc``
    or ``.git`` (so ``profiles/paper.yaml`` shares the project's MLflow db and data/), else its folder."""
    folder = Path(params_file).resolve().parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in PROJECT_MARKERS):
            return candidate
    return folder


def _empty_sections(raw: dict[str, Any], model: type[BaseModel]) -> None:
    """An empty section (``prune:`` with every key commented out) reads as YAML null: make it ``{}``."""
    for name, info in model.model_fields.items():
        sub = _unwrap(info.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel) and name in raw:
            if raw[name] is None:
                raw[name] = {}
            if isinstance(raw[name], dict):
                _empty_sections(raw[name], sub)


def _check_keys(node: Any, prefix: str, locate: _Locator) -> None:
    """Every mapping key is a string (YAML also allows ``1:`` or ``true:``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                where = repr(prefix) if prefix else "the top level"
                raise locate.error(prefix, f"key {key!r} ({_type_name(key)}) under {where} must be a string; "
                                   "quote it or use a name")
            _check_keys(value, f"{prefix}.{key}" if prefix else key, locate)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check_keys(item, f"{prefix}[{i}]", locate)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prune.sparsity=0.6"`` -> (["prune", "sparsity"], 0.6); the value is a YAML 1.2 scalar."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. prune.sparsity=0.6", where="-S")
    parsed, _ = parse_yaml(value, f"-S {text}") if value.strip() else (None, {})
    return [p.strip() for p in parts], parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Set each ``-S`` override in ``raw`` (in order); returns dotted path -> the override's text."""
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


# --- error messages -------------------------------------------------------------------------------


@dataclass
class _Locator:
    origin: str
    marks: dict[str, tuple[int, int]]
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


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggest(word: str, allowed: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _model_at(loc: Sequence[Any]) -> tuple[type[BaseModel] | None, Any]:
    """The model class holding the last key of ``loc`` and that key's FieldInfo (None when unknown)."""
    model: Any = PipelineConfig
    for i, part in enumerate(loc):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None, None
        info = model.model_fields.get(str(part))
        if info is None or i == len(loc) - 1:
            return (model, info) if i == len(loc) - 1 else (None, None)
        model = _unwrap(info.annotation)
    return None, None


def _unwrap(annotation: Any) -> Any:
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


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    inner = _unwrap(annotation)
    return typing.get_args(inner) if typing.get_origin(inner) is Literal else ()


_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a [low, high] pair", "dict_type": "a mapping", "model_type": "a section (a mapping of keys)",
    "int_from_float": "an integer", "finite_number": "a finite number",
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)


def _one_error(err: Mapping[str, Any]) -> tuple[str, str]:
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    path = _dotted(loc)
    model, info = _model_at(loc)
    annotation = info.annotation if info is not None else None
    hint = f" ({info.description})" if info is not None and info.description else ""
    if kind == "extra_forbidden":
        parent_loc = loc[:-1]
        parent_model = model
        allowed = list(parent_model.model_fields) if parent_model else []
        scope = f"of {_dotted(parent_loc)!r}" if parent_loc else "(sections)"
        return path, (f"unknown key {path!r}; allowed keys {scope}: {', '.join(allowed)}{_suggest(loc[-1], allowed)}")
    if kind == "literal_error":
        allowed = [str(v) for v in _literal_values(annotation)] or [err.get("ctx", {}).get("expected", "")]
        null = " or null" if _nullable(annotation) else ""
        return path, f"{path} = {_show(value)} is not allowed; allowed: {', '.join(allowed)}{null}{_suggest(value, allowed)}"
    if kind in _EXPECTED:
        expected = _EXPECTED[kind] + (" or null" if _nullable(annotation) else "")
        if kind == "model_type":
            allowed = list(_unwrap(annotation).model_fields) if annotation is not None else []
            return path, f"{path} = {_show(value)} must be a section with keys: {', '.join(allowed)}"
        return path, f"{path} = {_show(value)} ({_type_name(value)}) must be {expected}{hint}"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(err.get("ctx", {}).values()), "?")
        return path, f"{path} = {_show(value)} must be {op} {bound}"
    if kind == "value_error":
        return path, f"{path} = {_show(value)}: {err.get('ctx', {}).get('error', err['msg'])}"
    if kind == "missing":
        return path, f"{path} is required"
    return path, f"{path} = {_show(value)}: {err['msg']}"


def _translate(exc: ValidationError, locate: _Locator) -> ConfigError:
    errors = exc.errors(include_url=False)
    path, problem = _one_error(errors[0])
    return locate.error(path, problem, more=len(errors) - 1)


# --- meaning: registries and combinations ------------------------------------------------------


def _resolve_stage_params(
    section: str, method: str, params: Mapping[str, Any], registry: Mapping[str, StageMethod],
    planned: Sequence[str], locate: _Locator,
) -> dict[str, Any]:
    if method not in registry:
        allowed = ", ".join(registry)
        if method in planned:
            raise locate.error(f"{section}.method", f"{section}.method {method!r} is not available yet (it arrives with "
                               f"the extensions); allowed now: {allowed}")
        raise locate.error(f"{section}.method", f"unknown {section}.method {method!r}; allowed: {allowed}"
                           f"{_suggest(method, [*registry, *planned])}")
    entry = registry[method]
    for key in params:
        if key not in entry.defaults:
            allowed = ", ".join(entry.defaults) or "none"
            raise locate.error(f"{section}.params.{key}", f"unknown key '{section}.params.{key}': {section} method "
                               f"{method!r} has parameters: {allowed}{_suggest(key, entry.defaults)}")
    return {**entry.defaults, **params}


def _check_meaning(cfg: PipelineConfig, locate: _Locator) -> PipelineConfig:
    from crepe.scoring import SCORERS, get_scorer

    # model
    spec = cfg.model.spec.strip()
    if not spec:
        raise locate.error("model.spec", "model.spec is empty; use embedded:smollm2-135m, a hub id or a folder")
    if spec.startswith("embedded:") and spec.removeprefix("embedded:") not in EMBEDDED:
        name = spec.removeprefix("embedded:")
        raise locate.error("model.spec", f"unknown embedded model {name!r}; available: "
                           f"{', '.join('embedded:' + k for k in EMBEDDED)}{_suggest(name, EMBEDDED)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.model.device):
        raise locate.error("model.device", f"model.device = {cfg.model.device!r} is not a device; use auto, cpu, cuda or cuda:N")

    # prune
    p = cfg.prune
    if p.method not in SCORERS:
        raise locate.error("prune.method", f"unknown prune.method {p.method!r}; known methods: "
                           f"{', '.join(sorted(SCORERS))}{_suggest(p.method, SCORERS)}")
    spec_s = parse_sparsity(p.sparsity)
    if spec_s.pattern is not None and p.group is not None:
        raise locate.error("prune.group", f"prune.group = {p.group!r} cannot be combined with the N:M pattern "
                           f"{p.sparsity} (N:M selects within groups of M inputs); set prune.group: null", "prune.sparsity")
    if spec_s.pattern is not None and p.rule != "exact":
        raise locate.error("prune.rule", f"prune.rule = {p.rule!r} applies to unstructured sparsity only, not to "
                           f"the N:M pattern {p.sparsity}; set prune.rule: exact", "prune.sparsity")
    defaults = get_scorer(p.method).defaults
    params: dict[str, Any] = {}
    for key, value in p.params.items():
        if key not in defaults:
            raise locate.error(f"prune.params.{key}", f"unknown key 'prune.params.{key}': method {p.method!r} has "
                               f"parameters: {', '.join(defaults) or 'none'}{_suggest(key, defaults)}")
        want = type(defaults[key])
        if defaults[key] is None:  # an optional parameter: the method's own validation decides
            params[key] = value
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (want is float and not isinstance(value, float)) or (want is not float and type(value) is not want):
            expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(want, want.__name__)
            raise locate.error(f"prune.params.{key}", f"prune.params.{key} = {_show(value)} ({_type_name(value)}) "
                               f"must be {expected}")
        params[key] = value
    try:
        pc = _build(p.method, p.sparsity, params, p.group, p.rule)
    except CrepeError as exc:
        # name the parameter the library's message is about, so the error points at its line
        key = next((k for k in params if re.search(rf"\b{re.escape(k)}\b", str(exc))), None)
        path = f"prune.params.{key}" if key else "prune.params"
        raise locate.error(path, f"prune.params: {exc}", "prune.method", "prune.sparsity") from None
    group = None if spec_s.pattern is not None else pc.resolved_group()
    prune = p.model_copy(update={"params": pc.resolved_params(), "group": group})

    # pho
    h = cfg.pho
    from crepe.search import SAMPLERS, SearchSpace, cma_population_size

    if h.enabled and p.method != "crepe":
        raise locate.error("pho.enabled", f"PHO searches CRePE's coefficients but prune.method is {p.method!r}; "
                           "set prune.method: crepe or pho.enabled: false", "prune.method")
    if h.sampler not in SAMPLERS:
        raise locate.error("pho.sampler", f"unknown pho.sampler {h.sampler!r}; allowed: {', '.join(SAMPLERS)}"
                           f"{_suggest(h.sampler, SAMPLERS)}")
    if h.top_k > h.n_trials:
        raise locate.error("pho.top_k", f"pho.top_k = {h.top_k} is larger than pho.n_trials = {h.n_trials}; "
                           "verify at most as many candidates as were screened", "pho.n_trials")
    if h.sampler == "cmaes":
        try:
            cma_population_size(h.n_trials, 4 if h.search_kernel else 3)
        except CrepeError as exc:
            raise locate.error("pho.n_trials", f"pho.n_trials: {exc}", "pho.sampler", "pho.search_kernel") from None
    for name in ("alpha", "beta", "log10_gamma"):
        try:
            SearchSpace(**{name: getattr(h.bounds, name)})
        except CrepeError as exc:
            raise locate.error(f"pho.bounds.{name}", f"pho.bounds.{name}: {exc}") from None
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*", h.target):
        raise locate.error("pho.target", f"pho.target = {h.target!r} is not a dotted module name such as self_attn.q_proj")

    # refine / allocation
    refine = cfg.refine.model_copy(update={"params": _resolve_stage_params(
        "refine", cfg.refine.method, cfg.refine.params, REFINE_METHODS, PLANNED_REFINE, locate)})
    allocation = cfg.allocation.model_copy(update={"params": _resolve_stage_params(
        "allocation", cfg.allocation.method, cfg.allocation.params, ALLOCATION_METHODS, PLANNED_ALLOCATION, locate)})
    for section, entry in (("refine", REFINE_METHODS[refine.method]), ("allocation", ALLOCATION_METHODS[allocation.method])):
        if entry.patterns == "unstructured" and spec_s.pattern is not None:
            raise locate.error(f"{section}.method", f"{section}.method {entry.name!r} sets per-layer sparsity ratios and "
                               f"cannot be combined with the N:M pattern {p.sparsity}; use {section}.method: none or an "
                               "unstructured prune.sparsity such as 0.5", "prune.sparsity")
        if entry.patterns == "nm" and spec_s.pattern is None:
            raise locate.error(f"{section}.method", f"{section}.method {entry.name!r} works on N:M patterns only, but "
                               f"prune.sparsity is the unstructured {p.sparsity}; use an N:M pattern such as 2:4", "prune.sparsity")

    # eval
    z = cfg.eval.zero_shot
    for i, task in enumerate(z.tasks):
        if task not in ZERO_SHOT_TASKS:
            raise locate.error(f"eval.zero_shot.tasks[{i}]", f"unknown zero-shot task {task!r}; allowed: "
                               f"{', '.join(ZERO_SHOT_TASKS)}{_suggest(task, ZERO_SHOT_TASKS)}")
        if task in z.tasks[:i]:
            raise locate.error(f"eval.zero_shot.tasks[{i}]", f"zero-shot task {task!r} is listed twice")

    # tracking
    t = cfg.tracking
    scheme = t.uri.split(":", 1)[0] if ":" in t.uri else ""
    if scheme not in TRACKING_SCHEMES or (scheme != "databricks" and "://" not in t.uri):
        raise locate.error("tracking.uri", f"tracking.uri = {t.uri!r} is not a tracking URI; use one of the schemes "
                           f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} (default sqlite:///mlflow.db)")
    _check_template(locate, "tracking.experiment", t.experiment, ("model",))
    # runner
    r = cfg.runner
    if r.dask_address is not None:
        if r.backend != "dask":
            raise locate.error("runner.dask_address", "runner.dask_address is set but runner.backend is 'thread'; "
                               "set runner.backend: dask or runner.dask_address: null", "runner.backend")
        if not re.fullmatch(rf"(?:{'|'.join(DASK_SCHEMES)})://[^\s/:]+(?::\d{{1,5}})?/?", r.dask_address):
            raise locate.error("runner.dask_address", f"runner.dask_address = {r.dask_address!r} is not a scheduler "
                               "address like tcp://127.0.0.1:8786")
    # release
    rel = cfg.release
    if not rel.out_dir.strip():
        raise locate.error("release.out_dir", "release.out_dir is empty; give a folder such as data/release")
    if rel.register_model and not t.enabled:
        raise locate.error("release.register_model", "release.register_model needs MLflow but tracking.enabled is "
                           "false; set release.register_model: false or tracking.enabled: true", "tracking.enabled")
    _check_template(locate, "release.model_name", rel.model_name, ("model", "method", "pattern"))
    if not re.fullmatch(r"[A-Za-z0-9_-]+", rel.alias) or rel.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", rel.alias):
        raise locate.error("release.alias", f"release.alias = {rel.alias!r} is not a registry alias; use letters, "
                           "digits, '-' or '_' (not 'latest' and not v<number>), e.g. candidate or champion")
    return cfg.model_copy(update={"prune": prune, "refine": refine, "allocation": allocation})


def _build(method: str, sparsity: str, params: dict[str, Any], group: str | None, rule: str) -> Any:
    from crepe.jobs import build_config

    return build_config(method, sparsity, params, group, rule)


def _check_template(locate: _Locator, path: str, template: str, names: tuple[str, ...]) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise locate.error(path, f"{path} = {template!r} is not a valid template ({exc})") from None
    bad = [f for f in fields if f not in names]
    if bad:
        raise locate.error(path, f"{path} uses the unknown placeholder {{{bad[0]}}}; allowed: "
                           f"{', '.join('{' + n + '}' for n in names)}")
    if not template.format(**dict.fromkeys(names, "x")).strip():
        raise locate.error(path, f"{path} is empty")


# --- command-line helpers -------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--params FILE`` and repeatable ``-S/--set section.key=value`` (for pipeline-style commands)."""
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="pipeline parameters file (default %(default)s)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. -S prune.sparsity=0.6 (repeatable; YAML values)")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.params, args.overrides)


__all__ = [
    "ALLOCATION_METHODS",
    "DEFAULT_PARAMS",
    "REFINE_METHODS",
    "SECTIONS",
    "ZERO_SHOT_TASKS",
    "ConfigError",
    "PipelineConfig",
    "StageMethod",
    "add_config_args",
    "canonical_json",
    "config_from_args",
    "load_config",
    "model_slug",
    "parse_override",
    "parse_yaml",
    "pattern_slug",
    "project_root_of",
    "register_allocation",
    "register_refine",
]
