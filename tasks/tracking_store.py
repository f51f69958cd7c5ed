"""Where MLflow keeps crepe's runs, and the fail-fast checks of that store (no MLflow import here).

- **Store.** ``uri`` None means ``sqlite:///<project_root>/mlflow.db`` (a relative ``sqlite:///x.db``
  is also taken under the project), with artifacts under ``<project_root>/mlartifacts/<experiment>``:
  every experiment crepe creates gets an explicit ``artifact_location``, so nothing lands in the working
  directory (MLflow's default is ``./mlruns``). An ``http(s)://`` URI is a tracking server, which then
  owns the artifact location.
- **Bounded HTTP.** Telemetry is switched off and MLflow's HTTP retries are bounded (2 retries, backoff
  factor 1, 20 s per request, unless the environment already sets them), so a dead server fails in
  seconds, not after MLflow's default ~4 minutes of retries.
- **Checks.** :meth:`TrackingLocation.check_location` probes a server with a TCP connection and an
  HTTP request (3 s each) and makes sure a sqlite folder and the artifact folder are writable; each
  failure is one :class:`~crepe.errors.CrepeError` sentence naming the URI.
- **Experiments** are named by a template (default ``crepe-{model}``): ``{model}`` is the model's slug
  (``embedded:smollm2-135m`` -> ``smollm2-135m``), ``{spec}`` the spec as given.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from crepe.errors import CrepeError
from tasks.tracking_values import model_slug

DEFAULT_EXPERIMENT = "crepe-{model}"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ... at" line per nested run
}
PROBE_TIMEOUT_S = 3.0


def set_env_defaults() -> None:
    """:data:`ENV_DEFAULTS` for every variable the environment does not already set."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


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


def ui_command(uri: str, port: int, artifact_root: str | Path | None = None, python: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for ``uri``, bound to 127.0.0.1 only (never a public interface)."""
    cmd = [python or sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        cmd += ["--artifacts-destination", Path(artifact_root).resolve().as_uri()]
    return cmd


class TrackingLocation:
    """The store of one project: URI, artifact folder and experiment names (shared by the MLflow
    tracker and the null tracker, so ``crepe ui`` and the config checks read them either way)."""

    def __init__(
        self,
        uri: str | None = None,
        project_root: str | Path = ".",
        experiment: str = DEFAULT_EXPERIMENT,
        artifact_root: str | Path | None = None,
        sqlite_wal: bool = True,
    ) -> None:
        self.project_root = Path(project_root).resolve()
        self.uri = resolve_uri(uri, self.project_root)
        self.experiment_template = experiment
        self.explicit_artifacts = artifact_root is not None
        self.artifact_root = Path(artifact_root).resolve() if artifact_root else self.project_root / ARTIFACT_DIR
        self.sqlite_wal = sqlite_wal
        try:
            experiment.format(model="m", spec="s")
        except (KeyError, IndexError, ValueError):
            raise CrepeError(
                f"experiment name template {experiment!r} is not valid; use text with the placeholders {{model}} "
                "and {spec} only"
            ) from None

    @property
    def remote(self) -> bool:
        """True for a tracking server (http, https, databricks...), False for a local sqlite/file store."""
        return urlparse(self.uri).scheme not in ("sqlite", "file", "")

    @property
    def sqlite_path(self) -> Path | None:
        if not self.uri.startswith("sqlite:///"):
            return None
        return Path(self.uri.removeprefix("sqlite:///").split("?", 1)[0])

    def experiment_name(self, model_spec: str) -> str:
        """The experiment of base model ``model_spec`` (template ``{model}``: slug, ``{spec}``: as given)."""
        return self.experiment_template.format(model=model_slug(model_spec), spec=model_spec)

    def check_location(self) -> None:
        """Fail fast, in one sentence naming the URI, when the store cannot be reached or written.

        An ``http(s)`` server is probed (TCP, then HTTP) before MLflow's own client, which would retry
        for minutes; a sqlite database's folder must be creatable and writable (a real file is created
        there, so this also holds for root). ``file:`` stores are left to MLflow, which refuses its
        legacy file store itself unless ``MLFLOW_ALLOW_FILE_STORE`` is set.
        """
        scheme = urlparse(self.uri).scheme
        if scheme in ("http", "https"):
            self._probe_http()
        elif scheme == "sqlite":
            self.check_sqlite()
        if not self.remote or self.explicit_artifacts:
            _check_writable_dir(self.artifact_root, "MLflow artifact folder")

    def _probe_http(self) -> None:
        parsed = urlparse(self.uri)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname or "", port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
            raise CrepeError(
                f"cannot reach the MLflow tracking server at {self.uri} ({reason}); start it, fix tracking.uri, "
                "or set tracking.enabled: false"
            ) from None
        # Something listens; make sure it answers HTTP in time. Any HTTP status counts as an answer: a
        # 401/403 from an authenticating proxy is reported by the API call that follows, in MLflow's words.
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
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

    def check_sqlite(self) -> None:
        """The sqlite file can be created and written; switches it to write-ahead logging if ``sqlite_wal``."""
        path = self.sqlite_path
        if path is None or not str(path) or str(path).startswith(":memory:"):
            raise CrepeError(
                f"the MLflow tracking URI {self.uri} is not a sqlite file path; use sqlite:///<file>.db (an in-memory "
                "database would lose every run)"
            )
        _check_writable_dir(path.parent, f"folder of the MLflow database (tracking URI {self.uri})")
        if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
            raise CrepeError(f"cannot write the MLflow database {path} (tracking URI {self.uri}); choose a writable "
                             "tracking.uri")
        if self.sqlite_wal:
            _enable_wal(path)


def _check_writable_dir(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".crepe-probe-"):
            pass
    except OSError as exc:
        raise CrepeError(
            f"cannot write the {what} {folder} ({exc.strerror or type(exc).__name__}); choose a writable location"
        ) from None


def _enable_wal(path: Path) -> None:
    """Write-ahead logging: the UI can read while a pipeline writes, and commits are ~2x cheaper.

    Persistent in the file; harmless to repeat. (WAL needs a local filesystem: point ``tracking.uri``
    at a server for a shared network drive.)
    """
    try:
        with sqlite3.connect(path, timeout=20) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
    except sqlite3.Error as exc:
        raise CrepeError(f"cannot open the MLflow database {path} ({exc}); choose another tracking.uri") from None
