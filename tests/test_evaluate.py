"""Perplexity under the §14.1 protocol on tiny models: windows, NLL scaling, batching, blockwise."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, build, random_ids
from torch import nn

from crepe.errors import CrepeError
from crepe.evaluate import perplexity, same_device

SEQLEN = 16


def _hand_nll(model: nn.Module, ids: torch.Tensor, seqlen: int, n_windows: int) -> torch.Tensor:
    """Reference: one window at a time, mean CE of the seqlen-1 shifted predictions, times seqlen."""
    stream = ids.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for w in range(n_windows):
            window = stream[w * seqlen : (w + 1) * seqlen][None]
            logits = model(input_ids=window, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[0, :-1], window[0, 1:])
            total += loss.double() * seqlen
    return total


def test_window_count_drops_remainder(tiny_model: nn.Module, eval_ids: torch.Tensor) -> None:
    n_tokens = eval_ids.numel()
    assert n_tokens % SEQLEN != 0
    res = perplexity(tiny_model, eval_ids, SEQLEN)
    assert res.n_windows == n_tokens // SEQLEN == res.n_windows_available
    assert res.seqlen == SEQLEN
    assert res.n_tokens == res.n_windows * SEQLEN
    # the remainder really is unused: replacing it changes nothing
    changed = eval_ids.clone()
    changed[0, res.n_tokens :] = (changed[0, res.n_tokens :] + 1) % VOCAB
    again = perplexity(tiny_model, changed, SEQLEN)
    assert again.nll_sum == res.nll_sum
    trimmed = perplexity(tiny_model, eval_ids[:, : res.n_tokens], SEQLEN)
    assert trimmed.nll_sum == res.nll_sum
    assert trimmed.n_windows == res.n_windows


def test_nll_matches_hand_loop(tiny_model: nn.Module, eval_ids: torch.Tensor) -> None:
    res = perplexity(tiny_model, eval_ids, SEQLEN, batch_size=2)
    expected = _hand_nll(tiny_model, eval_ids, SEQLEN, res.n_windows)
    torch.testing.assert_close(torch.tensor(res.nll_sum, dtype=torch.float64), expected, rtol=1e-6, atol=1e-6)
    assert res.ppl == pytest.approx(math.exp(res.nll_sum / (res.n_windows * SEQLEN)), rel=1e-12)


def test_uniform_model_has_perplexity_vocab() -> None:
    """All-zero logits: CE = log V per prediction, so ppl = V exactly despite the seqlen scaling."""
    model = build("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = random_ids(1, 3 * SEQLEN, seed=7)
    res = perplexity(model, ids, SEQLEN)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-5)
    assert res.nll_sum == pytest.approx(3 * SEQLEN * math.log(VOCAB), rel=1e-6)


def test_max_windows_caps_and_reports_available(eval_ids: torch.Tensor) -> None:
    model = build("llama")
    full = perplexity(model, eval_ids, SEQLEN)
    capped = perplexity(model, eval_ids, SEQLEN, max_windows=2)
    assert capped.n_windows == 2
    assert capped.n_windows_available == full.n_windows == 5
    assert capped.n_tokens == 2 * SEQLEN
    first_two = perplexity(model, eval_ids[:, : 2 * SEQLEN], SEQLEN)
    assert capped.nll_sum == pytest.approx(first_two.nll_sum, rel=1e-12)
    assert capped.ppl == pytest.approx(first_two.ppl, rel=1e-12)
    more = perplexity(model, eval_ids, SEQLEN, max_windows=100)
    assert more.n_windows == 5 and more.n_windows_available == 5
    assert more.nll_sum == pytest.approx(full.nll_sum, rel=1e-12)


def test_flat_and_2d_streams_agree(eval_ids: torch.Tensor) -> None:
    model = build("qwen2")
    a = perplexity(model, eval_ids, SEQLEN)
    b = perplexity(model, eval_ids.reshape(-1), SEQLEN)
    assert a.nll_sum == b.nll_sum and a.n_windows == b.n_windows


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batch_size_does_not_change_ppl(arch: str, eval_ids: torch.Tensor) -> None:
    model = build(arch)
    one = perplexity(model, eval_ids, SEQLEN, batch_size=1)
    three = perplexity(model, eval_ids, SEQLEN, batch_size=3)  # chunks of 3 + 2
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert three.n_windows == one.n_windows


def test_blockwise_equals_direct(tiny_model: nn.Module, eval_ids: torch.Tensor) -> None:
    direct = perplexity(tiny_model, eval_ids, SEQLEN, batch_size=2, blockwise=False)
    blockwise = perplexity(tiny_model, eval_ids, SEQLEN, batch_size=2, blockwise=True)
    assert blockwise.n_windows == direct.n_windows
    assert blockwise.nll_sum == pytest.approx(direct.nll_sum, rel=1e-6)
    assert blockwise.ppl == pytest.approx(direct.ppl, rel=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blockwise_equals_direct_gemma3_attn(attn: str, eval_ids: torch.Tensor) -> None:
    model = build("gemma3", attn=attn)
    direct = perplexity(model, eval_ids, SEQLEN, batch_size=3, blockwise=False)
    blockwise = perplexity(model, eval_ids, SEQLEN, batch_size=3, blockwise=True)
    assert blockwise.nll_sum == pytest.approx(direct.nll_sum, rel=1e-6)


def test_perplexity_leaves_model_unchanged(tiny_model: nn.Module, eval_ids: torch.Tensor) -> None:
    before = copy.deepcopy(tiny_model.state_dict())
    ids = eval_ids[:, : 2 * SEQLEN]
    with torch.no_grad():
        logits = tiny_model(input_ids=ids.reshape(2, SEQLEN)).logits
    perplexity(tiny_model, eval_ids, SEQLEN, blockwise=True)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for block in tiny_model.model.layers:
        assert "forward" not in block.__dict__
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids.reshape(2, SEQLEN)).logits, logits)


def test_pruning_like_change_moves_ppl(eval_ids: torch.Tensor) -> None:
    """The metric is sensitive to the weights (guards against evaluating a cached dense model)."""
    model = build("llama")
    base = perplexity(model, eval_ids, SEQLEN).ppl
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(50.0)
    assert perplexity(model, eval_ids, SEQLEN, blockwise=True).ppl != pytest.approx(base, rel=1e-4)


# --- bad input -----------------------------------------------------------------------------------


def test_fewer_tokens_than_one_window_raises() -> None:
    model = build("llama")
    with pytest.raises(CrepeError):
        perplexity(model, random_ids(1, SEQLEN - 1, seed=0), SEQLEN)
    with pytest.raises(CrepeError):
        perplexity(model, torch.zeros(1, 0, dtype=torch.long), SEQLEN)


@pytest.mark.parametrize("seqlen", [1, 0, -4])
def test_seqlen_below_two_raises(seqlen: int, eval_ids: torch.Tensor) -> None:
    with pytest.raises(CrepeError):
        perplexity(build("llama"), eval_ids, seqlen)


@pytest.mark.parametrize("max_windows", [0, -1])
def test_max_windows_below_one_raises(max_windows: int, eval_ids: torch.Tensor) -> None:
    with pytest.raises(CrepeError):
        perplexity(build("llama"), eval_ids, SEQLEN, max_windows=max_windows)


def test_batch_size_below_one_raises(eval_ids: torch.Tensor) -> None:
    with pytest.raises(CrepeError):
        perplexity(build("llama"), eval_ids, SEQLEN, batch_size=0)


def test_same_device_without_cuda() -> None:
    """``cuda`` vs ``cuda:0`` is checked in tests/test_gpu.py; here: the CPU, and no CUDA call for a mismatch."""
    assert same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))
    assert not same_device(torch.device("cuda:1"), torch.device("cpu"))
