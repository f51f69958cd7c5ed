"""PHO candidates spread over GPUs (tasks/gpus.py), tested on a CPU with fake GPU ids; and the gpu marker.

The decisions are pure functions of the visible devices, so fake ids ("0", "1", a UUID) exercise them
here; a real local Dask cluster is started with fake ``CUDA_VISIBLE_DEVICES`` values (harmless without
CUDA) to check the pinning, and the Prefect concurrency slot is taken for real on a test server. The
run on real GPUs is ``tests/test_gpu.py::test_dask_pipeline_spreads_candidates_over_gpus``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.gpus import (
    GPU_RESOURCE,
    candidate_device,
    dask_cluster_spec,
    gpu_limit_name,
    gpu_of,
    gpu_slot,
    spreads,
    visible_gpus,
)

ROOT = Path(__file__).resolve().parent.parent
OLD_LOCAL_CLUSTER = {"n_workers": 3, "threads_per_worker": 1, "processes": True, "dashboard_address": None}


# --- pure functions ---------------------------------------------------------------------------------------


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({}, count=3) == ["0", "1", "2"]
    assert visible_gpus({}, count=0) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, count=2) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 5 , 1"}, count=2) == ["5", "1"]  # torch's order, not sorted
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, count=1) == ["2"]  # what torch actually found
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=0) == []  # every GPU hidden
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,,2"}, count=2) == ["1"]  # CUDA stops at an empty entry
    uuid = "GPU-8f3a2c1e-0000-1111-2222-333344445555"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": uuid}, count=1) == [uuid]


def test_visible_gpus_on_this_machine_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-GPU default is what is checked here")
    assert visible_gpus() == []


@pytest.mark.parametrize("n_gpus", [1, 2, 3, 4, 8])
def test_concurrent_candidates_get_distinct_devices(n_gpus: int) -> None:
    """Any n_gpus candidates that run together (consecutive indices, as a pool of n workers starts them)
    land on n different GPUs, and every GPU is a visible one."""
    visible = [str(7 - i) for i in range(n_gpus)]  # physical ids need not be 0..n-1
    devices = [candidate_device("cuda", i, n_gpus) for i in range(3 * n_gpus + 1)]
    for start in range(len(devices) - n_gpus + 1):
        window = devices[start:start + n_gpus]
        assert len(set(window)) == n_gpus
        assert len({gpu_of(d, visible) for d in window}) == n_gpus
    assert {gpu_of(d, visible) for d in devices} == set(visible)
    assert [candidate_device("auto", i, n_gpus) for i in range(n_gpus)] == devices[:n_gpus]


def test_one_pinned_gpu_per_worker_is_always_cuda_0() -> None:
    # a Dask GPU worker sees exactly its own GPU
    assert {candidate_device("cuda", i, 1) for i in range(5)} == {"cuda:0"}
    assert gpu_of("cuda:0", ["3"]) == "3"


@pytest.mark.parametrize("device", ["cpu", "cuda:1", "mps"])
def test_explicit_devices_are_not_moved(device: str) -> None:
    assert [candidate_device(device, i, 4) for i in range(4)] == [device] * 4


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda", "cuda:0"])
def test_without_gpus_nothing_changes(device: str) -> None:
    assert not spreads(device, 0)
    assert candidate_device(device, 3, 0) == device
    assert gpu_of(device, []) is None  # so no concurrency slot is taken


def test_gpu_of_names_the_physical_gpu() -> None:
    visible = ["2", "3"]
    assert gpu_of("cuda", visible) == "2" and gpu_of("auto", visible) == "2"
    assert gpu_of("cuda:1", visible) == "3"
    assert gpu_of("cuda:2", visible) is None and gpu_of("cpu", visible) is None


def test_limit_names_are_per_gpu_and_host() -> None:
    names = {gpu_limit_name(g, "box") for g in ("0", "1", "2")}
    assert names == {"crepe-gpu-box-0", "crepe-gpu-box-1", "crepe-gpu-box-2"}
    assert gpu_limit_name("0", "a") != gpu_limit_name("0", "b")
    assert gpu_limit_name("0", "node 1/x") == "crepe-gpu-node_1_x-0"  # only safe characters
    assert gpu_limit_name("0").startswith("crepe-gpu-")


def test_cluster_spec_without_gpus_is_the_old_local_cluster() -> None:
    assert dask_cluster_spec(3, []) == {"cluster_kwargs": OLD_LOCAL_CLUSTER}


def test_cluster_spec_has_one_pinned_single_threaded_worker_per_gpu() -> None:
    from distributed import Nanny, SpecCluster

    spec = dask_cluster_spec(1, ["0", "1", "3"])  # max_workers does not matter: the GPUs are the workers
    assert spec["cluster_class"] is SpecCluster
    workers = spec["cluster_kwargs"]["workers"]
    assert sorted(workers) == ["gpu-0", "gpu-1", "gpu-3"]
    for name, worker in workers.items():
        assert worker["cls"] is Nanny
        opts = worker["options"]
        assert opts["nthreads"] == 1 and opts["resources"] == {GPU_RESOURCE: 1}
        assert opts["env"] == {"CUDA_VISIBLE_DEVICES": name.removeprefix("gpu-")}
    with pytest.raises(ValueError, match="duplicate"):
        dask_cluster_spec(2, ["0", "0"])


def _cfg(tmp_path: Path, *overrides: str):
    from tasks.config import load_config

    (tmp_path / ".git").mkdir(exist_ok=True)
    params = tmp_path / "params.yaml"
    params.write_text("runner: {backend: dask, max_workers: 3}\n")
    return load_config(params, list(overrides))


@pytest.mark.parametrize(("device", "gpus", "n_workers"), [
    ("cuda", ["0", "1"], 2), ("auto", ["0", "1", "2", "3"], 4), ("cuda", ["5"], 1),
    ("cpu", ["0", "1"], None), ("cuda:1", ["0", "1"], None), ("auto", [], None), ("cuda", [], None),
])
def test_task_runner_spreads_only_for_cuda_with_gpus(tmp_path: Path, device: str, gpus: list[str],
                                                      n_workers: int | None) -> None:
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import task_runner

    runner = task_runner(_cfg(tmp_path, f"model.device={device}"), gpus=gpus)
    assert isinstance(runner, DaskTaskRunner)
    if n_workers is None:  # as before this change
        assert runner.cluster_class is None and runner.cluster_kwargs == OLD_LOCAL_CLUSTER
    else:
        envs = [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in runner.cluster_kwargs["workers"].values()]
        assert envs == gpus and len(envs) == n_workers


def test_task_runner_thread_and_remote_dask_are_unchanged(tmp_path: Path) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import task_runner

    thread = task_runner(_cfg(tmp_path, "runner.backend=thread", "model.device=cuda"), gpus=["0", "1"])
    assert isinstance(thread, ThreadPoolTaskRunner) and thread._max_workers == 3
    remote = task_runner(_cfg(tmp_path, "runner.dask_address=tcp://10.0.0.1:8786", "model.device=cuda"),
                         gpus=["0", "1"])
    assert remote.address == "tcp://10.0.0.1:8786" and remote.cluster_kwargs == {}


# --- a real local cluster with fake GPU ids ---------------------------------------------------------------


def _probe(seconds: float) -> tuple[str | None, float, float]:
    import os
    import time

    start = time.time()
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()


def test_gpu_cluster_pins_each_worker_and_runs_gpu_tasks_apart() -> None:
    """The SpecCluster of dask_cluster_spec starts (CPU only: fake ids), each worker sees only its
    CUDA_VISIBLE_DEVICES, and two GPU tasks submitted together run on different workers."""
    from distributed import Client

    spec = dask_cluster_spec(1, ["0", "1"])
    with spec["cluster_class"](**spec["cluster_kwargs"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        info = client.scheduler_info()["workers"]
        assert sorted(w["resources"][GPU_RESOURCE] for w in info.values()) == [1, 1]
        assert all(w["nthreads"] == 1 and not w["memory_limit"] for w in info.values())
        envs = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(envs.values()) == ["0", "1"]
        futures = [client.submit(_probe, 1.0, pure=False, resources={GPU_RESOURCE: 1}) for _ in range(4)]
        results = client.gather(futures)
    assert {r[0] for r in results} == {"0", "1"}
    for gpu in ("0", "1"):  # never two tasks on one (fake) GPU at the same time
        spans = sorted((s, e) for g, s, e in results if g == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# --- the Prefect concurrency slot ---------------------------------------------------------------------------


def test_cpu_device_takes_no_slot() -> None:
    with gpu_slot("cpu", visible=["0"]) as gpu:  # no Prefect server is running here: nothing is called
        assert gpu is None
    with gpu_slot("cuda", visible=[]) as gpu:
        assert gpu is None


def test_two_candidates_never_hold_one_gpu_at_once() -> None:
    """Two threads asking for the same (fake) GPU take turns; a different GPU does not wait. No timing
    thresholds: the holders of GPU 7 keep their slot until GPU 8's candidate has its own (a GPU 8 that waited
    for GPU 7 would never get it, and the holder would see no signal)."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    spans: dict[str, list[tuple[float, float]]] = {"7": [], "8": []}
    gpu8_running = threading.Event()
    saw_gpu8: list[bool] = []

    def candidate(device: str, visible: list[str]) -> None:
        with gpu_slot(device, visible=visible, host="testhost") as gpu:
            start = time.monotonic()
            if gpu == "8":
                gpu8_running.set()
                time.sleep(0.2)
            else:
                saw_gpu8.append(gpu8_running.wait(60))  # hold GPU 7 until GPU 8 runs too
                time.sleep(0.5)
            spans[gpu].append((start, time.monotonic()))

    with prefect_test_harness(server_startup_timeout=90):
        threads = [threading.Thread(target=candidate, args=args) for args in
                   [("cuda:0", ["7", "8"]), ("cuda", ["7"]), ("cuda:1", ["7", "8"])]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name("crepe-gpu-testhost-7")
    assert limit.limit == 1 and limit.active_slots == 0
    assert len(spans["7"]) == 2 and len(spans["8"]) == 1
    (a0, a1), (b0, b1) = sorted(spans["7"])
    assert a1 <= b0  # the second candidate on GPU 7 waited for the first
    assert saw_gpu8 == [True, True]  # GPU 8 got its slot while GPU 7 was held: it did not wait


# --- the gpu marker ----------------------------------------------------------------------------------------


PROBE = r"""
import sys, pytest
class Probe:
    def pytest_collection_finish(self, session):
        for item in session.items:
            print("ITEM", item.nodeid, item.get_closest_marker("gpu") is not None)
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], plugins=[Probe()]))
"""


def test_every_test_in_test_gpu_carries_the_gpu_marker() -> None:
    """Collected as pytest collects it (so ``pytest -m gpu`` selects all of it and ``-m "not gpu"`` none)."""
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    items = [line.removeprefix("ITEM ").rsplit(" ", 1) for line in res.stdout.splitlines() if line.startswith("ITEM ")]
    assert len(items) >= 10, res.stdout[-2000:]
    assert [nodeid for nodeid, marked in items if marked != "True"] == []


class _Item:
    def __init__(self, name: str, marked: bool) -> None:
        self.path, self.nodeid, self.marked, self.added = ROOT / "tests" / name, f"tests/{name}::t", marked, []

    def get_closest_marker(self, name: str):
        return object() if name == "gpu" and self.marked else None

    def add_marker(self, mark) -> None:
        self.added.append(mark)


def test_conftest_refuses_an_unmarked_test_in_test_gpu_and_skips_gpu_tests_without_cuda() -> None:
    import torch
    from conftest import pytest_collection_modifyitems

    with pytest.raises(pytest.UsageError, match="lacks @pytest.mark.gpu"):
        pytest_collection_modifyitems(None, [_Item("test_gpu.py", True), _Item("test_gpu.py", False)])
    items = [_Item("test_gpu.py", True), _Item("test_x.py", True), _Item("test_x.py", False)]
    pytest_collection_modifyitems(None, items)
    skipped = [bool(i.added) for i in items]
    assert skipped == ([False, False, False] if torch.cuda.is_available() else [True, True, False])


# --- the whole pipeline with two fake GPUs ------------------------------------------------------------------

FAKE_GPUS = """
import tasks.gpus as _gpus, crepe.models as _models, torch as _torch
_visible = _gpus.visible_gpus
def _fake_visible(env=None, count=None):  # two fake GPUs, or the one a Dask worker is pinned to
    ids = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES", "0,1")
    return _visible({{"CUDA_VISIBLE_DEVICES": ids}}, count=len(ids.split(",")))
_gpus.visible_gpus = _fake_visible
_resolve = _models.resolve_device
_fake_resolve = lambda name: _torch.device("cpu") if str(name).startswith("cuda") else _resolve(name)
import sys as _sys, crepe.streaming, tasks.inputs, tasks.verify  # every module that binds resolve_device
for _module in list(_sys.modules.values()):
    if getattr(_module, "resolve_device", None) is _resolve:
        _module.resolve_device = _fake_resolve
"""


@pytest.mark.slow  # a 2-worker Dask cluster, a Prefect server per worker: 1-2 minutes
def test_dask_pipeline_with_two_fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_gpu.py's Dask GPU run on a CPU: the CLI process and the Dask workers see two fake GPUs
    (CUDA_VISIBLE_DEVICES pinned per worker) and compute on the CPU; everything else is real: the
    SpecCluster, the device each candidate picks, the Prefect concurrency slots."""
    import tests.test_pipeline as tp
    from tests.local_models import save_tiny_llama
    from tests.test_gpu import run_dask_gpu_pipeline

    marker = 'if __name__ == "__main__":'
    assert marker in tp.LAUNCHER
    monkeypatch.setattr(tp, "LAUNCHER", tp.LAUNCHER.replace(marker, FAKE_GPUS + marker))
    folder = save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "run").mkdir()
    used = run_dask_gpu_pipeline(tmp_path / "run", folder, ["0", "1"])
    assert sorted(used.values()) == ["0", "1"]  # both workers, each on its own GPU
