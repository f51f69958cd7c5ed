"""PHO's two stages (spec §8.3): proxy screening, then perplexity verification of the best candidates.

- :func:`screen` (stage 1): a seeded sampler proposes ``n_trials`` points of a :class:`SearchSpace`;
  each costs one call of the proxy objective and ``gini_pruned`` is told back (lower is better);
- :func:`select_candidates`: the ``top_k`` lowest-``gini_pruned`` parameter sets, plus the RIA point
  (alpha = beta = 1, gamma = 0) always, so PHO can never return something worse than RIA;
- :func:`verify` (stage 2): ``evaluate(params) -> validation perplexity`` for every candidate (the
  caller prunes the full model); the lowest finite perplexity wins, ties by candidate order;
- :func:`run_pho`: the three in a row with one checkpoint, returning a JSON-serialisable summary;
- :func:`winner_of`: the lowest finite perplexity of verified results.

Resumption: after every trial / candidate the whole state
(``{"version", "config", "sampler", "trials", "stage2"}``) goes to a
:class:`~crepe.search.checkpoint.Checkpoint` (default: a fresh
:class:`~crepe.search.checkpoint.MemoryCheckpoint`; a JSON file is ``tasks.checkpoint.JsonCheckpoint``).
A later call with the same ``config`` continues where the last one stopped: the sampler is restored
by replaying its told history (:func:`~crepe.search.samplers.sampler_from_state`), so an
interrupted-and-resumed search returns exactly the trials of an uninterrupted one; finished stage-2
candidates are not evaluated again. A state saved for a different ``config`` is refused with a
:class:`CrepeError` naming the differing keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from crepe.errors import CrepeError
from crepe.search.checkpoint import STATE_VERSION, Checkpoint, MemoryCheckpoint, jsonable
from crepe.search.samplers import make_sampler, sampler_from_state
from crepe.search.space import RIA_POINT, SearchSpace

OBJECTIVE_PROXY = "gini_pruned"


@dataclass
class Trial:
    """One stage-1 evaluation: trial number, parameters, every proxy, and seconds spent."""

    index: int
    params: dict[str, Any]
    proxies: dict[str, float]
    seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time (less sensitive than wall time to a shared CPU)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        return cls(int(data["index"]), dict(data["params"]), dict(data["proxies"]), float(data["seconds"]),
                   float(data.get("cpu_seconds", 0.0)))


# --- state ------------------------------------------------------------------------------------------


def _new_state(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"version": STATE_VERSION, "config": jsonable(dict(config)), "sampler": None, "trials": [], "stage2": {}}


# --- stage 1 ----------------------------------------------------------------------------------------


def screen_config(
    space: SearchSpace, sampler_name: str, n_trials: int, seed: int, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration a stage-1 state file is checked against: the caller's ``config`` plus the
    sampler, budget, seed and search space (those always, so a changed seed is never resumed)."""
    return {
        **dict(config or {}),
        "sampler": sampler_name,
        "n_trials": n_trials,
        "seed": seed,
        "space": space.as_dict(),
    }


def screen(
    objective: Callable[[dict], dict[str, float]],
    space: SearchSpace,
    sampler_name: str,
    n_trials: int,
    seed: int,
    checkpoint: Checkpoint | None = None,
    config: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    sampler_options: Mapping[str, Any] | None = None,
) -> list[Trial]:
    """Stage 1: ``n_trials`` proxy evaluations proposed by sampler ``sampler_name``, seeded by ``seed``.

    Each trial asks a unit-cube point, maps it with ``space.from_unit``, calls ``objective(params)``
    (a dict holding at least ``gini_pruned``) and tells ``gini_pruned`` back. After every trial the
    whole state goes to ``checkpoint`` (default: in memory); a state it holds for the same
    configuration (see :func:`screen_config`) is resumed. ``sampler_options`` (``sigma``, ``mean`` for cmaes) go to
    :func:`~crepe.search.samplers.make_sampler`. ``progress(done, total)`` is called after each trial.
    Returns all ``n_trials`` trials in order.
    """
    full_config = screen_config(space, sampler_name, n_trials, seed, config)
    checkpoint = MemoryCheckpoint() if checkpoint is None else checkpoint
    state = checkpoint.load(full_config)
    if state is not None and state.get("sampler") is not None:
        sampler = sampler_from_state(state["sampler"])
        trials = [Trial.from_dict(t) for t in state.get("trials", [])]
        if len(trials) != sampler.n_told:
            raise checkpoint.refuse(
                f"holds {len(trials)} trials but its sampler was told {sampler.n_told} (it is damaged)"
            )
    else:
        sampler = make_sampler(sampler_name, space.dim, n_trials, seed, **dict(sampler_options or {}))
        trials = []
        state = {**_new_state(full_config), **({} if state is None else {"stage2": state.get("stage2", {})})}
        state["sampler"] = sampler.state_dict()
        checkpoint.save(state)
    while not sampler.done:
        u = sampler.ask()
        params = space.from_unit(u)
        start, cpu = time.perf_counter(), time.process_time()
        proxies = {k: float(v) for k, v in objective(dict(params)).items()}
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if OBJECTIVE_PROXY not in proxies:
            raise CrepeError(
                f"the objective returned proxies {sorted(proxies)!r} without {OBJECTIVE_PROXY!r}; it must return it"
            )
        sampler.tell(u, proxies[OBJECTIVE_PROXY])
        trials.append(Trial(len(trials), params, proxies, seconds, cpu))
        state["sampler"] = sampler.state_dict()
        state["trials"] = [t.to_dict() for t in trials]
        checkpoint.save(state)
        if progress is not None:
            progress(len(trials), n_trials)
    return trials


# --- candidate selection ------------------------------------------------------------------------------


def _is_point(candidate: Mapping[str, Any], point: Mapping[str, Any]) -> bool:
    return all(k in candidate and float(candidate[k]) == float(v) for k, v in point.items())


def select_candidates(
    trials: Sequence[Trial], top_k: int, ria_point: Mapping[str, float] = RIA_POINT
) -> list[dict]:
    """The ``top_k`` lowest-``gini_pruned`` trials' parameters (ties by trial index, non-finite last,
    repeated parameter sets once), followed by ``ria_point`` unless one of them already is it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(trials):
        raise CrepeError(f"top_k {top_k!r} must be an integer between 1 and the number of trials ({len(trials)})")

    def key(t: Trial) -> tuple[bool, float, int]:
        v = float(t.proxies[OBJECTIVE_PROXY])
        return (not math.isfinite(v), v if math.isfinite(v) else 0.0, t.index)

    chosen: list[dict] = []
    for t in sorted(trials, key=key):
        if len(chosen) == top_k:
            break
        if dict(t.params) not in chosen:
            chosen.append(dict(t.params))
    if ria_point is not None and not any(_is_point(c, ria_point) for c in chosen):
        chosen.append(dict(ria_point))
    return chosen


# --- stage 2 ----------------------------------------------------------------------------------------------


def winner_of(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The result with the lowest finite ``ppl`` (``None`` is non-finite), ties by ``index``; a
    :class:`CrepeError` when none is finite."""
    finite = [r for r in results if r["ppl"] is not None]
    if not finite:
        raise CrepeError(
            f"every one of the {len(results)} verified candidates gave a non-finite perplexity; "
            "no configuration can be chosen (check the model and the sparsity)"
        )
    return dict(min(finite, key=lambda r: (r["ppl"], r["index"])))


