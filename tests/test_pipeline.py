"""The Prefect pipeline (issue 4 §2-4, §8-9): content-hash caching, kill -9 and resume, CLI checks.

Everything runs on the tiny local LLaMA of tests/local_models.py with pydoc data. Each test gets its
own project folder (params.yaml, work folder, result storage, release); the in-process tests share one
``prefect_test_harness`` per module, the subprocess tests one ``PREFECT_HOME`` per session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crepe.io import sha256_file
from tests.local_models import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
PARAMS = """\
model: {{spec: {model}}}
data: {{calib_source: pydoc, eval_source: pydoc}}
calibration: {{samples: 4, seqlen: 32, batch_size: 4}}
prune: {{sparsity: "2:4"}}
pho: {{n_trials: 4, top_k: 2, verify_max_windows: 2}}
eval: {{ppl: {{seqlen: 32, max_windows: 4}}}}
tracking: {{enabled: {tracking}}}
release: {{register_model: {tracking}}}
runner: {{max_workers: 1{runner}}}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("pipeline-model") / "tiny")


def make_project(folder: Path, model: Path, tracking: bool = False, runner: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".git").mkdir(exist_ok=True)  # marks the project root
    (folder / "params.yaml").write_text(PARAMS.format(model=model, tracking=str(tracking).lower(), runner=runner))
    return folder


