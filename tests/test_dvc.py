"""DVC scaffolding (issue 4 §5): dvc.yaml parses, every parameter it names exists in params.yaml, every
stage command parses with the `crepe` CLI (the flow stages run `crepe pipeline --until STAGE --export OUT`),
and the local default remote makes push/pull work offline.

``test_dvc_repro_on_a_tiny_config`` (slow) runs the whole ``dvc repro`` on the tiny model and checks that
each flow stage reuses the Prefect tasks the stage before it cached."""

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
import yaml

from flows.cli import build_parser
from tasks.config import load_config, parse_yaml

REPO = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).parent / "dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
STAGES = ["prepare", "search", "prune", "evaluate", "release", "verify"]
FLOW_STAGES = ["search", "prune", "evaluate"]  # crepe pipeline --until STAGE --export ...
# the params.yaml sections each flow stage's result depends on (the cache keys of tasks/pipeline.py)
NEEDED = {"search": {"model", "data", "calibration", "prune", "pho", "eval.ppl"},
          "prune": {"refine", "allocation"}, "evaluate": {"eval"}}
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
    assert deps["release"] == ["data/pruned", "data/metrics/eval.json"]  # after evaluate: reuses its tasks
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            path = render(out if isinstance(out, str) else next(iter(out)), params())
            assert path.startswith("data/"), (name, out)
        for metric in stage.get("metrics", []):
            (path, opts), = metric.items()
            assert path.startswith("data/metrics/") and opts == {"cache": False}
    # PHO resumes from the Prefect task cache and pho-screen's state.json, not from a persisted DVC out
    assert stages["search"]["outs"] == ["data/search"]
    assert stages["release"]["outs"] == ["${release.out_dir}"]
    assert list(dvc_yaml()["plots"][0]) == ["data/metrics/verify.json"]


def _declared(stage: dict) -> set[str]:
    return {p for p in stage.get("params", []) if isinstance(p, str)}


def _covers(declared: set[str], key: str) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_flow_stages_declare_every_section_their_result_depends_on():
    """A later stage's flow recomputes (or reuses) everything before it, so its params include the earlier
    stage's; the release manifest records the whole configuration, so the release stage lists every section."""
    stages = dvc_yaml()["stages"]
    needed: set[str] = set()
    for name in FLOW_STAGES:
        needed |= NEEDED[name]
        missing = sorted(k for k in needed if not _covers(_declared(stages[name]), k))
        assert not missing, f"stage {name} does not declare {missing}"
    assert _declared(stages["release"]) == set(params()), "the release stage must declare every section"
    for earlier, later in zip(STAGES[1:4], STAGES[2:5], strict=True):
        assert all(_covers(_declared(stages[later]), k) for k in _declared(stages[earlier])), (earlier, later)


def test_every_param_and_interpolation_exists_in_params_yaml():
    values = params()
    for name, stage in dvc_yaml()["stages"].items():
        for entry in stage.get("params", []):
            keys = entry if isinstance(entry, str) else next(iter(entry.values()))
            for key in [keys] if isinstance(keys, str) else keys:
                lookup(values, key)
        outs = " ".join(o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", []))
        for key in INTERP.findall(stage["cmd"] + " " + outs):
            value = lookup(values, key)
            assert value is not None and not isinstance(value, (dict, list)), \
                f"stage {name}: ${{{key}}} must be a non-null scalar (DVC renders null as 'None')"
            # a value used in a command is also declared, so DVC re-runs the stage when it changes
            declared = [p if isinstance(p, str) else "" for p in stage.get("params", [])]
            assert any(key == d or key.startswith(d + ".") for d in declared), f"stage {name} uses {key} undeclared"


def test_stage_commands_parse_with_the_crepe_cli():
    """Flag drift between dvc.yaml and the CLI fails here; each flow stage stops after its own step and
    exports to exactly the output DVC tracks for it, reading the params.yaml DVC reads."""
    values = params()
    parser = build_parser()
    stages = dvc_yaml()["stages"]
    parsed = {}
    for name, stage in stages.items():
        argv = shlex.split(render(stage["cmd"], values))
        assert argv[0] == "crepe", name
        parsed[name] = args = parser.parse_args(argv[1:])  # SystemExit(2) on an unknown or malformed flag
        assert args.command == argv[1]
    for name in FLOW_STAGES:
        args = parsed[name]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages[name].get("outs", [])]
        outs += [next(iter(m)) for m in stages[name].get("metrics", [])]
        assert (args.command, args.until, args.params, args.overrides) == ("pipeline", name, "params.yaml", [])
        assert outs == [args.export], name
    release = parsed["release"]
    assert (release.command, release.until, release.export, release.overrides) == ("pipeline", None, None, [])
    assert (parsed["prepare"].command, parsed["verify"].command) == ("prepare", "verify")


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
                     ("prune", "verify"), ("prune", "release"), ("evaluate", "release")}


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


def _stage_logs(output: str) -> dict[str, str]:
    """``dvc repro`` output split into each stage's part (``Running stage 'NAME':`` starts one)."""
    parts = re.split(r"Running stage '([^']+)':", output)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.slow  # repro + exp run: 2 x 6 stages, each a crepe process (~2.5 min on 2 shared cores)
