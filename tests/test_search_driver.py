"""Checks crepe.search.driver: stage-1 screening budgets and determinism per sampler, resume after a
killed subprocess (tasks.checkpoint.JsonCheckpoint), config checks on resume (JSON file and
crepe.search.checkpoint.MemoryCheckpoint), candidate selection (RIA point always), stage-2
verification (lowest PPL, resume without re-evaluation, non-finite PPL) and the run_pho summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crepe.errors import CrepeError
from crepe.search.checkpoint import MemoryCheckpoint
from crepe.search.driver import Trial, run_pho, screen, select_candidates, verify
from crepe.search.proxies import PROXY_NAMES
from crepe.search.samplers import SAMPLERS
from crepe.search.space import RIA_POINT, SearchSpace
from tasks.checkpoint import JsonCheckpoint

SPACE = SearchSpace()
N = 12  # cmaes population 6: two whole generations


def fake_objective(params: dict) -> dict[str, float]:
    """Cheap deterministic stand-in for ProxyObjective: every proxy name, gini_pruned a bowl."""
    a, b, lg = params["alpha"], params["beta"], math.log10(params["gamma"])
    g = (a - 0.7) ** 2 + (b - 1.3) ** 2 + 0.1 * (lg + 2.0) ** 2
    return {name: g + i for i, name in enumerate(PROXY_NAMES)}


def strip(trials: list[Trial]) -> list[tuple]:
    return [(t.index, t.params, t.proxies) for t in trials]


# --- stage 1 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_screen_budget_and_determinism(sampler, tmp_path):
    calls, ticks = [], []

    def objective(params):
        calls.append(params)
        return fake_objective(params)

    trials = screen(objective, SPACE, sampler, N, seed=3, progress=lambda d, t: ticks.append((d, t)))
    assert len(trials) == N == len(calls)
    assert [t.index for t in trials] == list(range(N))
    assert ticks[-1] == (N, N) and len(ticks) == N
    assert all(set(t.proxies) == set(PROXY_NAMES) for t in trials)
    assert all(set(t.params) == {"alpha", "beta", "gamma", "kernel_size"} for t in trials)
    again = screen(fake_objective, SPACE, sampler, N, seed=3, checkpoint=JsonCheckpoint(tmp_path / "s.json"))
    assert strip(again) == strip(trials)
    other = screen(fake_objective, SPACE, sampler, N, seed=4)
    assert strip(other) != strip(trials)
    state = json.loads((tmp_path / "s.json").read_text())
    assert len(state["trials"]) == N and len(state["sampler"]["history"]) == N
    assert set(state) == {"version", "config", "sampler", "trials", "stage2"}


KILLER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path[:0] = [{tests!r}, {root!r}]
    from crash import sigkill_on_call
    from test_search_driver import fake_objective
    from crepe.search.driver import screen
    from crepe.search.space import SearchSpace
    from tasks.checkpoint import JsonCheckpoint

    screen(sigkill_on_call(fake_objective, {kill_at}), SearchSpace(), {sampler!r}, {n}, 5,
           JsonCheckpoint(Path({state!r})), {{"model": "x"}})
    """
)


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_screen_resume_after_kill(sampler, tmp_path):
    state = tmp_path / "state.json"
    kill_at = 9  # mid second cmaes generation
    script = KILLER.format(
        tests=str(Path(__file__).parent), root=str(Path(__file__).parent.parent), kill_at=kill_at, sampler=sampler, n=N, state=str(state)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    saved = json.loads(state.read_text())
    assert len(saved["trials"]) == kill_at - 1

    calls = []

    def objective(params):
        calls.append(params)
        return fake_objective(params)

    resumed = screen(objective, SPACE, sampler, N, 5, JsonCheckpoint(state), {"model": "x"})
    assert len(calls) == N - (kill_at - 1)
    straight = screen(fake_objective, SPACE, sampler, N, 5, None, {"model": "x"})
    assert strip(resumed) == strip(straight)
    # a finished state file is returned as is, without evaluating anything
    finished = screen(lambda p: pytest.fail("evaluated"), SPACE, sampler, N, 5, JsonCheckpoint(state), {"model": "x"})
    assert strip(finished) == strip(straight)


def test_screen_resume_with_other_config_names_keys(tmp_path):
    state = tmp_path / "state.json"
    ckpt = JsonCheckpoint(state)
    screen(fake_objective, SPACE, "random", 4, 0, ckpt, {"model": "a", "pattern": "2:4"})
    with pytest.raises(CrepeError, match=r"differs in: n_trials, seed\); delete it or use another --out$") as err:
        screen(fake_objective, SPACE, "random", 6, 1, ckpt, {"model": "a", "pattern": "2:4"})
    assert str(err.value).startswith(f"resume file {str(state)!r} was written for a different configuration")
    with pytest.raises(CrepeError, match=r"differs in: model, space\)"):
        screen(fake_objective, SearchSpace(alpha=(0, 1)), "random", 4, 0, ckpt, {"model": "b", "pattern": "2:4"})
    state.write_text('{"version": 0, "config": {}}')
    with pytest.raises(CrepeError, match="is not a version-1 search state"):
        screen(fake_objective, SPACE, "random", 4, 0, ckpt, {})
    state.write_text("not json")
    with pytest.raises(CrepeError, match="not a readable JSON"):
        screen(fake_objective, SPACE, "random", 4, 0, ckpt, {})


def test_screen_in_memory_resumes_and_refuses_other_configs():
    ckpt = MemoryCheckpoint()
    assert ckpt.state is None
    calls = []
    first = screen(lambda p: calls.append(p) or fake_objective(p), SPACE, "tpe", N, 2, ckpt, {"model": "a"})
    assert len(calls) == N and len(ckpt.state["trials"]) == N
    again = screen(lambda p: pytest.fail("evaluated"), SPACE, "tpe", N, 2, ckpt, {"model": "a"})
    assert strip(again) == strip(first)
    with pytest.raises(CrepeError, match=r"^the in-memory search state was written for a different configuration "
                                         r"\(differs in: model, seed\)"):
        screen(fake_objective, SPACE, "tpe", N, 3, ckpt, {"model": "b"})


def test_screen_requires_gini_pruned():
    with pytest.raises(CrepeError, match="gini_pruned"):
        screen(lambda p: {"gini_retained": 0.1}, SPACE, "random", 4, 0)


# --- candidate selection --------------------------------------------------------------------------------


def make_trials(values: list[float]) -> list[Trial]:
    return [
        Trial(i, {"alpha": 0.1 * i, "beta": 1.0, "gamma": 1e-3, "kernel_size": 9}, {"gini_pruned": v}, 0.0)
        for i, v in enumerate(values)
    ]


def test_select_candidates_order_and_ria():
    trials = make_trials([0.5, 0.2, 0.9, 0.2, 0.1])
    chosen = select_candidates(trials, 3)
    assert len(chosen) == 4
    assert [c["alpha"] for c in chosen[:3]] == pytest.approx([0.4, 0.1, 0.3])  # ties by index
    assert chosen[-1] == RIA_POINT
    assert len(select_candidates(trials, 5)) == 6
    assert select_candidates(trials, 1) == [trials[4].params, RIA_POINT]


def test_select_candidates_never_duplicates_ria():
    trials = make_trials([0.5, 0.2, 0.9])
    trials[1].params = {**RIA_POINT, "kernel_size": 9}
    chosen = select_candidates(trials, 2)
    assert len(chosen) == 2 and sum(c["gamma"] == 0 for c in chosen) == 1


def test_select_candidates_nan_last():
    chosen = select_candidates(make_trials([float("nan"), 0.3, 0.2]), 3)
    assert [c["alpha"] for c in chosen[:3]] == pytest.approx([0.2, 0.1, 0.0])


@pytest.mark.parametrize("bad", [0, -1, 6, 2.0, True])
def test_select_candidates_rejects_bad_top_k(bad):
    with pytest.raises(CrepeError, match="top_k"):
        select_candidates(make_trials([0.1] * 5), bad)


# --- stage 2 ----------------------------------------------------------------------------------------------


CANDS = [{"alpha": a, "beta": 1.0, "gamma": 1e-3} for a in (0.2, 0.5, 0.8, 1.1)] + [dict(RIA_POINT)]


def ppl_of(params: dict) -> float:
    return 10.0 + (params["alpha"] - 0.8) ** 2 + 5 * (params["gamma"] == 0)


def test_verify_picks_lowest(tmp_path):
    winner, results = verify(CANDS, ppl_of)
    assert winner["params"] == CANDS[2] and winner["ppl"] == pytest.approx(10.0)
    assert [r["index"] for r in results] == list(range(5))
    # ties go to the earlier candidate
    winner, _ = verify(CANDS, lambda p: 1.0)
    assert winner["index"] == 0


def test_verify_resume_skips_finished(tmp_path):
    state = tmp_path / "state.json"
    calls = []

    def failing(params):
        calls.append(params)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ppl_of(params)

    with pytest.raises(KeyboardInterrupt):
        verify(CANDS, failing, JsonCheckpoint(state), {"run": 1})
    assert len(json.loads(state.read_text())["stage2"]["results"]) == 2
    calls2 = []
    winner, results = verify(CANDS, lambda p: calls2.append(p) or ppl_of(p), JsonCheckpoint(state), {"run": 1})
    assert calls2 == CANDS[2:]
    assert winner["params"] == CANDS[2] and len(results) == 5
    assert [r["ppl"] for r in results] == [ppl_of(c) for c in CANDS]
    with pytest.raises(CrepeError, match=r"differs in: run\)"):
        verify(CANDS, ppl_of, JsonCheckpoint(state), {"run": 2})
    with pytest.raises(CrepeError, match=r"differs in: candidates\)"):
        verify(CANDS[:3], ppl_of, JsonCheckpoint(state), {"run": 1})


def test_verify_resume_in_memory():
    ckpt, calls = MemoryCheckpoint(), []

    def failing(params):
        calls.append(params)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return ppl_of(params)

    with pytest.raises(KeyboardInterrupt):
        verify(CANDS, failing, ckpt, {"run": 1})
    assert [r["params"] for r in ckpt.state["stage2"]["results"]] == CANDS[:3]
    rest = []
    winner, results = verify(CANDS, lambda p: rest.append(p) or ppl_of(p), ckpt, {"run": 1})
    assert rest == CANDS[3:] and winner["params"] == CANDS[2]
    assert [(r["index"], r["params"], r["ppl"]) for r in results] == [(i, c, ppl_of(c)) for i, c in enumerate(CANDS)]
    with pytest.raises(CrepeError, match=r"^the in-memory search state .*differs in: candidates\)"):
        verify(CANDS[1:], ppl_of, ckpt, {"run": 1})


def test_verify_nan(tmp_path):
    def nan_first(params):
        return float("nan") if params["alpha"] == 0.8 else ppl_of(params)

    winner, results = verify(CANDS, nan_first, JsonCheckpoint(tmp_path / "s.json"))
    assert results[2]["ppl"] is None and results[2]["ppl_raw"] == "nan"
    finite = [c for c in CANDS if c["alpha"] != 0.8]
    assert winner["params"] == min(finite, key=ppl_of) and winner["ppl"] is not None
    json.loads((tmp_path / "s.json").read_text())  # still valid
    with pytest.raises(CrepeError, match="non-finite"):
        verify(CANDS, lambda p: float("inf"))
    with pytest.raises(CrepeError, match="empty"):
        verify([], ppl_of)


# --- both stages ------------------------------------------------------------------------------------------


def test_run_pho_summary(tmp_path):
    state = tmp_path / "pho.json"
    ticks = []
    summary = run_pho(
        fake_objective,
        lambda p: 10.0 + fake_objective(p)["gini_pruned"] if p["gamma"] > 0 else 20.0,
        sampler_name="random",
        n_trials=8,
        top_k=3,
        seed=1,
        checkpoint=JsonCheckpoint(state),
        config={"model": "m"},
        progress=lambda *a: ticks.append(a),
    )
    json.dumps(summary, allow_nan=False)
    assert len(summary["trials"]) == 8 and len(summary["verified"]) == 4
    assert summary["candidates"][-1] == RIA_POINT
    best = min(summary["trials"], key=lambda t: t["proxies"]["gini_pruned"])
    assert summary["winner"]["params"] == best["params"]
    assert set(summary["totals"]) >= {"stage1_seconds", "stage2_seconds"}
    assert ticks[0] == ("screen", 1, 8) and ticks[-1] == ("verify", 4, 4)
    # resuming a finished run evaluates nothing and gives the same winner
    again = run_pho(
        lambda p: pytest.fail("screened"),
        lambda p: pytest.fail("verified"),
        sampler_name="random",
        n_trials=8,
        top_k=3,
        seed=1,
        checkpoint=JsonCheckpoint(state),
        config={"model": "m"},
    )
    assert again["winner"] == summary["winner"]
    with pytest.raises(CrepeError, match=r"differs in: top_k\)"):
        run_pho(fake_objective, ppl_of, sampler_name="random", n_trials=8, top_k=2, seed=1, checkpoint=JsonCheckpoint(state),
                config={"model": "m"})
