"""Checks crepe.search.hillclimb: it finds a separable bowl's minimum within bounds, spends max_evals
exactly, never pays twice for a point, resumes after a killed subprocess to the same result (state in
tasks.checkpoint.JsonCheckpoint) and from a MemoryCheckpoint, refuses a changed configuration and
rejects bad budgets and settings."""

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
from crepe.search.hillclimb import hill_climb
from crepe.search.space import SearchSpace
from tasks.checkpoint import JsonCheckpoint


def bowl(params: dict) -> float:
    """Separable; minimum 1.0 at alpha 0.75, beta 1.25, gamma 1e-2; gamma = 0 costs 16 (as lg = -6)."""
    lg = math.log10(params["gamma"]) if params["gamma"] > 0 else -6.0
    return 1.0 + (params["alpha"] - 0.75) ** 2 + (params["beta"] - 1.25) ** 2 + (lg + 2.0) ** 2


def key(params: dict) -> tuple:
    return tuple(round(params[k], 9) for k in ("alpha", "beta", "gamma"))


def test_finds_minimum_and_caches():
    seen = []

    def f(p):
        seen.append(key(p))
        return bowl(p)

    out = hill_climb(f, max_evals=500)
    assert out["stop_reason"] == "converged"
    best = out["best"]
    assert best["ppl"] == pytest.approx(1.0)
    assert best["params"]["alpha"] == pytest.approx(0.75)
    assert best["params"]["beta"] == pytest.approx(1.25)
    assert best["params"]["gamma"] == pytest.approx(1e-2)
    assert best["params"]["kernel_size"] == 9
    assert len(seen) == len(set(seen)) == out["n_evals"] == len(out["evaluations"])
    assert seen[0] == (1.0, 1.0, 0.0)  # starts at the RIA point
    assert all(s < 0.05 for s in out["steps"].values())
    json.dumps(out, allow_nan=False)


def test_stays_in_bounds():
    space = SearchSpace(alpha=(0.0, 0.5), beta=(1.0, 2.0), log10_gamma=(-4.0, -3.0))
    out = hill_climb(bowl, space=space, start={"alpha": 0.2, "beta": 1.5, "gamma": 1e-3}, max_evals=300)
    for e in out["evaluations"]:
        p = e["params"]
        assert 0.0 <= p["alpha"] <= 0.5 and 1.0 <= p["beta"] <= 2.0
        assert p["gamma"] == 0 or 1e-4 - 1e-12 <= p["gamma"] <= 1e-3 + 1e-12
    best = out["best"]["params"]
    assert best["alpha"] == pytest.approx(0.5) and best["beta"] == pytest.approx(1.25)
    assert best["gamma"] == pytest.approx(1e-3)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_evals_exact(n):
    calls = []
    out = hill_climb(lambda p: calls.append(p) or bowl(p), max_evals=n)
    assert len(calls) == n == out["n_evals"]
    assert out["stop_reason"] == "max_evals"


def test_max_seconds_stops():
    out = hill_climb(bowl, max_seconds=1e-9)
    assert out["stop_reason"] == "max_seconds" and out["n_evals"] == 1


def test_nan_never_best():
    out = hill_climb(lambda p: float("nan") if p["gamma"] > 0 else bowl(p), max_evals=40)
    assert out["best"]["params"]["gamma"] == 0
    assert any(e["ppl"] is None and e["ppl_raw"] == "nan" for e in out["evaluations"])
    json.dumps(out, allow_nan=False)


