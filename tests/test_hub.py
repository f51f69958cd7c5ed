"""Hub models (``org/name[@revision]``) have an identity: repo id + resolved commit + sha256 of their files.

A real HF cache is built in a temporary folder (``models--org--name/blobs/<sha>``,
``snapshots/<commit>/<file>`` symlinks to the blobs, ``refs/<branch or tag>``) holding two different tiny
models under two repo ids, a second commit of one of them and a byte-identical copy under a third repo id.
Everything then goes through huggingface_hub's own ``snapshot_download`` offline (``HF_HUB_OFFLINE=1``, set
by conftest): in process with ``huggingface_hub.constants.HF_HUB_CACHE`` pointed at the folder (the library
reads ``$HF_HOME`` once, at import), and in a subprocess through ``$HF_HOME`` itself.

Checked: different repos or commits give different content hashes, cache keys and manifests; the same repo
and commit (``org/name``, ``org/name@main``, ``org/name@<commit>``) hit the cache; a revision or repo that is
not in the cache is one sentence naming the cache folder and ``HF_HUB_OFFLINE`` (CLI exit status 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from crepe.errors import CrepeError
from crepe.hub import hub_identity
from crepe.io import sha256_file
from crepe.models import load_model, resolve_source
from flows.cli import main
from tests.local_models import save_tiny_llama
from tests.test_pipeline import computed, make_project

ROOT = Path(__file__).resolve().parent.parent
C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40  # commits: org-a/tiny main, org-a/tiny v2, org-b/tiny main
HERMETIC = ["--calib-source", "pydoc", "--eval-source", "pydoc", "--calib-samples", "4", "--seqlen", "32",
            "--max-windows", "2", "--batch-size", "2"]


def add_commit(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Store ``folder``'s files as the HF cache does: blobs named by content, a snapshot of relative symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        blob = repo / "blobs" / sha256_file(file)
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds org-a/tiny (main: seed 0, v2: seed 2), org-b/tiny (seed 1) and
    org-c/mirror (the same files as org-a/tiny@main); every snapshot also has a README.md."""
    src = tmp_path_factory.mktemp("hub-src")
    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    for name, seed in (("a", 0), ("a2", 2), ("b", 1)):
        save_tiny_llama(src / name, seed=seed)
        (src / name / "README.md").write_text(f"model card {name}\n")
    add_commit(cache, "org-a/tiny", src / "a", C1)
    add_commit(cache, "org-a/tiny", src / "a2", C2, refs=("v2",))
    add_commit(cache, "org-b/tiny", src / "b", C3)
    add_commit(cache, "org-c/mirror", src / "a", C1)
    # the older format: pytorch_model.bin only (org-d), and beside safetensors (org-e: not part of the identity)
    (src / "bin").mkdir()
    (src / "both").mkdir()
    for file in (src / "a").iterdir():
        shutil.copyfile(file, src / "both" / file.name)
        if file.suffix != ".safetensors":
            shutil.copyfile(file, src / "bin" / file.name)
    state = load_file(src / "a" / "model.safetensors")
    for name in ("bin", "both"):
        torch.save(state, src / name / "pytorch_model.bin")
    add_commit(cache, "org-d/bin-only", src / "bin", C1)
    add_commit(cache, "org-e/both", src / "both", C1)
    return home


