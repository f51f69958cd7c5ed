"""Shared fixtures: tiny seeded causal LMs of five architectures and seeded token ids.

Everything runs offline: the hub variables are set before anything imports ``transformers``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import ARCHS, build, random_ids  # noqa: E402
from torch import nn  # noqa: E402

# The models here are tiny: one intra-op thread is ~1000x faster than an OpenMP team of two on a
# busy 2-core machine (barrier spinning dominates a 64x64 matmul), and the results are the same.
torch.set_num_threads(1)

CALIB_N = 6
CALIB_SEQLEN = 16
EVAL_SEQLEN = 16
EVAL_WINDOWS = 5
EVAL_REMAINDER = 7  # tokens after the last full window, which the protocol drops


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    """Each of the five tiny architectures in turn."""
    return request.param


@pytest.fixture
def tiny_model(arch: str) -> nn.Module:
    """A fresh seeded float32 tiny causal LM of ``arch`` (eager attention)."""
    return build(arch, seed=0)


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """(6, 16) seeded calibration windows."""
    return random_ids(CALIB_N, CALIB_SEQLEN, seed=1234)


@pytest.fixture
def eval_ids() -> torch.Tensor:
    """(1, 5 * 16 + 7) seeded token stream: five full windows of 16 plus a dropped remainder."""
    return random_ids(1, EVAL_WINDOWS * EVAL_SEQLEN + EVAL_REMAINDER, seed=4321)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip without CUDA; every test in tests/test_gpu.py must carry the marker."""
    unmarked = [i.nodeid for i in items if i.path.name == "test_gpu.py" and i.get_closest_marker("gpu") is None]
    if unmarked:
        raise pytest.UsageError(f"{unmarked[0]} lacks @pytest.mark.gpu; every test in tests/test_gpu.py needs it")
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
