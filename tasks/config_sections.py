"""The sections of ``params.yaml`` that choose what is computed (``model``, ``data``, ``calibration``, ``prune``,
``pho``, ``refine``, ``allocation``, ``eval``, ``runner``) as frozen, strict pydantic models, each validating
its own keys; plus the slugs derived from their values (:func:`model_slug`, :func:`pattern_slug`).

Types and ranges come from the annotations (strict: no silent ``"16" -> 16`` or ``true -> 1``). Names come
from the library's single registries (methods, refinements, allocations, samplers, zero-shot tasks).
A field validator normalises a value (method parameters resolved against the method's defaults, the
comparison group filled in); a ``model_validator(mode="after")`` checks the rules between the fields the
model holds. Prune-level meaning is the library's: :class:`crepe.prune_config.PruneConfig` is built and validated
(:func:`crepe.prune_config.build_config`), and its :class:`~crepe.errors.CrepeError` becomes a located
:class:`~tasks.config_errors.Problem`. ``tracking`` and ``release``, and the rules between sections, live on
:class:`tasks.config.PipelineConfig`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crepe.allocation import ALLOCATORS, resolve_allocator_params
from crepe.data import CALIB_SOURCES, EVAL_SOURCES, SPLITS
from crepe.errors import CrepeError
from crepe.methods import all_methods, get_method, is_updater, resolve_method_params
from crepe.models import DEFAULT_MODEL, EMBEDDED
from crepe.prune_config import PruneConfig, build_config
from crepe.refine import REFINES, resolve_refine_params
from crepe.registry import Registry
from crepe.search import SAMPLERS, SearchSpace, cma_population_size
from crepe.shards import parse_size
from crepe.types import parse_sparsity
from crepe.updates import UPDATES
from crepe.zeroshot import TASKS
from tasks.config_errors import Problem, as_problem, blame, check_names, suggest

DASK_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


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


_adapter = lru_cache(maxsize=None)(TypeAdapter)  # a method parameter's type, checked like a schema field
Sparsity = Annotated[str, BeforeValidator(_canonical_sparsity)]
Bounds = Annotated[tuple[float, float], BeforeValidator(_pair)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


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


class Section(BaseModel):
    """A section: unknown keys are errors, values are never coerced, and an empty section means defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data  # `prune:` with every key commented out reads as null


class ModelSection(Section):
    """The base model (issue 4 §2 "resolve/download model")."""

    spec: str = Field(DEFAULT_MODEL, description="embedded:NAME, a hub id (org/name[@rev]) or a local folder")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype while pruning")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    blocks: str | None = Field(None, description="dotted path of the decoder block list (null: auto-detect)")
    max_memory: str | None = Field(
        None, description="host-memory cap such as 3GB: a model over it is streamed block by block (null: what is free)")

    @field_validator("spec")
    @classmethod
    def _spec(cls, value: str) -> str:
        if not value.strip():
            raise Problem("model.spec is empty; use embedded:smollm2-135m, a hub id or a folder")
        name = value.strip().removeprefix("embedded:")
        if value.strip().startswith("embedded:") and name not in EMBEDDED:
            raise Problem(f"unknown embedded model {name!r}; available: "
                          f"{', '.join('embedded:' + k for k in EMBEDDED)}{suggest(name, EMBEDDED)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise Problem(f"model.device = {value!r} is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)  # a CrepeError is a ValueError: reported with the key and value
        return value


class DataSection(Section):
    data_dir: str | None = Field(None, description="local data folder (null: $CREPE_DATA_DIR, else ../shared/data)")
    calib_source: Literal[CALIB_SOURCES] = Field("auto", description="calibration corpus")  # type: ignore[valid-type]
    eval_source: Literal[EVAL_SOURCES] = Field("auto", description="perplexity corpus")  # type: ignore[valid-type]


class CalibrationSection(Section):
    """Spec §1.2: seeded windows of ``seqlen`` tokens from documents longer than ``seqlen``."""

    samples: PosInt = Field(16, description="calibration windows")
    seqlen: Annotated[int, Field(ge=2)] = Field(256, description="tokens per window")
    batch_size: PosInt = Field(8, description="windows per forward pass")
    seed: NonNegInt = Field(0, description="sampling seed")