@pytest.fixture
def hub_cache(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point huggingface_hub (this process) at the test cache, as ``HF_HOME`` would at import time."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("CREPE_CACHE_DIR", str(hf_home / "crepe"))  # the file-hash memo
    assert constants.HF_HUB_OFFLINE
    return hf_home / "hub"


# --- resolution and identity -----------------------------------------------------------------------------


def test_hub_spec_resolves_to_snapshot_with_identity(hub_cache: Path) -> None:
    kind, folder, digest, extra = resolve_source("org-a/tiny")
    assert kind == "hub" and folder == hub_cache / "models--org-a--tiny" / "snapshots" / C1
    assert (extra["repo_id"], extra["revision"], extra["commit"]) == ("org-a/tiny", None, C1)
    # the files a model needs, each with its own sha256; the README is not part of the identity
    assert sorted(extra["files"]) == ["config.json", "generation_config.json", "model.safetensors",
                                      "tokenizer.json", "tokenizer_config.json"]
    assert all(extra["files"][n] == sha256_file(folder / n) for n in extra["files"])
    assert digest == hub_identity("org-a/tiny", C1, extra["files"]) and len(digest) == 64


def test_same_commit_same_identity_other_repo_or_commit_differs(hub_cache: Path) -> None:
    digest = {spec: resolve_source(spec)[2] for spec in
              ("org-a/tiny", "hf:org-a/tiny@main", f"org-a/tiny@{C1}", "org-a/tiny@v2", "org-b/tiny",
               "org-c/mirror")}
    assert digest["org-a/tiny"] == digest["hf:org-a/tiny@main"] == digest[f"org-a/tiny@{C1}"]
    # another commit, another model, and the same bytes under another repo id: all distinct
    assert len({digest["org-a/tiny"], digest["org-a/tiny@v2"], digest["org-b/tiny"], digest["org-c/mirror"]}) == 4
    assert resolve_source("org-a/tiny@v2")[3]["commit"] == C2


def test_load_model_reads_the_resolved_snapshot(hub_cache: Path, tmp_path: Path) -> None:
    lm = load_model("org-b/tiny@main", device="cpu")
    assert lm.info.kind == "hub" and lm.info.path == str(hub_cache / "models--org-b--tiny" / "snapshots" / C3)
    assert lm.info.content_hash == resolve_source("org-b/tiny")[2]
    assert lm.info.extra["commit"] == C3 and lm.info.extra["revision"] == "main"
    expected = save_tiny_llama(tmp_path / "b", seed=1)  # the same seed: the same weights
    reference = load_model(str(expected), device="cpu")
    for (name, p), (_, q) in zip(lm.model.named_parameters(), reference.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_bin_weights_only_when_there_are_no_safetensors(hub_cache: Path) -> None:
    bin_only = resolve_source("org-d/bin-only")[3]["files"]
    both = resolve_source("org-e/both")[3]["files"]
    assert "pytorch_model.bin" in bin_only and not any(n.endswith(".safetensors") for n in bin_only)
    assert "model.safetensors" in both and "pytorch_model.bin" not in both
    from_bin = load_model("org-d/bin-only", device="cpu").model.state_dict()
    for name, value in load_model("org-a/tiny", device="cpu").model.state_dict().items():
        assert torch.equal(from_bin[name], value), name


@pytest.mark.parametrize(("spec", "message"), [
    ("org-a/tiny@nope", "revision 'nope' of hub model org-a/tiny is not in the HF cache {cache}/models--org-a--tiny "
                        "(cached: main, v2, 111111111111, 222222222222) and HF_HUB_OFFLINE=1 forbids downloading it"),
    (f"org-b/tiny@{'4' * 40}", f"revision '{'4' * 40}' of hub model org-b/tiny is not in the HF cache"),
    ("org-z/missing", "hub model org-z/missing is not in the HF cache ({cache}/models--org-z--missing does not exist) "
                      "and HF_HUB_OFFLINE=1 forbids downloading it"),
])
def test_not_in_cache_is_one_sentence(hub_cache: Path, spec: str, message: str) -> None:
    with pytest.raises(CrepeError) as err:
        resolve_source(spec)
    text = str(err.value)
    assert text.startswith(message.format(cache=hub_cache)) and "\n" not in text


def test_hub_unreachable_falls_back_to_the_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode with the Hub unreachable (a closed local port): huggingface_hub's own fallback finds the
    cached snapshot, with the same identity; a model that is not cached is one sentence."""
    offline = resolve_source("org-a/tiny@v2")[2]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert resolve_source("org-a/tiny@v2")[2] == offline
    with pytest.raises(CrepeError, match=r"^hub model org-z/missing is not in the HF cache .* and it could not be "
                                         r"downloaded \(\w+\); check the network connection$"):
        resolve_source("org-z/missing")
    with pytest.raises(CrepeError, match="'org/na--me' is not a valid hub repo id"):
        resolve_source("org/na--me")


# --- crepe prune: manifests ----------------------------------------------------------------------------------


def prune(spec: str, out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, dict | None]:
    code = main(["--no-progress", "prune", "--model", spec, "--method", "wanda", "--sparsity", "0.5",
                 "--out", str(out), "--device", "cpu", *HERMETIC])
    err = capsys.readouterr().err
    manifest = out / "crepe_manifest.json"
    return code, err, json.loads(manifest.read_text()) if manifest.is_file() else None


def test_prune_manifests_record_repo_commit_and_files(hub_cache: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    models = {}
    for spec in ("org-a/tiny", "org-a/tiny@v2", "org-b/tiny"):
        code, err, manifest = prune(spec, tmp_path / spec.replace("/", "_"), capsys)
        assert code == 0, err
        models[spec] = manifest["model"]
    a, a2, b = models["org-a/tiny"], models["org-a/tiny@v2"], models["org-b/tiny"]
    assert (a["hub"]["repo_id"], a["hub"]["commit"], a2["hub"]["commit"]) == ("org-a/tiny", C1, C2)
    assert a2["hub"]["revision"] == "v2" and a["hub"]["files"]["model.safetensors"] != \
        a2["hub"]["files"]["model.safetensors"]
    assert len({a["content_hash"], a2["content_hash"], b["content_hash"]}) == 3
    assert a["content_hash"] == resolve_source("org-a/tiny")[2]


def test_prune_revision_not_in_cache_exits_2_and_writes_nothing(hub_cache: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    code, err, manifest = prune("org-a/tiny@nope", tmp_path / "out", capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("crepe: error: revision 'nope' of hub model org-a/tiny is not in the HF cache")
    assert "HF_HUB_OFFLINE" in lines[0] and not (tmp_path / "out").exists()


def test_real_process_reads_hf_home(hf_home: Path, tmp_path: Path) -> None:
    """No monkeypatching: huggingface_hub finds the cache through ``$HF_HOME`` in fresh processes."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "CREPE_CACHE_DIR": str(tmp_path / "crepe"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "pruned"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--no-progress", "prune", "--model", "hf:org-b/tiny",
                           "--method", "wanda", "--sparsity", "0.5", "--out", str(out), "--device", "cpu", *HERMETIC],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr
    model = json.loads((out / "crepe_manifest.json").read_text())["model"]
    assert model["kind"] == "hub" and model["hub"]["commit"] == C3  # the snapshot under $HF_HOME was read
    assert "path" not in model  # a manifest names content, never a machine path
    # crepe pipeline: the revision is resolved before any flow starts
    project = make_project(tmp_path / "proj", Path("org-b/tiny@v9"))
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--params", str(project / "params.yaml")],
                         capture_output=True, text=True, env={**env, "PREFECT_HOME": str(tmp_path / "prefect")},
                         cwd=project, timeout=240)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"crepe: error: revision 'v9' of hub model org-b/tiny is not in the HF cache "
                                 f"{hf_home / 'hub' / 'models--org-b--tiny'}")


