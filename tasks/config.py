"""The pipeline's configuration: ``params.yaml`` validated once into one typed, frozen :class:`PipelineConfig`.

One file holds every knob of every stage. Sections, in order: ``model``, ``data``, ``calibration``,
``prune``, ``pho``, ``refine``, ``allocation``, ``eval``, ``tracking``, ``runner``, ``release``
(:mod:`tasks.config_sections`; ``tracking`` and ``release``, which the derived names read, are here). Every key has a default (the CPU-sized profile that ships as
``params.yaml``), so a file may hold only what it changes; ``profiles/paper.yaml`` holds the paper's.

Validation is pydantic's, in one pass: types and ranges from the annotations, registry names and
normalisation in field validators, and rules between fields in ``model_validator(mode="after")``s on the
model that holds them (the rules between sections are on :class:`PipelineConfig`). Every failure is one
:class:`ConfigError` prefixed with ``file:line:column`` of the offending key, or the ``-S`` override that
set it (:mod:`tasks.config_errors`, :mod:`tasks.config_yaml`).
"""

from __future__ import annotations

import hashlib
import io
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

from crepe.budget import Budget
from crepe.errors import CrepeError
from crepe.io import write_text_atomic
from crepe.prune_config import PruneConfig, build_config
from crepe.search import KERNEL_CHOICES, SearchSpace
from crepe.types import SparsitySpec, parse_sparsity
from tasks.config_errors import ConfigError, Problem, translate
from tasks.config_sections import (
    AllocationSection,
    CalibrationSection,
    DataSection,
    EvalSection,
    ModelSection,
    PhoSection,
    PruneSection,
    RefineSection,
    RunnerSection,
    Section,
    model_slug,
    pattern_slug,
)
from tasks.config_yaml import (
    Locator,
    apply_overrides,
    parse_override,
    parse_yaml,
    project_root_of,
    read_params,
    with_overrides,
)
from tasks.keys import canonical_json