def test_dvc_repro_on_a_tiny_config(tmp_path):
    """`dvc repro` runs prepare -> search -> prune -> evaluate -> release, verify on the tiny model with pydoc
    data; each flow stage reuses the tasks the stage before it cached (one search, one prune in all); the
    exports are what the standalone commands read; a second `dvc repro` finds everything up to date; then
    `dvc exp run -S prune.sparsity=0.6` re-runs the pipeline for the new sparsity."""
    from tasks.params_file import load_params_file
    from tasks.verify import verify_release
    from tests.local_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    repo = _git_repo(tmp_path)
    cfg = load_config(REPO / "params.yaml", [
        f"model.spec={model}", "data.calib_source=pydoc", "data.eval_source=pydoc", "calibration.samples=4",
        "calibration.seqlen=32", "calibration.batch_size=4", "pho.n_trials=4", "pho.top_k=1",
        "pho.verify_max_windows=2", "eval.ppl.seqlen=32", "eval.ppl.max_windows=4", "tracking.enabled=false",
        "release.register_model=false", "runner.max_workers=1",
    ])
    # block style, like params.yaml (DVC's round-trip writer of `exp run -S` breaks flow-style '2:4' mappings)
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False))
    # the stages call `crepe` from PATH: a shim running this worktree's CLI with the test's interpreter
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "crepe"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m flows.cli \"$@\"\n")
    shim.chmod(0o755)
    log = tmp_path / "computed.txt"
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "OMP_NUM_THREADS": "1", "CREPE_TASK_LOG": str(log),
           "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_API_URL", "CREPE_WORK_DIR"):
        env.pop(key, None)  # the project's own .prefect/ and .crepe/work, as after a fresh clone
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True, env=env)
    proc = subprocess.run([DVC, "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = _stage_logs(proc.stdout)
    order = list(logs)
    assert sorted(order) == sorted(STAGES), proc.stdout[-3000:]
    assert [order.index(s) for s in STAGES[:5]] == sorted(order.index(s) for s in STAGES[:5])  # the flow's order
    # one computation of each task over all stages: every later flow stage reused what the earlier cached
    computed = [line.split("\t")[0] for line in log.read_text().splitlines() if line.count("\t") == 1]
    assert sorted(set(computed)) == sorted({"calibration-windows", "pho-screen", "verify-candidate",
                                            "search-summary", "final-prune", "evaluate", "release"})
    assert computed.count("pho-screen") == computed.count("final-prune") == computed.count("evaluate") == 1, \
        proc.stdout
    assert "[crepe] computed pho-screen" in logs["search"], proc.stdout
    for name in ("calibration-windows", "pho-screen", "verify-candidate[0]", "search-summary"):
        assert f"[crepe] reused cached {name}" in logs["prune"], logs["prune"][-3000:]
    assert "[crepe] reused cached final-prune" in logs["evaluate"]
    assert "[crepe] reused cached evaluate" in logs["release"]

    data = repo / "data"
    winner = json.loads((data / "search" / "pho.json").read_text())["winner"]
    assert load_params_file(data / "search" / "pho.json", "crepe") == winner["params"]  # crepe prune --params-from
    manifest = json.loads((data / "pruned" / "crepe_manifest.json").read_text())
    assert {k: manifest["prune"]["config"]["params"][k] for k in winner["params"]} == winner["params"]
    assert verify_release(data / "pruned", quick_ppl=False)["ok"]
    metrics = json.loads((data / "metrics" / "eval.json").read_text())
    assert metrics["perplexity"]["ppl"] > 1 and metrics["perplexity"]["split"] == "test"
    assert 0.49 < metrics["sparsity"] <= 0.5
    verify = json.loads((data / "metrics" / "verify.json").read_text())
    assert verify["ok"] and verify["layers"]
    release = json.loads((data / "release" / "crepe_release.json").read_text())
    assert release["metrics"]["ppl"]["value"] == metrics["perplexity"]["ppl"]
    assert release["pipeline"]["pruned_sha256"] == metrics["pruned_sha256"]
    assert (repo / "dvc.lock").is_file()
    again = subprocess.run([DVC, "status"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    changed = [s for s in STAGES[1:] if f"{s}:" in again.stdout]
    assert changed == [], again.stdout  # only the always-changed prepare stage may be listed

    # an experiment with one parameter changed: the search re-runs (its key holds prune.sparsity), the
    # calibration windows do not; the metrics follow the new sparsity
    exp = subprocess.run([DVC, "exp", "run", "-S", "prune.sparsity=0.6"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=900)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    logs = _stage_logs(exp.stdout)
    assert {"search", "prune", "evaluate", "release", "verify"} <= set(logs), exp.stdout[-3000:]
    assert "[crepe] reused cached calibration-windows" in logs["search"]
    assert "[crepe] computed pho-screen" in logs["search"]
    assert "[crepe] reused cached final-prune" in logs["evaluate"]
    metrics = json.loads((data / "metrics" / "eval.json").read_text())
    assert 0.59 < metrics["sparsity"] <= 0.6 and metrics["perplexity"]["ppl"] > 1
    assert json.loads((data / "release" / "crepe_release.json").read_text())["prune"]["sparsity"] == 0.6
