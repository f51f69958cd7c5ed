"""PHO's search space for CRePE's coefficients (spec §8.4), optimised in the unit cube ``[0, 1]^d``.

Coordinates, in order: alpha (row term, linear), beta (column term, linear), log10 gamma
(neighbourhood term, log scale) and, only when searched, the kernel size K (a choice index).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from crepe.errors import CrepeError

KERNEL_CHOICES: tuple[int, ...] = (3, 5, 7, 9, 11)
DEFAULT_KERNEL_SIZE = 9

# RIA as a CRePE point. gamma = 0 lies outside the log10 gamma range (log10 0 = -inf), so the
# search never proposes it; stage 2 evaluates this point separately, so PHO never loses to RIA.
RIA_POINT: dict[str, float] = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0}

Bounds = tuple[float, float]


def _check_bounds(field: str, value: Any, nonnegative: bool = False) -> Bounds:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CrepeError(f"{field} bounds {value!r} are not a (low, high) pair of numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CrepeError(f"{field} bounds {value!r} are not finite; use finite numbers with low < high")
    if lo >= hi:
        raise CrepeError(f"{field} bounds ({lo:g}, {hi:g}) are inverted or empty; low must be < high")
    if nonnegative and lo < 0:
        raise CrepeError(f"{field} lower bound {lo:g} is negative; coefficients must be >= 0")
    return lo, hi


def _check_kernel(field: str, k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 3 or k % 2 == 0:
        raise CrepeError(f"{field} {k!r} is not an odd integer >= 3; use values such as 3, 5, 7, 9, 11")
    return int(k)


@dataclass(frozen=True)
class SearchSpace:
    """Box for (alpha, beta, log10 gamma[, K]) and its affine map to the unit cube.

    gamma is searched on a log scale because of CRePE's term-scale mismatch (spec §7): the row and
    column terms average ``1/C_in`` and ``1/C_out`` while the neighbourhood term averages about
    ``1/|Omega_K|`` (1/65 at K = 9), so at equal coefficients ``gamma * N`` dominates by ~60x on a
    4096^2 matrix and useful gamma values span decades (about 1e-3 to 1e-1 relative to alpha, beta).
    A linear range would spend almost every sample on gammas where the neighbourhood term swamps
    the rest. ``kernel_choices`` (e.g. :data:`KERNEL_CHOICES`) adds K as a searched dimension;
    by default K is fixed at ``kernel_size``.
    """

    alpha: Bounds = (0.0, 2.0)
    beta: Bounds = (0.0, 2.0)
    log10_gamma: Bounds = (-5.0, 0.0)
    kernel_size: int = DEFAULT_KERNEL_SIZE
    kernel_choices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_bounds("alpha", self.alpha, nonnegative=True))
        object.__setattr__(self, "beta", _check_bounds("beta", self.beta, nonnegative=True))
        object.__setattr__(self, "log10_gamma", _check_bounds("log10_gamma", self.log10_gamma))
        object.__setattr__(self, "kernel_size", _check_kernel("kernel_size", self.kernel_size))
        if self.kernel_choices is not None:
            try:
                choices = tuple(self.kernel_choices)
            except TypeError:
                raise CrepeError(
                    f"kernel_choices {self.kernel_choices!r} is not a sequence of sizes"
                ) from None
            choices = tuple(_check_kernel("kernel_choices entry", k) for k in choices)
            if len(choices) < 2 or len(set(choices)) != len(choices):
                raise CrepeError(
                    f"kernel_choices {choices!r} must hold at least two distinct sizes; "
                    "to fix K use kernel_size instead"
                )
            object.__setattr__(self, "kernel_choices", choices)

    @property
    def names(self) -> tuple[str, ...]:
        """Coordinate names in unit-cube order."""
        base = ("alpha", "beta", "log10_gamma")
        return (*base, "kernel_size") if self.kernel_choices else base

    @property
    def dim(self) -> int:
        return len(self.names)

    def _boxes(self) -> tuple[Bounds, Bounds, Bounds]:
        return self.alpha, self.beta, self.log10_gamma

    def to_unit(self, params: Mapping[str, float]) -> np.ndarray:
        """``params`` {alpha, beta, gamma[, kernel_size]} as a point of ``[0, 1]^dim`` (float64)."""
        missing = [k for k in ("alpha", "beta", "gamma") if k not in params]
        if missing:
            raise CrepeError(f"parameters {dict(params)!r} lack {missing[0]!r}; give alpha, beta and gamma")
        gamma = float(params["gamma"])
        if not gamma > 0:
            raise CrepeError(
                f"gamma {gamma!r} is outside the log-scale search range; gamma must be > 0 "
                "(the RIA point gamma = 0 is evaluated separately in stage 2)"
            )
        coords = (float(params["alpha"]), float(params["beta"]), math.log10(gamma))
        unit = []
        for name, x, (lo, hi) in zip(self.names, coords, self._boxes(), strict=False):
            if not lo <= x <= hi:
                raise CrepeError(f"{name} {x!r} is outside its search bounds [{lo:g}, {hi:g}]")
            unit.append((x - lo) / (hi - lo))
        if self.kernel_choices:
            k = params.get("kernel_size", self.kernel_size)
            if k not in self.kernel_choices:
                raise CrepeError(f"kernel_size {k!r} is not one of the searched sizes {self.kernel_choices}")
            unit.append((self.kernel_choices.index(k) + 0.5) / len(self.kernel_choices))
        return np.asarray(unit, dtype=np.float64)

    def from_unit(self, unit: np.ndarray) -> dict[str, Any]:
        """The parameters {alpha, beta, gamma, kernel_size} of a unit-cube point."""
        u = np.asarray(unit, dtype=np.float64)
        if u.shape != (self.dim,):
            raise CrepeError(f"unit point has shape {u.shape}; this search space needs ({self.dim},)")
        if not (np.isfinite(u).all() and (u >= 0).all() and (u <= 1).all()):
            raise CrepeError(f"unit point {u.tolist()!r} is outside the unit cube [0, 1]^{self.dim}")
        alpha, beta, log_gamma = (
            lo + float(x) * (hi - lo) for x, (lo, hi) in zip(u, self._boxes(), strict=False)
        )
        kernel = self.kernel_size
        if self.kernel_choices:
            n = len(self.kernel_choices)
            kernel = self.kernel_choices[min(int(u[3] * n), n - 1)]  # equal-width bins; u = 1 -> last
        return {"alpha": alpha, "beta": beta, "gamma": 10.0**log_gamma, "kernel_size": kernel}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description, for run records and resume checks."""
        return {
            "alpha": list(self.alpha),
            "beta": list(self.beta),
            "log10_gamma": list(self.log10_gamma),
            "kernel_size": self.kernel_size,
            "kernel_choices": list(self.kernel_choices) if self.kernel_choices else None,
        }
