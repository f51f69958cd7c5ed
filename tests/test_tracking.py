"""MLflow tracking (tasks/tracking*.py, tasks/registry_release.py): runs, nested PHO runs, registry, transfer lookup.

Every test gets its own sqlite database under tmp_path: a copy of one empty, already-migrated template
(MLflow's schema creation takes seconds; copying the file takes milliseconds).
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import crepe
import crepe.provenance
from crepe.errors import CrepeError
from tasks import tracking_search, tracking_store, tracking_values
from tasks.tracking import NullTracker, RunRef, open_tracker
from tasks.tracking_mlflow import MlflowTracker
from tasks.tracking_values import flatten, metric_items, param_items, pattern_label, safe_key

REPO = Path(__file__).resolve().parent.parent
MODEL = "embedded:smollm2-135m"
OTHER = "embedded:gemma3-270m"


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlflow-template")
    MlflowTracker(None, root).check()  # creates and migrates the schema once
    db = root / tracking_store.DB_NAME
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


@pytest.fixture
def tracker(template_db, tmp_path, monkeypatch) -> MlflowTracker:
    """A Tracker on a private copy of the empty database; the test runs in an empty working directory."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(template_db, project / tracking_store.DB_NAME)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return MlflowTracker(None, project)


def run_of(tr: MlflowTracker, ref: RunRef | str):
    return tr.client.get_run(ref if isinstance(ref, str) else ref.run_id)


def children(tr: MlflowTracker, ref: RunRef) -> list:
    return list(tr.client.search_runs([ref.experiment_id], f"tags.mlflow.parentRunId = '{ref.run_id}'",
                                      max_results=1000))