class PruneSection(Section):
    """The final prune. ``params`` are resolved against the method's defaults, and ``group`` (unstructured)
    against the method's default group, so equal prunes have equal hashes however they are spelled."""

    method: str = Field("crepe", description="a pruning method of crepe.methods.all_methods()")
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
    update: str = Field("none", description="weight update after the mask: none | obs (registry crepe.updates.UPDATES)")
    update_params: dict[str, Any] = Field(default_factory=dict,
                                          description="update parameters (obs: blocksize, percdamp, max_damp_retries, guard)")

    @field_validator("update")
    @classmethod
    def _update(cls, value: str) -> str:
        if value not in UPDATES:
            raise Problem(f"unknown prune.update {value!r}; allowed: {', '.join(UPDATES)}{suggest(value, UPDATES)}")
        return value

    @field_validator("update_params")
    @classmethod
    def _update_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if (update := info.data.get("update")) is None:
            return value
        check_names("prune.update_params", f"update {update!r}", value, UPDATES[update].defaults)
        try:
            return UPDATES[update].resolve(value, "update")
        except CrepeError as exc:
            raise Problem(f"prune.update_params: {exc}", blame(str(exc), list(value), "")) from None

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        known = all_methods()
        if value not in known:
            raise Problem(f"unknown prune.method {value!r}; known methods: {', '.join(known)}{suggest(value, known)}")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None, info: ValidationInfo) -> str | None:
        method, sparsity = info.data.get("method"), info.data.get("sparsity")
        if value is not None or method is None or sparsity is None or is_updater(method):
            return value  # an updater selects its own mask (PruneConfig.validate rejects a group for it)
        spec = parse_sparsity(sparsity)
        return None if spec.pattern is not None else PruneConfig(method, spec).resolved_group()

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:
            return value
        defaults = get_method(method).defaults
        check_names("prune.params", f"method {method!r}", value, defaults)
        typed = {}
        for key, item in value.items():
            if defaults[key] is None:  # an optional parameter: the method's own validation decides
                typed[key] = item
                continue
            try:
                typed[key] = _adapter(type(defaults[key])).validate_python(item, strict=True)
            except ValidationError as exc:
                raise as_problem(exc, f"prune.params.{key}", key) from None
        return resolve_method_params(method, typed)

    @model_validator(mode="after")
    def _prune_level(self) -> PruneSection:
        """N:M takes no group and no threshold rule; the rest is the library's:
        :meth:`crepe.prune_config.PruneConfig.validate`."""
        if parse_sparsity(self.sparsity).pattern is not None:
            if self.group is not None:
                raise Problem(f"prune.group = {self.group!r} cannot be combined with the N:M pattern {self.sparsity} "
                              "(N:M selects within groups of M inputs); set prune.group: null", "group", "sparsity")
            if self.rule != "exact":
                raise Problem(f"prune.rule = {self.rule!r} applies to unstructured sparsity only, not to the N:M "
                              f"pattern {self.sparsity}; set prune.rule: exact", "rule", "sparsity")
        try:
            # an updater with an update is checked with its refinement (PipelineConfig): DSnoT allows it
            update = "none" if is_updater(self.method) else self.update
            build_config(self.method, self.sparsity, self.params, self.group, self.rule, targets=self.targets,
                         ignore=self.ignore, prune_router=self.prune_router, moe_min_tokens=self.moe_min_tokens,
                         moe_fallback=self.moe_fallback, update=update,
                         update_params=self.update_params if update != "none" else None)
        except CrepeError as exc:
            # name the key the library's message is about, so the error points at its line
            keys = ["group", "targets", "ignore", "moe_fallback", "update", *(f"params.{k}" for k in self.params)]
            path = blame(str(exc), keys, "params")
            raise Problem(f"prune.{path.partition('.')[0]}: {exc}", path, "method", "sparsity") from None
        return self


class BoundsSection(Section):
    """PHO's box (spec §8.4); gamma is searched on a log10 scale."""

    alpha: Bounds = (0.0, 2.0)
    beta: Bounds = (0.0, 2.0)
    log10_gamma: Bounds = (-5.0, 0.0)

    @model_validator(mode="after")
    def _box(self) -> BoundsSection:
        for name in ("alpha", "beta", "log10_gamma"):
            try:
                SearchSpace(**{name: getattr(self, name)})
            except CrepeError as exc:
                raise Problem(f"pho.bounds.{name}: {exc}", name) from None
        return self


