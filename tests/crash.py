"""Simulated crashes for resume tests: a wrapper that kill -9s its own process on the k-th call."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any


def sigkill_on_call(fn: Callable[..., Any], kill_at: int) -> Callable[..., Any]:
    """``fn``, except that call number ``kill_at`` (1-based) SIGKILLs the process: no cleanup runs."""
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapped
