"""DVC scaffolding (issue 4 §5): dvc.yaml parses, every parameter it names exists in params.yaml, every
stage command parses with the `crepe` CLI, and the local default remote makes push/pull work offline.

``test_dvc_repro_on_a_tiny_config`` (slow) runs the whole ``dvc repro`` on the tiny model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser
from flows.config import load_config, parse_yaml

REPO = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).parent / "dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
STAGES = ["prepare", "search", "prune", "evaluate", "verify"]
INTERP = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def dvc_yaml() -> dict:
    data, _ = parse_yaml((REPO / "dvc.yaml").read_text(), "dvc.yaml")
    return data


def params() -> dict:
    data, _ = parse_yaml((REPO / "params.yaml").read_text(), "params.yaml")
    return data


def lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted!r} is not a key of params.yaml"
        node = node[part]
    return node


def render(cmd: str, values: dict) -> str:
    def value(match: re.Match) -> str:
        v = lookup(values, match.group(1))
        return "true" if v is True else "false" if v is False else str(v)

    return INTERP.sub(value, cmd)


def test_stages_form_the_pipeline_in_order():
    stages = dvc_yaml()["stages"]
    assert list(stages) == STAGES
    deps = {name: stage.get("deps", []) for name, stage in stages.items()}
    assert "data/prepared" in deps["search"] and "data/search/pho.json" in deps["prune"]
    assert deps["evaluate"] == ["data/pruned"] and deps["verify"] == ["data/pruned"]
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path.startswith("data/"), (name, out)
        for metric in stage.get("metrics", []):
            (path, opts), = metric.items()
            assert path.startswith("data/metrics/") and opts == {"cache": False}
    assert stages["search"]["outs"] == [{"data/search": {"persist": True}}]  # resumable across dvc repro
    assert list(dvc_yaml()["plots"][0]) == ["data/metrics/verify.json"]


def test_every_param_and_interpolation_exists_in_params_yaml():
    values = params()
    for name, stage in dvc_yaml()["stages"].items():
        for entry in stage.get("params", []):
            keys = entry if isinstance(entry, str) else next(iter(entry.values()))
            for key in [keys] if isinstance(keys, str) else keys:
                lookup(values, key)
        for key in INTERP.findall(stage["cmd"]):
            value = lookup(values, key)
            assert value is not None and not isinstance(value, (dict, list)), \
                f"stage {name}: ${{{key}}} must be a non-null scalar (DVC renders null as 'None')"
            # a value used in a command is also declared, so DVC re-runs the stage when it changes
            declared = [p if isinstance(p, str) else "" for p in stage.get("params", [])]
            assert any(key == d or key.startswith(d + ".") for d in declared), f"stage {name} uses {key} undeclared"


def test_stage_commands_parse_with_the_crepe_cli():
    """Flag drift between dvc.yaml and the CLI fails here (a subcommand not yet built is listed, not parsed)."""
    values = params()
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    pending = []
    for name, stage in dvc_yaml()["stages"].items():
        argv = shlex.split(render(stage["cmd"], values))
        assert argv[0] == "crepe", name
        if argv[1] not in commands:
            pending.append(argv[1])
            continue
        args = parser.parse_args(argv[1:])  # SystemExit(2) on an unknown or malformed flag
        assert args.command == argv[1]
    assert set(pending) <= {"search"}, f"dvc.yaml calls commands the CLI lacks: {pending}"


def test_params_yaml_validates_with_the_flows_config():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.eval.ppl.max_windows is not None  # interpolated into `crepe eval --max-windows`


def _git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "proj"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=ENV)
    return repo


def _dvc(repo: Path, *args: str) -> str:
    proc = subprocess.run([DVC, *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_dvc_parses_the_pipeline(tmp_path):
    repo = _git_repo(tmp_path)
    listed = _dvc(repo, "stage", "list")
    assert [line.split()[0] for line in listed.strip().splitlines()] == STAGES
    dag = _dvc(repo, "dag", "--md")  # mermaid: node1["evaluate"] ... node2-->node3
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', dag))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", dag)}
    assert edges == {("prepare", "search"), ("prepare", "prune"), ("search", "prune"), ("prune", "evaluate"),
                     ("prune", "verify")}


def test_local_default_remote_push_and_pull_offline(tmp_path):
    repo = _git_repo(tmp_path)
    assert subprocess.run(["git", "check-ignore", "-q", ".dvc-remote/x"], cwd=repo, env=ENV).returncode == 0
    (repo / "data").mkdir()
    (repo / "data" / "blob.txt").write_text("weights\n")
    _dvc(repo, "add", "data/blob.txt")
    _dvc(repo, "push")
    assert any((repo / ".dvc-remote").rglob("*")), "nothing reached the local remote"
    (repo / "data" / "blob.txt").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", "data/blob.txt")  # the pipeline outs have no dvc.lock yet
    assert (repo / "data" / "blob.txt").read_text() == "weights\n"


def test_dvc_reads_params_yaml_exactly_as_the_config_loader_does():
    """Both read YAML 1.2 scalars: "2:4" stays a string, 1e-3 a float, so `dvc exp run -S` and the config agree."""
    from dvc.utils.serialize import parse_yaml as dvc_parse_yaml

    for name in ("params.yaml", "profiles/paper.yaml"):
        text = (REPO / name).read_text()
        ours, _ = parse_yaml(text)
        assert dvc_parse_yaml(text, name) == ours, name
    tricky = "a: 2:4\nb: 1e-3\nc: on\nd: 010\n"
    assert dvc_parse_yaml(tricky, "x") == parse_yaml(tricky)[0] == {"a": "2:4", "b": 0.001, "c": "on", "d": 10}


@pytest.mark.slow  # five stages, each a crepe process (~40 s on 2 shared cores)
def test_dvc_repro_on_a_tiny_config(tmp_path):
    """`dvc repro` runs prepare -> search -> prune -> evaluate -> verify on the tiny model with pydoc data,
    writes the metrics, and a second `dvc repro` finds everything up to date."""
    from tests.local_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    repo = _git_repo(tmp_path)
    cfg = load_config(REPO / "params.yaml", [
        f"model.spec={model}", "data.calib_source=pydoc", "data.eval_source=pydoc", "calibration.samples=4",
        "calibration.seqlen=32", "calibration.batch_size=4", "pho.n_trials=4", "pho.top_k=1",
        "pho.verify_max_windows=2", "eval.ppl.seqlen=32", "eval.ppl.max_windows=4", "tracking.enabled=false",
        "release.register_model=false",
    ])
    (repo / "params.yaml").write_text(cfg.dump_yaml())
    # the stages call `crepe` from PATH: a shim running this worktree's CLI with the test's interpreter
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "crepe"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m flows.cli \"$@\"\n")
    shim.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "OMP_NUM_THREADS": "1"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True, env=env)
    proc = subprocess.run([DVC, "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((repo / "data" / "metrics" / "eval.json").read_text())
    assert metrics["perplexity"]["ppl"] > 1
    assert (repo / "dvc.lock").is_file() and (repo / "data" / "pruned" / "crepe_manifest.json").is_file()
    again = subprocess.run([DVC, "status"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    changed = [s for s in ("search", "prune", "evaluate", "verify") if f"{s}:" in again.stdout]
    assert changed == [], again.stdout  # only the always-changed prepare stage may be listed