def release_hashes(project: Path) -> dict[str, str]:
    """sha256 of every file of the release folder, the manifest included."""
    folder = project / "data" / "release"
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def computed(log: Path) -> list[str]:
    """Names of the task bodies that started (``name<TAB>pid`` lines; finished ones add seconds and end time)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [fields[0] for fields in (line.split("\t") for line in lines) if len(fields) == 2]


# --- in process: cache hits and misses -------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def project(tmp_path: Path, tiny_model: Path, harness, monkeypatch: pytest.MonkeyPatch):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    proj = make_project(tmp_path / "proj", tiny_model)
    monkeypatch.setenv("CREPE_TASK_LOG", str(tmp_path / "computed.txt"))
    monkeypatch.delenv("CREPE_WORK_DIR", raising=False)
    threads = torch.get_num_threads()
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "storage")}):
        yield proj
    torch.set_num_threads(threads)


def run_flow(project: Path, *overrides: str) -> dict:
    from flows.pipeline import pipeline

    return pipeline(str(project / "params.yaml"), list(overrides))


def test_second_run_is_fully_cached(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "computed.txt"
    first = run_flow(project)
    assert sorted(set(computed(log))) == sorted({"calibration-windows", "pho-screen", "verify-candidate",
                                                 "search-summary", "final-prune", "evaluate", "release"})
    assert computed(log).count("verify-candidate") == 3  # top_k = 2, plus the RIA point
    log.unlink()
    capsys.readouterr()
    second = run_flow(project)
    out = capsys.readouterr().out
    assert computed(log) == []
    for name in ("calibration-windows", "pho-screen", "verify-candidate[0]", "final-prune", "evaluate", "release"):
        assert f"[crepe] reused cached {name}" in out
    assert second["release"] == first["release"]
    assert second["evaluation"] == first["evaluation"]


def test_relevant_change_misses_irrelevant_hits(project: Path, tmp_path: Path) -> None:
    log = tmp_path / "computed.txt"
    run_flow(project)
    log.unlink()
    # eval.zero_shot is off, so its batch size cannot change any result: prune/evaluate stay cached
    run_flow(project, "eval.zero_shot.batch_size=2")
    assert "final-prune" not in computed(log) and "evaluate" not in computed(log)
    assert "release" in computed(log)  # the manifest records the full config
    log.unlink()
    run_flow(project, "prune.sparsity=0.5")
    got = computed(log)
    assert "calibration-windows" not in got  # the windows depend on calibration settings only
    assert {"pho-screen", "verify-candidate", "final-prune", "evaluate", "release"} <= set(got)


def _release_tensors(project: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted((project / "data" / "release").glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_model_over_max_memory_is_streamed_with_the_same_release(
    project: Path, tmp_path: Path, tiny_model: Path
) -> None:
    """model.max_memory below the model: final-prune, evaluate and release read one block at a time from
    the shards and give the in-memory run's weights, sparsity and perplexities; PHO refuses in one sentence."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from crepe.errors import CrepeError
    from crepe.shards import Checkpoint

    size = Checkpoint(tiny_model).nbytes()
    cap = f"{int(size * 0.8)}B"  # above the tensors outside the blocks plus one block, below the model
    streamed = run_flow(project, "pho.enabled=false", f"model.max_memory={cap}")
    other = make_project(tmp_path / "in-memory", tiny_model)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "storage-2")}):
        in_memory = run_flow(other, "pho.enabled=false")
    assert streamed["evaluation"] == in_memory["evaluation"]
    a, b = _release_tensors(project), _release_tensors(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shards = lambda proj: len(list((proj / "data" / "release").glob("*.safetensors")))  # noqa: E731
    assert (shards(project), shards(other)) == (3, 1)  # streamed: one shard outside the blocks + one per block
    release = json.loads((project / "data" / "release" / "crepe_release.json").read_text())
    reference = json.loads((other / "data" / "release" / "crepe_release.json").read_text())
    assert release["sparsity"] == reference["sparsity"] and release["smoke_test"]["ppl"] == reference["smoke_test"]["ppl"]
    with pytest.raises(CrepeError, match="PHO keeps the whole model and a dense copy in memory"):
        run_flow(project, f"model.max_memory={cap}")


def test_ignored_weights_are_released_dense_and_reported(project: Path) -> None:
    from tasks.verify import verify_release

    run_flow(project, "pho.enabled=false", r"prune.ignore=mlp\.down_proj$")
    folder = project / "data" / "release"
    record = json.loads((folder / "crepe_release.json").read_text())
    skipped = record["prune"]["skipped"]
    assert {row["name"] for row in skipped} == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert all(not layer["name"].endswith("down_proj") for layer in record["sparsity"]["layers"])
    card = (folder / "README.md").read_text()
    assert "- Left dense: 2 block weight matrices (2 excluded by ignore)" in card
    assert "- Pruned weight kinds: linear 12 matrices at 0.5000." in card
    assert verify_release(folder, quick_ppl=False)["layers_checked"] == 12


def test_calibration_change_misses_everything_downstream(project: Path, tmp_path: Path) -> None:
    log = tmp_path / "computed.txt"
    run_flow(project, "pho.enabled=false")
    log.unlink()
    run_flow(project, "pho.enabled=false", "calibration.seed=1")
    assert {"calibration-windows", "final-prune", "evaluate", "release"} <= set(computed(log))


def test_removed_release_is_rewritten(project: Path) -> None:
    import shutil

    first = run_flow(project, "pho.enabled=false")
    shutil.rmtree(first["release"]["path"])
    second = run_flow(project, "pho.enabled=false")
    assert (Path(second["release"]["path"]) / "crepe_release.json").is_file()
    assert second["release"]["manifest_sha256"] == first["release"]["manifest_sha256"]


def test_cache_keys_ignore_paths_and_follow_sections(project: Path) -> None:
    from tasks.config import load_config
    from tasks.keys import content_key
    from tasks.keys import strip_paths as _strip_paths

    class Ctx:
        class task:  # noqa: N801 - mimics prefect's TaskRunContext.task
            name = "t"

    fn = content_key(("prune",), ("model",))
    cfg = load_config(project / "params.yaml")
    a = fn(Ctx, {"cfg": cfg, "model": {"path": "/a", "sha256": "x"}})
    assert a == fn(Ctx, {"cfg": cfg, "model": {"path": "/b", "sha256": "x"}})
    assert a != fn(Ctx, {"cfg": cfg, "model": {"path": "/a", "sha256": "y"}})
    assert a == fn(Ctx, {"cfg": load_config(project / "params.yaml", ["pho.n_trials=6"]), "model": {"sha256": "x"}})
    assert a != fn(Ctx, {"cfg": load_config(project / "params.yaml", ["prune.sparsity=4:8"]), "model": {"sha256": "x"}})
    assert _strip_paths({"path": 1, "x": [{"path": 2, "y": 3}]}) == {"x": [{"y": 3}]}


# --- subprocess: kill -9 in the middle of top-k verification, then resume -----------------------------------

LAUNCHER = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from crash import sigkill_on_call
import tasks.pho
import tasks.prune
kill_at = int(os.environ.get("CREPE_KILL_AT_CANDIDATE", "0"))
if kill_at:
    tasks.pho.evaluate_candidate = sigkill_on_call(tasks.pho.evaluate_candidate, kill_at)
if os.environ.get("CREPE_KILL_IN_PRUNE"):
    tasks.prune.prune_loaded = sigkill_on_call(tasks.prune.prune_loaded, 1)
if __name__ == "__main__":  # Dask's spawned workers import this file again
    from flows.cli import main
    raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


def crepe_cli(project: Path, prefect_home: Path, *args: str, kill_at: int = 0, log: Path | None = None,
              timeout: float = 240, kill_in_prune: bool = False,
              env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    launcher = project.parent / "launch.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_LOCAL_STORAGE_PATH": str(project / "storage"),
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "CREPE_KILL_AT_CANDIDATE": str(kill_at),
           "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    env.pop("CREPE_WORK_DIR", None)
    if kill_in_prune:
        env["CREPE_KILL_IN_PRUNE"] = "1"
    env.update(env_extra or {})
    if log is not None:
        env["CREPE_TASK_LOG"] = str(log)
    out, err = project.parent / "stdout.txt", project.parent / "stderr.txt"
    # Files, not pipes: after a kill -9 the orphaned ephemeral Prefect server would hold a pipe open.
    # A new session, so that whatever the run leaves behind is stopped with its process group.
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(launcher), *args], cwd=project, env=env, stdout=fo, stderr=fe,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, rc, out.read_text(), err.read_text())

