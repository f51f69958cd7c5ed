"""Every weight matrix in the blocks: Conv1D, Linear subclasses, fused experts, routers, targets/ignore.

Models are tiny, built from real ``transformers`` configs; the independent references below read
the parameters directly (``block.named_parameters()``), never through crepe.weights.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import build, random_ids
from torch import nn
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from crepe.blocks import find_blocks
from crepe.errors import CrepeError
from crepe.pruner import PruneConfig, prune_model
from crepe.types import parse_sparsity
from crepe.weights import block_weights, prunable_weights
from flows.cli import main
from tests.local_models import word_tokenizer

IDS = random_ids(4, 16, seed=7)


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def falcon() -> nn.Module:
    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4)).eval()


def qwen3_moe(moe_intermediate: int = 32, experts: int = 4) -> nn.Module:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=moe_intermediate, num_experts=experts, num_experts_per_tok=2,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            decoder_sparse_step=1, mlp_only_layers=[])
    config._attn_implementation = "eager"
    return Qwen3MoeForCausalLM(config).eval()


def matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Independent: every parameter of >= 2 dims inside the blocks, by full name."""
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": p for i, b in enumerate(blocks) for n, p in b.named_parameters() if p.dim() >= 2}


def config(method: str = "wanda", sparsity: str = "2:4", **kw) -> PruneConfig:
    return PruneConfig(method, parse_sparsity(sparsity), **kw)


# --- GPT-2 Conv1D (stored in x out) ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_conv1d_groups_run_along_the_input_dimension(method: str) -> None:
    model = gpt2()
    prune_model(model, IDS, config(method, "2:4"))
    for name, p in matrices(model).items():
        stored = p.detach()  # (in, out): an input channel is a row of the stored tensor
        groups = stored.t().reshape(stored.shape[1], -1, 4)  # (out, in/4, 4)
        assert torch.equal((groups == 0).sum(-1), torch.full(groups.shape[:2], 2)), name
        # c_attn is (64, 192): groups along the stored rows would not be valid, so this is decisive
    assert torch.isfinite(model(IDS).logits).all()


def test_conv1d_wanda_uses_the_input_norm_of_the_stored_rows() -> None:
    """Wanda on c_fc (stored 64 x 256) equals a hand computation of |W^T| * ||X||, per output row."""
    model = gpt2()
    block = model.transformer.h[0]
    seen = {}
    handle = block.mlp.c_fc.register_forward_hook(lambda _m, inp, _o: seen.update(x=inp[0].detach()))
    model(IDS)
    handle.remove()
    w = block.mlp.c_fc.weight.detach().t().clone()  # (out 256, in 64)
    x = seen["x"].reshape(-1, w.shape[1])
    scores = w.abs() * x.norm(dim=0)[None, :]
    want_prune = torch.zeros_like(w, dtype=torch.bool)
    want_prune.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, : w.shape[1] // 2], True)
    prune_model(model, IDS, config("wanda", "0.5", group="row"))
    assert torch.equal(block.mlp.c_fc.weight.detach().t() == 0, want_prune)


def test_falcon_linear_subclasses_are_pruned() -> None:
    model = falcon()
    report = prune_model(model, IDS, config("ria", "0.5"))
    assert len(report.layers) == len(matrices(model)) and not report.skipped
    assert report.by_kind() == {"linear": {"n_weights": 8, "zeros": report.total_zeros, "numel": report.total_numel,
                                           "sparsity": 0.5}}


# --- MoE: fused experts, routers ---------------------------------------------------------------------


def test_fused_experts_are_pruned_per_expert_and_routers_are_reported() -> None:
    model = qwen3_moe()
    report = prune_model(model, IDS, config("wanda", "2:4"))
    kinds = report.by_kind()
    assert kinds["expert"]["n_weights"] == 2 * 4 * 2 and kinds["expert"]["sparsity"] == 0.5
    for i, layer in enumerate(model.model.layers):
        for attr in ("gate_up_proj", "down_proj"):
            tensor = getattr(layer.mlp.experts, attr).detach()  # (E, out, in)
            groups = tensor.reshape(tensor.shape[0], tensor.shape[1], -1, 4)
            assert torch.equal((groups == 0).sum(-1), torch.full(groups.shape[:3], 2)), (i, attr)
        assert not (layer.mlp.gate.weight == 0).any()  # routers stay dense by default
    skipped = {row["name"]: row for row in report.skipped}
    assert set(skipped) == {f"model.layers.{i}.mlp.gate" for i in range(2)}
    assert all("not pruned by default" in row["reason"] and row["numel"] == 4 * 64 for row in skipped.values())
    whole = report.all_block_weights()
    assert whole["numel"] == sum(p.numel() for p in matrices(model).values())
    assert whole["zeros"] == sum(int((p == 0).sum()) for p in matrices(model).values())
    assert json.dumps(report.as_dict())  # the manifest can hold it
    assert torch.isfinite(model(IDS).logits).all()


