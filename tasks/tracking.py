"""MLflow tracking for crepe pipelines (issue 4, points 6 and 7): the only module that talks to MLflow.

Nothing in ``crepe/`` imports MLflow; the Prefect tasks and flows call this module with plain
dicts, paths and run ids (:class:`RunRef`), never with config objects. MLflow itself is imported
lazily, on the first call that needs it, so ``tracking.enabled: false`` costs nothing.

Layout (see ``docs/tracking.md``):

- **Store.** ``Tracker(uri=None, project_root)`` uses ``sqlite:///<project_root>/mlflow.db`` (a
  relative ``sqlite:///x.db`` is also taken under the project) with artifacts under
  ``<project_root>/mlartifacts/<experiment>``: every experiment this module creates gets an explicit
  ``artifact_location``, so nothing lands in the working directory (MLflow's default is ``./mlruns``).
  An ``http(s)://`` URI is a tracking server, which then owns the artifact location. Telemetry is
  switched off (``MLFLOW_DISABLE_TELEMETRY``) and MLflow's HTTP retries are bounded (2 retries,
  backoff factor 1, 20 s per request, unless the environment already sets them) so a dead server
  fails in seconds, not after MLflow's default ~4 minutes of retries. :meth:`Tracker.check` probes
  the store first and raises one :class:`~crepe.errors.CrepeError` sentence naming the URI.
- **Experiments.** One per base model, named by a template (default ``crepe-{model}``, the config's
  ``tracking.experiment``): ``{model}`` is the model's slug (``embedded:smollm2-135m`` ->
  ``smollm2-135m``), ``{spec}`` the spec as given.
- **Runs.** :meth:`Tracker.pipeline_run` opens a parent run (kind ``pipeline``, ``search``,
  ``transfer``...) tagged with the lineage (:data:`TAG_PREFIX` ``crepe.``: model spec and content hash,
  data hashes, pattern, method, crepe version, source hash, git sha). With a ``run_key`` an unfinished
  run of the same key (killed, failed, still marked running) is reopened instead of starting a new
  one, so a resumed pipeline keeps one parent run. Nested runs (``mlflow.parentRunId``) hold one PHO
  stage-1 trial or one verified stage-2 candidate each; a deterministic ``crepe.trial_key`` makes
  re-logging (a resumed pipeline, :meth:`Tracker.log_search` twice) a no-op.
- **Registry.** :meth:`Tracker.register_release` registers a release folder without copying its
  weights (the version's source is the folder itself on a local store) and sets an alias.
- **Transfer.** :meth:`Tracker.best_config` returns the lowest-validation-perplexity PHO winner
  recorded for (source model, pattern); :meth:`Tracker.log_transfer_table` stores the table.

MLflow limits handled here: params are flattened to dotted keys, names sanitised to MLflow's
character set, values longer than 6,000 characters truncated (the untruncated config is always
logged as ``config/params.json``), batches split at 100 params/tags and 1,000 metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from crepe.errors import CrepeError

__all__ = [
    "DEFAULT_EXPERIMENT",
    "RunRef",
    "Tracker",
    "flatten",
    "model_slug",
    "pattern_label",
    "run_key",
    "ui_command",
]

TAG_PREFIX = "crepe."
DEFAULT_EXPERIMENT = "crepe-{model}"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
RELEASE_MANIFESTS = ("crepe_release.json", "crepe_manifest.json")  # crepe.release / crepe prune
# MLflow's limits (mlflow.utils.validation, 3.x).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated; full value in config/params.json]"
# Bounded HTTP behaviour for remote tracking servers (set only when the environment does not).
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ... at" line per nested run
}
PROBE_TIMEOUT_S = 3.0
_UNFINISHED = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")
_KEY_BAD = re.compile(r"[^/\w.\- :]")
_ALIAS = re.compile(r"^[\w\-]+$")


# --- small pure helpers ---------------------------------------------------------------------------


def model_slug(spec: str) -> str:
    """A short name for a model spec: ``embedded:smollm2-135m`` -> ``smollm2-135m``,
    ``hf:org/name@rev`` -> ``org-name``, ``/path/to/folder`` -> ``folder`` (the same rule as
    ``flows.config.model_slug``, repeated here because ``tasks`` must not import ``flows``)."""
    text = spec.removeprefix("embedded:").removeprefix("hf:").split("@", 1)[0]
    if text.startswith((".", "/", "~")) or "\\" in text:
        text = Path(text).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def pattern_label(pattern: str | float) -> str:
    """The canonical label of a sparsity pattern (``"2:4"``, ``"4:8"``, ``0.5`` -> ``"50%"``), as
    :func:`crepe.types.parse_sparsity` writes it; what the ``crepe.pattern`` tags hold."""
    from crepe.types import parse_sparsity

    return parse_sparsity(str(pattern)).label


def canonical_json(data: Any) -> str:
    """Sorted keys, no whitespace: equal data gives equal text (and equal keys) in every process."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def run_key(*parts: Any) -> str:
    """A deterministic 16-hex-digit key of ``parts`` (e.g. the resolved config and the code version),
    for :meth:`Tracker.pipeline_run`'s ``run_key``."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:16]


def _params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(params)).encode()).hexdigest()[:12]


def _render(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def safe_key(key: str) -> str:
    """``key`` in MLflow's name alphabet (``/ \\w . - : space``), without ``..`` or a leading ``/``,
    at most 250 characters (a long key keeps its head and a hash of the whole)."""
    key = _KEY_BAD.sub("_", str(key)).strip("/") or "_"
    while ".." in key or "//" in key:
        key = key.replace("..", ".").replace("//", "/")
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 17] + "~" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return key


def flatten(data: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with ``sep``-joined keys: ``{"prune": {"sparsity": "2:4"}}`` ->
    ``{"prune.sparsity": "2:4"}``. Lists, tuples and scalars are leaves; an empty mapping is a leaf
    ``{}`` (so it is not silently lost)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def param_items(params: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """``params`` flattened, keys made safe, values as text (JSON for non-strings) truncated to
    MLflow's 6,000 characters; returns the params and the keys that were truncated."""
    out: dict[str, str] = {}
    truncated: list[str] = []
    for key, value in flatten(params).items():
        text = _render(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
            truncated.append(key)
        out[safe_key(key)] = text
    return out, truncated


def metric_items(metrics: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], list[str]]:
    """Numeric leaves of ``metrics`` flattened with ``/`` (the MLflow UI groups charts by it).

    ``None`` and non-numeric leaves are dropped; booleans count as 0/1; non-finite numbers are
    dropped and returned as the second element (MLflow would store inf as 1.8e308).
    """
    out: dict[str, float] = {}
    nonfinite: list[str] = []
    for key, value in flatten(metrics, "/", prefix).items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float):
            continue
        if not math.isfinite(float(value)):
            nonfinite.append(safe_key(key))
            continue
        out[safe_key(key)] = float(value)
    return out, nonfinite


