"""End to end on the real embedded SmolLM2-135M with a tiny budget (marked slow: ~1 minute).

Prunes 2:4 with CRePE, checks exact sparsity and N:M validity of all 210 linears, a finite
perplexity, that the saved folder reloads with identical logits, and that two runs with the same
seed write bit-identical weights.
"""

from __future__ import annotations

import front_door
import pytest
import torch
from transformers import AutoModelForCausalLM

from crepe.budget import Budget
from crepe.io import sha256_file
from crepe.models import load_model
from crepe.prune_config import build_config
from crepe.run import evaluate_loaded, prune_loaded

pytestmark = pytest.mark.slow

BUDGET = Budget(calib_samples=4, seqlen=64, max_windows=2, batch_size=4, seed=0, calib_source="auto",
                eval_source="auto")


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model("embedded:smollm2-135m", device="cpu")
    except Exception as exc:  # the package is installed by `make setup`
        pytest.fail(f"embedded SmolLM2 unavailable: {exc}")


def test_smollm2_crepe_2to4_end_to_end(smollm2, tmp_path):
    lm = smollm2
    config = build_config("crepe", "2:4")
    untouched = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "proj" not in n}
    report, calibration = prune_loaded(lm, config, BUDGET)
    assert len(report.layers) == 210
    for layer in report.layers:
        assert report.mask_pruned[layer.name] == layer.numel // 2, layer.name
        assert layer.nm_valid, layer.name
        assert layer.n_zeros >= layer.numel // 2
    assert report.nm_valid is True
    assert calibration is not None and calibration["n_samples"] == 4
    for name, param in lm.model.named_parameters():  # embeddings, norms (and the tied head) untouched
        if name in untouched:
            assert torch.equal(param, untouched[name]), name

    ppl = evaluate_loaded(lm, BUDGET, "test")
    assert torch.isfinite(torch.tensor(ppl["ppl"])) and ppl["ppl"] > 1

    out = tmp_path / "pruned"
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, reloaded(ids).logits)


def test_smollm2_same_seed_same_weights_bit_for_bit(tmp_path):
    budget = ("calibration.samples=2", "calibration.seqlen=32", "calibration.batch_size=2", "calibration.seed=7")
    cfg = front_door.config("embedded:smollm2-135m", "crepe", "0.5", "model.device=cpu", budget=budget)
    a = front_door.prune(cfg, tmp_path / "a")
    b = front_door.prune(cfg, tmp_path / "b")
    assert a["files"]["model.safetensors"] == b["files"]["model.safetensors"]
    assert sha256_file(tmp_path / "a" / "model.safetensors") == a["files"]["model.safetensors"]
    assert a["data"]["calibration"]["tokens_sha256"] == b["data"]["calibration"]["tokens_sha256"]
    assert a["prune"]["overall_sparsity"] >= 0.5