def test_prune_router_prunes_the_router_too() -> None:
    model = qwen3_moe()
    report = prune_model(model, IDS, config("magnitude", "0.5", prune_router=True))
    assert not report.skipped and report.by_kind()["router"]["sparsity"] == 0.5
    assert int((model.model.layers[0].mlp.gate.weight == 0).sum()) == 4 * 64 // 2


def test_expert_width_not_divisible_by_m_is_refused_by_name() -> None:
    model = qwen3_moe(moe_intermediate=36)  # down_proj input width 36: 4:8 does not fit
    with pytest.raises(CrepeError, match=r"expert weight model\.layers\.0\.mlp\.experts\.down_proj\[0\] has input "
                                         r"width 36, not divisible by M=8"):
        prune_model(model, IDS, config("magnitude", "4:8"))


def test_experts_see_only_their_routed_tokens_and_counts_are_reported() -> None:
    model = qwen3_moe()
    report = prune_model(model, IDS, config("wanda", "0.5", moe_min_tokens=0))
    tokens = {n: i["moe"]["routed_tokens"] for n, i in report.layer_info.items() if "moe" in i}
    block0 = [v for n, v in tokens.items() if n.startswith("model.layers.0.mlp.experts.gate_up_proj")]
    assert len(block0) == 4 and sum(block0) == IDS.numel() * 2  # top-2: every token reaches two experts