def _tag_text(value: Any) -> str:
    text = _render(value)
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _is_remote(uri: str) -> bool:
    return urlparse(uri).scheme not in ("sqlite", "file", "")


def ui_command(uri: str, port: int, artifact_root: str | Path | None = None, python: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for ``uri``, bound to 127.0.0.1 only (never a public interface)."""
    import sys

    cmd = [python or sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        cmd += ["--artifacts-destination", Path(artifact_root).resolve().as_uri()]
    return cmd


# --- lazy MLflow ------------------------------------------------------------------------------------


def _set_env_defaults() -> None:
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _mlflow() -> Any:
    """``mlflow`` imported on first use, with telemetry off and its chattier loggers quieted."""
    _set_env_defaults()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration", "mlflow.tracking._tracking_service",
                 "mlflow.store.model_registry.abstract_store"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


@dataclass(frozen=True)
class RunRef:
    """A run handle that crosses task and process boundaries: plain strings only.

    ``run_id`` is None when tracking is disabled; every :class:`Tracker` method then does nothing.
    """

    run_id: str | None
    experiment_id: str | None = None
    name: str = ""
    resumed: bool = False

    @property
    def active(self) -> bool:
        return self.run_id is not None


RunLike = RunRef | str | None


def _rid(run: RunLike) -> str | None:
    return run.run_id if isinstance(run, RunRef) else run


class Tracker:
    """MLflow logging for one project (see the module docstring for the layout).

    ``uri`` None means ``sqlite:///<project_root>/mlflow.db``; a relative ``sqlite:///name.db`` is
    resolved under ``project_root``. ``artifact_root`` (default ``<project_root>/mlartifacts``) is
    where experiments created here keep their artifacts on a local store; on a remote server it is
    used only when given explicitly. ``experiment`` is the experiment-name template. With
    ``enabled=False`` every method is a no-op (lookups raise, since there is nothing to look up).
    """

    def __init__(
        self,
        uri: str | None = None,
        project_root: str | Path = ".",
        enabled: bool = True,
        experiment: str = DEFAULT_EXPERIMENT,
        artifact_root: str | Path | None = None,
        sqlite_wal: bool = True,
    ) -> None:
        self.project_root = Path(project_root).resolve()
        self.enabled = bool(enabled)
        self.uri = self.resolve_uri(uri, self.project_root)
        self.experiment_template = experiment
        self._explicit_artifacts = artifact_root is not None
        self.artifact_root = Path(artifact_root).resolve() if artifact_root else self.project_root / ARTIFACT_DIR
        self.sqlite_wal = sqlite_wal
        self._client_obj: Any = None
        self._experiments: dict[str, str] = {}
        try:
            experiment.format(model="m", spec="s")
        except (KeyError, IndexError, ValueError):
            raise CrepeError(
                f"experiment name template {experiment!r} is not valid; use text with the placeholders {{model}} "
                "and {spec} only"
            ) from None
        if self.enabled:
            _set_env_defaults()

    # -- store -----------------------------------------------------------------------------------
    @staticmethod
    def resolve_uri(uri: str | None, project_root: str | Path) -> str:
        """``uri`` with the default and relative sqlite paths made absolute under ``project_root``."""
        root = Path(project_root).resolve()
        if not uri:
            return f"sqlite:///{(root / DB_NAME).as_posix()}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            rel = uri.removeprefix("sqlite:///")
            if rel and not rel.startswith(":memory:") and not re.match(r"^[A-Za-z]:[/\\]", rel):
                return f"sqlite:///{(root / rel).as_posix()}"
        return uri

    @property
    def remote(self) -> bool:
        """True for a tracking server (http, https, databricks...), False for a local sqlite/file store."""
        return _is_remote(self.uri)

    @property
    def sqlite_path(self) -> Path | None:
        if not self.uri.startswith("sqlite:///"):
            return None
        return Path(self.uri.removeprefix("sqlite:///").split("?", 1)[0])

    def check(self) -> None:
        """Fail fast, in one sentence naming the URI, when the store cannot be used.

        An ``http(s)`` server is probed with a TCP connection (3 s timeout) before MLflow's own
        client (which would otherwise retry for minutes); a sqlite database's folder must be
        creatable and writable (a real file is created there, so this also holds for root). Then one
        cheap API call confirms the store works (for a new sqlite file MLflow creates its tables,
        a few seconds once).
        """
        if not self.enabled:
            return
        scheme = urlparse(self.uri).scheme
        if scheme in ("http", "https"):
            self._probe_http()
        elif scheme == "sqlite":
            self._check_sqlite()
        elif scheme == "file":
            pass  # MLflow refuses its legacy file store itself unless MLFLOW_ALLOW_FILE_STORE is set
        if not self.remote or self._explicit_artifacts:
            self._check_writable_dir(self.artifact_root, "MLflow artifact folder")
        try:
            self._client().search_experiments(max_results=1)
        except CrepeError:
            raise
        except Exception as exc:  # MlflowException, SQLAlchemy, requests: all mean "unusable store"
            raise CrepeError(
                f"the MLflow tracking URI {self.uri} is not usable ({_one_line(exc)}); fix tracking.uri or set "
                "tracking.enabled: false"
            ) from None

    def _probe_http(self) -> None:
        parsed = urlparse(self.uri)
        host = parsed.hostname or ""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
            raise CrepeError(
                f"cannot reach the MLflow tracking server at {self.uri} ({reason}); start it, fix tracking.uri, "
                "or set tracking.enabled: false"
            ) from None
        # Something listens; make sure it answers HTTP in time (MLflow's own client would wait
        # MLFLOW_HTTP_REQUEST_TIMEOUT per attempt). Any HTTP status counts as an answer: a 401/403
        # from an authenticating proxy is reported by the API call that follows, in MLflow's words.
        health = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=PROBE_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            text = "no answer" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)
            raise CrepeError(
                f"the MLflow tracking server at {self.uri} does not answer HTTP within {PROBE_TIMEOUT_S:g} s ({text}); "
                "check tracking.uri or set tracking.enabled: false"
            ) from None

    def _check_sqlite(self) -> None:
        path = self.sqlite_path
        if path is None or str(path).startswith(":memory:") or not str(path):
            raise CrepeError(
                f"the MLflow tracking URI {self.uri} is not a sqlite file path; use sqlite:///<file>.db (an in-memory "
                "database would lose every run)"
            )
        self._check_writable_dir(path.parent, f"folder of the MLflow database (tracking URI {self.uri})")
        if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
            raise CrepeError(f"cannot write the MLflow database {path} (tracking URI {self.uri}); choose a writable "
                             "tracking.uri")
        if self.sqlite_wal:
            self._enable_wal(path)

    @staticmethod
    def _check_writable_dir(folder: Path, what: str) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".crepe-probe-"):
                pass
        except OSError as exc:
            raise CrepeError(
                f"cannot write the {what} {folder} ({exc.strerror or type(exc).__name__}); choose a writable location"
            ) from None

    @staticmethod
    def _enable_wal(path: Path) -> None:
        """Write-ahead logging: the UI can read while a pipeline writes, and commits are ~2x cheaper.

        Persistent in the file; harmless to repeat. (WAL needs a local filesystem: point
        ``tracking.uri`` at a server for a shared network drive.)
        """
        try:
            with sqlite3.connect(path, timeout=20) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.close()
        except sqlite3.Error as exc:
            raise CrepeError(f"cannot open the MLflow database {path} ({exc}); choose another tracking.uri") from None

    def _client(self) -> Any:
        if self._client_obj is None:
            if not self.enabled:
                raise RuntimeError("MLflow client requested while tracking is disabled")
            if self.sqlite_path is not None and self.sqlite_wal and not self.sqlite_path.exists():
                self._check_sqlite()
            mlflow = _mlflow()
            self._client_obj = mlflow.tracking.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client_obj

    @property
    def client(self) -> Any:
        """The underlying ``mlflow.tracking.MlflowClient`` (for queries this module does not wrap)."""
        return self._client()

    # -- experiments -------------------------------------------------------------------------------
    def experiment_name(self, model_spec: str) -> str:
        """The experiment of base model ``model_spec`` (template ``{model}``: slug, ``{spec}``: as given)."""
        return self.experiment_template.format(model=model_slug(model_spec), spec=model_spec)

    def experiment_id(self, model_spec: str, create: bool = True) -> str | None:
        """The id of ``model_spec``'s experiment, created (with the project's artifact location) if
        ``create``; None if it does not exist and ``create`` is False. A deleted experiment of that name
        is an error (MLflow keeps the name reserved)."""
        name = self.experiment_name(model_spec)
        if name in self._experiments:
            return self._experiments[name]
        client = self._client()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            if not create:
                return None
            location = None
            if not self.remote or self._explicit_artifacts:
                location = (self.artifact_root / safe_key(name).replace("/", "_")).as_uri()
            tags = {f"{TAG_PREFIX}model": model_spec, f"{TAG_PREFIX}model_slug": model_slug(model_spec)}
            try:
                exp_id = client.create_experiment(name, artifact_location=location, tags=tags)
            except Exception:  # created meanwhile by another process
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                raise CrepeError(
                    f"the MLflow experiment {name!r} was deleted; restore it (mlflow experiments restore --experiment-id "
                    f"{exp.experiment_id}), purge it (mlflow gc), or change tracking.experiment"
                )
            exp_id = exp.experiment_id
        self._experiments[name] = exp_id
        return exp_id

    # -- lineage -----------------------------------------------------------------------------------
    @staticmethod
    def lineage_tags(
        model_spec: str | None = None,
        model_hash: str | None = None,
        data_hashes: Mapping[str, str | None] | None = None,
        pattern: str | float | None = None,
        method: str | None = None,
    ) -> dict[str, str]:
        """The ``crepe.*`` tags of a run: code version always, the rest when given.

        ``crepe.version``, ``crepe.source_sha256``, ``crepe.git_sha`` / ``crepe.git_dirty`` (also MLflow's
        own ``mlflow.source.git.commit``, shown in the UI), ``crepe.model``, ``crepe.model_hash``,
        ``crepe.data.<name>`` per data hash, ``crepe.pattern`` (canonical label), ``crepe.method``.
        """
        from crepe.provenance import code_version

        code = code_version()
        tags = {
            f"{TAG_PREFIX}version": str(code["crepe_version"]),
            f"{TAG_PREFIX}source_sha256": str(code["source_sha256"]),
        }
        if code.get("git_sha"):
            tags[f"{TAG_PREFIX}git_sha"] = code["git_sha"]
            tags[f"{TAG_PREFIX}git_dirty"] = _render(bool(code.get("git_dirty")))
            tags["mlflow.source.git.commit"] = code["git_sha"]
        if model_spec is not None:
            tags[f"{TAG_PREFIX}model"] = model_spec
        if model_hash:
            tags[f"{TAG_PREFIX}model_hash"] = model_hash
        for name, digest in (data_hashes or {}).items():
            if digest:
                tags[safe_key(f"{TAG_PREFIX}data.{name}")] = digest
        if pattern is not None:
            tags[f"{TAG_PREFIX}pattern"] = pattern_label(pattern)
        if method:
            tags[f"{TAG_PREFIX}method"] = method
        return tags

    def set_lineage(
        self,
        run: RunLike,
        model_hash: str | None = None,
        data_hashes: Mapping[str, str | None] | None = None,
        pattern: str | float | None = None,
        method: str | None = None,
    ) -> None:
        """Add lineage learnt after the run started (the model hash once the model is resolved, ...)."""
        rid = _rid(run)
        if not self.enabled or rid is None:
            return
        tags = {k: v for k, v in self.lineage_tags(None, model_hash, data_hashes, pattern, method).items()
                if not k.startswith((f"{TAG_PREFIX}version", f"{TAG_PREFIX}source", f"{TAG_PREFIX}git", "mlflow."))}
        self.set_tags(rid, tags)

    # -- parent runs ---------------------------------------------------------------------------------
    @contextmanager
    def pipeline_run(
        self,
        model_spec: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        kind: str = "pipeline",
        model_hash: str | None = None,
        data_hashes: Mapping[str, str | None] | None = None,
        pattern: str | float | None = None,
        method: str | None = None,
        run_key: str | None = None,
    ) -> Iterator[RunRef]:
        """A parent run in ``model_spec``'s experiment, finished when the block exits.

        ``params`` (nested, e.g. the resolved ``params.yaml``) are flattened to dotted MLflow params and
        also logged whole as ``config/params.json``. Tags: :meth:`lineage_tags` (git sha, crepe version and
        source hash always; model hash, data hashes, pattern, method when given, or later through
        :meth:`set_lineage`), ``crepe.kind`` and the caller's ``tags``.

        ``run_key`` (see :func:`run_key`): an unfinished run with the same key in this experiment is
        reopened (``RunRef.resumed``) rather than a new one started: a pipeline killed and rerun keeps
        one parent run, whose nested runs :meth:`log_search` does not duplicate. A FINISHED run is never
        reopened. The block's outcome sets the status: FINISHED, KILLED (KeyboardInterrupt) or FAILED
        (any other exception, whose first line goes to the ``crepe.error`` tag; the exception propagates).
        """
        if not self.enabled:
            yield RunRef(None, None, run_name)
            return
        client = self._client()
        exp_id = self.experiment_id(model_spec)
        all_tags = {
            **self.lineage_tags(model_spec, model_hash, data_hashes, pattern, method),
            f"{TAG_PREFIX}kind": kind,
            **{safe_key(str(k)): _tag_text(v) for k, v in (tags or {}).items()},
        }
        if run_key:
            all_tags[f"{TAG_PREFIX}run_key"] = run_key
        previous = self._unfinished_run(exp_id, run_key) if run_key else None
        if previous is not None:
            rid = previous.info.run_id
            client.update_run(rid, status="RUNNING")
            self.set_tags(rid, {**all_tags, f"{TAG_PREFIX}resumed": "true"})
            ref = RunRef(rid, exp_id, previous.info.run_name or run_name, resumed=True)
        else:
            run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
            ref = RunRef(run.info.run_id, exp_id, run.info.run_name or run_name)
        if params:
            self.log_params(ref, params)
        try:
            yield ref
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                client.set_tag(ref.run_id, f"{TAG_PREFIX}error", _tag_text(_one_line(exc)))
                client.set_terminated(ref.run_id, status)
            except Exception:  # never hide the pipeline's own error behind a tracking one
                logging.getLogger(__name__).warning("could not mark MLflow run %s %s", ref.run_id, status)
            raise
        client.set_terminated(ref.run_id, "FINISHED")

    def _unfinished_run(self, exp_id: str, key: str) -> Any:
        runs = self._client().search_runs(
            [exp_id], filter_string=f"tags.`{TAG_PREFIX}run_key` = '{key}'", max_results=50,
            order_by=["attributes.start_time DESC"],
        )
        return next((r for r in runs if r.info.status in _UNFINISHED), None)

    # -- params, metrics, tags, artifacts ----------------------------------------------------------------
    def log_params(self, run: RunLike, params: Mapping[str, Any]) -> dict[str, str]:
        """Flatten ``params`` (dotted keys) and log them; the whole nested dict goes to ``config/params.json``.

        Values over 6,000 characters are truncated (keys listed in the ``crepe.truncated_params`` tag).
        Re-logging an identical value is a no-op (a resumed run); a *different* value for a key the run
        already has raises a :class:`CrepeError` (MLflow params are immutable). Returns what was logged.
        """
        rid = _rid(run)
        if not self.enabled or rid is None:
            return {}
        mlflow = _mlflow()
        items, truncated = param_items(params)
        existing = self._client().get_run(rid).data.params
        clash = next((k for k, v in items.items() if k in existing and existing[k] != v), None)
        if clash is not None:
            raise CrepeError(
                f"MLflow run {rid} already has param {clash}={existing[clash]!r}, not {items[clash]!r}; a run keeps "
                "one configuration (start a new run)"
            )
        new = [mlflow.entities.Param(k, v) for k, v in items.items() if k not in existing]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self._client().log_batch(rid, params=list(chunk))
        if truncated:
            self.set_tags(rid, {f"{TAG_PREFIX}truncated_params": ",".join(truncated)})
        self.log_dict(rid, json.loads(json.dumps(dict(params), default=str)), "config/params.json")
        return items

    def log_metrics(self, run: RunLike, metrics: Mapping[str, Any], step: int = 0, prefix: str = "") -> dict[str, float]:
        """Log the numeric leaves of ``metrics`` (nested keys joined by ``/``, e.g. ``ppl/test``,
        ``zero_shot/boolq/acc``, ``sparsity/overall``, ``time/prune``), in one or a few batches.

        None and non-numeric leaves are skipped; non-finite values are skipped and named in the
        ``crepe.nonfinite_metrics`` tag. Returns what was logged.
        """
        rid = _rid(run)
        if not self.enabled or rid is None:
            return {}
        items, nonfinite = metric_items(metrics, prefix)
        self._log_metric_batch(rid, items, step)
        if nonfinite:
            self.set_tags(rid, {f"{TAG_PREFIX}nonfinite_metrics": ",".join(nonfinite)})
        return items

    def _log_metric_batch(self, rid: str, items: Mapping[str, float], step: int = 0) -> None:
        mlflow = _mlflow()
        stamp = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(k, v, stamp, step) for k, v in items.items()]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self._client().log_batch(rid, metrics=list(chunk))

    def set_tags(self, run: RunLike, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text, JSON for non-strings, truncated to 8,000 characters) in batches."""
        rid = _rid(run)
        if not self.enabled or rid is None or not tags:
            return
        mlflow = _mlflow()
        items = [mlflow.entities.RunTag(safe_key(str(k)), _tag_text(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._client().log_batch(rid, tags=list(chunk))

    def log_artifact(self, run: RunLike, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a folder (recursively) into the run's artifacts under ``artifact_path``.

        Logging the same path again replaces it. Keep weights out: they live in the release folder/DVC.
        """
        rid = _rid(run)
        if not self.enabled or rid is None:
            return
        p = Path(path)
        if not p.exists():
            raise CrepeError(f"cannot log {p} to MLflow: it does not exist")
        if p.is_dir():
            self._client().log_artifacts(rid, str(p), artifact_path)
        else:
            self._client().log_artifact(rid, str(p), artifact_path)

    def log_dict(self, run: RunLike, data: Any, artifact_file: str) -> None:
        """A JSON artifact (``artifact_file`` such as ``config/resolved.json``) from ``data``."""
        rid = _rid(run)
        if not self.enabled or rid is None:
            return
        with tempfile.TemporaryDirectory(prefix="crepe-mlflow-") as tmp:
            file = Path(tmp) / Path(artifact_file).name
            file.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            parent = Path(artifact_file).parent.as_posix()
            self._client().log_artifact(rid, str(file), None if parent in ("", ".") else parent)

    def log_plots(self, run: RunLike, paths: Iterable[str | Path], artifact_path: str = "plots") -> list[str]:
        """Log image files (PNG/SVG/PDF) under ``plots/``; missing files are skipped. Returns the logged names."""
        logged = []
        for path in paths:
            p = Path(path)
            if p.is_file():
                self.log_artifact(run, p, artifact_path)
                logged.append(p.name)
        return logged

    def log_manifest(self, run: RunLike, manifest_path: str | Path, artifact_path: str = "manifest") -> dict[str, float]:
        """Log a release/prune manifest JSON as an artifact and its headline numbers as metrics.

        Understands ``crepe_release.json`` (``sparsity.overall``, ``smoke_test.ppl``, ``metrics``) and the
        ``crepe prune`` manifest (``prune.overall_sparsity``, ``evaluation.ppl``); returns the metrics logged.
        """
        from crepe.io import read_json

        path = Path(manifest_path)
        manifest = read_json(path, "manifest")
        self.log_artifact(run, path, artifact_path)
        return self.log_metrics(run, manifest_metrics(manifest))

    # -- nested runs: PHO trials and candidates --------------------------------------------------------------
    def _parent(self, run: RunLike) -> tuple[str, str, dict[str, str]] | None:
        rid = _rid(run)
        if not self.enabled or rid is None:
            return None
        parent = self._client().get_run(rid)
        return rid, parent.info.experiment_id, parent.data.tags

    def child_keys(self, parent: RunLike) -> dict[str, str]:
        """``{crepe.trial_key: run_id}`` of ``parent``'s nested runs (one query per 1,000 runs)."""
        info = self._parent(parent)
        if info is None:
            return {}
        rid, exp_id, _ = info
        return self._child_keys(rid, exp_id)

    def _child_keys(self, rid: str, exp_id: str) -> dict[str, str]:
        client, keys, token = self._client(), {}, None
        while True:
            page = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'",
                                      max_results=1000, page_token=token)
            for r in page:
                key = r.data.tags.get(f"{TAG_PREFIX}trial_key")
                if key:
                    keys[key] = r.info.run_id
            token = page.token
            if not token:
                return keys

    def _inherited(self, tags: Mapping[str, str]) -> dict[str, str]:
        keep = ("model", "model_hash", "pattern", "method", "git_sha", "version")
        return {f"{TAG_PREFIX}{k}": tags[f"{TAG_PREFIX}{k}"] for k in keep if f"{TAG_PREFIX}{k}" in tags}

    def _child(self, rid: str, exp_id: str, parent_tags: Mapping[str, str], key: str, name: str, kind: str,
               params: Mapping[str, Any], metrics: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
        """One nested run in three store calls: create (with tags), log_batch (params + metrics), finish."""
        mlflow = _mlflow()
        client = self._client()
        all_tags = {**self._inherited(parent_tags), "mlflow.parentRunId": rid, f"{TAG_PREFIX}kind": kind,
                    f"{TAG_PREFIX}trial_key": key, **{k: _tag_text(v) for k, v in tags.items()}}
        child = client.create_run(exp_id, tags=all_tags, run_name=name)
        p_items, _ = param_items(params)
        m_items, nonfinite = metric_items(metrics)
        stamp = int(time.time() * 1000)
        extra = [mlflow.entities.RunTag(f"{TAG_PREFIX}nonfinite_metrics", ",".join(nonfinite))] if nonfinite else []
        client.log_batch(
            child.info.run_id,
            metrics=[mlflow.entities.Metric(k, v, stamp, 0) for k, v in m_items.items()],
            params=[mlflow.entities.Param(k, v) for k, v in p_items.items()],
            tags=extra,
        )
        client.set_terminated(child.info.run_id, "FINISHED")
        return child.info.run_id

    @staticmethod
    def trial_key(trial: Mapping[str, Any]) -> str:
        """``trial:<index>:<params hash>``: the identity of a stage-1 trial under one parent run."""
        return f"trial:{int(trial['index'])}:{_params_hash(trial['params'])}"

    @staticmethod
    def candidate_key(result: Mapping[str, Any]) -> str:
        """``candidate:<index>:<params hash>``: the identity of a verified stage-2 candidate."""
        return f"candidate:{int(result['index'])}:{_params_hash(result['params'])}"

    @staticmethod
    def _trial_record(trial: Mapping[str, Any]) -> tuple[dict, dict, dict]:
        metrics = {**dict(trial.get("proxies") or {}), "seconds": trial.get("seconds"),
                   "cpu_seconds": trial.get("cpu_seconds")}
        return dict(trial["params"]), metrics, {f"{TAG_PREFIX}index": int(trial["index"]), f"{TAG_PREFIX}stage": "screen"}

    @staticmethod
    def _candidate_record(result: Mapping[str, Any], proxies: Mapping[str, Any] | None, winner: bool) -> tuple[dict, dict, dict]:
        metrics = {"validation_ppl": result.get("ppl"), "seconds": result.get("seconds"),
                   "cpu_seconds": result.get("cpu_seconds"), **dict(proxies or {})}
        tags = {f"{TAG_PREFIX}index": int(result["index"]), f"{TAG_PREFIX}stage": "verify",
                f"{TAG_PREFIX}winner": _render(bool(winner))}
        if result.get("ppl") is None:
            tags[f"{TAG_PREFIX}ppl_raw"] = str(result.get("ppl_raw", "non-finite"))
        return dict(result["params"]), metrics, tags

    def log_trial(self, parent: RunLike, trial: Mapping[str, Any]) -> str | None:
        """A nested run for one PHO stage-1 trial ``{index, params, proxies, seconds, cpu_seconds}``:
        params alpha/beta/gamma/kernel_size, metrics every proxy + seconds + cpu_seconds.

        Idempotent: if ``parent`` already has the trial (same index and params) its run id is returned
        and nothing is logged. Returns the nested run id (None when tracking is disabled).
        """
        info = self._parent(parent)
        if info is None:
            return None
        rid, exp_id, tags = info
        key = self.trial_key(trial)
        existing = self._existing(rid, exp_id, key)
        if existing:
            return existing
        params, metrics, extra = self._trial_record(trial)
        return self._child(rid, exp_id, tags, key, f"trial-{int(trial['index']):03d}", "trial", params, metrics, extra)

    def log_candidate(self, parent: RunLike, result: Mapping[str, Any], proxies: Mapping[str, Any] | None = None,
                      winner: bool = False) -> str | None:
        """A nested run for one verified stage-2 candidate ``{index, params, ppl, seconds, cpu_seconds}``:
        params as the trial's, metrics ``validation_ppl`` (absent when non-finite: ``crepe.ppl_raw`` tag),
        seconds, cpu_seconds, and the candidate's proxies if given; tag ``crepe.winner``. Idempotent like
        :meth:`log_trial`."""
        info = self._parent(parent)
        if info is None:
            return None
        rid, exp_id, tags = info
        key = self.candidate_key(result)
        existing = self._existing(rid, exp_id, key)
        if existing:
            return existing
        params, metrics, extra = self._candidate_record(result, proxies, winner)
        return self._child(rid, exp_id, tags, key, f"candidate-{int(result['index']):02d}", "candidate",
                           params, metrics, extra)

    def _existing(self, rid: str, exp_id: str, key: str) -> str | None:
        runs = self._client().search_runs(
            [exp_id], filter_string=f"tags.mlflow.parentRunId = '{rid}' and tags.`{TAG_PREFIX}trial_key` = '{key}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def log_search(self, parent: RunLike, pho_json: str | Path, artifacts: bool = True) -> dict[str, int]:
        """Log a finished PHO search (``pho.json`` of ``crepe search`` / ``run_search``) under ``parent``.

        - one nested run per ``trials`` entry and per ``verified`` entry not yet logged under ``parent``
          (one lookup query, then three store calls per new run), so a second call logs nothing;
        - on the parent: tags ``crepe.pho.winner`` (the winner's params as JSON), ``crepe.pho.model`` /
          ``crepe.pho.model_hash`` / ``crepe.pho.pattern`` (what the search actually ran on),
          ``crepe.pho.key`` (hash of the search config); metrics ``pho/validation_ppl`` (the winner's),
          ``pho/test_ppl``, ``pho/ria_validation_ppl``, ``pho/winner/<param>`` and ``pho/totals/<key>``;
        - artifacts (``artifacts=True``): ``search/pho.json`` and the PNG plots beside it under ``plots/``.

        A parent holds one search: logging a pho.json of a different configuration under it raises
        :class:`CrepeError`. Returns ``{"trials", "candidates", "skipped"}`` counts of nested runs.
        """
        counts = {"trials": 0, "candidates": 0, "skipped": 0}
        path = Path(pho_json)
        summary = load_pho(path)
        info = self._parent(parent)
        if info is None:
            return counts
        rid, exp_id, tags = info
        config = summary.get("config") or {}
        key = run_key(config)
        previous = tags.get(f"{TAG_PREFIX}pho.key")
        if previous and previous != key:
            raise CrepeError(
                f"MLflow run {rid} already holds a different PHO search (config key {previous}, this one {key}); "
                "log each search under its own run"
            )
        existing = self._child_keys(rid, exp_id)
        proxies_of = {_params_hash(t["params"]): t.get("proxies") or {} for t in summary["trials"]}
        winner = summary.get("winner") or {}
        for trial in summary["trials"]:
            k = self.trial_key(trial)
            if k in existing:
                counts["skipped"] += 1
                continue
            params, metrics, extra = self._trial_record(trial)
            self._child(rid, exp_id, tags, k, f"trial-{int(trial['index']):03d}", "trial", params, metrics, extra)
            counts["trials"] += 1
        for result in summary.get("verified") or []:
            k = self.candidate_key(result)
            if k in existing:
                counts["skipped"] += 1
                continue
            is_winner = bool(winner) and int(result["index"]) == int(winner.get("index", -1))
            params, metrics, extra = self._candidate_record(
                result, proxies_of.get(_params_hash(result["params"])), is_winner)
            self._child(rid, exp_id, tags, k, f"candidate-{int(result['index']):02d}", "candidate", params,
                        metrics, extra)
            counts["candidates"] += 1
        self._log_search_summary(rid, summary, key)
        if artifacts:
            self.log_artifact(rid, path, "search")
            plots = [Path(p) for p in (summary.get("plots") or {}).values()]
            plots += sorted(path.parent.glob("*.png"))
            self.log_plots(rid, dict.fromkeys(p for p in plots if p.is_file()))
        return counts

    def _log_search_summary(self, rid: str, summary: Mapping[str, Any], key: str) -> None:
        config = summary.get("config") or {}
        final = summary.get("final") or {}
        winner = summary.get("winner") or {}
        params = final.get("params") or winner.get("params") or {}
        tags = {f"{TAG_PREFIX}pho.key": key, f"{TAG_PREFIX}pho.winner": canonical_json(params)}
        model = config.get("model") or (summary.get("model") or {}).get("spec")
        if model:
            tags[f"{TAG_PREFIX}pho.model"] = model
        model_hash = config.get("model_hash") or (summary.get("model") or {}).get("content_hash")
        if model_hash:
            tags[f"{TAG_PREFIX}pho.model_hash"] = model_hash
        if config.get("sparsity") is not None:
            tags[f"{TAG_PREFIX}pho.pattern"] = pattern_label(config["sparsity"])
        if config.get("sampler"):
            tags[f"{TAG_PREFIX}pho.sampler"] = config["sampler"]
        self.set_tags(rid, tags)
        metrics = {
            "pho": {
                "validation_ppl": final.get("validation_ppl", winner.get("ppl")),
                "test_ppl": final.get("test_ppl"),
                "ria_validation_ppl": summary.get("ria_validation_ppl"),
                "winner": {k: v for k, v in params.items() if isinstance(v, int | float)},
                "totals": dict(summary.get("totals") or {}),
            }
        }
        self.log_metrics(rid, metrics)

    # -- registry ------------------------------------------------------------------------------------------
    def register_release(
        self,
        release_dir: str | Path,
        name: str,
        alias: str | None = "candidate",
        run: RunLike = None,
        *,
        dvc_path: str | None = None,
        tags: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> dict[str, Any] | None:
        """Register a release folder as a version of registered model ``name`` and point ``alias`` at it.

        **No second copy of the weights.** On a local store (sqlite, the default) the version's
        *source* is the release folder itself (``file:///.../data/release``): the registry points at
        the exact files DVC versions, and ``mlflow artifacts download -u models:/<name>@<alias>`` reads
        them from there. A remote tracking server refuses client-local paths as sources (it cannot see
        them); there the source is ``runs:/<run>/release``, a small pointer logged into ``run``: the
        manifest, the model card and ``pointer.json`` (release path, DVC path, manifest sha256) --
        never the weights. On both, the pointer is logged when ``run`` is given, and the version carries
        tags ``crepe.release_path``, ``crepe.dvc_path``, ``crepe.manifest_sha256``, ``crepe.sparsity``,
        ``crepe.pattern``, ``crepe.method``, ``crepe.model`` and ``crepe.model_hash`` (read from the
        manifest: ``crepe_release.json`` or a ``crepe prune`` ``crepe_manifest.json``), plus ``tags``.

        Idempotent: a version of ``name`` with the same manifest sha256 is reused (the alias is still
        (re)set), so a resumed pipeline does not register twice. ``alias`` (letters, digits, ``_``, ``-``;
        not ``latest`` nor ``v<N>``) is moved to this version, e.g. ``candidate`` then ``production``.
        Returns ``{"name", "version", "alias", "source", "run_id", "created"}`` (None when disabled).
        """
        folder = Path(release_dir).resolve()
        manifest_path = next((folder / m for m in RELEASE_MANIFESTS if (folder / m).is_file()), None)
        if not folder.is_dir() or manifest_path is None:
            raise CrepeError(
                f"release folder {folder} has no {' or '.join(RELEASE_MANIFESTS)}; register a folder written by the "
                "release step or crepe prune"
            )
        if alias is not None and (not _ALIAS.match(alias) or alias.lower() == "latest"
                                  or re.match(r"^[vV]\d+$", alias)):
            raise CrepeError(
                f"registry alias {alias!r} is not allowed; use letters, digits, '_' and '-' (not 'latest' or v<N>), "
                "e.g. candidate or production"
            )
        if not self.enabled:
            return None
        from crepe.io import sha256_file

        client = self._client()
        rid = _rid(run)
        manifest = json.loads(manifest_path.read_text())
        digest = sha256_file(manifest_path)
        version_tags = {**release_tags(manifest), f"{TAG_PREFIX}manifest_sha256": digest,
                        f"{TAG_PREFIX}release_path": str(folder)}
        if dvc_path:
            version_tags[f"{TAG_PREFIX}dvc_path"] = dvc_path
        version_tags.update({safe_key(str(k)): _tag_text(v) for k, v in (tags or {}).items()})
        if rid is not None:
            self._log_release_pointer(rid, folder, manifest_path, digest, dvc_path)
        if self.remote:
            if rid is None:
                raise CrepeError(
                    f"registering {folder} on the remote tracking server {self.uri} needs the pipeline run (the server "
                    "cannot read local paths, so a pointer is logged into that run)"
                )
            source = f"runs:/{rid}/release"
        else:
            source = folder.as_uri()
        try:
            try:
                client.create_registered_model(name, tags={f"{TAG_PREFIX}kind": "release"})
            except Exception as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) and "already exists" not in str(exc):
                    raise
            found = client.search_model_versions(
                f"name = '{name}' and tags.`{TAG_PREFIX}manifest_sha256` = '{digest}'")
            created = not found
            if found:
                version = max(found, key=lambda v: int(v.version))
            else:
                version = client.create_model_version(name, source, run_id=rid, tags=version_tags,
                                                      description=description)
            if alias is not None:
                client.set_registered_model_alias(name, alias, version.version)
        except CrepeError:
            raise
        except Exception as exc:
            if type(exc).__name__ != "MlflowException":
                raise
            raise CrepeError(f"cannot register {folder} as MLflow model {name!r}: {_one_line(exc)}") from None
        return {"name": name, "version": str(version.version), "alias": alias, "source": version.source,
                "run_id": rid, "created": created}

    def _log_release_pointer(self, rid: str, folder: Path, manifest: Path, digest: str, dvc_path: str | None) -> None:
        pointer = {"release_path": str(folder), "dvc_path": dvc_path, "manifest": manifest.name,
                   "manifest_sha256": digest,
                   "note": "the weights are not copied here; they live in release_path (versioned by DVC)"}
        self.log_artifact(rid, manifest, "release")
        card = folder / "README.md"
        if card.is_file():
            self.log_artifact(rid, card, "release")
        self.log_dict(rid, pointer, "release/pointer.json")

    def model_version(self, name: str, alias: str) -> dict[str, Any] | None:
        """``{"version", "source", "run_id", "tags"}`` of the version ``alias`` points at, None if none."""
        if not self.enabled:
            return None
        try:
            v = self._client().get_model_version_by_alias(name, alias)
        except Exception as exc:
            if type(exc).__name__ == "MlflowException":
                return None
            raise
        return {"version": str(v.version), "source": v.source, "run_id": v.run_id, "tags": dict(v.tags)}

    # -- transfer (issue 4 §7) ---------------------------------------------------------------------------------
    def best_config(self, source_model: str, pattern: str | float) -> dict[str, Any] | None:
        """The best PHO configuration recorded for (``source_model``, ``pattern``), or None.

        Looks at FINISHED runs of ``source_model``'s experiment that carry a PHO result (logged by
        :meth:`log_search`) for that model spec and pattern (compared as canonical labels, so ``0.5`` and
        ``50%`` match), and returns the one with the lowest winner validation perplexity (ties: the most
        recent run): ``{"params", "validation_ppl", "test_ppl", "ria_validation_ppl", "run_id",
        "experiment", "model", "model_hash", "pattern", "method"}``. Raises :class:`CrepeError` when tracking
        is disabled (there is nothing to look up).
        """
        if not self.enabled:
            raise CrepeError(
                "looking up a recorded configuration needs MLflow tracking; set tracking.enabled: true"
            )
        label = pattern_label(pattern)
        exp_id = self.experiment_id(source_model, create=False)
        if exp_id is None:
            return None
        runs, token, client = [], None, self._client()
        filt = (f"tags.`{TAG_PREFIX}pho.pattern` = '{label}' and tags.`{TAG_PREFIX}pho.model` = "
                f"'{source_model.replace(chr(39), chr(39) * 2)}' and attributes.status = 'FINISHED'")
        while True:
            page = client.search_runs([exp_id], filter_string=filt, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        best = None
        for r in runs:
            ppl = r.data.metrics.get("pho/validation_ppl")
            winner = r.data.tags.get(f"{TAG_PREFIX}pho.winner")
            if ppl is None or not math.isfinite(ppl) or not winner:
                continue
            rank = (ppl, -(r.info.start_time or 0))
            if best is None or rank < best[0]:
                best = (rank, r)
        if best is None:
            return None
        r = best[1]
        return {
            "params": json.loads(r.data.tags[f"{TAG_PREFIX}pho.winner"]),
            "validation_ppl": r.data.metrics["pho/validation_ppl"],
            "test_ppl": r.data.metrics.get("pho/test_ppl"),
            "ria_validation_ppl": r.data.metrics.get("pho/ria_validation_ppl"),
            "run_id": r.info.run_id,
            "experiment": self.experiment_name(source_model),
            "model": source_model,
            "model_hash": r.data.tags.get(f"{TAG_PREFIX}pho.model_hash"),
            "pattern": label,
            "method": r.data.tags.get(f"{TAG_PREFIX}method", "crepe"),
        }

    def log_transfer_table(self, run: RunLike, rows: Sequence[Mapping[str, Any]], path: str | Path,
                           preamble: str = "") -> Path:
        """Write the transfer table ``rows`` to ``path`` and log it (and a JSON copy) under ``transfer/``.

        The format follows the suffix: ``.md`` (a markdown table), ``.csv`` or ``.json``; columns are the
        rows' keys in first-seen order, nested values as JSON, floats with 4 decimals in markdown. The
        file is written atomically even when tracking is disabled (it also goes to ``docs/``). ``preamble``
        (markdown only) precedes the table: a heading, the context and a summary.
        """
        from crepe.io import write_json_atomic, write_text_atomic

        out = Path(path)
        rows = [dict(r) for r in rows]
        suffix = out.suffix.lower()
        if suffix == ".json":
            write_json_atomic(out, rows)
        elif suffix == ".csv":
            write_text_atomic(out, render_csv(rows))
        elif suffix in (".md", ".markdown"):
            write_text_atomic(out, preamble + render_markdown(rows))
        else:
            raise CrepeError(f"transfer table path {out} must end in .md, .csv or .json")
        rid = _rid(run)
        if self.enabled and rid is not None:
            self.log_artifact(rid, out, "transfer")
            if suffix != ".json":
                self.log_dict(rid, rows, f"transfer/{out.stem}.json")
        return out


# --- manifests, pho.json, tables -----------------------------------------------------------------------------


def load_pho(path: str | Path) -> dict[str, Any]:
    """A ``pho.json`` summary, checked for the keys :meth:`Tracker.log_search` needs."""
    p = Path(path)
    try:
        summary = json.loads(p.read_text())
    except FileNotFoundError:
        raise CrepeError(f"PHO summary {p} does not exist; run the search first (it writes pho.json)") from None
    except ValueError:
        raise CrepeError(f"PHO summary {p} is not valid JSON") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("trials"), list):
        raise CrepeError(f"{p} is not a PHO summary (no 'trials' list); give the pho.json of crepe search")
    for entry in (*summary["trials"], *(summary.get("verified") or [])):
        if not isinstance(entry, dict) or "index" not in entry or not isinstance(entry.get("params"), dict):
            raise CrepeError(f"{p} has a trial or candidate without 'index' and 'params'; it is not a PHO summary")
    return summary


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(data: Mapping[str, Any], *paths: str) -> Any:
    return next((v for v in (_get(data, p) for p in paths) if v is not None), None)


def manifest_metrics(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Headline numbers of a release or prune manifest: ``sparsity/overall``, ``ppl/<split>`` (from the
    evaluation or the release smoke test, as ``ppl/smoke``) and any ``metrics`` block as given."""
    out: dict[str, Any] = {}
    overall = _first(manifest, "sparsity.overall", "prune.overall_sparsity")
    if overall is not None:
        out["sparsity/overall"] = overall
    ev = manifest.get("evaluation")
    if isinstance(ev, Mapping) and ev.get("ppl") is not None:
        out[f"ppl/{ev.get('split', 'eval')}"] = ev["ppl"]
    smoke = manifest.get("smoke_test")
    if isinstance(smoke, Mapping) and smoke.get("ppl") is not None:
        out["ppl/smoke"] = smoke["ppl"]
    if isinstance(manifest.get("metrics"), Mapping):
        out["metrics"] = manifest["metrics"]
    return out


def release_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``crepe.*`` registry tags read from a release (or prune) manifest: model spec and hash, method,
    pattern, declared and measured sparsity. Missing fields are left out."""
    found = {
        "model": _first(manifest, "base_model.spec", "model.spec"),
        "model_hash": _first(manifest, "base_model.content_hash", "model.content_hash"),
        "method": _first(manifest, "prune.method", "prune.config.method"),
        "pattern": _first(manifest, "prune.pattern", "prune.config.pattern"),
        "declared_sparsity": _first(manifest, "prune.sparsity", "prune.config.sparsity"),
        "sparsity": _first(manifest, "sparsity.overall", "prune.overall_sparsity"),
    }
    return {f"{TAG_PREFIX}{k}": _render(v) for k, v in found.items() if v is not None}


def _cell(value: Any, markdown: bool) -> str:
    if value is None:
        return "" if not markdown else "-"
    if isinstance(value, float) and markdown:
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping | list | tuple):
        return canonical_json(value)
    return str(value)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of ``rows`` (columns in first-seen key order; numbers right-aligned)."""
    cols = _columns(rows)
    if not cols:
        return "(no rows)\n"
    numeric = {c for c in cols if all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows)}
    head = "| " + " | ".join(cols) + " |"
    rule = "|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|"
    body = ["| " + " | ".join(_cell(r.get(c), True).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def render_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    import csv
    import io

    cols = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_cell(r.get(c), False) for c in cols])
    return buf.getvalue()
