"""PHO (proxy-based hyperparameter optimisation, spec §8): CRePE's coefficients from a cheap proxy.

- :mod:`~crepe.search.proxies`: Gini and outlier proxies of one pruned layer's scores;
- :mod:`~crepe.search.space`: the (alpha, beta, log10 gamma[, K]) box and its unit-cube map;
- :mod:`~crepe.search.samplers`: seeded, resumable ask/tell samplers (cmaes, tpe, random);
- :mod:`~crepe.search.objective`: target input norms and the ``params -> proxies`` objective;
- :mod:`~crepe.search.checkpoint`: where a resumable search keeps its state (protocol, in-memory one);
- :mod:`~crepe.search.driver`: the two stages (proxy screening, perplexity verification), resumable;
- :mod:`~crepe.search.hillclimb`: the perplexity hill-climbing baseline.
"""

from crepe.search.checkpoint import STATE_VERSION, Checkpoint, MemoryCheckpoint, jsonable
from crepe.search.driver import Trial, run_pho, screen, select_candidates, verify, winner_of
from crepe.search.hillclimb import hill_climb
from crepe.search.objective import DEFAULT_TARGET, ProxyObjective, find_target, target_input_norm
from crepe.search.proxies import PROXY_NAMES, compute_proxies, gini, outlier_ratio
from crepe.search.samplers import (
    SAMPLERS,
    Sampler,
    cma_population_size,
    default_popsize,
    make_sampler,
    sampler_from_state,
)
from crepe.search.space import KERNEL_CHOICES, RIA_POINT, SearchSpace

__all__ = [
    "DEFAULT_TARGET",
    "KERNEL_CHOICES",
    "PROXY_NAMES",
    "RIA_POINT",
    "SAMPLERS",
    "STATE_VERSION",
    "Checkpoint",
    "MemoryCheckpoint",
    "ProxyObjective",
    "Sampler",
    "SearchSpace",
    "Trial",
    "cma_population_size",
    "compute_proxies",
    "default_popsize",
    "find_target",
    "gini",
    "hill_climb",
    "jsonable",
    "make_sampler",
    "outlier_ratio",
    "run_pho",
    "sampler_from_state",
    "screen",
    "select_candidates",
    "target_input_norm",
    "verify",
    "winner_of",
]