DEFAULT_PARAMS = "params.yaml"
SECTIONS: tuple[str, ...] = (
    "model", "data", "calibration", "prune", "pho", "refine", "allocation", "eval", "tracking", "runner", "release",
)


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def _template(path: str, template: str, names: tuple[str, ...]) -> str:
    """``template`` may use only the placeholders ``names`` and must not format to an empty string."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise Problem(f"{path} = {template!r} is not a valid template ({exc})") from None
    bad = [f for f in fields if f not in names]
    if bad:
        raise Problem(f"{path} uses the unknown placeholder {{{bad[0]}}}; allowed: {', '.join('{' + n + '}' for n in names)}")
    if not template.format(**dict.fromkeys(names, "x")).strip():
        raise Problem(f"{path} is empty")
    return template


class TrackingSection(Section):
    enabled: bool = Field(True, description="log runs to MLflow")
    uri: str = Field("sqlite:///mlflow.db", description="tracking URI; a relative sqlite path is under the project")
    experiment: str = Field("crepe-{model}", description="experiment name; {model} is the base model's slug")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        scheme = value.split(":", 1)[0] if ":" in value else ""
        if scheme not in TRACKING_SCHEMES or (scheme != "databricks" and "://" not in value):
            raise Problem(f"tracking.uri = {value!r} is not a tracking URI; use one of the schemes "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} (default sqlite:///mlflow.db)")
        return value

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str) -> str:
        return _template("tracking.experiment", value, ("model",))


class ReleaseSection(Section):
    out_dir: str = Field("data/release", description="release folder (relative: under the project)")
    register_model: bool = Field(True, description="register the release in the MLflow model registry")
    model_name: str = Field("crepe-{model}-{pattern}", description="registered name; {model}, {method}, {pattern}")
    alias: str = Field("candidate", description="registry alias set on the new version")

    @field_validator("out_dir")
    @classmethod
    def _out_dir(cls, value: str) -> str:
        if not value.strip():
            raise Problem("release.out_dir is empty; give a folder such as data/release")
        return value

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return _template("release.model_name", value, ("model", "method", "pattern"))

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise Problem(f"release.alias = {value!r} is not a registry alias; use letters, digits, '-' or '_' (not "
                          "'latest' and not v<number>), e.g. candidate or champion")
        return value


class PipelineConfig(Section):
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

    # -- rules between sections
    @model_validator(mode="after")
    def _pho_searches_crepe(self) -> PipelineConfig:
        if self.pho.enabled and self.prune.method != "crepe":
            raise Problem(f"PHO searches CRePE's coefficients but prune.method is {self.prune.method!r}; set "
                          "prune.method: crepe or pho.enabled: false", "pho.enabled", "prune.method")
        return self

    @model_validator(mode="after")
    def _stages_fit_the_pattern(self) -> PipelineConfig:
        """A registry entry's ``patterns`` ("nm", "unstructured") against ``prune.sparsity``; then the
        library validates the prune with that stage (:meth:`crepe.prune_config.PruneConfig.validate`)."""
        nm = self.sparsity_spec().pattern is not None
        for name in ("refine", "allocation"):
            stage = getattr(self, name)
            if stage.method == "none":
                continue
            patterns = stage.registry[stage.method].patterns
            if patterns == "unstructured" and nm:
                raise Problem(f"{name}.method {stage.method!r} sets per-layer sparsity ratios and cannot be combined "
                              f"with the N:M pattern {self.prune.sparsity}; use {name}.method: none or an "
                              "unstructured prune.sparsity such as 0.5", f"{name}.method", "prune.sparsity")
            if patterns == "nm" and not nm:
                raise Problem(f"{name}.method {stage.method!r} works on N:M patterns only, but prune.sparsity is the "
                              f"unstructured {self.prune.sparsity}; use an N:M pattern such as 2:4",
                              f"{name}.method", "prune.sparsity")
            try:
                self._prune_config({}, **{name: True})
            except CrepeError as exc:
                raise Problem(f"{name}.method: {exc}", f"{name}.method", "prune.sparsity", "prune.method") from None
        return self

    @model_validator(mode="after")
    def _update_fits_the_method(self) -> PipelineConfig:
        """An update with the whole prune (method and refinement): SparseGPT reconstructs its weights itself
        unless DSnoT chose its mask (:meth:`crepe.prune_config.PruneConfig.validate`)."""
        if self.prune.update != "none":
            try:
                self._prune_config({}, refine=True)
            except CrepeError as exc:
                raise Problem(f"prune.update: {exc}", "prune.update", "prune.method", "refine.method") from None
        return self

    @model_validator(mode="after")
    def _registry_needs_tracking(self) -> PipelineConfig:
        if self.release.register_model and not self.tracking.enabled:
            raise Problem("release.register_model needs MLflow but tracking.enabled is false; set "
                          "release.register_model: false or tracking.enabled: true",
                          "release.register_model", "tracking.enabled")
        return self

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
        raw, set_by = with_overrides(data, overrides)
        locate = Locator(origin, dict(marks or {}), set_by)
        locate.check_keys(raw)
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise translate(exc, locate, cls) from None
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
                allowed = [k for k in fields if isinstance(getattr(node, k), BaseModel)]
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
        out = io.StringIO()
        dumper = YAML(typ="safe", pure=True)
        dumper.default_flow_style, dumper.width = None, 100
        dumper.representer.sort_base_mapping_type_on_output = False  # sections in schema order
        dumper.dump(self.to_dict(), out)
        return header + "\n" + out.getvalue()

    def write_resolved(self, path: str | Path) -> Path:
        """Write :meth:`dump_yaml` atomically to ``path``."""
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

    def sparsity_spec(self) -> SparsitySpec:
        """The :class:`crepe.types.SparsitySpec` of ``prune.sparsity``."""
        return parse_sparsity(self.prune.sparsity)

    def prune_config(self, params: Mapping[str, Any] | None = None) -> PruneConfig:
        """The validated :class:`crepe.prune_config.PruneConfig` of ``prune``, ``refine`` and ``allocation``
        (``params``: e.g. the PHO winner laid over ``prune.params``)."""
        return self._prune_config(params, refine=True, allocation=True)

    def _prune_config(self, params: Mapping[str, Any] | None, refine: bool = False,
                      allocation: bool = False) -> PruneConfig:
        p, r, a = self.prune, self.refine, self.allocation
        use_refine, use_allocation = refine and r.method != "none", allocation and a.method != "none"
        return build_config(
            p.method, p.sparsity, {**p.params, **dict(params or {})}, p.group, p.rule,
            refine=r.method if use_refine else None, refine_params=dict(r.params) if use_refine else None,
            allocation=a.method if use_allocation else None,
            allocation_params=dict(a.params) if use_allocation else None,
            targets=p.targets, ignore=p.ignore, prune_router=p.prune_router,
            moe_min_tokens=p.moe_min_tokens, moe_fallback=p.moe_fallback,
            update=p.update, update_params=dict(p.update_params) if p.update != "none" else None,
        )

    def budget(self, max_windows: Any = "eval") -> Budget:
        """The :class:`crepe.budget.Budget` of calibration and the final evaluation (``eval.ppl``);
        ``max_windows`` other than ``"eval"`` replaces ``eval.ppl.max_windows`` (see :meth:`pho_budget`)."""
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

    def pho_budget(self) -> Budget:
        """The Budget of PHO's stage 2: ``pho.verify_max_windows`` windows of ``eval.ppl.seqlen`` tokens
        (on ``pho.verify_split``, which the caller passes to the evaluation)."""
        return self.budget(max_windows=self.pho.verify_max_windows)

    def search_space(self) -> SearchSpace:
        """The :class:`crepe.search.SearchSpace` of ``pho.bounds`` (K fixed at prune.params.kernel_size)."""
        b = self.pho.bounds
        kernel = self.prune.params.get("kernel_size", 9)
        return SearchSpace(b.alpha, b.beta, b.log10_gamma, kernel, KERNEL_CHOICES if self.pho.search_kernel else None)

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


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read, validate and resolve ``path`` (None: the built-in defaults) with ``-S`` ``overrides``.

    Raises :class:`ConfigError` (one line, ``file:line:col: ...``) for a missing or malformed file,
    unknown keys, wrong types and impossible combinations.
    """
    if path is None:
        return PipelineConfig.from_mapping({}, overrides, origin="<defaults>", root=Path.cwd())
    data, marks = read_params(path)
    return PipelineConfig.from_mapping(data, overrides, origin=str(path), marks=marks, root=project_root_of(path))


__all__ = [
    "DEFAULT_PARAMS",
    "SECTIONS",
    "ConfigError",
    "PipelineConfig",
    "apply_overrides",
    "load_config",
    "model_slug",
    "parse_override",
    "parse_yaml",
    "pattern_slug",
    "project_root_of",
]
