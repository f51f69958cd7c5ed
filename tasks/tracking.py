"""MLflow tracking for crepe pipelines: the front door (``open_tracker``) and the run handle.

Nothing in ``crepe/`` imports MLflow; tasks and flows call the tracker with plain dicts, paths and run
ids (:class:`RunRef`), never with config objects. Whether tracking is on is decided once, here, by
:func:`open_tracker`: it returns an :class:`~tasks.tracking_mlflow.MlflowTracker`, or a
:class:`NullTracker` with the same methods doing nothing, so no method checks a flag.

- :mod:`tasks.tracking_store`: where the store is (``sqlite:///<project>/mlflow.db`` by default) and
  its fail-fast checks;
- :mod:`tasks.tracking_mlflow`: parent runs (reopened by ``run_key`` after a crash), params, metrics,
  tags, artifacts, tables, with their lineage tags;
- :mod:`tasks.tracking_search`: one nested run per PHO trial and candidate, the best recorded config;
- :mod:`tasks.registry_release`: a release folder as a registered model version with an alias;
- :mod:`tasks.tracking_values`: keys and values as MLflow accepts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crepe.errors import CrepeError
from crepe.io import read_json
from tasks.reports import write_table
from tasks.tracking_search import load_pho
from tasks.tracking_store import DEFAULT_EXPERIMENT, TrackingLocation
from tasks.tracking_values import release_manifest

if TYPE_CHECKING:
    from tasks.tracking_mlflow import MlflowTracker

__all__ = ["NullTracker", "RunLike", "RunRef", "open_tracker", "run_id_of"]


@dataclass(frozen=True)
class RunRef:
    """A run handle that crosses task and process boundaries: plain strings only (``run_id`` is None
    for the runs of a :class:`NullTracker`)."""

    run_id: str | None
    experiment_id: str | None = None
    name: str = ""
    resumed: bool = False

    @property
    def active(self) -> bool:
        return self.run_id is not None


RunLike = RunRef | str


def run_id_of(run: RunLike) -> str:
    """The run id of a :class:`RunRef` or of a run id given as text."""
    return run.run_id if isinstance(run, RunRef) else run


class NullTracker(TrackingLocation):
    """The tracker of ``tracking.enabled: false``: the same calls, nothing logged. Inputs are still
    checked (a bad pho.json or release folder fails the same way), and table files are still written."""

    def check(self) -> None:
        pass

    def experiment_id(self, model_spec: str, create: bool = True) -> None:
        return None

    @property
    def client(self) -> Any:
        raise CrepeError("the MLflow client needs tracking; set tracking.enabled: true")

    @contextmanager
    def pipeline_run(self, model_spec: str, run_name: str, *args: Any, **kwargs: Any) -> Iterator[RunRef]:
        yield RunRef(None, None, run_name)

    def set_lineage(self, run: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_params(self, run: Any, params: Mapping[str, Any]) -> dict[str, str]:
        return {}

    def log_metrics(self, run: Any, metrics: Mapping[str, Any], step: int = 0, prefix: str = "") -> dict[str, float]:
        return {}

    def set_tags(self, run: Any, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, run: Any, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, run: Any, data: Any, artifact_file: str) -> None:
        pass

    def log_plots(self, run: Any, paths: Iterable[str | Path], artifact_path: str = "plots") -> list[str]:
        return []

    def log_table(self, run: Any, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        pass

    def log_transfer_table(self, run: Any, rows: Sequence[Mapping[str, Any]], path: str | Path,
                           preamble: str = "") -> Path:
        return write_table(rows, path, preamble)

    def log_manifest(self, run: Any, manifest_path: str | Path, artifact_path: str = "manifest") -> dict[str, float]:
        read_json(Path(manifest_path), "manifest")
        return {}

    def child_keys(self, parent: Any) -> dict[str, str]:
        return {}

    def log_trial(self, parent: Any, trial: Mapping[str, Any]) -> None:
        return None

    def log_candidate(self, parent: Any, result: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        return None

    def log_search(self, parent: Any, pho_json: str | Path, artifacts: bool = True) -> dict[str, int]:
        load_pho(pho_json)
        return {"trials": 0, "candidates": 0, "skipped": 0}

    def register_release(self, release_dir: str | Path, name: str, alias: str | None = "candidate", *args: Any,
                         **kwargs: Any) -> None:
        release_manifest(release_dir, alias)

    def model_version(self, name: str, alias: str) -> None:
        return None

    def best_config(self, source_model: str, pattern: str | float) -> dict[str, Any] | None:
        raise CrepeError("looking up a recorded configuration needs MLflow tracking; set tracking.enabled: true")


def open_tracker(uri: str | None = None, project_root: str | Path = ".", enabled: bool = True,
                 experiment: str = DEFAULT_EXPERIMENT, artifact_root: str | Path | None = None,
                 sqlite_wal: bool = True) -> MlflowTracker | NullTracker:
    """The project's tracker: an :class:`~tasks.tracking_mlflow.MlflowTracker`, or a :class:`NullTracker`
    when ``enabled`` is False (the one place that reads the flag)."""
    if not enabled:
        return NullTracker(uri, project_root, experiment, artifact_root, sqlite_wal)
    from tasks.tracking_mlflow import MlflowTracker  # imports MLflow (~1.4 s): only when tracking is on

    return MlflowTracker(uri, project_root, experiment, artifact_root, sqlite_wal)
