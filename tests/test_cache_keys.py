"""The pipeline's cache keys as a whole: every setting, changed alone, misses exactly the tasks it affects.

The settings are read from the config schema (every leaf field of every section of
:class:`tasks.config.PipelineConfig`, walked recursively), and each must be classified in :data:`DEPENDS`:
the tasks whose *result* it changes directly. A new field that nobody classified fails
:func:`test_every_setting_is_classified`, so it cannot be forgotten in a key.

:func:`pipeline_keys` runs the flow's wiring (:func:`flows.pipeline.run_pipeline`) at the level of the
keys: it calls every task's real ``cache_key_fn`` with the real config, feeding each task the outputs of
the tasks before it, where a task whose key changed returns a different output (its content is derived
from its key) and one whose key did not returns the cached output; resolve-inputs (never cached: it is
the content identity) is simulated by :func:`resolve_inputs` from the settings that choose the model
and the data. The expected misses of a change are its direct tasks plus everything downstream of them
(:data:`CONSUMERS`), and ``release``/``track``, which record the whole configuration. Runs in about a
second: nothing is loaded or computed.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

import tasks.pipeline as T
from tasks.config import PipelineConfig, load_config

# --- what each setting changes --------------------------------------------------------------------------

PHO = ("pho-screen",)
PRUNE_MODEL = ("pho-screen", "verify-candidate", "final-prune")
# setting -> tasks whose result it changes directly ("model", "calib-data", "eval-data[verify]",
# "eval-data[ppl]": the content identities resolve-inputs computes). A dotted prefix ending in ".*" covers
# every field of that (sub-)section, present and future. release and track depend on every setting.
DEPENDS: dict[str, tuple[str, ...]] = {
    "model.spec": ("model",),
    "model.dtype": (*PRUNE_MODEL, "evaluate"),
    "model.device": (*PRUNE_MODEL, "evaluate"),  # the resolved kind (cpu/cuda): kernels round differently
    "model.blocks": PRUNE_MODEL,
    "model.max_memory": (),  # streamed or in memory, the results are bit-identical (tests/test_streaming.py)
    "data.data_dir": ("calib-data", "eval-data[verify]", "eval-data[ppl]"),
    "data.calib_source": ("calib-data", "calibration-windows"),
    "data.eval_source": ("eval-data[verify]", "eval-data[ppl]", "verify-candidate", "evaluate"),
    "calibration.batch_size": ("calibration-windows", *PRUNE_MODEL),  # chunked sums of the statistics
    "calibration.*": ("calibration-windows",),
    "prune.method": ("final-prune",),
    "prune.sparsity": PRUNE_MODEL,
    "prune.group": ("final-prune",),
    "prune.rule": PRUNE_MODEL,
    "prune.params": ("pho-screen", "final-prune"),
    "prune.targets": PRUNE_MODEL,  # PHO prunes the same weights as the final prune
    "prune.ignore": PRUNE_MODEL,
    "prune.prune_router": PRUNE_MODEL,
    "prune.moe_min_tokens": PRUNE_MODEL,
    "prune.moe_fallback": PRUNE_MODEL,
    "prune.update": PRUNE_MODEL,  # PHO verifies its candidates with the update the release uses
    "prune.update_params": PRUNE_MODEL,
    "pho.enabled": (),  # changes the graph itself: the search tasks run or not, final-prune's params
    "pho.sampler": PHO,
    "pho.n_trials": PHO,
    "pho.top_k": PHO,
    "pho.seed": PHO,
    "pho.target": PHO,
    "pho.target_block": PHO,
    "pho.bounds.*": PHO,
    "pho.search_kernel": PHO,
    "pho.verify_split": ("eval-data[verify]", "verify-candidate"),
    "pho.verify_max_windows": ("verify-candidate",),
    "refine.*": ("final-prune", "refine"),
    "allocation.*": ("final-prune",),
    "eval.ppl.split": ("eval-data[ppl]", "evaluate"),
    "eval.ppl.seqlen": ("verify-candidate", "evaluate"),
    "eval.ppl.max_windows": ("evaluate",),
    "eval.ppl.batch_size": ("verify-candidate", "evaluate"),
    "eval.zero_shot.*": ("evaluate",),  # with tasks; without, see test_zero_shot_settings_without_tasks
    "tracking.*": (),
    "runner.*": (),
    "release.*": (),
}
ALWAYS = ("release", "track")  # the release manifest holds the resolved config; track's run key is its hash
# producer -> the tasks that consume its output (the wiring of flows.pipeline.run_pipeline)
CONSUMERS: dict[str, tuple[str, ...]] = {
    "model": ("calibration-windows", "pho-screen", "verify-candidate", "final-prune"),
    "calib-data": ("calibration-windows",),
    "eval-data[verify]": ("verify-candidate",),
    "eval-data[ppl]": ("evaluate",),
    "calibration-windows": ("pho-screen", "verify-candidate", "final-prune"),
    "pho-screen": ("verify-candidate", "search-summary"),
    "verify-candidate": ("search-summary",),
    "search-summary": ("final-prune", "release"),
    "final-prune": ("refine",),
    "refine": ("evaluate", "release"),
    "evaluate": ("release", "track"),
    "release": ("track",),
}
# Settings the generic rule (bool: flipped, int: +1, Literal: another choice) cannot vary: the override
# that changes them, and the context (applied to both sides) in which the change is valid and matters.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model.spec": ("model.spec=/models/other", ()),
    "model.device": ("model.device=cuda", ()),  # auto is cpu here: only another device kind is a change
    "model.blocks": ("model.blocks=model.layers", ()),
    "model.max_memory": ("model.max_memory=3GB", ()),
    "data.data_dir": ("data.data_dir=/data/other", ()),
    "prune.method": ("prune.method=ria", ("pho.enabled=false", "prune.params={}")),
    "prune.sparsity": ("prune.sparsity=4:8", ()),
    "prune.group": ("prune.group=row", ("prune.sparsity=0.5",)),
    "prune.rule": ("prune.rule=threshold", ("prune.sparsity=0.5",)),
    "prune.params": ("prune.params.a=0.25", ()),
    "prune.targets": ("prune.targets=mlp", ()),
    "prune.ignore": ("prune.ignore=mlp", ()),
    "prune.update": ("prune.update=obs", ()),
    "prune.update_params": ("prune.update_params.guard=false", ("prune.update=obs",)),
    "pho.sampler": ("pho.sampler=tpe", ()),
    "pho.target": ("pho.target=self_attn.k_proj", ()),
    "pho.bounds.alpha": ("pho.bounds.alpha=[0.0, 1.5]", ()),
    "pho.bounds.beta": ("pho.bounds.beta=[0.0, 1.5]", ()),
    "pho.bounds.log10_gamma": ("pho.bounds.log10_gamma=[-4.0, 0.0]", ()),
    "pho.verify_max_windows": ("pho.verify_max_windows=null", ()),
    "refine.method": ("refine.method=cp", ()),
    "refine.params": ("refine.params.max_cycle_time=7", ("refine.method=dsnot",)),
    "allocation.method": ("allocation.method=owl", ("prune.sparsity=0.5",)),
    "allocation.params": ("allocation.params.lam=0.07", ("prune.sparsity=0.5", "allocation.method=owl")),
    "eval.ppl.max_windows": ("eval.ppl.max_windows=null", ()),
    "eval.zero_shot.tasks": ("eval.zero_shot.tasks=[boolq]", ()),
    "eval.zero_shot.limit": ("eval.zero_shot.limit=10", ("eval.zero_shot.tasks=[boolq]",)),
    "eval.zero_shot.batch_size": ("eval.zero_shot.batch_size=2", ("eval.zero_shot.tasks=[boolq]",)),
    "eval.zero_shot.num_fewshot": ("eval.zero_shot.num_fewshot=1", ("eval.zero_shot.tasks=[boolq]",)),
    "tracking.enabled": ("tracking.enabled=false", ("release.register_model=false",)),
    "tracking.uri": ("tracking.uri=sqlite:///other.db", ()),
    "tracking.experiment": ("tracking.experiment=other-{model}", ()),
    "runner.dask_address": ("runner.dask_address=tcp://127.0.0.1:8786", ("runner.backend=dask",)),
    "release.out_dir": ("release.out_dir=data/other", ()),
    "release.model_name": ("release.model_name=other-{model}", ()),
    "release.alias": ("release.alias=staging", ()),
}
BASE = ("model.spec=/models/base",)


def leaves(node: BaseModel, prefix: str = "") -> Iterator[str]:
    """Dotted names of every leaf setting of ``node``, from the schema (sub-sections are walked)."""
    for name in type(node).model_fields:
        value = getattr(node, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from leaves(value, path + ".")
        else:
            yield path


def classified(field: str) -> tuple[str, ...] | None:
    """The direct tasks of ``field`` in :data:`DEPENDS` (exact entry, else the nearest ``section.*``)."""
    if field in DEPENDS:
        return DEPENDS[field]
    parts = field.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) + ".*" in DEPENDS:
            return DEPENDS[".".join(parts[:i]) + ".*"]
    return None


def variant(cfg: PipelineConfig, field: str) -> tuple[str, tuple[str, ...]]:
    """(override changing ``field``, context overrides) from :data:`VARIANTS` or the generic rule."""
    if field in VARIANTS:
        return VARIANTS[field]
    section, _, name = field.rpartition(".")
    node = cfg.section(section)
    value = getattr(node, name)
    if isinstance(value, bool):
        return f"{field}={str(not value).lower()}", ()
    if isinstance(value, int):
        return f"{field}={value + 1}", ()
    annotation = type(node).model_fields[name].annotation
    choices = [c for c in typing.get_args(annotation) if c != value] if typing.get_origin(annotation) is \
        typing.Literal else []
    if choices:
        return f"{field}={choices[0]}", ()
    raise AssertionError(f"no way to vary {field} = {value!r}: add it to VARIANTS")


# --- the flow's wiring, at the level of keys -----------------------------------------------------------------


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def resolve_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """What resolve-inputs returns, with content identities derived from the settings choosing them."""
    splits = sorted({cfg.eval.ppl.split, cfg.pho.verify_split} if cfg.pho.enabled else {cfg.eval.ppl.split})
    return {"model": {"spec": cfg.model.spec, "kind": "local", "path": "/m", "content_hash": _h(cfg.model.spec)},
            "calibration": {"source": cfg.data.calib_source,
                            "sha256": _h(cfg.data.data_dir, cfg.data.calib_source)},
            "evaluation": {s: {"sha256": _h(cfg.data.data_dir, cfg.data.eval_source, s)} for s in splits}}


def pipeline_keys(cfg: PipelineConfig) -> dict[str, str]:
    """task name -> cache key of every cached task the pipeline runs on ``cfg`` (the real key functions)."""
    keys: dict[str, str] = {}

    def key(task: Any, **parameters: Any) -> str:
        context = SimpleNamespace(task=SimpleNamespace(name=task.name))
        value = task.cache_key_fn(context, {"cfg": cfg, **parameters})
        keys[task.name] = keys.get(task.name, "") + value  # a mapped task: all its keys
        return _h(value)  # what the task returns is a function of its key (cached or recomputed)

    inputs = resolve_inputs(cfg)
    model, mh = inputs["model"], inputs["model"]["content_hash"]
    k = key(T.calibration_windows, model_path="/m", model_hash=mh, data_sha256=inputs["calibration"]["sha256"])
    calib = {"path": f"/c/{k}", "sha256": k, "info": {"sha256": inputs["calibration"]["sha256"]}}
    search, params = None, {}
    if cfg.pho.enabled:
        k = key(T.pho_screen, model=model, model_hash=mh, calib=calib)
        screened = {"path": f"/s/{k}", "sha256": k, "candidates": [{"alpha": k[:8]}, {"alpha": k[8:16]}]}
        verified = []
        for i, candidate in enumerate(screened["candidates"]):
            k = key(T.verify_candidate, model=model, model_hash=mh, calib=calib,
                    eval_sha256=inputs["evaluation"][cfg.pho.verify_split]["sha256"], index=i, params=candidate)
            verified.append({"index": i, "params": candidate, "ppl": int(k[:6], 16), "seconds": 1.0})
        k = key(T.search_summary, screened=screened, verified=verified)
        search = {"path": str(T.work_dir(cfg) / "search" / k / T.SEARCH_FILE), "sha256": k, "pho_json": "/p",
                  "winner": {"index": 0, "params": {"alpha": k[:8]}, "ppl": 1.0}, "n_trials": 2, "n_verified": 2}
        params = search["winner"]["params"]
    k = key(T.final_prune, model=model, model_hash=mh, calib=calib, params=params)
    pruned = {"path": f"/p/{k}", "sha256": k, "prune": {"method": cfg.prune.method}, "report": {"overall_sparsity": 0.5}}
    key(T.refine, pruned=pruned)
    refined = T.refine.fn(cfg, pruned)  # the real refine step (no I/O)
    k = key(T.evaluate, model=refined, eval_sha256=inputs["evaluation"][cfg.eval.ppl.split]["sha256"])
    evaluation = {"ppl": {"ppl": int(k[:6], 16), "split": cfg.eval.ppl.split, "seqlen": 1, "n_windows": 1}}
    k = key(T.release, model=refined, lineage=T.lineage(cfg, inputs, calib, refined, search, evaluation))
    released = {"path": "/r", "manifest_sha256": k, "files": {"f": k}, "metrics": {"smoke_ppl": None, "sparsity": 0.5}}
    key(T.track, run_key=cfg.config_hash(), inputs=inputs, search=search, metrics=T.run_metrics(evaluation, released),
        released=released)
    return keys


def expected_misses(direct: tuple[str, ...], base: dict[str, str], changed: dict[str, str]) -> set[str]:
    """``direct`` tasks, tasks run on one side only, and everything downstream of them (:data:`CONSUMERS`)."""
    todo = [*direct, *ALWAYS, *(set(base) ^ set(changed))]
    out: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(CONSUMERS.get(name, ()))
    return out & (set(base) & set(changed))


def misses(base: dict[str, str], changed: dict[str, str]) -> set[str]:
    return {name for name in set(base) & set(changed) if base[name] != changed[name]}


@pytest.fixture(scope="module")
def defaults() -> PipelineConfig:
    return load_config(None, list(BASE))


SETTINGS = list(leaves(load_config(None)))


def test_every_setting_is_classified() -> None:
    unknown = [f for f in SETTINGS if classified(f) is None]
    assert not unknown, f"classify these settings in DEPENDS (the tasks whose result they change): {unknown}"
    stale = [k for k in DEPENDS if not any(f == k or f.startswith(k.removesuffix("*")) for f in SETTINGS)]
    assert not stale, f"DEPENDS names settings the schema no longer has: {stale}"
    assert set(CONSUMERS) | {t for ts in CONSUMERS.values() for t in ts} >= set(pipeline_keys(load_config(None)))


@pytest.mark.parametrize("field", SETTINGS)
def test_each_setting_misses_exactly_its_tasks(field: str, defaults: PipelineConfig) -> None:
    change, context = variant(defaults, field)
    before = load_config(None, [*BASE, *context])
    after = load_config(None, [*BASE, *context, change])
    assert after.to_dict() != before.to_dict(), f"{change} does not change the configuration"
    base, changed = pipeline_keys(before), pipeline_keys(after)
    direct = classified(field)
    assert direct is not None
    assert misses(base, changed) == expected_misses(direct, base, changed), f"after {change}"


def test_zero_shot_settings_without_tasks_change_no_result(defaults: PipelineConfig) -> None:
    base = pipeline_keys(defaults)
    for change in ("eval.zero_shot.limit=10", "eval.zero_shot.batch_size=2", "eval.zero_shot.num_fewshot=1"):
        assert misses(base, pipeline_keys(load_config(None, [*BASE, change]))) == set(ALWAYS), change


def test_same_settings_same_keys_in_another_project(defaults: PipelineConfig, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(T.WORK_ENV, raising=False)
    elsewhere = PipelineConfig.from_mapping(defaults.to_dict(), root=tmp_path)
    assert pipeline_keys(elsewhere) == pipeline_keys(defaults)