def test_starved_expert_falls_back_as_configured() -> None:
    """A min-tokens floor above every expert's count sends all of them through the fallback rule."""
    dense = qwen3_moe()
    mag = qwen3_moe()
    report = prune_model(mag, IDS, config("sparsegpt", "0.5", moe_min_tokens=10_000, moe_fallback="magnitude"))
    infos = [i["moe"] for n, i in report.layer_info.items() if "experts" in n]
    assert infos and all(i["rule"] == "magnitude" and i["min_tokens"] == 10_000 for i in infos)
    w = dense.model.layers[0].mlp.experts.down_proj.detach()[1]
    flat = w.abs().flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[: flat.numel() // 2]] = False
    assert torch.equal(mag.model.layers[0].mlp.experts.down_proj.detach()[1] != 0, keep.reshape(w.shape))
    every = qwen3_moe()
    report = prune_model(every, IDS, config("wanda", "0.5", moe_min_tokens=10_000, moe_fallback="all-tokens"))
    assert all(i["moe"]["rule"] == "all-tokens" for n, i in report.layer_info.items() if "experts" in n)


# --- targets / ignore / unsupported weights ------------------------------------------------------------


def test_ignore_leaves_matches_dense_and_lists_them() -> None:
    model = build("llama")
    report = prune_model(model, IDS, config("wanda", "2:4", ignore=r"mlp\.down_proj$"))
    skipped = {row["name"]: row["reason"] for row in report.skipped}
    assert set(skipped) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert set(skipped.values()) == {"excluded by ignore"}
    assert not (model.model.layers[0].mlp.down_proj.weight == 0).any()
    report = prune_model(build("llama"), IDS, config("wanda", "2:4", targets=r"self_attn"))
    assert {r.name.split(".")[-1] for r in report.layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {row["reason"] for row in report.skipped} == {"not matched by targets"}


def test_targets_matching_nothing_is_one_sentence() -> None:
    with pytest.raises(CrepeError, match="no weight matrix in the blocks at 'model.layers' is left to prune"):
        prune_model(build("llama"), IDS, config("wanda", "2:4", targets=r"nothing_matches"))


def test_unsupported_weight_type_is_refused_by_name_unless_ignored() -> None:
    model = build("llama")
    model.model.layers[1].mlp.extra = nn.Conv1d(8, 8, 3)  # a 3-D weight crepe cannot prune
    with pytest.raises(CrepeError, match=r"block weight model\.layers\.1\.mlp\.extra\.weight \(Conv1d\.weight of "
                                         r"shape \(8, 8, 3\)\) is of a type crepe cannot prune"):
        prune_model(model, IDS, config("magnitude", "0.5"))
    report = prune_model(model, IDS, config("magnitude", "0.5", ignore=r"mlp\.extra"))
    row = next(r for r in report.skipped if r["name"] == "model.layers.1.mlp.extra.weight")
    assert row["numel"] == 8 * 8 * 3 and row["reason"].startswith("excluded by ignore")


def test_block_weights_classifies_without_running_anything() -> None:
    kinds = {w.kind for w in prunable_weights(gpt2().transformer.h[0]).values()}
    assert kinds == {"conv1d"}
    bw = block_weights(qwen3_moe().model.layers[0], prune_router=False)
    assert {w.kind for w in bw.weights.values()} == {"linear", "expert"}
    assert {w.kind for w, _ in bw.skipped.values()} == {"router"}


@pytest.mark.parametrize("bad", ["(", "[a-"])
def test_invalid_regex_is_one_sentence(bad: str) -> None:
    with pytest.raises(CrepeError, match=re.escape(f"targets {bad!r} is not a valid regular expression")):
        config("wanda", "2:4", targets=bad).validate()


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_prunes_an_moe_folder_and_reports_experts(tmp_path, capsys) -> None:
    folder = tmp_path / "moe"
    model = qwen3_moe()
    tokenizer = word_tokenizer(128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["--no-progress", "prune", "--model", str(folder), "--method", "wanda", "--sparsity", "2:4",
                 "--out", str(out), "--calib-source", "pydoc", "--calib-samples", "4", "--seqlen", "16",
                 "--ignore", r"layers\.1\.self_attn"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "16 expert 0.5000" in printed and "left dense: 6 block weight matrices" in printed
    manifest = json.loads((out / "crepe_manifest.json").read_text())
    assert manifest["prune"]["by_kind"]["expert"]["sparsity"] == 0.5
    assert manifest["prune"]["config"]["ignore"] == r"layers\.1\.self_attn"
    assert {r["reason"] for r in manifest["prune"]["skipped"]} == {
        "excluded by ignore", "router/gate weights are not pruned by default (prune_router)"}
    code = main(["--no-progress", "verify", str(out), "--no-ppl"])  # the ignored/router matrices are not unrecorded
    assert code == 0, capsys.readouterr().err


def test_cli_bad_regex_exits_2(tmp_path, capsys) -> None:
    code = main(["--no-progress", "prune", "--model", "embedded:smollm2-135m", "--method", "wanda",
                 "--sparsity", "2:4", "--out", str(tmp_path / "o"), "--targets", "("])
    err = capsys.readouterr().err
    assert code == 2 and "targets '(' is not a valid regular expression" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_pho_prunes_and_restores_the_same_weights_as_the_final_prune() -> None:
    """SearchContext takes the prune's selection: a candidate leaves ignored weights dense, routers pruned
    on request are restored exactly between candidates."""
    from crepe.budget import Budget
    from crepe.models import LoadedModel, ModelInfo
    from crepe.search.context import SearchContext

    model = qwen3_moe()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = ModelInfo("tiny", "local", "", "h", "float32", "cpu", False)
    ctx = SearchContext(LoadedModel(model, None, info), parse_sparsity("2:4"), Budget(calib_samples=4, seqlen=16),
                        selection={"ignore": r"layers\.1\.self_attn", "prune_router": True})
    ctx.calibration = (IDS, {})
    for name, w in ctx._linears().items():
        ctx._dense[name] = w.matrix().detach().clone()
    report = ctx.prune({"alpha": 1.0, "beta": 1.0, "gamma": 0.01, "kernel_size": 3})
    assert {r["reason"] for r in report.skipped} == {"excluded by ignore"}
    assert "router" in report.by_kind()
    ctx.restore_dense()
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())


def test_moe_checkpoint_with_converted_names_is_refused_by_the_streamed_path(tmp_path) -> None:
    """transformers stores fused experts per expert: under a cap, one sentence; verify then needs memory."""
    from crepe.streaming import load_capped

    folder = tmp_path / "moe"
    qwen3_moe().save_pretrained(folder)
    word_tokenizer(128).save_pretrained(folder)
    with pytest.raises(CrepeError, match=r"stores 'model\.layers\.0\.mlp\.experts\.gate_up_proj' under another name"):
        load_capped(str(folder), max_memory="300KB")  # > resident + one block, < the model


def test_git_lfs_pointer_is_a_corrupt_header_not_a_memory_error(tmp_path) -> None:
    from crepe.shards import Checkpoint

    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9\n")
    with pytest.raises(CrepeError, match="has a corrupt header"):
        Checkpoint(tmp_path)
