"""Block discovery, input capture and replay on tiny models of five architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, build
from torch import nn

from crepe.blocks import (
    capture_inputs,
    find_blocks,
    run_block,
)
from crepe.errors import CrepeError
from crepe.weights import prunable_weights

CPU = torch.device("cpu")
LINEAR_NAMES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def _block_outputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output hidden state in one ordinary forward of the whole model."""
    outs: list[torch.Tensor] = [None] * len(blocks)  # type: ignore[list-item]

    def grab(i: int):
        def hook(module, args, output):
            outs[i] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()

        return hook

    handles = [b.register_forward_hook(grab(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


def _replay(blocks: nn.ModuleList, inputs) -> list[list[torch.Tensor]]:
    """[block][chunk] outputs of replaying the captured inputs block after block."""
    hidden = inputs.hidden
    per_block = []
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = [
                run_block(block, h, inputs.args[i][c], inputs.kwargs[i][c]) for c, h in enumerate(hidden)
            ]
            per_block.append(hidden)
    return per_block


# --- find_blocks / prunable_linears -----------------------------------------------------------


def test_find_blocks_generic(tiny_model: nn.Module) -> None:
    path, blocks = find_blocks(tiny_model)
    assert path == "model.layers"
    assert blocks is tiny_model.model.layers
    assert len(blocks) == tiny_model.config.num_hidden_layers


def test_find_blocks_explicit_path(tiny_model: nn.Module) -> None:
    path, blocks = find_blocks(tiny_model, "model.layers")
    assert path == "model.layers"
    assert blocks is tiny_model.model.layers


class _TwoLists(nn.Module):
    """Two lists of linear-bearing blocks: the generic rule takes the bigger, a path the other."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
        self.big = nn.ModuleList([nn.Sequential(nn.Linear(16, 16)) for _ in range(2)])


def test_find_blocks_override_beats_generic_choice() -> None:
    model = _TwoLists()
    assert find_blocks(model) == ("big", model.big)
    assert find_blocks(model, "small") == ("small", model.small)


@pytest.mark.parametrize(
    "path",
    [
        "model.nope",  # missing attribute
        "model.embed_tokens",  # exists, not a ModuleList
        "model.layers.0",  # one block, not the list
        "lm_head",
    ],
)
def test_find_blocks_bad_path_raises(path: str) -> None:
    model = build("llama")
    with pytest.raises(CrepeError):
        find_blocks(model, path)


@pytest.mark.parametrize("path", ["model.layers.99.mlp", "lm_head.0"])
def test_find_blocks_bad_index_path_raises_crepe_error(path: str) -> None:
    model = build("llama")
    with pytest.raises(CrepeError):
        find_blocks(model, path)


def test_find_blocks_empty_list_path_raises() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList()
    with pytest.raises(CrepeError):
        find_blocks(model, "layers")


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
        nn.ModuleDict({"empty": nn.ModuleList()}),
        nn.ModuleList([nn.ReLU(), nn.ReLU()]),  # a list, but without linears
    ],
    ids=["sequential", "empty-list", "no-linears"],
)
def test_find_blocks_model_without_blocks_raises(model: nn.Module) -> None:
    with pytest.raises(CrepeError):
        find_blocks(model)


def test_prunable_weights_are_the_seven_projections(tiny_model: nn.Module) -> None:
    _, blocks = find_blocks(tiny_model)
    for block in blocks:
        weights = prunable_weights(block)
        assert set(weights) == LINEAR_NAMES
        assert all(w.kind == "linear" and type(w.module) is nn.Linear for w in weights.values())
        assert all(weights[n].module is block.get_submodule(n) for n in LINEAR_NAMES)
        assert all(weights[n].matrix().data_ptr() == block.get_submodule(n).weight.data_ptr() for n in LINEAR_NAMES)


# --- capture + replay --------------------------------------------------------------------------


def _check_replay_matches_forward(model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    _, blocks = find_blocks(model)
    expected = _block_outputs(model, blocks, ids)
    inputs = capture_inputs(model, blocks, ids, batch_size, CPU)
    n_chunks = -(-ids.shape[0] // batch_size)
    assert len(inputs.hidden) == n_chunks
    assert [len(a) for a in inputs.args] == [n_chunks] * len(blocks)
    assert [len(k) for k in inputs.kwargs] == [n_chunks] * len(blocks)
    replayed = _replay(blocks, inputs)
    for i in range(len(blocks)):
        got = torch.cat(replayed[i], dim=0)
        torch.testing.assert_close(got, expected[i], msg=lambda m, i=i: f"block {i}: {m}")
    # the blocks' forwards are restored: a normal forward reproduces the dense outputs
    for block in blocks:
        assert "forward" not in block.__dict__
    again = _block_outputs(model, blocks, ids)
    for a, b in zip(again, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_replay_reproduces_model_hidden_states(arch: str, attn: str, calib_ids: torch.Tensor) -> None:
    model = build(arch, attn=attn)
    _check_replay_matches_forward(model, calib_ids, batch_size=4)  # uneven chunks: 4 + 2


def test_replay_batch_size_one(tiny_model: nn.Module, calib_ids: torch.Tensor) -> None:
    _check_replay_matches_forward(tiny_model, calib_ids[:3], batch_size=1)


def test_capture_does_not_run_the_head_or_change_weights(
    tiny_model: nn.Module, calib_ids: torch.Tensor
) -> None:
    before = copy.deepcopy(tiny_model.state_dict())
    _, blocks = find_blocks(tiny_model)
    calls = []
    handle = tiny_model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        capture_inputs(tiny_model, blocks, calib_ids, 3, CPU)
    finally:
        handle.remove()
    assert calls == []
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recorded_kwargs_include_position_embeddings(tiny_model: nn.Module, calib_ids: torch.Tensor) -> None:
    _, blocks = find_blocks(tiny_model)
    inputs = capture_inputs(tiny_model, blocks, calib_ids, 4, CPU)
    head_dim = tiny_model.config.head_dim
    for i in range(len(blocks)):
        for c, hidden in enumerate(inputs.hidden):
            kwargs = inputs.kwargs[i][c]
            assert "position_embeddings" in kwargs, f"block {i} chunk {c}: {sorted(kwargs)}"
            cos, sin = kwargs["position_embeddings"]
            assert cos.shape[-2:] == (calib_ids.shape[1], head_dim)
            assert sin.shape == cos.shape
    assert inputs.hidden[0].shape == (4, calib_ids.shape[1], tiny_model.config.hidden_size)
    assert inputs.tuple_output is False  # transformers 5 decoder layers return a tensor


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_per_layer_kwargs_are_captured(attn: str, calib_ids: torch.Tensor) -> None:
    model = build("gemma3", attn=attn)
    assert model.config.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, calib_ids, 6, CPU)
    sliding0, full, sliding2 = (inputs.kwargs[i][0] for i in range(3))

    # rotary tables: local and global layers use different rope_theta
    cos_s, _ = sliding0["position_embeddings"]
    cos_f, _ = full["position_embeddings"]
    assert not torch.allclose(cos_s, cos_f)
    torch.testing.assert_close(sliding2["position_embeddings"][0], cos_s, rtol=0, atol=0)

    # masks: the window (4) is shorter than the sequence (16), so sliding and full masks differ
    m_s, m_f = sliding0["attention_mask"], full["attention_mask"]
    assert m_s is not None
    assert m_f is None or not torch.equal(m_s, m_f)
    torch.testing.assert_close(sliding2["attention_mask"], m_s, rtol=0, atol=0)


def test_gemma3_replay_needs_each_blocks_own_kwargs(calib_ids: torch.Tensor) -> None:
    """Sanity for the fidelity test: replaying block 1 with block 0's kwargs gives other outputs."""
    model = build("gemma3")
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, calib_ids, 6, CPU)
    with torch.no_grad():
        h1 = run_block(blocks[0], inputs.hidden[0], inputs.args[0][0], inputs.kwargs[0][0])
        own = run_block(blocks[1], h1, inputs.args[1][0], inputs.kwargs[1][0])
        borrowed = run_block(blocks[1], h1, inputs.args[0][0], inputs.kwargs[0][0])
    assert not torch.allclose(own, borrowed, atol=1e-5, rtol=1e-4)


def test_run_block_accepts_tuple_outputs() -> None:
    class TupleBlock(nn.Module):
        def forward(self, hidden, scale=1.0):
            return (hidden * scale, "extra")

    h = torch.ones(2, 3)
    assert torch.equal(run_block(TupleBlock(), h, (), {"scale": 2.0}), h * 2)
    assert torch.equal(run_block(nn.Identity(), h, (), {}), h)