def artifact_paths(tr: MlflowTracker, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in tr.client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= artifact_paths(tr, run_id, info.path)
        else:
            out.add(info.path)
    return out


def write_pho(folder: Path, sparsity: str = "2:4", model: str = MODEL, winner_ppl: float = 30.0,
              shift: float = 0.0) -> Path:
    """A small pho.json in the format of crepe.search.runs.run_search: 4 trials, 3 verified
    (one non-finite), winner = candidate 1, plus a PNG plot beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = [
        {"index": i, "params": {"alpha": 0.5 + i / 4 + shift, "beta": 1.0, "gamma": 10.0 ** -(i + 1), "kernel_size": 9},
         "proxies": {"gini_pruned": 0.5 - i / 100, "gini_retained": 0.4, "outlier": 0.01},
         "seconds": 0.1 * (i + 1), "cpu_seconds": 0.05 * (i + 1)}
        for i in range(4)
    ]
    ria = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0}
    verified = [
        {"index": 0, "params": trials[3]["params"], "ppl": winner_ppl + 5.0, "seconds": 2.0, "cpu_seconds": 1.5},
        {"index": 1, "params": trials[2]["params"], "ppl": winner_ppl, "seconds": 2.5, "cpu_seconds": 2.0},
        {"index": 2, "params": ria, "ppl": None, "ppl_raw": "nan", "seconds": 2.2, "cpu_seconds": 1.9},
    ]
    plot = folder / "screening.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    summary = {
        "version": 1,
        "config": {"model": model, "model_hash": "h-" + model, "sparsity": sparsity, "sampler": "cmaes",
                   "n_trials": 4, "seed": 0, "top_k": 2},
        "trials": trials,
        "candidates": [v["params"] for v in verified],
        "verified": verified,
        "winner": dict(verified[1]),
        "final": {"params": verified[1]["params"], "validation_ppl": winner_ppl, "test_ppl": winner_ppl - 2.0},
        "ria_validation_ppl": None,
        "totals": {"n_trials": 4, "n_verified": 3, "stage1_seconds": 1.0, "stage2_seconds": 6.7},
        "plots": {"screening": str(plot)},
    }
    path = folder / "pho.json"
    path.write_text(json.dumps(summary))
    return path


def write_release(folder: Path, method: str = "crepe") -> Path:
    folder.mkdir(parents=True)
    manifest = {
        "kind": "crepe-release", "version": 1,
        "base_model": {"spec": MODEL, "content_hash": "basehash"},
        "prune": {"method": method, "sparsity": 0.5, "pattern": "2:4", "params": {"alpha": 1.0}},
        "sparsity": {"overall": 0.5, "nm_valid": True},
        "smoke_test": {"ppl": 42.5},
    }
    (folder / "crepe_release.json").write_text(json.dumps(manifest))
    (folder / "README.md").write_text("# card\n")
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


# --- pure helpers ----------------------------------------------------------------------------------------


def test_flatten_dotted_keys_golden():
    nested = {"prune": {"method": "crepe", "params": {"alpha": 1.5}}, "pho": {"top_k": 10}, "tags": [1, 2], "e": {}}
    assert flatten(nested) == {"prune.method": "crepe", "prune.params.alpha": 1.5, "pho.top_k": 10,
                               "tags": [1, 2], "e": {}}
    assert flatten({"ppl": {"test": 1.0}}, "/") == {"ppl/test": 1.0}


def test_param_items_render_truncate_and_sanitise():
    long = "x" * 7000
    items, truncated = param_items({"a": {"b": None, "c": True, "d": [1, "2"]}, "s": "2:4", "long": long,
                                    "bad key!": 1, "k" * 300: 2})
    assert items["a.b"] == "null" and items["a.c"] == "true" and items["a.d"] == '[1, "2"]' and items["s"] == "2:4"
    assert len(items["long"]) == tracking_values.MAX_PARAM_VALUE and items["long"].endswith(tracking_values.TRUNCATED)
    assert truncated == ["long"]
    assert items["bad key_"] == "1"
    (long_key,) = [k for k in items if k.startswith("kkk")]
    assert len(long_key) == tracking_values.MAX_KEY
    assert safe_key("/a//b..c") == "a/b.c"


def test_metric_items_skip_none_and_nonfinite():
    items, nonfinite = metric_items({"ppl": {"test": 12.5, "validation": math.nan, "x": None},
                                     "sparsity": 0.5, "ok": True, "name": "text", "inf": math.inf})
    assert items == {"ppl/test": 12.5, "sparsity": 0.5, "ok": 1.0}
    assert sorted(nonfinite) == ["inf", "ppl/validation"]


def test_pattern_label_and_slug_and_run_key():
    assert pattern_label("0.5") == pattern_label(0.5) == pattern_label("50%") == "50%"
    assert pattern_label("2:4") == "2:4"
    assert tracking_values.model_slug(MODEL) == "smollm2-135m"
    assert tracking_values.model_slug("hf:org/name@rev") == "org-name"
    assert tracking_values.model_slug("/some/where/folder") == "folder"
    assert tracking_values.run_key({"a": 1, "b": 2}) == tracking_values.run_key({"b": 2, "a": 1})
    assert tracking_values.run_key({"a": 1}) != tracking_values.run_key({"a": 2})


def test_default_uri_relative_sqlite_and_template(tmp_path):
    t = open_tracker(None, tmp_path, enabled=False)
    assert t.uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"
    assert t.artifact_root == tmp_path.resolve() / "mlartifacts"
    rel = open_tracker("sqlite:///sub/x.db", tmp_path, enabled=False)
    assert rel.sqlite_path == tmp_path.resolve() / "sub" / "x.db"
    assert open_tracker("sqlite:////abs/y.db", tmp_path, enabled=False).uri == "sqlite:////abs/y.db"
    assert open_tracker(None, tmp_path, enabled=False).experiment_name(MODEL) == "crepe-smollm2-135m"
    assert open_tracker(None, tmp_path, enabled=False, experiment="crepe/{spec}").experiment_name(MODEL) == f"crepe/{MODEL}"
    with pytest.raises(CrepeError, match="template"):
        open_tracker(None, tmp_path, experiment="crepe-{modle}")


# --- parent runs ---------------------------------------------------------------------------------------------


def test_pipeline_run_tags_params_and_artifacts(tracker, tmp_path):
    params = {"model": {"spec": MODEL}, "prune": {"method": "crepe", "sparsity": "2:4"}, "pho": {"top_k": 3},
              "notes": "n" * 7000}
    with tracker.pipeline_run(MODEL, "pipe", params, {"owner": "me"}, model_hash="mh", method="crepe",
                              data_hashes={"calibration": "cal-sha", "evaluation": "ev-sha"}, pattern="2:4") as ref:
        assert ref.active and not ref.resumed
        tracker.log_metrics(ref, {"ppl": {"test": 12.0, "validation": 13.0}, "zero_shot": {"boolq": {"acc": 0.6}},
                                  "sparsity": {"overall": 0.5}, "time": {"prune": 3.0}})
    run = run_of(tracker, ref)
    assert run.info.status == "FINISHED" and run.info.run_name == "pipe"
    tags = run.data.tags
    code = crepe.provenance.code_version()
    assert tags["crepe.version"] == crepe.__version__
    assert tags["crepe.source_sha256"] == code["source_sha256"]
    if code.get("git_sha"):
        assert tags["crepe.git_sha"] == tags["mlflow.source.git.commit"] == code["git_sha"]
    assert tags["crepe.model"] == MODEL and tags["crepe.model_hash"] == "mh"
    assert tags["crepe.data.calibration"] == "cal-sha" and tags["crepe.data.evaluation"] == "ev-sha"
    assert tags["crepe.pattern"] == "2:4" and tags["crepe.method"] == "crepe" and tags["crepe.kind"] == "pipeline"
    assert tags["owner"] == "me" and tags["crepe.truncated_params"] == "notes"
    assert run.data.params["prune.sparsity"] == "2:4" and run.data.params["pho.top_k"] == "3"
    assert len(run.data.params["notes"]) == tracking_values.MAX_PARAM_VALUE
    assert run.data.metrics == {"ppl/test": 12.0, "ppl/validation": 13.0, "zero_shot/boolq/acc": 0.6,
                                "sparsity/overall": 0.5, "time/prune": 3.0}
    # the experiment is the model's, with artifacts under the project (never the working directory)
    exp = tracker.client.get_experiment(ref.experiment_id)
    assert exp.name == "crepe-smollm2-135m"
    assert exp.artifact_location.startswith(tracker.artifact_root.as_uri())
    assert artifact_paths(tracker, ref.run_id) == {"config/params.json"}
    local = Path(run.info.artifact_uri.removeprefix("file://")) / "config" / "params.json"
    assert json.loads(local.read_text()) == params  # the untruncated config
    assert list(Path.cwd().iterdir()) == []


def test_large_batches_rely_on_mlflow_splitting(tracker):
    """250 params, 150 tags and 1,200 metrics in one call each: MlflowClient.log_batch splits them into
    the store's limits (100 params/tags, 1,000 metrics per batch) itself; nothing is lost."""
    params = {"p": {f"k{i:03d}": i for i in range(250)}}
    with tracker.pipeline_run(MODEL, "big", params) as ref:
        tracker.set_tags(ref, {f"t{i:03d}": i for i in range(150)})
        tracker.log_metrics(ref, {"m": {f"x{i:04d}": float(i) for i in range(1200)}})
    data = run_of(tracker, ref).data
    assert len(data.params) == 250 and data.params["p.k249"] == "249"
    assert sum(k.startswith("t") for k in data.tags) == 150 and data.tags["t149"] == "149"
    assert len(data.metrics) == 1200 and data.metrics["m/x1199"] == 1199.0


def test_set_lineage_after_start(tracker):
    with tracker.pipeline_run(MODEL, "late") as ref:
        tracker.set_lineage(ref, model_hash="later", data_hashes={"calibration": "c"}, pattern=0.5)
    tags = run_of(tracker, ref).data.tags
    assert tags["crepe.model_hash"] == "later" and tags["crepe.data.calibration"] == "c"
    assert tags["crepe.pattern"] == "50%"


def test_pipeline_run_failure_and_interrupt_set_status(tracker):
    with pytest.raises(ValueError, match="boom"):
        with tracker.pipeline_run(MODEL, "fails") as failed:
            raise ValueError("boom\nsecond line")
    run = run_of(tracker, failed)
    assert run.info.status == "FAILED" and run.data.tags["crepe.error"] == "boom"
    with pytest.raises(KeyboardInterrupt):
        with tracker.pipeline_run(MODEL, "killed") as killed:
            raise KeyboardInterrupt
    assert run_of(tracker, killed).info.status == "KILLED"


def test_run_key_reopens_an_unfinished_run_only(tracker):
    key = tracking_values.run_key({"config": 1})
    params = {"prune": {"sparsity": "2:4"}}
    with pytest.raises(RuntimeError):
        with tracker.pipeline_run(MODEL, "first", params, run_key=key) as first:
            raise RuntimeError("crash")
    with tracker.pipeline_run(MODEL, "again", params, run_key=key) as second:
        assert second.resumed and second.run_id == first.run_id
    run = run_of(tracker, second)
    assert run.info.status == "FINISHED" and run.data.tags["crepe.resumed"] == "true"
    with tracker.pipeline_run(MODEL, "third", params, run_key=key) as third:
        assert not third.resumed and third.run_id != first.run_id  # a finished run is never reopened
    # a reopened run refuses a different configuration for the same param
    with pytest.raises(CrepeError, match="prune.sparsity"):
        tracker.log_params(third, {"prune": {"sparsity": "4:8"}})


# --- nested runs ----------------------------------------------------------------------------------------------


def test_log_search_nested_runs_metrics_artifacts(tracker, tmp_path):
    pho = write_pho(tmp_path / "search")
    with tracker.pipeline_run(MODEL, "search", kind="search", pattern="2:4", method="crepe") as ref:
        counts = tracker.log_search(ref, pho)
    assert counts == {"trials": 4, "candidates": 3, "skipped": 0}
    kids = children(tracker, ref)
    trials = sorted((r for r in kids if r.data.tags["crepe.kind"] == "trial"), key=lambda r: r.info.run_name)
    cands = sorted((r for r in kids if r.data.tags["crepe.kind"] == "candidate"), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in trials] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert [r.info.run_name for r in cands] == ["candidate-00", "candidate-01", "candidate-02"]
    assert all(r.info.status == "FINISHED" for r in kids)
    t2 = trials[2]
    assert t2.data.params == {"alpha": "1.0", "beta": "1.0", "gamma": "0.001", "kernel_size": "9"}
    assert t2.data.metrics == {"gini_pruned": 0.48, "gini_retained": 0.4, "outlier": 0.01, "seconds": 0.30000000000000004,
                               "cpu_seconds": 0.15000000000000002}
    assert t2.data.tags["crepe.model"] == MODEL and t2.data.tags["crepe.pattern"] == "2:4"  # inherited
    winner = cands[1]
    assert winner.data.tags["crepe.winner"] == "true" and cands[0].data.tags["crepe.winner"] == "false"
    assert winner.data.metrics["validation_ppl"] == 30.0 and winner.data.metrics["gini_pruned"] == 0.48
    assert "validation_ppl" not in cands[2].data.metrics and cands[2].data.tags["crepe.ppl_raw"] == "nan"
    parent = run_of(tracker, ref)
    assert json.loads(parent.data.tags["crepe.pho.winner"]) == json.loads(json.dumps(winner_params(pho)))
    assert parent.data.tags["crepe.pho.pattern"] == "2:4" and parent.data.tags["crepe.pho.model"] == MODEL
    m = parent.data.metrics
    assert m["pho/validation_ppl"] == 30.0 and m["pho/test_ppl"] == 28.0 and m["pho/winner/alpha"] == 1.0
    assert m["pho/totals/n_trials"] == 4 and "pho/ria_validation_ppl" not in m
    assert artifact_paths(tracker, ref.run_id) == {"search/pho.json", "plots/screening.png"}


def winner_params(pho: Path) -> dict:
    return json.loads(pho.read_text())["final"]["params"]


def test_log_search_twice_and_incremental_logging_do_not_duplicate(tracker, tmp_path):
    pho = write_pho(tmp_path / "s")
    summary = json.loads(pho.read_text())
    with tracker.pipeline_run(MODEL, "incremental") as ref:
        first_trial = tracker.log_trial(ref, summary["trials"][0])  # as a running search would
        first_cand = tracker.log_candidate(ref, summary["verified"][0])
        assert tracker.log_trial(ref, summary["trials"][0]) == first_trial
        assert tracker.log_search(ref, pho) == {"trials": 3, "candidates": 2, "skipped": 2}
        assert tracker.log_search(ref, pho) == {"trials": 0, "candidates": 0, "skipped": 7}
    kids = children(tracker, ref)
    assert len(kids) == 7
    keys = tracker.child_keys(ref)
    assert keys[tracking_search.trial_key(summary["trials"][0])] == first_trial
    assert keys[tracking_search.candidate_key(summary["verified"][0])] == first_cand
    # a resumed pipeline (same run_key) logging the same search: still one nested run each
    key = tracking_values.run_key("resume")
    with pytest.raises(RuntimeError):
        with tracker.pipeline_run(MODEL, "killed", run_key=key) as a:
            tracker.log_search(a, pho)
            raise RuntimeError("killed")
    with tracker.pipeline_run(MODEL, "resumed", run_key=key) as b:
        assert b.run_id == a.run_id
        assert tracker.log_search(b, pho)["skipped"] == 7
    assert len(children(tracker, b)) == 7


def test_log_search_refuses_a_second_different_search(tracker, tmp_path):
    with tracker.pipeline_run(MODEL, "one") as ref:
        tracker.log_search(ref, write_pho(tmp_path / "a", "2:4"))
        with pytest.raises(CrepeError, match="different PHO search"):
            tracker.log_search(ref, write_pho(tmp_path / "b", "4:8"))


def test_load_pho_rejects_non_summaries(tmp_path):
    with pytest.raises(CrepeError, match="does not exist"):
        tracking_search.load_pho(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CrepeError, match="not valid JSON"):
        tracking_search.load_pho(bad)
    bad.write_text(json.dumps({"trials": [{"params": {}}]}))
    with pytest.raises(CrepeError, match="index"):
        tracking_search.load_pho(bad)


# --- manifests, registry ----------------------------------------------------------------------------------------


def test_log_manifest_metrics():
    assert tracking_values.manifest_metrics({"prune": {"overall_sparsity": 0.5}, "evaluation": {"ppl": 9.0, "split": "test"}}) \
        == {"sparsity/overall": 0.5, "ppl/test": 9.0}
    assert tracking_values.manifest_metrics({"sparsity": {"overall": 0.5}, "smoke_test": {"ppl": 3.0},
                                      "metrics": {"ppl": {"value": 7.0}}}) \
        == {"sparsity/overall": 0.5, "ppl/smoke": 3.0, "metrics": {"ppl": {"value": 7.0}}}


def test_register_release_points_at_folder_with_alias_and_tags(tracker, tmp_path):
    release = write_release(tmp_path / "data" / "release")
    with tracker.pipeline_run(MODEL, "release") as ref:
        logged = tracker.log_manifest(ref, release / "crepe_release.json")
        out = tracker.register_release(release, "crepe-smollm2-135m-2of4", "candidate", ref, dvc_path="data/release")
    assert logged == {"sparsity/overall": 0.5, "ppl/smoke": 42.5}
    assert out["version"] == "1" and out["created"] and out["source"] == release.resolve().as_uri()
    version = tracker.model_version("crepe-smollm2-135m-2of4", "candidate")
    assert version["version"] == "1" and version["source"] == release.resolve().as_uri()
    assert version["run_id"] == ref.run_id
    tags = version["tags"]
    assert tags["crepe.sparsity"] == "0.5" and tags["crepe.method"] == "crepe" and tags["crepe.pattern"] == "2:4"
    assert tags["crepe.model_hash"] == "basehash" and tags["crepe.dvc_path"] == "data/release"
    assert tags["crepe.release_path"] == str(release.resolve())
    # the run holds a pointer, never the weights
    files = artifact_paths(tracker, ref.run_id)
    assert files == {"release/crepe_release.json", "release/README.md", "release/pointer.json",
                     "manifest/crepe_release.json"}
    # registering again (a resumed pipeline) reuses the version and moves a new alias to it
    again = tracker.register_release(release, "crepe-smollm2-135m-2of4", "production")
    assert again["version"] == "1" and not again["created"]
    assert tracker.model_version("crepe-smollm2-135m-2of4", "production")["version"] == "1"
    assert tracker.model_version("crepe-smollm2-135m-2of4", "nope") is None
    # a changed release is a new version; the alias follows it
    (release / "crepe_release.json").write_text(json.dumps({"prune": {"method": "ria"}}))
    assert tracker.register_release(release, "crepe-smollm2-135m-2of4", "candidate")["version"] == "2"
    assert tracker.model_version("crepe-smollm2-135m-2of4", "candidate")["version"] == "2"
    assert tracker.model_version("crepe-smollm2-135m-2of4", "production")["version"] == "1"


def test_register_release_bad_input(tracker, tmp_path):
    with pytest.raises(CrepeError, match="has no crepe_release.json"):
        tracker.register_release(tmp_path, "m", "candidate")
    release = write_release(tmp_path / "rel")
    for alias in ("latest", "v3", "bad alias"):
        with pytest.raises(CrepeError, match="alias"):
            tracker.register_release(release, "m", alias)


# --- transfer lookup -------------------------------------------------------------------------------------------


def test_best_config_lowest_validation_ppl_for_model_and_pattern(tracker, tmp_path):
    def search(model: str, sparsity: str, ppl: float, shift: float, fail: bool = False) -> str:
        pho = write_pho(tmp_path / f"{model[-4:]}-{sparsity.replace(':', '')}-{ppl}", sparsity, model, ppl, shift)
        if fail:
            with pytest.raises(RuntimeError):
                with tracker.pipeline_run(model, "crashed", kind="search") as ref:
                    tracker.log_search(ref, pho, artifacts=False)
                    raise RuntimeError("x")
        else:
            with tracker.pipeline_run(model, "s", kind="search") as ref:
                tracker.log_search(ref, pho, artifacts=False)
        return ref.run_id

    search(MODEL, "2:4", 40.0, 0.0)
    best_id = search(MODEL, "2:4", 25.0, 0.1)
    search(MODEL, "2:4", 10.0, 0.2, fail=True)  # not finished: never picked
    search(MODEL, "4:8", 5.0, 0.3)  # other pattern
    search(OTHER, "2:4", 1.0, 0.4)  # other model
    search(MODEL, "0.5", 20.0, 0.5)
    best = tracker.best_config(MODEL, "2:4")
    assert best["run_id"] == best_id and best["validation_ppl"] == 25.0 and best["test_ppl"] == 23.0
    assert best["params"] == {"alpha": 1.1, "beta": 1.0, "gamma": 0.001, "kernel_size": 9}
    assert best["model"] == MODEL and best["pattern"] == "2:4" and best["experiment"] == "crepe-smollm2-135m"
    assert tracker.best_config(MODEL, "4:8")["validation_ppl"] == 5.0
    assert tracker.best_config(MODEL, "50%")["validation_ppl"] == 20.0
    assert tracker.best_config(OTHER, "2:4")["validation_ppl"] == 1.0
    assert tracker.best_config(OTHER, "4:8") is None
    assert tracker.best_config("embedded:unknown", "2:4") is None
    assert tracker.client.get_experiment_by_name("crepe-unknown") is None  # a lookup creates nothing


def test_log_transfer_table(tracker, tmp_path):
    rows = [{"source": MODEL, "target": OTHER, "pattern": "2:4", "ria_ppl": 30.12345, "transfer_ppl": 28.5,
             "params": {"alpha": 1.0}},
            {"source": MODEL, "target": MODEL, "pattern": "4:8", "ria_ppl": 20.0, "transfer_ppl": None}]
    with tracker.pipeline_run(OTHER, "transfer", kind="transfer") as ref:
        md = tracker.log_transfer_table(ref, rows, tmp_path / "docs" / "transfer.md")
        csv = tracker.log_transfer_table(ref, rows, tmp_path / "transfer.csv")
    text = md.read_text()
    assert text.splitlines()[0] == "| source | target | pattern | ria_ppl | transfer_ppl | params |"
    assert text.splitlines()[1] == "|---|---|---|---:|---:|---|"
    assert "| 30.1234 | 28.5000 |" in text and '{"alpha":1.0}' in text and "| - |" in text
    assert csv.read_text().splitlines()[0] == "source,target,pattern,ria_ppl,transfer_ppl,params"
    assert artifact_paths(tracker, ref.run_id) == {"transfer/transfer.md", "transfer/transfer.json",
                                                   "transfer/transfer.csv"}
    # the rows as an MLflow table (log_table's split format), once although two formats were logged
    local = Path(run_of(tracker, ref).info.artifact_uri.removeprefix("file://")) / "transfer" / "transfer.json"
    table = json.loads(local.read_text())
    assert table["columns"] == ["source", "target", "pattern", "ria_ppl", "transfer_ppl", "params"]
    assert [row[3] for row in table["data"]] == [30.12345, 20.0]
    with pytest.raises(CrepeError, match=r"\.md, \.csv or \.json"):
        tracker.log_transfer_table(ref, rows, tmp_path / "t.txt")


# --- disabled, bad stores -----------------------------------------------------------------------------------------


def test_disabled_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = open_tracker(None, tmp_path / "p", enabled=False)
    assert isinstance(t, NullTracker)
    public = {n for n in dir(MlflowTracker) if not n.startswith("_")}
    assert public - set(dir(NullTracker)) == set()  # the null tracker answers every call the real one does
    t.check()
    with t.pipeline_run(MODEL, "off", {"a": 1}) as ref:
        assert not ref.active
        assert t.log_metrics(ref, {"x": 1.0}) == {} and t.log_params(ref, {"a": 1}) == {}
        assert t.log_search(ref, write_pho(tmp_path / "s")) == {"trials": 0, "candidates": 0, "skipped": 0}
        assert t.log_trial(ref, {"index": 0, "params": {}}) is None
        assert t.register_release(write_release(tmp_path / "rel"), "m") is None
        out = t.log_transfer_table(ref, [{"a": 1}], tmp_path / "t.json")
    assert json.loads(out.read_text()) == [{"a": 1}]  # the table file is still written
    assert not (tmp_path / "p").exists()
    with pytest.raises(CrepeError, match="tracking.enabled"):
        t.best_config(MODEL, "2:4")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_unreachable_http_server_fails_fast_in_one_sentence(tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    t = open_tracker(uri, tmp_path)
    assert isinstance(t, MlflowTracker)
    assert t.remote
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's default 7 retries would take minutes
    with pytest.raises(CrepeError) as err:
        t.check()
    msg = str(err.value)
    assert uri in msg and "cannot reach" in msg and "\n" not in msg


@pytest.mark.timeout(60)
def test_silent_http_server_fails_after_the_probe_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_store, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as server:  # accepts connections (kernel backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(CrepeError, match="does not answer HTTP") as err:
            MlflowTracker(uri, tmp_path).check()
    assert uri in str(err.value)


def test_unwritable_sqlite_path_fails_in_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    with pytest.raises(CrepeError) as err:
        MlflowTracker(uri, tmp_path).check()
    assert uri in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CrepeError, match="in-memory"):
        MlflowTracker("sqlite:///:memory:", tmp_path).check()


def test_deleted_experiment_is_reported(tracker):
    exp_id = tracker.experiment_id(OTHER)
    tracker.client.delete_experiment(exp_id)
    fresh = MlflowTracker(tracker.uri, tracker.project_root)
    with pytest.raises(CrepeError, match="was deleted"):
        with fresh.pipeline_run(OTHER, "x"):
            pass


# --- architecture rule ----------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_orchestration_packages():
    """crepe/ imports none of mlflow, prefect, dvc; flows/ leaves MLflow to tasks/ (the only MLflow user)."""
    offenders = [f"{p.relative_to(REPO)} imports {bad}" for p in sorted((REPO / "crepe").rglob("*.py"))
                 for bad in sorted(_imports(p) & {"mlflow", "prefect", "dvc"})]
    offenders += [f"{p.relative_to(REPO)} imports mlflow" for p in sorted((REPO / "flows").rglob("*.py"))
                  if "mlflow" in _imports(p)]
    assert offenders == []
    assert "mlflow" in _imports(REPO / "tasks" / "tracking_mlflow.py")  # the one MLflow caller


def test_tracking_off_never_imports_mlflow():
    """open_tracker decides once: with tracking off, MLflow (about 1.4 s to import) is never loaded."""
    code = ("import sys; from tasks.tracking import open_tracker; "
            "t = open_tracker(None, sys.argv[1], enabled=False); t.check(); "
            "assert type(t).__name__ == 'NullTracker' and 'mlflow' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(REPO / "nonexistent")], cwd=REPO, check=True)


# --- crepe ui ----------------------------------------------------------------------------------------------------------


def test_ui_command_is_localhost_only(tmp_path):
    cmd = tracking_store.ui_command("sqlite:////x/mlflow.db", 5123, tmp_path / "art", python="py")
    assert cmd[:3] == ["py", "-m", "mlflow"] and cmd[3] == "ui"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == "sqlite:////x/mlflow.db"
    assert cmd[cmd.index("--artifacts-destination") + 1] == (tmp_path / "art").resolve().as_uri()


def test_cli_ui_arguments(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    started: list[list[str]] = []

    real_popen = subprocess.Popen

    class FakeProcess:
        pid = -1

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    def fake_popen(cmd, **kwargs):
        if "mlflow" not in cmd:  # other processes (e.g. ctypes' library lookup during imports) run for real
            return real_popen(cmd, **kwargs)
        started.append(cmd)
        assert kwargs.get("start_new_session") is True
        return FakeProcess()

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    assert main(["ui", "--project", str(tmp_path), "--port", str(_closed_port())]) == 0
    out = capsys.readouterr().out
    (cmd,) = started
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "http://127.0.0.1:" in out and "does not exist yet" in out

    # a remote tracking server serves its own UI: nothing is started
    assert main(["ui", "--uri", "http://example.invalid:5000"]) == 0
    assert len(started) == 1 and "serves the MLflow UI itself" in capsys.readouterr().out

    # bad ports: argparse's exit 2; a port in use: one sentence, exit 2
    for bad in ("0", "70000", "http"):
        with pytest.raises(SystemExit) as exc:
            main(["ui", "--port", bad])
        assert exc.value.code == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        capsys.readouterr()
        assert main(["ui", "--project", str(tmp_path), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert len(started) == 1
