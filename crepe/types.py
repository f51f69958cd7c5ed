"""Small value types shared across the library.

Conventions, stated once:

- a keep-mask is a bool tensor shaped like the weight, True = keep, False = prune;
- ``NMPattern(n, m)`` means: in every group of ``m`` consecutive weights along the *input*
  dimension of one output row, the ``n`` lowest-scoring weights are set to zero (``n`` zeros per
  ``m``, as ``prune_n`` in Wanda/RIA/SparseGPT). For 2:4 and 4:8 this equals NVIDIA's "n nonzeros
  of m"; for 1:4 or 3:4 it does not.
- ``group`` is the set of scores that compete with each other for unstructured pruning:
  ``"row"`` (each output row keeps the same count, Wanda) or ``"layer"`` (the whole matrix, RIA).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from crepe.errors import CrepeError

Group = Literal["row", "layer"]
GROUPS: tuple[str, ...] = ("row", "layer")


@dataclass(frozen=True, slots=True)
class NMPattern:
    """``n`` zeros in every ``m`` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise CrepeError(f"N:M pattern needs integers, got {self.n!r}:{self.m!r}")
        if self.m < 2 or not (1 <= self.n < self.m):
            raise CrepeError(
                f"invalid N:M pattern {self.n}:{self.m}; need integers with 1 <= N < M "
                "(N zeros in every M weights), e.g. 2:4 or 4:8"
            )

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True, slots=True)
class SparsitySpec:
    """Either an unstructured fraction (``pattern is None``) or an N:M pattern."""

    sparsity: float
    pattern: NMPattern | None = None

    def __str__(self) -> str:
        return str(self.pattern) if self.pattern else f"{self.sparsity:g}"

    @property
    def label(self) -> str:
        """A filesystem- and table-friendly label: ``50%``, ``2:4``."""
        return str(self.pattern) if self.pattern else f"{self.sparsity * 100:g}%"


_NM_RE = re.compile(r"^\s*(\S+?)\s*:\s*(\S+?)\s*$")


def check_sparsity(value: float) -> float:
    """Return ``value`` if it is a valid unstructured sparsity in [0, 1), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CrepeError(f"sparsity {value!r} is not a number; use a fraction in [0, 1), e.g. 0.5")
    if not 0.0 <= float(value) < 1.0:
        raise CrepeError(f"sparsity {value!r} is outside [0, 1); use a fraction such as 0.5")
    return float(value)


def parse_sparsity(text: str | float) -> SparsitySpec:
    """Parse ``"0.5"``, ``"50%"``, ``0.5`` or ``"2:4"`` into a :class:`SparsitySpec`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return SparsitySpec(check_sparsity(float(text)))
    if not isinstance(text, str):
        raise CrepeError(f"sparsity {text!r} is neither a fraction like 0.5 nor a pattern like 2:4")
    match = _NM_RE.match(text)
    if match:
        a, b = match.groups()
        if not all(x.isascii() and x.isdigit() for x in (a, b)):
            raise CrepeError(
                f"invalid N:M pattern {text!r}; N and M must be integers with 1 <= N < M, e.g. 2:4"
            )
        pattern = NMPattern(int(a), int(b))
        return SparsitySpec(pattern.sparsity, pattern)
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CrepeError(
            f"sparsity {text!r} is neither a fraction in [0, 1) like 0.5 nor an N:M pattern like 2:4"
        ) from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise CrepeError(f"sparsity {text!r} is outside [0, 1); use a fraction such as 0.5 or 50%")
    return SparsitySpec(check_sparsity(value))


def check_group(group: str) -> Group:
    if group not in GROUPS:
        raise CrepeError(f"unknown comparison group {group!r}; allowed: {', '.join(GROUPS)}")
    return group  # type: ignore[return-value]
