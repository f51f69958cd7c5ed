"""SearchContext: exact restore of the dense weights, shared calibration, baselines on the same data."""

from __future__ import annotations

import pytest
import torch

from crepe.budget import Budget
from crepe.search.context import SearchContext
from tests.local_models import save_tiny_llama

BUDGET = Budget(calib_samples=4, seqlen=32, max_windows=3, batch_size=2, calib_source="pydoc", eval_source="pydoc")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    folder = save_tiny_llama(tmp_path_factory.mktemp("runs") / "tiny")
    return SearchContext.create(str(folder), "2:4", BUDGET)


def weights(ctx):
    return {n: m.weight.detach().clone() for n, m in ctx._linears().items()}


def test_restore_is_bit_exact_after_a_prune(ctx):
    dense = weights(ctx)
    report = ctx.prune({"alpha": 0.7, "beta": 1.3, "gamma": 1e-2, "kernel_size": 5})
    assert report.nm_valid
    assert any(not torch.equal(dense[n], w) for n, w in weights(ctx).items())
    ctx.restore_dense()
    assert all(torch.equal(dense[n], w) for n, w in weights(ctx).items())


def test_same_params_same_perplexity_and_ria_point_equals_ria(ctx):
    p = {"alpha": 1.1, "beta": 0.9, "gamma": 1e-3, "kernel_size": 9}
    assert ctx.evaluate(p) == ctx.evaluate(p)
    # CRePE at alpha = beta = 1, gamma = 0 is RIA: identical perplexity on the same calibration data
    assert ctx.evaluate({"alpha": 1.0, "beta": 1.0, "gamma": 0.0}, "test") == ctx.evaluate_method("ria", "test")


def test_proxy_uses_dense_weights_even_after_pruning(ctx):
    ctx.prune({"alpha": 1.0, "beta": 1.0, "gamma": 0.0})
    fresh = ctx.proxy_objective()
    ctx.restore_dense()
    target = ctx._dense[ctx._target_name("self_attn.q_proj", 0)]
    assert torch.equal(fresh.weight, target.float())
    assert ctx.identity()["sparsity"] == "2:4" and ctx.identity()["model_hash"]