# --- crepe pipeline: cache keys ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_pipeline_keys_follow_the_hub_identity(hub_cache: Path, tmp_path: Path, harness,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import pipeline, preflight
    from tasks.config import load_config

    project = make_project(tmp_path / "proj", Path("org-a/tiny"))
    params = str(project / "params.yaml")
    log = tmp_path / "computed.txt"
    monkeypatch.setenv("CREPE_TASK_LOG", str(log))
    monkeypatch.delenv("CREPE_WORK_DIR", raising=False)
    threads = torch.get_num_threads()

    def run(spec: str) -> tuple[list[str], dict]:
        log.unlink(missing_ok=True)
        result = pipeline(params, [f"model.spec={spec}", "pho.enabled=false", "prune.method=wanda",
                                   "prune.params={}"], until="prune")
        manifest = json.loads((Path(result["pruned"]["path"]) / "crepe_manifest.json").read_text())
        return computed(log), manifest["model"]

    try:
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "storage")}):
            first, a = run("org-a/tiny")
            assert sorted(set(first)) == ["calibration-windows", "final-prune"]
            # the same repo and commit under another spelling: every task is reused
            assert run(f"hf:org-a/tiny@{C1}")[0] == []
            # another repo (the same tokenizer, so even the same windows), then another commit: recomputed
            got, b = run("org-b/tiny")
            assert sorted(set(got)) == ["calibration-windows", "final-prune"]
            got, a2 = run("org-a/tiny@v2")
            assert sorted(set(got)) == ["calibration-windows", "final-prune"]
    finally:
        torch.set_num_threads(threads)
    assert (a["hub"]["commit"], a2["hub"]["commit"], b["hub"]["repo_id"]) == (C1, C2, "org-b/tiny")
    assert len({a["content_hash"], a2["content_hash"], b["content_hash"]}) == 3
    with pytest.raises(CrepeError, match="revision 'nope' of hub model org-a/tiny is not in the HF cache"):
        preflight(load_config(params, ["model.spec=org-a/tiny@nope"]), tracking=False)
