"""Checks crepe.search.samplers: the CMA-ES population rule and exact budgets, seeded determinism,
resume from a saved state (JSON and pickle) for every sampler, a quadratic sanity run and errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from crepe.errors import CrepeError
from crepe.search.samplers import (
    SAMPLERS,
    cma_population_size,
    default_popsize,
    make_sampler,
    sampler_from_state,
)

OPTIMUM = np.array([0.2, 0.7, 0.4])


def quadratic(u: np.ndarray) -> float:
    return float(((u - OPTIMUM[: len(u)]) ** 2).sum())


def run(sampler, n: int) -> list[np.ndarray]:
    asked = []
    for _ in range(n):
        u = sampler.ask()
        asked.append(u)
        sampler.tell(u, quadratic(u))
    return asked


# --- population rule ----------------------------------------------------------------------------


def test_default_popsize():
    assert [default_popsize(d) for d in (2, 3, 4, 10)] == [6, 7, 8, 10]


@pytest.mark.parametrize(
    ("n_trials", "dim", "expected"),
    [
        (60, 3, 6),
        (12, 3, 6),
        (10, 3, 5),
        (7, 3, 7),
        (14, 3, 7),
        (2, 3, 2),
        (9, 3, 3),
        (16, 4, 8),
        (20, 10, 10),
    ],
)
def test_cma_population_size_is_largest_divisor(n_trials, dim, expected):
    assert cma_population_size(n_trials, dim) == expected


@pytest.mark.parametrize("n_trials", [11, 13, 59])
def test_cma_prime_budget_too_small_for_a_population(n_trials):
    with pytest.raises(CrepeError, match=f"n_trials {n_trials} .*no divisor between 2 and 7"):
        make_sampler("cmaes", 3, n_trials, seed=0)


@pytest.mark.parametrize(("n_trials", "popsize"), [(60, 6), (12, 6), (10, 5)])
def test_cmaes_runs_exactly_n_trials(n_trials, popsize, monkeypatch):
    sampler = make_sampler("cmaes", 3, n_trials, seed=1)
    assert sampler.population_size == popsize
    told: list[int] = []
    original = sampler._cma.tell
    monkeypatch.setattr(sampler._cma, "tell", lambda sols: (told.append(len(sols)), original(sols)))
    run(sampler, n_trials)
    assert told == [popsize] * (n_trials // popsize)  # every trial reached CMA-ES, whole generations
    assert sampler.done and sampler.n_told == n_trials
    assert sampler._generation == []


# --- determinism and resume ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_is_deterministic_under_seed(name):
    a = run(make_sampler(name, 3, 12, seed=7), 12)
    b = run(make_sampler(name, 3, 12, seed=7), 12)
    c = run(make_sampler(name, 3, 12, seed=8), 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    for u in a:
        assert u.shape == (3,) and u.dtype == np.float64 and (u >= 0).all() and (u <= 1).all()


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("k", [0, 4, 6, 9])
def test_resume_reproduces_subsequent_asks(name, k):
    whole = run(make_sampler(name, 3, 18, seed=3), 18)
    first = make_sampler(name, 3, 18, seed=3)
    run(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # what a resume file holds
    resumed = sampler_from_state(state)
    assert resumed.n_told == k
    rest = run(resumed, 18 - k)
    assert all(np.array_equal(x, y) for x, y in zip(whole[k:], rest, strict=True))


@pytest.mark.parametrize("name", SAMPLERS)
def test_pickle_round_trip_resumes(name):
    sampler = make_sampler(name, 3, 12, seed=5)
    run(sampler, 5)
    clone = pickle.loads(pickle.dumps(sampler))
    assert all(np.array_equal(x, y) for x, y in zip(run(sampler, 7), run(clone, 7), strict=True))


def test_resume_refuses_a_different_configuration():
    state = make_sampler("cmaes", 3, 12, seed=1).state_dict()
    with pytest.raises(CrepeError, match="seed: saved 1 vs 2"):
        make_sampler("cmaes", 3, 12, seed=2).load_state_dict(state)
    with pytest.raises(CrepeError, match="name"):
        make_sampler("tpe", 3, 12, seed=1).load_state_dict(state)
    with pytest.raises(CrepeError, match="lacks"):
        sampler_from_state({"name": "random"})


def test_resume_detects_a_diverging_history():
    sampler = make_sampler("random", 3, 12, seed=1)
    run(sampler, 3)
    state = sampler.state_dict()
    state["history"][1][0][0] += 1e-9
    with pytest.raises(CrepeError, match="diverged at trial 1"):
        sampler_from_state(state)


def test_ask_tell_must_alternate():
    sampler = make_sampler("random", 2, 4, seed=0)
    u = sampler.ask()
    with pytest.raises(RuntimeError, match="tell the pending point"):
        sampler.ask()
    with pytest.raises(RuntimeError, match="preceding ask"):
        sampler.tell(u + 0.01, 1.0)
    with pytest.raises(CrepeError, match="not finite"):
        sampler.tell(u, float("nan"))
    sampler.tell(u, 1.0)
    assert sampler.history == [(u.tolist(), 1.0)]


# --- sanity ------------------------------------------------------------------------------------


def test_cmaes_minimises_a_quadratic():
    sampler = make_sampler("cmaes", 3, 60, seed=0)
    asked = run(sampler, 60)
    best = min(quadratic(u) for u in asked)
    assert best < 5e-3
    assert quadratic(np.array(sampler._cma.mean)) < 1e-2


def test_cmaes_mean_and_sigma_are_configurable():
    sampler = make_sampler("cmaes", 3, 12, seed=0, sigma=1e-6, mean=[0.5, 0.5, 0.4])
    u = sampler.ask()
    np.testing.assert_allclose(u, [0.5, 0.5, 0.4], atol=1e-4)
    assert sampler.state_dict()["sigma"] == 1e-6


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("nevergrad", 3, 60), {}, "unknown sampler 'nevergrad'; allowed: cmaes, tpe, random"),
        (("cmaes", 3, 1), {}, "n_trials 1 is below 2"),
        (("tpe", 3, 0), {}, "n_trials 0 is below 2"),
        (("cmaes", 1, 60), {}, "cmaes sampler needs dim >= 2"),
        (("random", 0, 60), {}, "dim 0 must be >= 1"),
        (("random", 3, 6.5), {}, "n_trials 6.5 is not an integer"),
        (("cmaes", 3, 60), {"sigma": 0.0}, "sigma 0.0 must be a positive"),
        (("cmaes", 3, 60), {"mean": [0.5, 1.5, 0.5]}, "must be a point of the unit cube"),
    ],
)
def test_bad_input_raises(args, kwargs, message):
    with pytest.raises(CrepeError, match=message.replace("(", r"\(")):
        make_sampler(*args, **kwargs)
