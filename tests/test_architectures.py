"""The architecture matrix: every decoder family of ``bench.families`` x method x sparsity.

For each family crepe prunes: every weight matrix of every block (derived here from
``block.named_parameters()``, independently of ``crepe.weights``) is either pruned to exactly the
requested sparsity under the method's group rule (or is a valid N:M matrix), or is listed in
``report.skipped`` with a reason; the experts of mixture-of-experts families are pruned; routers,
embeddings, norms and biases are untouched; the logits stay finite; and the model saved with
``save_pretrained`` reloads with ``AutoModelForCausalLM.from_pretrained`` to identical logits.
Families crepe refuses raise CrepeError naming the weight; the refused set is asserted exactly.

The non-slow subset runs every family with ``wanda`` at 2:4 and ``sparsegpt`` at 0.5 (with the
save/reload check); the other method x sparsity cells are ``slow``.

The routed-token tests check that an expert's statistics come only from the tokens its router
sends it, for per-expert linears (``experts.<e>.<proj>``, remote-code layout) and for transformers'
fused experts (qwen3_moe), and the ``moe_min_tokens`` / ``moe_fallback`` rules.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import crepe
import crepe.pruner as pruner
from bench.families import FAMILIES, N_EXPERTS, TOP_K, build_family, random_ids
from crepe.blocks import find_blocks

METHODS = ("magnitude", "wanda", "ria", "crepe", "sparsegpt")
SPARSITIES = ("0.5", "2:4")
ROW_METHODS = {"wanda"}
FAST = {("wanda", "2:4"), ("sparsegpt", "0.5")}
CALIB_N, CALIB_SEQLEN = 4, 16

# Families crepe refuses, and the weight (or reason) the refusal must name. A change to this set is
# a change of behaviour: update it (and docs/architectures.md, `make architectures`) deliberately.
REFUSED: dict[str, str] = {
    "falcon_h1": r"model\.layers\.0\.mamba\.conv1d\.weight \(Conv1d\.weight",
    "lfm2": r"model\.layers\.0\.conv\.conv\.weight \(Conv1d\.weight",
    "qwen3_next": r"model\.layers\.0\.linear_attn\.conv1d\.weight \(Conv1d\.weight",
    "qwen3_5_moe": r"model\.layers\.0\.linear_attn\.conv1d\.weight \(Conv1d\.weight",
    # MoE experts stored outside transformers' experts interface: refused by name, not skipped
    "llama4": r"model\.layers\.0\.feed_forward\.experts\.gate_up_proj \(Llama4TextExperts\.gate_up_proj of shape \(4, 64, 64\)\)",
    "dbrx": r"transformer\.blocks\.0\.ffn\.experts\.mlp\.w1 \(DbrxExpertGLU\.w1 of shape \(128, 64\)\)",
    "jetmoe": r"model\.layers\.0\.mlp\.input_linear\.weight \(JetMoeParallelExperts\.weight of shape \(4, 64, 64\)\)",
    # Jamba's blocks are two classes (attention / Mamba); the Mamba mixer's A_log is refused by name
    "jamba": r"model\.layers\.0\.mamba\.A_log \(JambaMambaMixer\.A_log",
}
# Routers nested in a gate/router module (HunYuan-MoE ``mlp.gate.wg``, AFMoE ``mlp.router.gate``) are
# routers too; 2-D biases (gpt-oss's stacked expert biases, ERNIE-4.5-MoE's correction bias) are vectors.

SUPPORTED = tuple(f for f in FAMILIES if f not in REFUSED)


def _config(method: str, sparsity: str, **kwargs: Any) -> crepe.PruneConfig:
    return crepe.PruneConfig(method, crepe.parse_sparsity(sparsity), **kwargs)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return random_ids(CALIB_N, CALIB_SEQLEN, seed=1234)


# --- an independent view of every weight matrix in the blocks ---------------------------------------


def block_matrices(block: nn.Module) -> dict[str, tuple[nn.Module, str, int | None]]:
    """Every parameter of 2+ dims in ``block`` under the name a report uses for it.

    ``<module>`` for a 2-D ``weight``, ``<module>.<param>[<e>]`` for each slice of a 3-D parameter,
    ``<module>.<param>`` for any other matrix. Value: (owner module, attribute, slice or None).
    Bias tensors are not matrices, also when stacked per expert (gpt-oss ``gate_up_proj_bias``).
    """
    out: dict[str, tuple[nn.Module, str, int | None]] = {}
    for pname, param in block.named_parameters():
        mname, _, attr = pname.rpartition(".")
        if param.dim() < 2 or attr.endswith("bias"):  # stacked biases (E, out) are biases, not matrices
            continue
        module = block.get_submodule(mname) if mname else block
        if param.dim() == 3:
            for e in range(param.shape[0]):
                out[f"{pname}[{e}]"] = (module, attr, e)
        elif attr == "weight":
            out[mname] = (module, attr, None)
        else:
            out[pname] = (module, attr, None)
    return out


def out_in_view(module: nn.Module, attr: str, expert: int | None) -> torch.Tensor:
    """The (out, in) matrix as transformers computes with it (Conv1D and transposed experts flipped)."""
    data = getattr(module, attr).detach()
    if expert is not None:
        data = data[expert]
        return data.t() if getattr(module, "is_transposed", False) else data
    return data.t() if isinstance(module, Conv1D) else data


def model_matrices(model: nn.Module) -> tuple[str, dict[str, tuple[nn.Module, str, int | None]]]:
    path, blocks = find_blocks(model)
    return path, {f"{path}.{i}.{n}": v for i, b in enumerate(blocks) for n, v in block_matrices(b).items()}


def param_key(name: str) -> str:
    """The state-dict key holding report matrix ``name`` (a module's weight or a fused parameter)."""
    if name.endswith("]"):
        return name[: name.rindex("[")]
    return f"{name}.weight"


def router_like(view: torch.Tensor) -> bool:
    """A routing matrix in these tiny models: one output per expert (or one shared-expert gate)."""
    return view.shape[0] in (N_EXPERTS, 1)


def expected_pruned(method: str, sparsity: str, shape: tuple[int, int], blocksize: int = 128) -> int:
    out, inp = shape
    spec = crepe.parse_sparsity(sparsity)
    if spec.pattern is not None:
        return out * (inp // spec.pattern.m) * spec.pattern.n
    s = spec.sparsity
    if method in ROW_METHODS:
        return out * math.floor(s * inp)
    if method == "sparsegpt":  # int(s * out * width) per column block
        return sum(int(s * out * min(blocksize, inp - c)) for c in range(0, inp, blocksize))
    return math.floor(s * out * inp)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the matrix ----------------------------------------------------------------------------------------


def _cells() -> list[Any]:
    cells = []
    for family in SUPPORTED:
        for method in METHODS:
            for sparsity in SPARSITIES:
                marks = [] if (method, sparsity) in FAST else [pytest.mark.slow]
                cells.append(pytest.param(family, method, sparsity, marks=marks, id=f"{family}-{method}-{sparsity}"))
    return cells


def check_pruned_model(
    family: str, method: str, sparsity: str, model: nn.Module, dense: nn.Module, report: crepe.PruneReport,
    ids: torch.Tensor,
) -> None:
    path, matrices = model_matrices(model)
    _, dense_matrices = model_matrices(dense)
    assert report.blocks_path == path
    pruned = {layer.name: layer for layer in report.layers}
    skipped = {row["name"]: row for row in report.skipped}
    # every matrix is pruned or skipped with a reason, and nothing else is reported
    assert not set(pruned) & set(skipped)
    assert set(pruned) | set(skipped) == set(matrices), (
        f"unaccounted: {sorted(set(matrices) - set(pruned) - set(skipped))}; "
        f"unknown: {sorted((set(pruned) | set(skipped)) - set(matrices))}"
    )
    for name, row in skipped.items():
        assert isinstance(row["reason"], str) and row["reason"].strip(), name
        assert row["kind"] == "router", f"{name} left dense by default but is {row['kind']!r}"
        assert router_like(out_in_view(*matrices[name])), name

    pattern = crepe.parse_sparsity(sparsity).pattern
    blocksize = report.config["params"].get("blocksize", 128)
    for name, layer in pruned.items():
        w = out_in_view(*matrices[name])
        w0 = out_in_view(*dense_matrices[name])
        assert tuple(w.shape) == layer.shape, name
        want = expected_pruned(method, sparsity, tuple(w.shape), blocksize)
        assert report.mask_pruned[name] == want, name
        exact = bool((w0 != 0).all())  # seeded weights hold no zeros: the zeros are the mask
        zeros = int((w == 0).sum())
        assert zeros == want if exact else zeros >= want, f"{name}: {zeros} zeros, expected {want}"
        assert layer.n_zeros == zeros, name
        if pattern is not None:
            groups = (w.reshape(w.shape[0], -1, pattern.m) == 0).sum(-1)
            assert bool((groups == pattern.n).all() if exact else (groups >= pattern.n).all()), name
            assert layer.nm_valid is True, name
        elif method in ROW_METHODS and exact:
            assert bool(((w == 0).sum(dim=1) == math.floor(0.5 * w.shape[1])).all()), name
        if method != "sparsegpt":  # scorers only zero weights; the kept ones keep their values
            assert torch.equal(w, torch.where(w == 0, torch.zeros_like(w0), w0)), name
    # everything that is not a pruned matrix is untouched (embeddings, norms, biases, routers, head)
    touched = {param_key(name) for name in pruned}
    dense_state = dense.state_dict()
    for key, value in model.state_dict().items():
        if key not in touched:
            assert torch.equal(value, dense_state[key]), f"{key} changed"

    by_kind = report.by_kind()
    assert all(row["sparsity"] == pytest.approx(0.5) for row in by_kind.values()), by_kind
    if FAMILIES[family].moe:
        assert "expert" in by_kind and by_kind["expert"]["sparsity"] == pytest.approx(0.5), by_kind
        assert all(report.kinds[n] == "expert" for n in pruned if ".experts." in n), family
    assert report.nm_valid is (True if pattern is not None else None)
    assert torch.isfinite(logits(model, ids)).all()


@pytest.mark.parametrize(("family", "method", "sparsity"), _cells())
def test_family_prunes(family: str, method: str, sparsity: str, ids: torch.Tensor, tmp_path) -> None:
    model = build_family(family)
    dense = copy.deepcopy(model)
    report = crepe.prune_model(model, ids, _config(method, sparsity), batch_size=CALIB_N)
    check_pruned_model(family, method, sparsity, model, dense, report, ids)

    # save_pretrained / from_pretrained round trip (safetensors), identical logits
    if (method, sparsity) in FAST:
        model.save_pretrained(tmp_path)
        assert list(tmp_path.glob("*.safetensors")), sorted(p.name for p in tmp_path.iterdir())
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
        reloaded.eval()
        assert torch.equal(logits(reloaded, ids), logits(model, ids))

    # routers stay dense
    _, matrices = model_matrices(model)
    routers = [layer.name for layer in report.layers if router_like(out_in_view(*matrices[layer.name]))]
    assert not routers, f"router matrices were pruned: {routers}"


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_name_the_weight(family: str, ids: torch.Tensor) -> None:
    model = build_family(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(crepe.CrepeError) as info:
        crepe.prune_model(model, ids, _config("wanda", "2:4"), batch_size=CALIB_N)
    message = str(info.value)
    assert re.search(REFUSED[family], message), message
    assert "\n" not in message.strip()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "refusal changed weights"


def test_jamba_with_explicit_blocks_names_the_convolution(ids: torch.Tensor) -> None:
    model = build_family("jamba")
    with pytest.raises(crepe.CrepeError, match=r"block weight model\.layers\.0\.mamba\.A_log \(JambaMambaMixer"):
        crepe.prune_model(model, ids, _config("wanda", "2:4"), blocks_path="model.layers", batch_size=CALIB_N)


def test_refused_set_is_exact() -> None:
    """Every family is either in the matrix or refused; the refusals are exactly REFUSED."""
    assert set(SUPPORTED) | set(REFUSED) == set(FAMILIES)
    assert set(REFUSED) <= set(FAMILIES)


# --- routed-token statistics -----------------------------------------------------------------------------


class Expert(nn.Module):
    """A LlamaMLP-shaped expert (gate/up/down, SiLU), as remote-code MoE checkpoints define them."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class RoutedMoE(nn.Module):
    """``self.gate = nn.Linear(H, E)`` + ``self.experts = nn.ModuleList`` with softmax top-k routing."""

    def __init__(self, hidden: int, n_experts: int = N_EXPERTS, top_k: int = TOP_K, width: int = 32) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, width) for _ in range(n_experts))

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(flat), dim=-1)
        return torch.topk(probs, self.top_k, dim=-1)  # (values, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(index == e)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * weights[tok, slot, None])
        return out.reshape(x.shape)


def per_expert_llama(seed: int = 0) -> nn.Module:
    model = build_family("llama", seed=seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.mlp = RoutedMoE(model.config.hidden_size)
        nn.init.normal_(layer.mlp.gate.weight, std=0.5)  # decisive routing, unequal loads
    return model.eval()


def spy_norms(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The act_norm prune_model hands to each weight, by full report name."""
    seen: dict[str, torch.Tensor] = {}
    real = pruner.prune_linear_

    def spy(module, config, act_norm, device, ctx=None):
        seen[ctx.name] = act_norm.clone()
        return real(module, config, act_norm, device, ctx)

    monkeypatch.setattr(pruner, "prune_linear_", spy)
    return seen


def mlp_inputs(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Block ``layer``'s MLP input as the loop sees it: blocks < layer pruned, this block dense."""
    hybrid = copy.deepcopy(dense)
    for j in range(layer):
        hybrid.model.layers[j].load_state_dict(pruned.model.layers[j].state_dict())
    got: list[torch.Tensor] = []
    hook = hybrid.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()))
    try:
        logits(hybrid, ids)
    finally:
        hook.remove()
    return got[0].reshape(-1, got[0].shape[-1])


def col_norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).sum(0).sqrt().float()


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_per_expert_linears_see_only_routed_tokens(ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = per_expert_llama()
    dense = copy.deepcopy(model)
    seen = spy_norms(monkeypatch)
    report = crepe.prune_model(model, ids, _config("wanda", "0.5", moe_min_tokens=0), batch_size=CALIB_N)
    assert {r["name"] for r in report.skipped} == {f"model.layers.{i}.mlp.gate" for i in range(2)}
    assert report.by_kind()["expert"]["n_weights"] == 2 * N_EXPERTS * 3
    for layer in range(2):
        x = mlp_inputs(dense, model, ids, layer)
        moe = dense.model.layers[layer].mlp
        with torch.no_grad():
            _, index = moe.route(x)
        counts = []
        for e, expert in enumerate(moe.experts):
            xe = x[(index == e).any(dim=-1)]
            counts.append(xe.shape[0])
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            for proj in ("gate_proj", "up_proj"):
                close(seen[f"{prefix}.{proj}"], col_norm(xe), f"{prefix}.{proj}")
                assert report.layer_info[f"{prefix}.{proj}"]["moe"] == {"routed_tokens": xe.shape[0]}
            with torch.no_grad():
                h = nn.functional.silu(expert.gate_proj(xe)) * expert.up_proj(xe)
            close(seen[f"{prefix}.down_proj"], col_norm(h), f"{prefix}.down_proj")
            # not the all-token norm: the routing really selects
            assert 0 < xe.shape[0] < x.shape[0]
            assert not torch.allclose(seen[f"{prefix}.gate_proj"], col_norm(x), rtol=1e-3)
        assert sum(counts) == TOP_K * x.shape[0]


def _starved(model: nn.Module, ids: torch.Tensor) -> tuple[int, int, int]:
    """(expert, its routed tokens, a moe_min_tokens that starves only it) in block 0."""
    x = mlp_inputs(model, model, ids, 0)
    with torch.no_grad():
        _, index = model.model.layers[0].mlp.route(x)
    counts = [int((index == e).any(dim=-1).sum()) for e in range(N_EXPERTS)]
    order = sorted(range(N_EXPERTS), key=counts.__getitem__)
    assert counts[order[0]] < counts[order[1]], counts  # a unique least-routed expert
    return order[0], counts[order[0]], counts[order[0]] + 1


def test_per_expert_magnitude_fallback(ids: torch.Tensor) -> None:
    model = per_expert_llama()
    dense = copy.deepcopy(model)
    e, n_tok, floor = _starved(model, ids)
    config = _config("wanda", "0.5", moe_min_tokens=floor, moe_fallback="magnitude")
    report = crepe.prune_model(model, ids, config, batch_size=CALIB_N)
    prefix = f"model.layers.0.mlp.experts.{e}"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"{prefix}.{proj}"
        info = report.layer_info[name]["moe"]
        # down_proj's routed tokens are the same tokens
        assert info == {"routed_tokens": n_tok, "min_tokens": floor, "rule": "magnitude"}, info
        w0 = dense.model.layers[0].mlp.experts[e].get_submodule(proj).weight
        w = model.model.layers[0].mlp.experts[e].get_submodule(proj).weight
        keep = torch.zeros_like(w0, dtype=torch.bool)  # wanda's group (row): the larger half of |W|
        keep.scatter_(1, w0.abs().topk(w0.shape[1] // 2, dim=1).indices, True)
        assert torch.equal(w != 0, keep), name
    others = [n for n, i in report.layer_info.items() if n.startswith("model.layers.0.") and "rule" in i.get("moe", {})]
    assert sorted(others) == sorted(f"{prefix}.{p}" for p in ("down_proj", "gate_proj", "up_proj"))


def test_per_expert_all_tokens_fallback(ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = per_expert_llama()
    dense = copy.deepcopy(model)
    e, n_tok, floor = _starved(model, ids)
    seen = spy_norms(monkeypatch)
    report = crepe.prune_model(
        model, ids, _config("wanda", "0.5", moe_min_tokens=floor, moe_fallback="all-tokens"), batch_size=CALIB_N
    )
    x = mlp_inputs(dense, model, ids, 0)
    expert = dense.model.layers[0].mlp.experts[e]
    prefix = f"model.layers.0.mlp.experts.{e}"
    assert report.layer_info[f"{prefix}.gate_proj"]["moe"] == {
        "routed_tokens": n_tok, "min_tokens": floor, "rule": "all-tokens"
    }
    for proj in ("gate_proj", "up_proj"):
        close(seen[f"{prefix}.{proj}"], col_norm(x), f"{prefix}.{proj} (all tokens)")
    with torch.no_grad():
        h = nn.functional.silu(expert.gate_proj(x)) * expert.up_proj(x)
    close(seen[f"{prefix}.down_proj"], col_norm(h), f"{prefix}.down_proj (all tokens)")
    assert report.by_kind()["expert"]["sparsity"] == pytest.approx(0.5)


def test_fused_experts_see_only_routed_tokens(ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """qwen3_moe: expert e's gate_up input norm is the norm over the tokens whose top-k holds e."""
    model = build_family("qwen3_moe")
    dense = copy.deepcopy(model)
    seen = spy_norms(monkeypatch)
    report = crepe.prune_model(model, ids, _config("wanda", "0.5", moe_min_tokens=0), batch_size=CALIB_N)
    for layer in range(2):
        x = mlp_inputs(dense, model, ids, layer)
        mlp = dense.model.layers[layer].mlp
        with torch.no_grad():
            _, _, index = mlp.gate(x)  # the router's own (logits, scores, indices)
        total = 0
        for e in range(N_EXPERTS):
            xe = x[(index == e).any(dim=-1)]
            total += xe.shape[0]
            up = f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"
            down = f"model.layers.{layer}.mlp.experts.down_proj[{e}]"
            close(seen[up], col_norm(xe), up)
            assert report.layer_info[up]["moe"] == {"routed_tokens": xe.shape[0]}
            with torch.no_grad():
                gate, upv = nn.functional.linear(xe, mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
                h = mlp.experts.act_fn(gate) * upv
            close(seen[down], col_norm(h), down)
            assert 0 < xe.shape[0] < x.shape[0]
        assert total == TOP_K * x.shape[0]


# --- docs/architectures.md -------------------------------------------------------------------------------


def test_architectures_doc_is_generated_and_current() -> None:
    """The committed doc names the command, the pinned transformers and exactly the refused families."""
    import transformers

    from bench.architectures import COMMAND, DOC

    text = DOC.read_text()
    assert f"Generated by `{COMMAND}`" in text.splitlines()[2]
    assert f"transformers {transformers.__version__}" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(FAMILIES) <= set(rows), sorted(set(FAMILIES) - set(rows))
    refused_section = text.split("## Refused families", 1)[1]
    refused = {line.split("|")[1].strip() for line in refused_section.splitlines() if line.startswith("| ")}
    assert refused - {"family"} == set(REFUSED), "re-run `make architectures`"


def test_architectures_doc_cells_are_computed(ids: torch.Tensor) -> None:
    from bench.architectures import _cell, render, run_family

    gpt2, lfm2 = run_family("gpt2", ids), run_family("lfm2", ids)
    assert all(_cell(gpt2, m) == "ok" for m in METHODS) and gpt2.kinds == {"conv1d": 8}
    assert all(_cell(lfm2, m) == "refused" for m in METHODS)
    assert lfm2.workaround == r"`--ignore 'conv\.conv\.weight$'`"
    text = render([gpt2, lfm2])
    assert "| gpt2 | `GPT2LMHeadModel` | ok | ok | ok | ok | ok |" in text
    assert "conv.conv.weight" in text.split("## Refused families", 1)[1]


def test_transposed_fused_experts_with_biases_see_only_routed_tokens(
    ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpt-oss ((E, in, out) experts, interleaved gate/up, biases)."""
    model = build_family("gpt_oss")
    dense = copy.deepcopy(model)
    seen = spy_norms(monkeypatch)
    config = _config("wanda", "0.5", moe_min_tokens=0)
    crepe.prune_model(model, ids, config, batch_size=CALIB_N)
    for layer in range(2):
        x = mlp_inputs(dense, model, ids, layer)
        mlp = dense.model.layers[layer].mlp
        with torch.no_grad():
            _, _, index = mlp.router(x)
        for e in range(N_EXPERTS):
            xe = x[(index == e).any(dim=-1)]
            up = f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"
            down = f"model.layers.{layer}.mlp.experts.down_proj[{e}]"
            close(seen[up], col_norm(xe), up)
            with torch.no_grad():  # stored (in, out): x @ W, then the model's own gate
                h = mlp.experts._apply_gate(xe @ mlp.experts.gate_up_proj[e] + mlp.experts.gate_up_proj_bias[e])
            assert h.shape[-1] == mlp.experts.down_proj.shape[1]
            close(seen[down], col_norm(h), down)
            assert 0 < xe.shape[0] < x.shape[0]