class PhoSection(Section):
    """Proxy-based hyperparameter optimisation (spec §8.3): screening then verification of the top_k."""

    enabled: bool = Field(True, description="search CRePE's coefficients before the final prune")
    sampler: str = Field("cmaes", description="a sampler of crepe.search.SAMPLERS")
    n_trials: Annotated[int, Field(ge=2)] = Field(20, description="stage-1 proxy evaluations")
    top_k: PosInt = Field(3, description="candidates verified by perplexity (plus the RIA point)")
    seed: NonNegInt = Field(0, description="sampler seed")
    target: str = Field("self_attn.q_proj", description="the proxy's linear inside the target block")
    target_block: NonNegInt = Field(0, description="the proxy's block index")
    bounds: BoundsSection = Field(default_factory=BoundsSection)
    search_kernel: bool = Field(False, description="also search K in {3,5,7,9,11} (default: fixed K)")
    verify_split: Literal[SPLITS] = Field("validation", description="stage-2 perplexity split")  # type: ignore[valid-type]
    verify_max_windows: PosInt | None = Field(16, description="stage-2 windows per candidate (null: all)")

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise Problem(f"unknown pho.sampler {value!r}; allowed: {', '.join(SAMPLERS)}{suggest(value, SAMPLERS)}")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*", value):
            raise Problem(f"pho.target = {value!r} is not a dotted module name such as self_attn.q_proj")
        return value

    @model_validator(mode="after")
    def _trials(self) -> PhoSection:
        if self.top_k > self.n_trials:
            raise Problem(f"pho.top_k = {self.top_k} is larger than pho.n_trials = {self.n_trials}; verify at most as "
                          "many candidates as were screened", "top_k", "n_trials")
        if self.sampler == "cmaes":
            try:
                cma_population_size(self.n_trials, 4 if self.search_kernel else 3)
            except CrepeError as exc:
                raise Problem(f"pho.n_trials: {exc}", "n_trials", "sampler", "search_kernel") from None
        return self


class StageSection(Section):
    """A stage chosen by name from a library registry (``none``: skipped), with that entry's parameters."""

    axis: ClassVar[str]
    registry: ClassVar[Registry]
    method: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)

    @staticmethod
    def check(method: str, params: dict[str, Any]) -> None:
        """The library's own validation of resolved parameters (raises CrepeError)."""

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value != "none" and value not in cls.registry:
            raise Problem(f"unknown {cls.axis}.method {value!r}; allowed: none, {', '.join(cls.registry)}"
                          f"{suggest(value, cls.registry)}")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:
            return value
        defaults = cls.registry[method].defaults if method != "none" else {}
        check_names(f"{cls.axis}.params", f"{cls.axis} method {method!r}", value, defaults)
        if method == "none":
            return {}
        try:
            full = cls.registry.get(method).resolve(value, cls.registry.axis)
            cls.check(method, full)
        except CrepeError as exc:
            key = blame(str(exc), list(value), "")
            raise Problem(f"{cls.axis}.params: {exc}", key) from None
        return full


class RefineSection(StageSection):
    axis = "refine"
    registry = REFINES
    method: str = Field("none", description="refinement after the prune (registry: crepe.refine.REFINES)")

    @staticmethod
    def check(method: str, params: dict[str, Any]) -> None:
        resolve_refine_params(method, params)


class AllocationSection(StageSection):
    axis = "allocation"
    registry = ALLOCATORS
    method: str = Field("none", description="layer-wise sparsity allocation (registry: crepe.allocation.ALLOCATORS)")

    @staticmethod
    def check(method: str, params: dict[str, Any]) -> None:
        resolve_allocator_params(method, params)


class PplSection(Section):
    """Spec §14.1: non-overlapping windows of ``seqlen`` tokens; the remainder is dropped."""

    split: Literal[SPLITS] = "test"  # type: ignore[valid-type]
    seqlen: Annotated[int, Field(ge=2)] = 256
    max_windows: PosInt | None = Field(16, description="first N windows (null: the whole split)")
    batch_size: PosInt = 4


class ZeroShotSection(Section):
    """Spec §14.2 (lm-eval, 0-shot, ``acc``); an empty task list turns zero-shot evaluation off."""

    tasks: list[str] = Field(default_factory=list)
    limit: PosInt | None = Field(None, description="examples per task (null: all)")
    batch_size: PosInt = 8
    num_fewshot: NonNegInt = 0

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        known = list(TASKS)
        for i, task in enumerate(value):
            if task not in known:
                raise Problem(f"unknown zero-shot task {task!r}; allowed: {', '.join(known)}{suggest(task, known)}",
                              f"[{i}]")
            if task in value[:i]:
                raise Problem(f"zero-shot task {task!r} is listed twice", f"[{i}]")
        return value


class EvalSection(Section):
    ppl: PplSection = Field(default_factory=PplSection)
    zero_shot: ZeroShotSection = Field(default_factory=ZeroShotSection)


class RunnerSection(Section):
    backend: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(None, description="scheduler address (null: a local cluster)")
    max_workers: PosInt = 2

    @model_validator(mode="after")
    def _dask(self) -> RunnerSection:
        if self.dask_address is None:
            return self
        if self.backend != "dask":
            raise Problem("runner.dask_address is set but runner.backend is 'thread'; set runner.backend: dask or "
                          "runner.dask_address: null", "dask_address", "backend")
        if not re.fullmatch(rf"(?:{'|'.join(DASK_SCHEMES)})://[^\s/:]+(?::\d{{1,5}})?/?", self.dask_address):
            raise Problem(f"runner.dask_address = {self.dask_address!r} is not a scheduler address like "
                          "tcp://127.0.0.1:8786", "dask_address")
        return self