KILLER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path[:0] = [{tests!r}, {root!r}]
    from crash import sigkill_on_call
    from test_search_hillclimb import bowl
    from crepe.search.hillclimb import hill_climb
    from tasks.checkpoint import JsonCheckpoint

    hill_climb(sigkill_on_call(bowl, {kill_at}), max_evals=30, checkpoint=JsonCheckpoint(Path({state!r})),
               config={{"model": "x"}})
    """
)


def test_resume_after_kill(tmp_path):
    state = tmp_path / "hc.json"
    kill_at = 13
    script = KILLER.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parent.parent), kill_at=kill_at,
                           state=str(state))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(json.loads(state.read_text())["evaluations"]) == kill_at - 1

    calls = []
    resumed = hill_climb(lambda p: calls.append(p) or bowl(p), max_evals=30, checkpoint=JsonCheckpoint(state),
                         config={"model": "x"})
    straight = hill_climb(bowl, max_evals=30, config={"model": "x"})
    assert straight["stop_reason"] == "max_evals"
    assert len(calls) == straight["n_evals"] - (kill_at - 1)
    strip = [(e["params"], e["ppl"]) for e in straight["evaluations"]]
    assert [(e["params"], e["ppl"]) for e in resumed["evaluations"]] == strip
    assert resumed["best"] == straight["best"] and resumed["stop_reason"] == straight["stop_reason"]
    assert json.loads(state.read_text())["stop_reason"] == straight["stop_reason"]

    # a larger budget extends the finished run without paying again for known points
    more = []
    extended = hill_climb(lambda p: more.append(key(p)) or bowl(p), max_evals=80, checkpoint=JsonCheckpoint(state),
                          config={"model": "x"})
    assert more and not set(more) & {key(e["params"]) for e in straight["evaluations"]}
    uninterrupted = hill_climb(bowl, max_evals=80)
    assert [(e["params"], e["ppl"]) for e in extended["evaluations"]] == [
        (e["params"], e["ppl"]) for e in uninterrupted["evaluations"]
    ]
    with pytest.raises(CrepeError, match=r"differs in: model, shrink\)"):
        hill_climb(bowl, max_evals=30, shrink=0.25, checkpoint=JsonCheckpoint(state), config={"model": "y"})


def test_memory_checkpoint_extends_a_finished_run():
    ckpt = MemoryCheckpoint()
    first = hill_climb(bowl, max_evals=10, checkpoint=ckpt, config={"model": "x"})
    assert ckpt.state == json.loads(json.dumps(first))  # the final summary is saved
    more = []
    extended = hill_climb(lambda p: more.append(key(p)) or bowl(p), max_evals=25, checkpoint=ckpt, config={"model": "x"})
    assert len(more) == 15 and not set(more) & {key(e["params"]) for e in first["evaluations"]}
    straight = hill_climb(bowl, max_evals=25)
    assert [(e["params"], e["ppl"]) for e in extended["evaluations"]] == [
        (e["params"], e["ppl"]) for e in straight["evaluations"]
    ]
    with pytest.raises(CrepeError, match=r"^the in-memory search state .*differs in: min_step\)"):
        hill_climb(bowl, max_evals=30, min_step=0.1, checkpoint=ckpt, config={"model": "x"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs a budget"),
        ({"max_evals": 0}, "max_evals"),
        ({"max_evals": 2.5}, "max_evals"),
        ({"max_evals": True}, "max_evals"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"max_seconds": -1.0}, "max_seconds"),
        ({"max_seconds": float("nan")}, "max_seconds"),
        ({"max_evals": 5, "shrink": 1.0}, "shrink"),
        ({"max_evals": 5, "min_step": 0}, "min_step"),
        ({"max_evals": 5, "steps": {"alpha": -0.5}}, "step for alpha"),
        ({"max_evals": 5, "steps": {"gamma": 0.5}}, "unknown step"),
        ({"max_evals": 5, "start": {"alpha": 3.0, "beta": 1.0, "gamma": 0.0}}, "alpha 3.0 is outside"),
        ({"max_evals": 5, "start": {"alpha": 1.0, "beta": 1.0, "gamma": 10.0}}, "log10 gamma"),
        ({"max_evals": 5, "space": SearchSpace(kernel_choices=(3, 5))}, "kernel_choices"),
    ],
)
def test_rejects_bad_settings(kwargs, match):
    with pytest.raises(CrepeError, match=match):
        hill_climb(lambda p: pytest.fail("evaluated"), **kwargs)
