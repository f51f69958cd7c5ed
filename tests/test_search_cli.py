"""`crepe search / hill-climb / proxy-study` on a tiny local model: outputs, determinism, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.cli import main
from tests.local_models import save_tiny_llama

HERMETIC = ["--calib-source", "pydoc", "--eval-source", "pydoc", "--calib-samples", "4", "--seqlen", "32",
            "--max-windows", "3", "--batch-size", "2"]
REPO = Path(__file__).resolve().parent.parent
PROXIES = {"gini_pruned", "gini_retained", "outlier", "outlier_pruned", "outlier_retained"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("search") / "tiny")


def run(argv, capsys):
    try:
        code = main(["--no-progress", *argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("crepe: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def search_args(tiny, out, *extra):
    return ["search", "--model", str(tiny), "--sparsity", "0.5", "--trials", "12", "--top-k", "3",
            "--out", str(out), *HERMETIC, *extra]


def essence(result: dict) -> dict:
    """Everything but timings and provenance: what must be identical between equivalent runs."""
    return {
        "trials": [(t["params"], t["proxies"]) for t in result["trials"]],
        "verified": [(r["params"], r["ppl"]) for r in result["verified"]],
        "winner": (result["winner"]["params"], result["winner"]["ppl"]),
        "final": result["final"],
    }


@pytest.fixture(scope="module")
def searched(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pho") / "run"
    assert main(["--no-progress", *search_args(tiny, out)]) == 0
    return out, json.loads((out / "pho.json").read_text())


def test_search_writes_every_trial_candidate_winner_and_plots(searched):
    out, result = searched
    assert len(result["trials"]) == 12
    for t in result["trials"]:
        assert set(t["proxies"]) == PROXIES and t["seconds"] >= 0
        assert set(t["params"]) == {"alpha", "beta", "gamma", "kernel_size"}
    # stage 2: the 3 lowest gini_pruned trials, then the RIA point
    ranked = sorted(result["trials"], key=lambda t: (t["proxies"]["gini_pruned"], t["index"]))
    assert [r["params"] for r in result["verified"][:3]] == [t["params"] for t in ranked[:3]]
    assert result["verified"][-1]["params"] == {"alpha": 1.0, "beta": 1.0, "gamma": 0.0}
    assert result["ria_validation_ppl"] == result["verified"][-1]["ppl"]
    best = min(result["verified"], key=lambda r: r["ppl"])
    assert result["winner"]["params"] == best["params"] and result["winner"]["ppl"] == best["ppl"]
    assert result["final"]["validation_ppl"] == best["ppl"] and result["final"]["test_ppl"] > 1
    totals = result["totals"]
    assert totals["n_trials"] == 12 and totals["n_verified"] == 4
    assert totals["pho_seconds"] >= totals["stage1_seconds"] + totals["stage2_seconds"]
    assert result["config"]["sampler"] == "cmaes" and result["config"]["model_hash"]
    assert result["config"]["sampler_options"]["sigma"] == 0.25
    assert result["config"]["sampler_options"]["mean"] == pytest.approx([0.5, 0.5, 0.4])
    for name in ("screening.png", "proxy_vs_ppl.png", "state.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "screening.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_is_deterministic_and_rerun_resumes_without_work(searched, tiny, tmp_path, capsys, monkeypatch):
    out, result = searched
    code, _, _ = run(search_args(tiny, tmp_path / "again"), capsys)
    assert code == 0
    assert essence(json.loads((tmp_path / "again" / "pho.json").read_text())) == essence(result)

    from crepe.search import context as runs

    calls = []
    original = runs.SearchContext.evaluate

    def counting(self, params, split="validation"):
        calls.append(split)
        return original(self, params, split)

    monkeypatch.setattr(runs.SearchContext, "evaluate", counting)
    code, _, _ = run(search_args(tiny, out), capsys)
    assert code == 0
    assert calls == ["test"]  # stage 1 and 2 come from state.json; only the final report is recomputed
    assert essence(json.loads((out / "pho.json").read_text())) == essence(result)


KILLER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from tests.crash import sigkill_on_call
    from crepe.search import context as runs
    from flows.cli import main
    runs.SearchContext.evaluate = sigkill_on_call(runs.SearchContext.evaluate, {kill_at})
    raise SystemExit(main({argv!r}))
    """
)


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_search_killed_in_stage_2_resumes_to_the_same_winner(sampler, tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    argv = ["--no-progress", *search_args(tiny, cut, "--sampler", sampler)]
    killer = KILLER.format(repo=str(REPO), kill_at=3, argv=argv)
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr
    state = json.loads((cut / "state.json").read_text())
    assert len(state["trials"]) == 12 and len(state["stage2"]["results"]) == 2
    assert not (cut / "pho.json").exists()
    cli = [sys.executable, "-m", "flows.cli", "--no-progress"]
    for out in (cut, straight):
        proc = subprocess.run([*cli, *search_args(tiny, out, "--sampler", sampler)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
    resumed = json.loads((cut / "pho.json").read_text())
    assert essence(resumed) == essence(json.loads((straight / "pho.json").read_text()))


def test_found_params_apply_with_prune_params_from(searched, tiny, tmp_path, capsys):
    out, result = searched
    code, _, err = run(["prune", "--model", str(tiny), "--method", "crepe", "--sparsity", "0.5",
                        "--params-from", str(out / "pho.json"), "--out", str(tmp_path / "m"), *HERMETIC], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "m" / "crepe_manifest.json").read_text())
    applied = manifest["prune"]["config"]["params"]
    for key, value in result["winner"]["params"].items():
        assert applied[key] == value


def test_hill_climb_cli(tiny, tmp_path, capsys):
    out = tmp_path / "hc"
    code, stdout, err = run(["hill-climb", "--model", str(tiny), "--sparsity", "2:4", "--max-evals", "5",
                             "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    result = json.loads((out / "hill_climb.json").read_text())
    assert result["n_evals"] == 5 and result["stop_reason"] == "max_evals"
    assert result["evaluations"][0]["params"]["gamma"] == 0.0  # starts at the RIA point
    best = min(result["evaluations"], key=lambda e: (e["ppl"], e["index"]))
    assert result["final"]["params"] == best["params"] and result["final"]["test_ppl"] > 1
    assert (out / "hill_climb.png").read_bytes()[:4] == b"\x89PNG"
    assert "hill climbing best" in stdout


def test_proxy_study_cli(tiny, tmp_path, capsys):
    out = tmp_path / "ps"
    code, stdout, err = run(["proxy-study", "--model", str(tiny), "--sparsity", "0.5", "--configs", "6",
                             "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    result = json.loads((out / "proxy_study.json").read_text())
    assert len(result["rows"]) == 6 and set(result["spearman"]) == PROXIES
    for name in PROXIES:
        rho = result["spearman"][name]
        assert rho is None or -1.0 <= rho <= 1.0
        assert (out / f"proxy_{name}.png").read_bytes()[:4] == b"\x89PNG"
    from tasks.search_jobs import spearman

    ppls = [r["ppl"] for r in result["rows"]]
    assert result["spearman"]["gini_pruned"] == spearman([r["proxies"]["gini_pruned"] for r in result["rows"]], ppls)
    assert "gini_pruned" in stdout


def test_spearman_matches_hand_computed_ranks():
    from tasks.search_jobs import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1 2 3 4, y: 1 3 2 4 -> d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6*2 / (4 * 15) = 0.8
    assert spearman([0.1, 0.2, 0.3, 0.4], [5, 7, 6, 9]) == pytest.approx(0.8)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None  # constant proxy
    assert spearman([1, 2, float("nan"), 4, 5], [1, 2, 3, None, 5]) == pytest.approx(1.0)  # 3 finite pairs
    assert spearman([1, 2], [1, 2]) is None


def test_cma_start_mean_is_the_ria_like_point():
    from crepe.search.context import cma_start_mean
    from crepe.search.space import SearchSpace

    assert cma_start_mean(SearchSpace()) == pytest.approx([0.5, 0.5, 0.4])
    assert cma_start_mean(SearchSpace(alpha=(0, 4), log10_gamma=(-2, 0))) == pytest.approx([0.25, 0.5, 0.0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trials", "1"], "--trials 1: pho.n_trials = 1 must be >= 2"),
        (["--trials", "11"], "n_trials 11 is smaller than one CMA-ES population"),
        (["--top-k", "0"], "--top-k 0: pho.top_k = 0 must be >= 1"),
        (["--top-k", "13"], "--top-k 13: pho.top_k = 13 is larger than pho.n_trials = 12"),
        (["--sampler", "grid"], "argument --sampler: invalid choice: 'grid' (choose from 'cmaes', 'tpe', 'random')"),
        (["--alpha-bounds", "2,1"], "alpha bounds (2, 1) are inverted or empty"),
        (["--log10-gamma-bounds", "0,0"], "log10_gamma bounds (0, 0) are inverted or empty"),
        (["--sigma", "0"], "--sigma 0.0 must be a positive number"),
        (["--alpha-bounds", "1"], "is not LOW,HIGH"),
    ],
)
def test_search_bad_input_fails_before_loading(extra, message, tmp_path, capsys):
    code, _, err = run(search_args("/does/not/exist", tmp_path / "o", *extra), capsys)
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "o").exists()


def test_search_unknown_target_module_names_the_alternatives(tiny, tmp_path, capsys):
    code, _, err = run(search_args(tiny, tmp_path / "o", "--target-module", "attn.q"), capsys)
    assert code == 2
    line = error_line(err)
    assert "has no linear 'attn.q'" in line and "self_attn.q_proj" in line


def test_search_refuses_a_resume_file_of_another_configuration(searched, tiny, capsys):
    out, _ = searched
    before = (out / "state.json").read_bytes()
    code, _, err = run(search_args(tiny, out, "--sampler", "random"), capsys)
    assert code == 2
    line = error_line(err)
    assert "different configuration" in line and "sampler" in line
    code, _, err = run([*search_args(tiny, out), "--seed", "3"], capsys)
    assert code == 2 and "seed" in error_line(err)
    assert (out / "state.json").read_bytes() == before


def test_hill_climb_and_proxy_study_bad_input(tmp_path, capsys):
    code, _, err = run(["proxy-study", "--model", "/nope", "--sparsity", "0.5", "--configs", "2",
                        "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "--configs 2 must be an integer >= 3" in error_line(err)
    code, _, err = run(["hill-climb", "--model", "/nope", "--sparsity", "0.5", "--max-seconds", "-1",
                        "--out", str(tmp_path / "h")], capsys)
    assert code == 2 and "--max-seconds -1.0 must be a positive number" in error_line(err)
    code, _, err = run(["hill-climb", "--model", "/nope", "--sparsity", "0.5", "--max-evals", "0",
                        "--out", str(tmp_path / "h")], capsys)
    assert code == 2 and "must be a positive integer" in error_line(err)
