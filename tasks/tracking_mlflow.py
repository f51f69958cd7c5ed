"""The MLflow tracker: parent runs, params, metrics, tags and artifacts through ``MlflowClient``.

MLflow does the work: ``log_batch`` (which splits params, tags and metrics into batches of MLflow's
limits itself), ``log_dict``, ``log_table``, ``log_artifact(s)``; :mod:`tasks.tracking_values` only
makes keys and values acceptable to it. Nested PHO runs and the best-config lookup come from
:class:`~tasks.tracking_search.SearchRuns`, the model registry from
:class:`~tasks.registry_release.ReleaseRegistry`.

Built by :func:`tasks.tracking.open_tracker` when tracking is enabled; importing this module imports
MLflow (about 1.4 s on top of Prefect and torch), which is why nothing imports it when tracking is off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from crepe.provenance import code_version
from tasks.reports import columns, write_table
from tasks.tracking import RunLike, RunRef, run_id_of
from tasks.tracking_search import SearchRuns
from tasks.tracking_store import DEFAULT_EXPERIMENT, TrackingLocation, set_env_defaults
from tasks.tracking_values import (
    TAG_PREFIX,
    metric_items,
    model_slug,
    one_line,
    param_items,
    pattern_label,
    render,
    safe_key,
    tag_items,
)

set_env_defaults()  # MLflow reads MLFLOW_DISABLE_TELEMETRY when it is imported: set before the import

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from tasks.registry_release import ReleaseRegistry  # noqa: E402  (imports MLflow too)

__all__ = ["MlflowTracker", "lineage_tags"]

_UNFINISHED = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")
_QUIET = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration", "mlflow.tracking._tracking_service",
          "mlflow.store.model_registry.abstract_store")
for _name in _QUIET:
    logging.getLogger(_name).setLevel(logging.WARNING)


def lineage_tags(model_spec: str | None = None, model_hash: str | None = None,
                 data_hashes: Mapping[str, str | None] | None = None, pattern: str | float | None = None,
                 method: str | None = None, code: bool = True) -> dict[str, str]:
    """The ``crepe.*`` tags of a run: the code version (``crepe.version``, ``crepe.source_sha256``,
    ``crepe.git_sha`` / ``crepe.git_dirty`` and MLflow's own ``mlflow.source.git.commit``) when ``code``,
    and ``crepe.model``, ``crepe.model_hash``, ``crepe.data.<name>``, ``crepe.pattern`` (canonical label),
    ``crepe.method`` when given."""
    tags: dict[str, str] = {}
    if code:
        version = code_version()
        tags[f"{TAG_PREFIX}version"] = str(version["crepe_version"])
        tags[f"{TAG_PREFIX}source_sha256"] = str(version["source_sha256"])
        if version.get("git_sha"):
            tags[f"{TAG_PREFIX}git_sha"] = tags["mlflow.source.git.commit"] = version["git_sha"]
            tags[f"{TAG_PREFIX}git_dirty"] = render(bool(version.get("git_dirty")))
    if model_spec is not None:
        tags[f"{TAG_PREFIX}model"] = model_spec
    if model_hash:
        tags[f"{TAG_PREFIX}model_hash"] = model_hash
    tags.update({safe_key(f"{TAG_PREFIX}data.{n}"): d for n, d in (data_hashes or {}).items() if d})
    if pattern is not None:
        tags[f"{TAG_PREFIX}pattern"] = pattern_label(pattern)
    if method:
        tags[f"{TAG_PREFIX}method"] = method
    return tags


class MlflowTracker(TrackingLocation, SearchRuns, ReleaseRegistry):
    """MLflow logging for one project (the store's options: :class:`~tasks.tracking_store.TrackingLocation`)."""

    def __init__(self, uri: str | None = None, project_root: str | Path = ".", experiment: str = DEFAULT_EXPERIMENT,
                 artifact_root: str | Path | None = None, sqlite_wal: bool = True) -> None:
        super().__init__(uri, project_root, experiment, artifact_root, sqlite_wal)
        set_env_defaults()  # again: a test or a caller may have changed the environment since the import
        self._experiments: dict[str, str] = {}

    @cached_property
    def client(self) -> mlflow.MlflowClient:
        """The ``MlflowClient`` of the store (a new sqlite file is first checked and switched to WAL)."""
        if self.sqlite_path is not None and self.sqlite_wal and not self.sqlite_path.exists():
            self.check_sqlite()
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def check(self) -> None:
        """Fail fast in one sentence naming the URI: the location checks, then one cheap API call (for a
        new sqlite file MLflow creates its tables, a few seconds once)."""
        self.check_location()
        try:
            self.client.search_experiments(max_results=1)
        except CrepeError:
            raise
        except Exception as exc:  # MlflowException, SQLAlchemy, requests: all mean "unusable store"
            raise CrepeError(f"the MLflow tracking URI {self.uri} is not usable ({one_line(exc)}); fix tracking.uri "
                             "or set tracking.enabled: false") from None

    def experiment_id(self, model_spec: str, create: bool = True) -> str | None:
        """The id of ``model_spec``'s experiment, created (with the project's artifact location) if
        ``create``; None if it does not exist and ``create`` is False. A deleted experiment of that name
        is an error (MLflow keeps the name reserved)."""
        name = self.experiment_name(model_spec)
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None and not create:
                return None
            if exp is not None and exp.lifecycle_stage == "deleted":
                raise CrepeError(
                    f"the MLflow experiment {name!r} was deleted; restore it (mlflow experiments restore "
                    f"--experiment-id {exp.experiment_id}), purge it (mlflow gc), or change tracking.experiment")
            self._experiments[name] = exp.experiment_id if exp is not None else self._create_experiment(name, model_spec)
        return self._experiments[name]

    def _create_experiment(self, name: str, model_spec: str) -> str:
        location = None
        if not self.remote or self.explicit_artifacts:
            location = (self.artifact_root / safe_key(name).replace("/", "_")).as_uri()
        tags = {f"{TAG_PREFIX}model": model_spec, f"{TAG_PREFIX}model_slug": model_slug(model_spec)}
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=tags)
        except mlflow.MlflowException:  # created meanwhile by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- parent runs -----------------------------------------------------------------------------------
    @contextmanager
    def pipeline_run(self, model_spec: str, run_name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None, *, kind: str = "pipeline", model_hash: str | None = None,
                     data_hashes: Mapping[str, str | None] | None = None, pattern: str | float | None = None,
                     method: str | None = None, run_key: str | None = None) -> Iterator[RunRef]:
        """A parent run in ``model_spec``'s experiment, finished when the block exits.

        ``params`` (nested, e.g. the resolved ``params.yaml``) are logged by :meth:`log_params`. Tags:
        :func:`lineage_tags`, ``crepe.kind`` and the caller's ``tags``. ``run_key`` (see
        :func:`~tasks.tracking_values.run_key`): an unfinished run with the same key in this experiment is
        reopened (``RunRef.resumed``) rather than a new one started; a FINISHED run is never reopened. The
        block's outcome sets the status: FINISHED, KILLED (KeyboardInterrupt) or FAILED (any other
        exception, whose first line goes to the ``crepe.error`` tag; the exception propagates).
        """
        exp_id = self.experiment_id(model_spec)
        all_tags = {**lineage_tags(model_spec, model_hash, data_hashes, pattern, method), f"{TAG_PREFIX}kind": kind,
                    **tag_items(tags or {})}
        if run_key:
            all_tags[f"{TAG_PREFIX}run_key"] = run_key
        previous = self._unfinished_run(exp_id, run_key) if run_key else None
        if previous is not None:
            rid = previous.info.run_id
            self.client.update_run(rid, status="RUNNING")
            self.set_tags(rid, {**all_tags, f"{TAG_PREFIX}resumed": "true"})
            ref = RunRef(rid, exp_id, previous.info.run_name or run_name, resumed=True)
        else:
            run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
            ref = RunRef(run.info.run_id, exp_id, run.info.run_name or run_name)
        if params:
            self.log_params(ref, params)
        try:
            yield ref
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                self.client.set_tag(ref.run_id, f"{TAG_PREFIX}error", one_line(exc))
                self.client.set_terminated(ref.run_id, status)
            except Exception:  # never hide the pipeline's own error behind a tracking one
                logging.getLogger(__name__).warning("could not mark MLflow run %s %s", ref.run_id, status)
            raise
        self.client.set_terminated(ref.run_id, "FINISHED")

    def _unfinished_run(self, exp_id: str, key: str) -> Any:
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{TAG_PREFIX}run_key` = '{key}'",
                                       max_results=50, order_by=["attributes.start_time DESC"])
        return next((r for r in runs if r.info.status in _UNFINISHED), None)

    def set_lineage(self, run: RunLike, model_hash: str | None = None,
                    data_hashes: Mapping[str, str | None] | None = None, pattern: str | float | None = None,
                    method: str | None = None) -> None:
        """Add lineage learnt after the run started (the model hash once the model is resolved, ...)."""
        self.set_tags(run, lineage_tags(None, model_hash, data_hashes, pattern, method, code=False))

    # -- params, metrics, tags, artifacts --------------------------------------------------------------
    def log_params(self, run: RunLike, params: Mapping[str, Any]) -> dict[str, str]:
        """Flatten ``params`` (dotted keys) and log them; the whole nested dict goes to ``config/params.json``.

        Truncated values (see :mod:`tasks.tracking_values`) are named in the ``crepe.truncated_params`` tag.
        Re-logging an identical value is a no-op (a resumed run); a *different* value for a key the run
        already has raises a :class:`CrepeError` (MLflow params are immutable). Returns what was logged.
        """
        rid = run_id_of(run)
        items, truncated = param_items(params)
        existing = self.client.get_run(rid).data.params
        clash = next((k for k, v in items.items() if existing.get(k, v) != v), None)
        if clash is not None:
            raise CrepeError(f"MLflow run {rid} already has param {clash}={existing[clash]!r}, not {items[clash]!r}; "
                             "a run keeps one configuration (start a new run)")
        self.client.log_batch(rid, params=[Param(k, v) for k, v in items.items() if k not in existing])
        if truncated:
            self.set_tags(rid, {f"{TAG_PREFIX}truncated_params": ",".join(truncated)})
        self.client.log_dict(rid, dict(params), "config/params.json")
        return items

    def log_metrics(self, run: RunLike, metrics: Mapping[str, Any], step: int = 0, prefix: str = "") -> dict[str, float]:
        """Log the numeric leaves of ``metrics`` (nested keys joined by ``/``, e.g. ``ppl/test``,
        ``zero_shot/boolq/acc``); non-finite values are skipped and named in the ``crepe.nonfinite_metrics``
        tag. Returns what was logged."""
        items, nonfinite = metric_items(metrics, prefix)
        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id_of(run), metrics=[Metric(k, v, stamp, step) for k, v in items.items()])
        if nonfinite:
            self.set_tags(run, {f"{TAG_PREFIX}nonfinite_metrics": ",".join(nonfinite)})
        return items

    def set_tags(self, run: RunLike, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text, JSON for non-strings) in one ``log_batch``."""
        self.client.log_batch(run_id_of(run), tags=[RunTag(k, v) for k, v in tag_items(tags).items()])

    def log_artifact(self, run: RunLike, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a folder (recursively) into the run's artifacts under ``artifact_path``; logging
        the same path again replaces it. Keep weights out: they live in the release folder/DVC."""
        p = Path(path)
        if not p.exists():
            raise CrepeError(f"cannot log {p} to MLflow: it does not exist")
        if p.is_dir():
            self.client.log_artifacts(run_id_of(run), str(p), artifact_path)
        else:
            self.client.log_artifact(run_id_of(run), str(p), artifact_path)

    def log_dict(self, run: RunLike, data: Any, artifact_file: str) -> None:
        """A JSON (or YAML, by suffix) artifact such as ``config/resolved.json`` from ``data``."""
        self.client.log_dict(run_id_of(run), data, artifact_file)

    def log_plots(self, run: RunLike, paths: Iterable[str | Path], artifact_path: str = "plots") -> list[str]:
        """Log image files already written (PNG/SVG/PDF) under ``plots/``; missing files are skipped.
        Returns the logged names. (``log_figure`` is for in-memory figures; these are files on disk.)"""
        files = [Path(p) for p in paths if Path(p).is_file()]
        for p in files:
            self.log_artifact(run, p, artifact_path)
        return [p.name for p in files]

    def log_table(self, run: RunLike, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """``rows`` as an MLflow table (``log_table``: shown as a table in the UI). MLflow appends to a table
        file the run already has; the same rows logged again (another format of one table) are skipped."""
        rid, folder = run_id_of(run), Path(artifact_file).parent.as_posix()
        if any(f.path == artifact_file for f in self.client.list_artifacts(rid, None if folder == "." else folder)):
            return
        self.client.log_table(rid, data={c: [r.get(c) for r in rows] for c in columns(rows)},
                              artifact_file=artifact_file)

    def log_transfer_table(self, run: RunLike, rows: Sequence[Mapping[str, Any]], path: str | Path,
                           preamble: str = "") -> Path:
        """Write the transfer table to ``path`` (:func:`tasks.reports.write_table`: ``.md``, ``.csv`` or
        ``.json``) and log the file and the rows as a table under ``transfer/``."""
        out = write_table(rows, path, preamble)
        self.log_artifact(run, out, "transfer")
        if out.suffix.lower() != ".json":
            self.log_table(run, rows, f"transfer/{out.stem}.json")
        return out

    # -- nested runs (used by tasks.tracking_search) ------------------------------------------------
    def _parent_info(self, run: RunLike) -> tuple[str, str, dict[str, str]]:
        """``(run_id, experiment_id, tags)`` of a parent run."""
        parent = self.client.get_run(run_id_of(run))
        return parent.info.run_id, parent.info.experiment_id, parent.data.tags

    def _log_child(self, parent: tuple[str, str, Mapping[str, str]], record: Mapping[str, Any]) -> str:
        """One finished nested run under ``parent`` (from :meth:`_parent_info`) in three store calls:
        create (with tags inherited from the parent), one ``log_batch`` (params + metrics), finish.
        ``record``: ``{"key", "name", "kind", "params", "metrics", "tags"}``."""
        rid, exp_id, parent_tags = parent
        inherited = {k: parent_tags[k] for k in (f"{TAG_PREFIX}{n}" for n in
                     ("model", "model_hash", "pattern", "method", "git_sha", "version")) if k in parent_tags}
        tags = {**inherited, "mlflow.parentRunId": rid, f"{TAG_PREFIX}kind": record["kind"],
                f"{TAG_PREFIX}trial_key": record["key"], **tag_items(record["tags"])}
        child = self.client.create_run(exp_id, tags=tags, run_name=record["name"]).info.run_id
        params, _ = param_items(record["params"])
        metrics, nonfinite = metric_items(record["metrics"])
        stamp = int(time.time() * 1000)
        self.client.log_batch(child, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                              params=[Param(k, v) for k, v in params.items()],
                              tags=[RunTag(f"{TAG_PREFIX}nonfinite_metrics", ",".join(nonfinite))] if nonfinite else [])
        self.client.set_terminated(child, "FINISHED")
        return child
