"""The data budget of a run: how many calibration windows, how long, how many evaluation windows.

A plain record: the values are validated once, by the pipeline configuration (``tasks.config``), before
any model work; library callers pass sensible integers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from crepe.data import get_calibration


@dataclass(frozen=True)
class Budget:
    """Calibration and evaluation windows of a run (``eval_seqlen`` None: the calibration ``seqlen``;
    ``max_windows`` None: the whole split)."""

    calib_samples: int = 128
    seqlen: int = 2048
    eval_seqlen: int | None = None
    max_windows: int | None = None
    batch_size: int = 8  # calibration windows per forward pass (memory, not results)
    eval_batch_size: int = 4  # perplexity windows per forward pass (logits are seqlen x vocab each)
    seed: int = 0
    calib_source: str = "auto"
    eval_source: str = "auto"
    data_dir: str | None = None

    @property
    def eval_len(self) -> int:
        return self.eval_seqlen or self.seqlen

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: the same config gives the same masks."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def calibration_windows(tokenizer: Any, budget: Budget) -> tuple[torch.Tensor, dict[str, Any]]:
    """The seeded calibration windows of ``budget`` (spec §1.2) and their record: the data source and its
    sha256, n_samples, seqlen, seed and the sha256 of the token ids (no machine paths)."""
    seed_everything(budget.seed)
    ids, info = get_calibration(tokenizer, budget.calib_samples, budget.seqlen, budget.seed, budget.calib_source,
                                budget.data_dir)
    record = {k: v for k, v in info.as_dict().items() if k != "path"}
    record.update(n_samples=budget.calib_samples, seqlen=budget.seqlen, seed=budget.seed,
                  tokens_sha256=hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest())
    return ids, record