def verify(
    candidates: Sequence[Mapping[str, Any]],
    evaluate: Callable[[dict], float],
    checkpoint: Checkpoint | None = None,
    config: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Stage 2: validation perplexity ``evaluate(params)`` of every candidate, in order.

    Returns ``(winner, results)``; each result is ``{"index", "params", "ppl", "seconds"}`` and the
    winner is the result with the lowest finite ``ppl`` (ties by candidate order). A non-finite
    perplexity is recorded as ``"ppl": None`` with ``"ppl_raw"`` (its text) and never wins; if all
    are non-finite a :class:`CrepeError` is raised. After every candidate the ``"stage2"`` entry of
    the state in ``checkpoint`` is rewritten (other entries kept); a resumed call with the same
    ``config`` and candidates skips the finished ones. ``progress(done, total)`` is called after each candidate.
    """
    cands = jsonable([dict(c) for c in candidates])
    if not cands:
        raise CrepeError("the candidate list is empty; stage 2 needs at least one candidate")
    checkpoint = MemoryCheckpoint() if checkpoint is None else checkpoint
    state = checkpoint.load(config or {}) or _new_state(config or {})
    stage2 = state.get("stage2") or {}
    results: list[dict] = []
    if stage2:
        if stage2.get("candidates") != cands:
            raise checkpoint.refuse("was written for a different configuration (differs in: candidates)")
        results = [dict(r) for r in stage2.get("results", [])]
    for i in range(len(results), len(cands)):
        start, cpu = time.perf_counter(), time.process_time()
        ppl = float(evaluate(dict(cands[i])))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        result: dict[str, Any] = {"index": i, "params": cands[i], "ppl": ppl, "seconds": seconds, "cpu_seconds": cpu}
        if not math.isfinite(ppl):
            result["ppl"], result["ppl_raw"] = None, repr(ppl)
        results.append(result)
        state["stage2"] = {"candidates": cands, "results": results}
        checkpoint.save(state)
        if progress is not None:
            progress(len(results), len(cands))
    return winner_of(results), results


# --- both stages --------------------------------------------------------------------------------------------


def run_pho(
    objective: Callable[[dict], dict[str, float]],
    evaluate: Callable[[dict], float],
    space: SearchSpace | None = None,
    sampler_name: str = "cmaes",
    n_trials: int = 60,
    top_k: int = 10,
    seed: int = 0,
    checkpoint: Checkpoint | None = None,
    config: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    ria_point: Mapping[str, float] = RIA_POINT,
    sampler_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Screen, select and verify with one ``checkpoint`` (default: in memory); a JSON-serialisable summary.

    The summary holds ``config``, every ``trials`` entry (params, all proxies, seconds), the
    ``candidates``, every ``verified`` result (params, ppl, seconds), the ``winner`` and ``totals``
    (``stage1_seconds`` and ``stage2_seconds`` are sums of per-evaluation times, so a resumed run
    reports the compute of every session). ``progress(stage, done, total)`` with stage "screen" or
    "verify".
    """
    space = space if space is not None else SearchSpace()
    full_config = {
        **screen_config(space, sampler_name, n_trials, seed, config),
        "top_k": top_k,
        "ria_point": None if ria_point is None else dict(ria_point),
        "sampler_options": dict(sampler_options or {}),
    }
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_trials:
        raise CrepeError(f"top_k {top_k!r} must be an integer between 1 and n_trials ({n_trials})")

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    checkpoint = MemoryCheckpoint() if checkpoint is None else checkpoint
    trials = screen(
        objective, space, sampler_name, n_trials, seed, checkpoint, full_config, stage("screen"), sampler_options
    )
    candidates = select_candidates(trials, top_k, ria_point)
    winner, results = verify(candidates, evaluate, checkpoint, jsonable(full_config), stage("verify"))
    return {
        "version": STATE_VERSION,
        "config": jsonable(full_config),
        "trials": [t.to_dict() for t in trials],
        "candidates": jsonable(candidates),
        "verified": results,
        "winner": winner,
        "totals": {
            "n_trials": len(trials),
            "n_verified": len(results),
            "stage1_seconds": sum(t.seconds for t in trials),
            "stage2_seconds": sum(r["seconds"] for r in results),
            "stage1_cpu_seconds": sum(t.cpu_seconds for t in trials),
            "stage2_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in results),
        },
    }
