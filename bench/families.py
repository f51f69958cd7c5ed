"""Seeded tiny causal LMs of every decoder family crepe is checked on, built from real configs.

Each family is the pinned transformers' own configuration class and ``AutoModelForCausalLM`` model
class (``AutoConfig.for_model(model_type, ...)``), shrunk to hidden 64, 2 decoder layers, vocab 128,
4 query heads of 16 (2 key/value heads where the family has GQA) and, for mixture-of-experts
families, 4 experts with top-2 routing and expert width 32; no hub access, no checkpoint. Every
input width of every block matrix is a multiple of 8, so 2:4 and 4:8 patterns apply. Attention is
eager. Weights are drawn by the family's own initialisation after ``torch.manual_seed(seed)``; a
matrix that initialisation leaves all-zero (AFMoE's router) is redrawn from N(0, 0.02^2), so every
router routes and every matrix starts without zeros.

``build_family(name)`` returns a float32 model in eval mode; ``FAMILIES`` lists every family with
the model type it builds, whether it is a mixture of experts and a one-line note. The families
are *inputs* to the architecture matrix (``tests/test_architectures.py``, ``python -m
bench.architectures``): whether crepe prunes or refuses them is measured there, not declared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 128
HIDDEN = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
N_EXPERTS = 4
TOP_K = 2
EXPERT_WIDTH = 32
ATTN = "eager"

# Keys most Llama-like configs take; a family drops the ones its config does not accept.
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_cache": False,
}
# GPT-2-style configs (n_embd, n_layer, n_head, n_inner): only the common names they map.
GPT_STYLE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": N_HEADS,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_cache": False,
}
MOE: dict[str, Any] = {"num_experts_per_tok": TOP_K}  # most MoE configs; the expert count key varies


@dataclass(frozen=True)
class Family:
    """One decoder family: the model type and the config values that make it tiny."""

    name: str
    model_type: str
    config: Mapping[str, Any] = field(default_factory=dict)
    base: Mapping[str, Any] = field(default_factory=lambda: COMMON)
    drop: tuple[str, ...] = ()  # base keys this config does not accept
    moe: bool = False
    note: str = ""

    def config_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.base.items() if k not in self.drop}
        kwargs.update(self.config)
        return kwargs


def _f(name: str, model_type: str | None = None, **kwargs: Any) -> Family:
    return Family(name, model_type or name, **kwargs)


def _moe(**kwargs: Any) -> dict[str, Any]:
    return {**MOE, **kwargs}


_FAMILIES: tuple[Family, ...] = (
    # --- dense, Llama-like (nn.Linear everywhere) ------------------------------------------------
    _f("llama", note="Llama 2/3, SmolLM, TinyLlama, Vicuna, ..."),
    _f("mistral", config={"sliding_window": 6}, note="Mistral 7B (sliding window 6 < seqlen)"),
    _f("ministral", config={"sliding_window": 6}),
    _f("qwen2", note="Qwen-2 / Qwen-2.5 (q/k/v biases)"),
    _f("qwen3", note="Qwen-3 dense (q/k norms)"),
    _f("gemma", note="Gemma 1"),
    _f("gemma2", config={"sliding_window": 4, "query_pre_attn_scalar": HEAD_DIM}, note="Gemma 2 (soft-capping)"),
    _f("gemma3", "gemma3_text", config={
        "sliding_window": 4, "query_pre_attn_scalar": HEAD_DIM,
        "layer_types": ["sliding_attention", "full_attention"],
    }, note="Gemma 3 text (sliding + full layers)"),
    _f("phi3", note="Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj)"),
    _f("phi", note="Phi-1/1.5/2 (dense MLP fc1/fc2, partial rotary)"),
    _f("olmo"),
    _f("olmo2"),
    _f("olmo3", config={"sliding_window": 4}),
    _f("granite"),
    _f("cohere", note="Command-R (parallel attention + MLP)"),
    _f("cohere2", config={"sliding_window": 4}),
    _f("stablelm", note="StableLM 2"),
    _f("starcoder2", note="StarCoder 2 (biases)"),
    _f("exaone4", config={"sliding_window": 4}),
    _f("ernie4_5"),
    _f("glm", note="GLM-4 (fused gate_up_proj)"),
    _f("glm4"),
    _f("helium"),
    _f("smollm3"),
    _f("nemotron", note="Nemotron (relu^2 MLP)"),
    _f("seed_oss"),
    # --- older GPT-style families ------------------------------------------------------------------
    _f("opt", base=GPT_STYLE, config={"ffn_dim": INTERMEDIATE}, note="OPT (fc1/fc2, learned positions)"),
    _f("gpt2", base=GPT_STYLE, config={"n_inner": INTERMEDIATE, "n_positions": 128},
       note="GPT-2 (Conv1D weights stored (in, out))"),
    _f("gpt_bigcode", base=GPT_STYLE, config={"n_inner": INTERMEDIATE, "n_positions": 128},
       note="StarCoder 1 / SantaCoder (multi-query)"),
    _f("gpt_neo", base=GPT_STYLE, drop=("num_hidden_layers",),
       config={"num_layers": N_LAYERS, "attention_types": [[["global", "local"], 1]], "window_size": 4,
               "intermediate_size": INTERMEDIATE},
       note="GPT-Neo (global + local attention)"),
    _f("gpt_neox", base=GPT_STYLE, config={"intermediate_size": INTERMEDIATE}, note="Pythia, GPT-NeoX"),
    _f("gptj", base=GPT_STYLE, config={"n_inner": INTERMEDIATE, "rotary_dim": 8, "n_positions": 128}),
    _f("codegen", base=GPT_STYLE, config={"n_inner": INTERMEDIATE, "rotary_dim": 8, "n_positions": 128, "n_ctx": 128}),
    _f("falcon", drop=("head_dim", "intermediate_size", "num_key_value_heads"),
       config={"new_decoder_architecture": True, "num_kv_heads": N_KV_HEADS, "ffn_hidden_size": INTERMEDIATE},
       note="Falcon (FalconLinear, new decoder architecture)"),
    _f("bloom", base=GPT_STYLE, note="BLOOM (ALiBi, fused query_key_value)"),
    _f("mpt", base={"vocab_size": VOCAB, "d_model": HIDDEN, "n_heads": N_HEADS, "n_layers": N_LAYERS,
                     "expansion_ratio": 2, "max_seq_len": 128, "use_cache": False},
       note="MPT (ALiBi, fused Wqkv)"),
    _f("persimmon", drop=("head_dim", "num_key_value_heads"), note="Persimmon / Fuyu text"),
    # --- mixtures of experts ------------------------------------------------------------------------
    _f("mixtral", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH), moe=True,
       note="Mixtral (fused experts)"),
    _f("qwen2_moe", config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH,
                                shared_expert_intermediate_size=INTERMEDIATE, decoder_sparse_step=1,
                                mlp_only_layers=[]),
       moe=True, note="Qwen1.5/2-MoE (shared expert + shared_expert_gate)"),
    _f("qwen3_moe", config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH, decoder_sparse_step=1,
                                mlp_only_layers=[], norm_topk_prob=True),
       moe=True, note="Qwen-3 MoE"),
    _f("olmoe", config=_moe(num_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH), moe=True),
    _f("phimoe", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH), moe=True),
    _f("granitemoe", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH), moe=True),
    _f("granitemoeshared", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH,
                                       shared_intermediate_size=INTERMEDIATE), moe=True),
    _f("deepseek_v3", drop=("head_dim",), config=_moe(num_key_value_heads=N_HEADS,
        n_routed_experts=N_EXPERTS, n_shared_experts=1, moe_intermediate_size=EXPERT_WIDTH, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16,
    ), moe=True, note="DeepSeek-V3 / R1 (MLA attention; block 0 dense, block 1 MoE)"),
    _f("deepseek_v2", drop=("head_dim",), config=_moe(num_key_value_heads=N_HEADS,
        n_routed_experts=N_EXPERTS, n_shared_experts=1, moe_intermediate_size=EXPERT_WIDTH, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, topk_method="greedy",
    ), moe=True, note="DeepSeek-V2 (MLA attention; block 0 dense, block 1 MoE)"),
    _f("glm4_moe", config=_moe(n_routed_experts=N_EXPERTS, n_shared_experts=1, moe_intermediate_size=EXPERT_WIDTH,
                               n_group=1, topk_group=1, first_k_dense_replace=1),
       moe=True, note="GLM-4.5 (block 0 dense, block 1 MoE)"),
    _f("ernie4_5_moe", config={"moe_num_experts": N_EXPERTS, "moe_k": TOP_K, "moe_intermediate_size": EXPERT_WIDTH,
                               "moe_layer_start_index": 0, "moe_num_shared_experts": 1}, moe=True),
    _f("gpt_oss", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"]),
       moe=True, note="gpt-oss (transposed fused experts with biases, router with bias)"),
    _f("minimax", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH,
                              layer_types=["linear_attention", "full_attention"]),
       moe=True, note="MiniMax-Text-01 (lightning attention + full attention, MoE)"),
    _f("minimax_m2", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH), moe=True),
    _f("dots1", config=_moe(n_routed_experts=N_EXPERTS, n_shared_experts=1, moe_intermediate_size=EXPERT_WIDTH,
                            n_group=1, topk_group=1, first_k_dense_replace=1),
       moe=True, note="dots.llm1 (block 0 dense, block 1 MoE)"),
    _f("exaone_moe", config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH, first_k_dense_replace=1,
                                 num_shared_experts=1, n_group=1, topk_group=1),
       moe=True, note="EXAONE MoE (block 0 dense, block 1 MoE)"),
    _f("afmoe", config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH, num_dense_layers=1),
       moe=True, note="AFMoE / Trinity (router `mlp.router.gate`, block 0 dense)"),
    _f("llama4", "llama4_text", config=_moe(num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH,
                                            intermediate_size_mlp=INTERMEDIATE, interleave_moe_layer_step=1,
                                            attention_chunk_size=8, num_experts_per_tok=1),
       moe=True, note="Llama 4 text (Llama4TextExperts: (E, in, out) experts outside the experts interface)"),
    _f("dbrx", base={"vocab_size": VOCAB, "d_model": HIDDEN, "n_heads": N_HEADS, "n_layers": N_LAYERS,
                     "max_seq_len": 128, "use_cache": False},
       config={"attn_config": {"kv_n_heads": N_KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
               "ffn_config": {"ffn_hidden_size": EXPERT_WIDTH, "moe_num_experts": N_EXPERTS, "moe_top_k": TOP_K}},
       moe=True, note="DBRX (experts concatenated in one 2-D parameter per projection)"),
    _f("jetmoe", drop=("num_attention_heads", "head_dim"),
       config={"num_local_experts": N_EXPERTS, "num_experts_per_tok": TOP_K, "intermediate_size": EXPERT_WIDTH,
               "kv_channels": HEAD_DIM},
       moe=True, note="JetMoE (JetMoeParallelExperts: 3-D weights outside the experts interface)"),
    _f("hunyuan_v1_moe", config={"num_experts": N_EXPERTS, "moe_topk": TOP_K, "intermediate_size": EXPERT_WIDTH},
       moe=True),
    _f("cohere2_moe", config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH, sliding_window=4), moe=True),
    _f("flex_olmo", config=_moe(num_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH), moe=True),
    # --- hybrids with convolutions / state-space weights (expected to be refused by name) --------------
    _f("jamba", config=_moe(num_experts=N_EXPERTS, expert_layer_period=1, expert_layer_offset=0,
                            attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8,
                            intermediate_size=EXPERT_WIDTH, use_mamba_kernels=False),
       moe=True, note="Jamba (Mamba + attention + MoE)"),
    _f("falcon_h1", config={"mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_state": 16, "mamba_chunk_size": 16},
       note="Falcon-H1 (Mamba-2 + attention)"),
    _f("lfm2", config={"layer_types": ["conv", "full_attention"]}, note="LFM2 (short convolutions)"),
    _f("qwen3_next", config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH,
                                 shared_expert_intermediate_size=INTERMEDIATE,
                                 layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                                 linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
       moe=True, note="Qwen3-Next (gated DeltaNet + attention, MoE)"),
    _f("qwen3_5_moe", "qwen3_5_moe_text",
       config=_moe(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_WIDTH, shared_expert_intermediate_size=INTERMEDIATE,
                   layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16, linear_value_head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4),
       moe=True, note="Qwen3.5 MoE text (gated DeltaNet + attention, MoE)"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}
MOE_FAMILIES: tuple[str, ...] = tuple(f.name for f in _FAMILIES if f.moe)


def family_config(name: str) -> Any:
    """The tiny transformers config of family ``name``."""
    from transformers import AutoConfig

    family = FAMILIES[name]
    config = AutoConfig.for_model(family.model_type, **family.config_kwargs())
    config._attn_implementation = ATTN
    return config


def build_family(name: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model of family ``name``: float32, eval mode, eager attention, seeded weights."""
    from transformers import AutoModelForCausalLM

    config = family_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN, dtype=torch.float32)
    model = model.to(torch.float32).eval()
    with torch.no_grad():  # a zero-initialised matrix (AFMoE's router) would route every token alike
        g = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    return model


def random_ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(n, seqlen)`` token ids in ``[3, VOCAB)`` (no special tokens), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)
