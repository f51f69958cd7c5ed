"""Seeded ask/tell samplers over the unit cube for PHO's stage 1 (spec §8.3-8.4).

- ``cmaes``: the ``cmaes`` package's ``CMA`` with bounds ``[[0, 1]] * dim``; its population is a
  divisor of ``n_trials`` so the budget is spent exactly (``tell`` takes whole generations);
- ``tpe`` and ``random``: Optuna's ``TPESampler`` / ``RandomSampler`` through the ask/tell study API.

Every sampler minimises, asks and tells strictly alternately, and is resumable: its state is the
configuration plus the told history, and restoring replays that history into a freshly seeded
sampler, which reproduces the uninterrupted sequence of asks exactly (checked during the replay).
``cmaes`` and ``optuna`` are imported lazily (the ``crepe[search]`` extra).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from crepe.errors import CrepeError
from crepe.registry import Registry

DEFAULT_SIGMA = 0.3


def default_popsize(dim: int) -> int:
    """CMA-ES's default population ``4 + floor(3 ln dim)`` (7 for dim = 3)."""
    return 4 + math.floor(3 * math.log(dim))


def cma_population_size(n_trials: int, dim: int) -> int:
    """The largest divisor of ``n_trials`` in ``[2, default_popsize(dim)]``, so generations fill it."""
    limit = default_popsize(dim)
    for size in range(min(limit, n_trials), 1, -1):
        if n_trials % size == 0:
            return size
    raise CrepeError(
        f"n_trials {n_trials} is smaller than one CMA-ES population: it has no divisor between 2 and "
        f"{limit} (the default population for dim {dim}); use a multiple of one of 2..{limit}, e.g. 60"
    )