@pytest.mark.slow  # three pipeline processes, ~50 s on 2 shared cores
def test_kill_during_verification_then_resume(tmp_path: Path, tiny_model: Path, prefect_home: Path) -> None:
    clean = make_project(tmp_path / "clean", tiny_model)
    done = crepe_cli(clean, prefect_home, "pipeline")
    assert done.returncode == 0, done.stderr[-3000:]

    proj = make_project(tmp_path / "crashed", tiny_model)
    log = tmp_path / "computed.txt"
    killed = crepe_cli(proj, prefect_home, "pipeline", kill_at=2, log=log)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert computed(log).count("verify-candidate") == 2  # the first finished, the second died mid-way
    assert not (proj / "data" / "release").exists()
    log.unlink()

    resumed = crepe_cli(proj, prefect_home, "pipeline", log=log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = computed(log)
    assert "calibration-windows" not in got and "pho-screen" not in got
    assert got.count("verify-candidate") == 2  # the finished candidate was reused
    for name in ("calibration-windows", "pho-screen", "verify-candidate[0]"):
        assert f"[crepe] reused cached {name}" in resumed.stdout
    assert release_hashes(proj) == release_hashes(clean)


@pytest.mark.slow  # three pipeline processes, ~35 s
def test_kill_during_final_prune_then_resume(tmp_path: Path, tiny_model: Path, prefect_home: Path) -> None:
    clean = make_project(tmp_path / "clean", tiny_model)
    assert crepe_cli(clean, prefect_home, "pipeline", "-S", "pho.enabled=false").returncode == 0
    proj = make_project(tmp_path / "crashed", tiny_model)
    log = tmp_path / "computed.txt"
    killed = crepe_cli(proj, prefect_home, "pipeline", "-S", "pho.enabled=false", kill_in_prune=True, log=log)
    assert killed.returncode == -9 and computed(log) == ["calibration-windows", "final-prune"]
    assert not any((proj / ".crepe" / "work" / "pruned").glob("*/model.safetensors"))  # nothing half-written
    log.unlink()
    resumed = crepe_cli(proj, prefect_home, "pipeline", "-S", "pho.enabled=false", log=log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "calibration-windows" not in computed(log) and "final-prune" in computed(log)
    assert "[crepe] reused cached calibration-windows" in resumed.stdout
    assert release_hashes(proj) == release_hashes(clean)


def test_cli_errors_are_one_line(tmp_path: Path, tiny_model: Path, prefect_home: Path) -> None:
    proj = make_project(tmp_path / "p", tiny_model, runner=", backend: dask, dask_address: 'tcp://127.0.0.1:9'")
    res = crepe_cli(proj, prefect_home, "pipeline")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "tcp://127.0.0.1:9" in res.stderr and "unreachable" in res.stderr
    res = crepe_cli(proj, prefect_home, "schedule", "--cron", "0 3 * *")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cron" in res.stderr
    res = crepe_cli(proj, prefect_home, "pipeline", "-S", f"model.spec={tmp_path / 'missing'}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "missing does not exist" in res.stderr
    res = crepe_cli(proj, prefect_home, "pipeline", "-S", "runner.backend=thread", "-S", "runner.dask_address=null",
                    env_extra={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "PREFECT_API_URL" in res.stderr
    res = crepe_cli(proj, prefect_home, "pipeline", "-S", "prune.sparsty=0.5")
    assert res.returncode == 2 and "prune.sparsty" in res.stderr and res.stderr.count("\n") == 1


def test_unreachable_mlflow_fails_fast(tmp_path: Path, tiny_model: Path, prefect_home: Path) -> None:
    proj = make_project(tmp_path / "p", tiny_model, tracking=True)
    res = crepe_cli(proj, prefect_home, "pipeline", "-S", "tracking.uri=http://127.0.0.1:9", timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "127.0.0.1:9" in res.stderr


@pytest.mark.slow  # a 2-worker Dask LocalCluster (each worker starts its own Prefect client): ~35 s
def test_dask_runner_verifies_candidates_in_parallel_workers(tmp_path: Path, tiny_model: Path,
                                                             prefect_home: Path) -> None:
    proj = make_project(tmp_path / "p", tiny_model, runner=", backend: dask")
    log = tmp_path / "computed.txt"
    res = crepe_cli(proj, prefect_home, "pipeline", "-S", "runner.max_workers=2", log=log)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("\t")[:2] for line in log.read_text().splitlines()]
    flow_pid = next(pid for name, pid in rows if name == "pho-screen")
    workers = {pid for name, pid in rows if name == "verify-candidate"}
    assert len(workers) == 2 and flow_pid not in workers  # the candidates ran on both Dask workers
    assert (proj / "data" / "release" / "crepe_release.json").is_file()
    # the persisted results are shared: the thread runner reuses what the Dask workers computed
    log.unlink()
    res = crepe_cli(proj, prefect_home, "pipeline", "-S", "runner.backend=thread", log=log)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "verify-candidate" not in computed(log) and "final-prune" not in computed(log)


def test_tracking_release_registry_and_transfer(tmp_path: Path, tiny_model: Path, harness,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracked pipeline: parent run with nested trial/candidate runs, a registered release; then
    ``transfer`` takes the recorded best configuration to another pattern, next to the RIA baseline."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import pipeline, transfer
    from tasks.tracking import open_tracker

    proj = make_project(tmp_path / "proj", tiny_model, tracking=True)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    threads = torch.get_num_threads()
    try:
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "storage")}):
            result = pipeline(str(proj / "params.yaml"), [])
            again = pipeline(str(proj / "params.yaml"), [])
            rows = transfer(str(tiny_model), "2:4", [str(tiny_model)], ["4:8"], params=str(proj / "params.yaml"),
                            out="docs/transfer.md")
    finally:
        torch.set_num_threads(threads)
    assert again["tracking"] == result["tracking"]  # a fully cached rerun logs nothing new
    tracker = open_tracker(None, proj)
    client = tracker.client
    parent = client.get_run(result["tracking"]["run_id"])
    assert parent.data.tags["crepe.kind"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.params["prune.sparsity"] == "2:4"
    assert "ppl/test" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted(r.data.tags["crepe.kind"] for r in children)
    assert kinds.count("trial") == 4 and kinds.count("candidate") == 3
    version = tracker.model_version("crepe-tiny-2of4", "candidate")
    assert version is not None and str(result["tracking"]["version"]) == str(version["version"])
    assert [r["config"] for r in rows] == ["ria", f"transfer from {tiny_model} 2:4"]
    assert rows[1]["params"]["alpha"] == result["search"]["winner"]["params"]["alpha"]
    assert all(r["pattern"] == "4:8" and r["test_ppl"] > 0 for r in rows)
    assert "| ria |" in (proj / "docs" / "transfer.md").read_text()


def test_prefect_yaml_deploys_the_pipeline_flow() -> None:
    import importlib

    import yaml

    from flows.cli_ops import check_cron

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    module, _, name = deployment["entrypoint"].partition(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
    assert flow.name == "crepe-pipeline"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert check_cron(deployment["schedules"][0]["cron"]) == "0 3 * * 1"


def test_refinement_runs_in_the_prune_and_is_recorded(project: Path, tmp_path: Path) -> None:
    log = tmp_path / "computed.txt"
    plain = run_flow(project, "pho.enabled=false")
    log.unlink()
    refined = run_flow(project, "pho.enabled=false", "refine.method=dsnot")
    assert "final-prune" in computed(log)  # refine changes the pruned weights: a miss
    assert refined["pruned"]["refined"]["method"] == "dsnot"
    assert refined["pruned"]["sha256"] != plain["pruned"]["sha256"]
    assert refined["pruned"]["prune"]["refine"] == "dsnot"


def test_schedule_serves_the_pipeline_with_the_cron(tmp_path: Path, tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import pipeline as flows_pipeline
    from flows.cli import main

    proj = make_project(tmp_path / "p", tiny_model)
    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_RESULTS_PERSIST_BY_DEFAULT"):
        monkeypatch.delenv(key, raising=False)  # whatever prefect_env sets is undone after the test
    served = {}
    monkeypatch.setattr(flows_pipeline.pipeline, "serve", lambda **kw: served.update(kw))
    monkeypatch.chdir(proj)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: url}):
            assert main(["schedule", "--cron", "0 3 * * 1", "-S", "prune.sparsity=4:8"]) == 0
    finally:
        listener.close()
    assert served["cron"] == "0 3 * * 1"
    assert served["parameters"] == {"params": str(proj / "params.yaml"), "overrides": ["prune.sparsity=4:8"]}


def test_schedule_needs_a_reachable_prefect_server() -> None:
    from crepe.errors import CrepeError
    from flows.cli_ops import check_prefect_api

    with pytest.raises(CrepeError, match="prefect server start"):
        check_prefect_api(None)
    with pytest.raises(CrepeError, match="unreachable"):
        check_prefect_api("http://127.0.0.1:9/api", timeout=1)


def test_search_and_evaluate_flows(project: Path, tmp_path: Path) -> None:
    from flows.pipeline import evaluate_flow, search

    summary = search(str(project / "params.yaml"), [])
    assert summary["n_trials"] == 4 and summary["n_verified"] == 3
    assert json.loads(Path(summary["path"]).read_text())["winner"] == summary["winner"]
    dense = evaluate_flow(str(project / "params.yaml"), [])
    assert dense["ppl"]["ppl"] > 1 and dense["ppl"]["split"] == "test"
    from crepe.errors import CrepeError

    with pytest.raises(CrepeError, match="pho.enabled"):
        search(str(project / "params.yaml"), ["pho.enabled=false"])


def test_cli_refresh_recomputes_cached_tasks(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import main

    log = tmp_path / "computed.txt"
    run_flow(project, "pho.enabled=false")
    log.unlink()
    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_RESULTS_PERSIST_BY_DEFAULT"):
        monkeypatch.delenv(key, raising=False)  # whatever prefect_env sets is undone after the test
    args = ["pipeline", "--params", str(project / "params.yaml"), "-S", "pho.enabled=false"]
    assert main(args) == 0
    assert computed(log) == []
    assert main([*args, "--refresh"]) == 0
    assert {"calibration-windows", "final-prune", "evaluate", "release"} <= set(computed(log))



# --- crepe pipeline --until STEP --export PATH (the DVC stages) ---------------------------------------------


def cli(project: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``crepe pipeline --params params.yaml ARGS`` in process (in the module's harness), run from the project
    folder as DVC runs its stages (relative --export paths land there)."""
    from flows.cli import main

    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_RESULTS_PERSIST_BY_DEFAULT"):
        monkeypatch.delenv(key, raising=False)  # whatever prefect_env sets is undone after the test
    monkeypatch.chdir(project)
    return main(["pipeline", "--params", "params.yaml", *args])


def test_until_steps_export_and_reuse_each_other(project: Path, tmp_path: Path, tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """search -> prune -> evaluate as separate commands (the DVC stages): each computes only its own step,
    reuses the earlier ones, exports what the standalone commands read, and nothing is released or tracked."""
    from crepe.io import sha256_folder
    from tasks.params_file import load_params_file
    from tasks.verify import verify_release

    log, data = tmp_path / "computed.txt", project / "data"
    assert cli(project, monkeypatch, "--until", "search", "--export", "data/search") == 0
    assert sorted(set(computed(log))) == ["calibration-windows", "pho-screen", "search-summary", "verify-candidate"]
    pho = json.loads((data / "search" / "pho.json").read_text())
    assert load_params_file(data / "search" / "pho.json", "crepe") == pho["winner"]["params"]  # --params-from
    assert json.loads((data / "search" / "search.json").read_text())["winner"]["params"] == pho["winner"]["params"]
    log.unlink()
    capsys.readouterr()

    assert cli(project, monkeypatch, "--until", "prune", "--export", "data/pruned") == 0
    out = capsys.readouterr().out
    assert computed(log) == ["final-prune"]
    for name in ("calibration-windows", "pho-screen", "verify-candidate[0]", "search-summary"):
        assert f"[crepe] reused cached {name}" in out
    manifest = json.loads((data / "pruned" / "crepe_manifest.json").read_text())
    assert {k: manifest["prune"]["config"]["params"][k] for k in pho["winner"]["params"]} == pho["winner"]["params"]
    report = verify_release(data / "pruned", quick_ppl=False)  # crepe verify data/pruned (the DVC verify stage)
    assert report["pattern"] == "2:4" and report["nm_valid"]
    log.unlink()

    assert cli(project, monkeypatch, "--until", "evaluate", "--export", "data/metrics/eval.json") == 0
    assert computed(log) == ["evaluate"] and "[crepe] reused cached final-prune" in capsys.readouterr().out
    metrics = json.loads((data / "metrics" / "eval.json").read_text())
    assert metrics["perplexity"]["ppl"] > 1 and metrics["perplexity"]["split"] == "test"
    assert metrics["sparsity"] == report["overall_sparsity"]
    assert metrics["pruned_sha256"] == sha256_folder(data / "pruned")
    assert not (data / "release").exists()
    assert sorted(p.name for p in data.iterdir()) == ["metrics", "pruned", "search"]  # no temp folder left
    log.unlink()

    full = run_flow(project)  # the release stage: only the release is new
    assert computed(log) == ["release"]
    assert full["evaluation"]["ppl"]["ppl"] == metrics["perplexity"]["ppl"]
    assert full["release"]["metrics"]["sparsity"] == metrics["sparsity"]

    # partial runs never touch MLflow: the same steps with tracking on (all cached) create no store
    tracked = make_project(tmp_path / "tracked", tiny_model, tracking=True)
    assert cli(tracked, monkeypatch, "--until", "evaluate", "--export", "eval.json") == 0
    assert (tracked / "eval.json").is_file() and not (tracked / "mlflow.db").exists()


def test_until_search_without_pho_exports_prune_params(project: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.params_file import load_params_file

    log = tmp_path / "computed.txt"
    off = ["-S", "pho.enabled=false", "-S", "prune.params={alpha: 0.5}"]
    assert cli(project, monkeypatch, *off, "--until", "search", "--export", "s") == 0
    doc = json.loads((project / "s" / "pho.json").read_text())
    assert doc["enabled"] is False and doc["winner"] is None and "no search ran" in doc["note"]
    params = load_params_file(project / "s" / "pho.json", "crepe")  # what crepe prune --params-from reads
    assert params["alpha"] == 0.5 and params["beta"] == 1.0  # prune.params resolved against CRePE's defaults
    assert computed(log) == ["calibration-windows"]
    assert cli(project, monkeypatch, *off, "--until", "prune", "--export", "p") == 0
    assert computed(log) == ["calibration-windows", "final-prune"]
    manifest = json.loads((project / "p" / "crepe_manifest.json").read_text())
    assert manifest["prune"]["config"]["params"]["alpha"] == 0.5


def test_crepe_prune_and_the_pipeline_prune_step_write_the_same_folder(project: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One front door: `crepe prune` with flags and `crepe pipeline --until prune` on the params those flags
    spell out run the same code, so the manifest and every file of the pruned folder are identical."""
    from flows.cli import main

    off = ["-S", "pho.enabled=false", "-S", "prune.params={alpha: 0.5}", "-S", "refine.method=dsnot",
           "-S", "prune.update=obs"]
    assert cli(project, monkeypatch, *off, "--until", "prune", "--export", "by-pipeline") == 0
    monkeypatch.chdir(tmp_path)  # no params.yaml here: flags on the built-in defaults
    model = str(yaml_model(project))
    flags = ["prune", "--model", model, "--method", "crepe", "--sparsity", "2:4", "--alpha", "0.5",
             "--refine", "dsnot", "--update", "obs", "--calib-samples", "4", "--seqlen", "32", "--batch-size", "4",
             "--calib-source", "pydoc", "--eval-source", "pydoc", "--max-windows", "4", "--out", "by-cli"]
    assert main(flags) == 0
    pipeline_dir, cli_dir = project / "by-pipeline", tmp_path / "by-cli"
    by_pipeline = json.loads((pipeline_dir / "crepe_manifest.json").read_text())
    by_cli = json.loads((cli_dir / "crepe_manifest.json").read_text())
    assert by_cli == by_pipeline
    assert by_cli["prune"]["config"]["refine"] == "dsnot" and by_cli["data"]["calibration"]["source"] == "pydoc"
    assert by_cli["prune"]["config"]["update"] == "obs" and by_cli["prune"]["update_summary"]
    assert "timings" not in by_cli and "created_utc" not in by_cli  # deterministic: no clock, no machine paths
    files = sorted(p.relative_to(pipeline_dir).as_posix() for p in pipeline_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(cli_dir).as_posix() for p in cli_dir.rglob("*") if p.is_file())
    for name in files:
        assert sha256_file(pipeline_dir / name) == sha256_file(cli_dir / name), name


def yaml_model(project: Path) -> Path:
    """The model folder a test project's params.yaml names."""
    line = next(x for x in (project / "params.yaml").read_text().splitlines() if x.startswith("model:"))
    return Path(line.split("spec:", 1)[1].strip(" }"))


def test_export_is_atomic_and_checks_the_cached_folder(project: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """An export that fails half-way leaves the previous export as it was and no temp folder; a cached
    pruned folder modified since it was written is refused (one sentence), never exported."""
    import shutil

    import tasks.export as tp
    from crepe.io import sha256_folder

    args = ("-S", "pho.enabled=false", "--until", "prune", "--export", "data/pruned")
    assert cli(project, monkeypatch, *args) == 0
    before = sha256_folder(project / "data" / "pruned")

    def copy_half_then_fail(src: Path, dst: Path) -> None:
        shutil.copyfile(src / "config.json", dst / "config.json")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched, pytest.raises(OSError, match="No space left"):
        patched.setattr(tp, "_copy_tree", copy_half_then_fail)
        cli(project, monkeypatch, *args)
    assert sha256_folder(project / "data" / "pruned") == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["pruned"]

    work = next((project / ".crepe" / "work" / "pruned").iterdir())
    (work / "config.json").write_text((work / "config.json").read_text() + " ")
    capsys.readouterr()
    assert cli(project, monkeypatch, *args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (Prefect logs the failed task run above it)
    assert last.startswith("crepe: error: the cached pruned model") and "changed since it was written" in last
    assert "--refresh" in last
    assert sha256_folder(project / "data" / "pruned") == before
    assert cli(project, monkeypatch, *args, "--refresh") == 0  # recomputed: the same weights again
    assert sha256_folder(project / "data" / "pruned") == before


def test_until_export_refusals_are_one_sentence(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """Bad --until/--export input fails before the flow starts: exit 2 and one line, nothing written."""
    log = tmp_path / "computed.txt"
    (project / "notes").mkdir()
    (project / "notes" / "todo.txt").write_text("keep me\n")
    (project / "afile").write_text("x\n")
    cases = [
        (["--export", "data/search"], "--export needs --until"),
        (["--until", "release", "--export", "data/release"], "release.out_dir"),
        (["--until", "search", "--export", "afile"], "is a file"),
        (["--until", "prune", "--export", "notes"], "without crepe_manifest.json"),
        (["--until", "search", "--export", "afile/sub"], "afile is a file"),
        (["--until", "evaluate", "--export", "notes"], "writes a JSON file"),
    ]
    for args, expected in cases:
        capsys.readouterr()
        assert cli(project, monkeypatch, *args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("crepe: error: ") and err.count("\n") == 1 and expected in err, (args, err)
    with pytest.raises(SystemExit) as exc:
        cli(project, monkeypatch, "--until", "everything")
    assert exc.value.code == 2 and "invalid choice: 'everything'" in capsys.readouterr().err
    assert not log.exists() and not (project / "data").exists()
    assert (project / "notes" / "todo.txt").read_text() == "keep me\n" and (project / "afile").read_text() == "x\n"