class Sampler:
    """Minimising ask/tell sampler of unit-cube points; ``state_dict()`` is JSON-serialisable.

    Subclasses implement ``_ask`` (the next point) and ``_tell`` (one result for the pending point).
    """

    name = ""

    def __init__(self, dim: int, n_trials: int, seed: int) -> None:
        self.dim, self.n_trials, self.seed = dim, n_trials, seed
        self.history: list[tuple[list[float], float]] = []
        self._pending: np.ndarray | None = None

    # -- subclass hooks
    def _ask(self) -> np.ndarray:
        raise NotImplementedError

    def _tell(self, u: np.ndarray, value: float) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "n_trials": self.n_trials, "seed": self.seed}

    # -- public API
    @property
    def n_told(self) -> int:
        return len(self.history)

    @property
    def done(self) -> bool:
        """True once ``n_trials`` results were told."""
        return self.n_told >= self.n_trials

    def ask(self) -> np.ndarray:
        """The next point to evaluate, a float64 array in ``[0, 1]^dim``."""
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell(); tell the pending point first")
        u = np.clip(np.asarray(self._ask(), dtype=np.float64), 0.0, 1.0)
        self._pending = u
        return u.copy()

    def tell(self, u: np.ndarray, value: float) -> None:
        """Report the objective ``value`` (lower is better) of the point returned by ``ask()``."""
        if self._pending is None or not np.array_equal(np.asarray(u, dtype=np.float64), self._pending):
            raise RuntimeError("tell() must receive the point returned by the preceding ask()")
        value = float(value)
        if not math.isfinite(value):
            raise CrepeError(f"objective value {value!r} is not finite; samplers need finite values")
        pending, self._pending = self._pending, None
        self._tell(pending, value)
        self.history.append(([float(x) for x in pending], value))

    def state_dict(self) -> dict[str, Any]:
        """Configuration and told history (plain lists and floats: JSON round-trips it exactly)."""
        return {**self.config(), "history": [[list(u), v] for u, v in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay ``state``'s history into this freshly made sampler of the same configuration."""
        if self.history or self._pending is not None:
            raise RuntimeError("load_state_dict() needs a fresh sampler (nothing asked or told yet)")
        mine = self.config()
        differing = sorted(k for k in mine if state.get(k) != mine[k])
        if differing:
            details = ", ".join(f"{k}: saved {state.get(k)!r} vs {mine[k]!r}" for k in differing)
            raise CrepeError(f"the saved sampler state is from a different configuration ({details})")
        for i, (u_saved, value) in enumerate(state.get("history", [])):
            u = self.ask()
            if not np.array_equal(u, np.asarray(u_saved, dtype=np.float64)):
                raise CrepeError(
                    f"replaying the saved sampler state diverged at trial {i}; it was written by a "
                    "different version of the sampler and cannot be resumed"
                )
            self.tell(u, value)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        if self._pending is not None:
            raise RuntimeError("cannot pickle a sampler with a pending ask; tell it first")
        return sampler_from_state, (self.state_dict(),)


class CMASampler(Sampler):
    """``cmaes.CMA`` in the unit cube; tells are buffered into whole generations."""

    name = "cmaes"

    def __init__(
        self, dim: int, n_trials: int, seed: int, sigma: float = DEFAULT_SIGMA, mean: Any = None
    ) -> None:
        from cmaes import CMA  # optional: the "search" extra

        if dim < 2:
            raise CrepeError(f"the cmaes sampler needs dim >= 2, got {dim}; use tpe or random for 1-D")
        if not (math.isfinite(sigma) and sigma > 0):
            raise CrepeError(f"sigma {sigma!r} must be a positive number (in unit-cube coordinates)")
        super().__init__(dim, n_trials, seed)
        self.population_size = cma_population_size(n_trials, dim)
        self.sigma = float(sigma)
        m = np.full(dim, 0.5) if mean is None else np.asarray(mean, dtype=np.float64)
        if m.shape != (dim,) or not ((m >= 0).all() and (m <= 1).all()):
            raise CrepeError(f"mean {m.tolist()!r} must be a point of the unit cube [0, 1]^{dim}")
        self.mean = [float(x) for x in m]
        with np.errstate(divide="ignore"):  # populations of 2-3 divide by zero in unused weights
            self._cma = CMA(
                mean=m.copy(),
                sigma=self.sigma,
                bounds=np.array([[0.0, 1.0]] * dim),
                seed=seed,
                population_size=self.population_size,
            )
        self._generation: list[tuple[np.ndarray, float]] = []

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sigma": self.sigma, "mean": self.mean}

    def _ask(self) -> np.ndarray:
        return self._cma.ask()

    def _tell(self, u: np.ndarray, value: float) -> None:
        self._generation.append((u, value))
        if len(self._generation) == self.population_size:
            self._cma.tell(self._generation)
            self._generation = []


class OptunaSampler(Sampler):
    """Optuna's TPE or random sampler on float parameters ``u0 .. u{dim-1}`` in [0, 1]."""

    def __init__(self, name: str, dim: int, n_trials: int, seed: int) -> None:
        import optuna  # optional ("search" extra) and slow to import

        super().__init__(dim, n_trials, seed)
        self.name = name
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        make = optuna.samplers.TPESampler if name == "tpe" else optuna.samplers.RandomSampler
        self._study = optuna.create_study(direction="minimize", sampler=make(seed=seed))
        self._dists = {f"u{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(dim)}
        self._trial: Any = None

    def _ask(self) -> np.ndarray:
        self._trial = self._study.ask(self._dists)
        return np.array([self._trial.params[f"u{i}"] for i in range(self.dim)], dtype=np.float64)

    def _tell(self, u: np.ndarray, value: float) -> None:
        self._study.tell(self._trial, value)
        self._trial = None


def make_sampler(
    name: str, dim: int, n_trials: int, seed: int = 0, sigma: float = DEFAULT_SIGMA, mean: Any = None
) -> Sampler:
    """A fresh seeded sampler: ``cmaes`` (``sigma``, ``mean`` in unit coordinates), ``tpe``, ``random``."""
    if name not in SAMPLERS:
        raise CrepeError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    for field, value in (("dim", dim), ("n_trials", n_trials), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CrepeError(f"{field} {value!r} is not an integer")
    if dim < 1:
        raise CrepeError(f"dim {dim} must be >= 1")
    if n_trials < 2:
        raise CrepeError(f"n_trials {n_trials} is below 2; use at least 2 trials (the default is 60)")
    if name == "cmaes":
        return CMASampler(int(dim), int(n_trials), int(seed), sigma, mean)
    return OptunaSampler(name, int(dim), int(n_trials), int(seed))


# The sampler registry (``pho.sampler``, ``--sampler``).
SAMPLERS = Registry("sampler")
SAMPLERS.register("cmaes", "CMA-ES (the cmaes package) in the unit cube; the paper's sampler (spec §8.4)", obj=CMASampler)
SAMPLERS.register("tpe", "Optuna's seeded TPE sampler", obj=OptunaSampler)
SAMPLERS.register("random", "Optuna's seeded uniform random sampler", obj=OptunaSampler)


def sampler_from_state(state: dict[str, Any]) -> Sampler:
    """Rebuild a sampler from :meth:`Sampler.state_dict` output, replaying its history."""
    needed = ["name", "dim", "n_trials", "seed", "history"]
    if state.get("name") == "cmaes":
        needed += ["sigma", "mean"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CrepeError(f"the saved sampler state lacks {', '.join(missing)}; it is not a sampler state")
    extra = {"sigma": state["sigma"], "mean": state["mean"]} if state.get("name") == "cmaes" else {}
    sampler = make_sampler(state["name"], state["dim"], state["n_trials"], state["seed"], **extra)
    sampler.load_state_dict(state)
    return sampler
