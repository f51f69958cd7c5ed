"""Seeded float32 tiny causal LMs built from configs (no hub access), one factory per architecture.

Every model uses grouped-query attention (4 query heads, 2 key/value heads, head_dim 16), hidden 64,
intermediate 128, vocab 128 and a small layer count, so the full pruning loop runs in well under a
second on a CPU. Gemma-3 mixes sliding-window and full-attention layers with a window of 4 tokens,
shorter than any test sequence, so its layers really receive different masks and rotary tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from bench.families import COMMON, HEAD_DIM, HIDDEN, INTERMEDIATE, N_HEADS, N_KV_HEADS, VOCAB  # noqa: F401

SLIDING_WINDOW = 4
DEFAULT_ATTN = "eager"

# Gemma-3 layer pattern: sliding, full, sliding (blocks 0 and 2 share the sliding mask).
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _config_kwargs(n_layers: int, **overrides: Any) -> dict[str, Any]:
    """The tiny Llama-like config shared with the architecture matrix (bench/families.py)."""
    return {**COMMON, "num_hidden_layers": n_layers, **overrides}


def _build(config_cls: type, model_cls: type, attn: str, seed: int, **config_kwargs: Any) -> nn.Module:
    config = config_cls(**config_kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config)
    model.config._attn_implementation = attn
    return model.to(torch.float32).eval()


def tiny_llama(seed: int = 0, attn: str = DEFAULT_ATTN, n_layers: int = 2, **overrides: Any) -> nn.Module:
    return _build(LlamaConfig, LlamaForCausalLM, attn, seed, **_config_kwargs(n_layers, **overrides))


def tiny_mistral(seed: int = 0, attn: str = DEFAULT_ATTN, n_layers: int = 2, **overrides: Any) -> nn.Module:
    """Mistral with a sliding window (6) shorter than the test sequences, on every layer."""
    kwargs = _config_kwargs(n_layers, **{"sliding_window": 6, **overrides})
    return _build(MistralConfig, MistralForCausalLM, attn, seed, **kwargs)


def tiny_qwen2(seed: int = 0, attn: str = DEFAULT_ATTN, n_layers: int = 2, **overrides: Any) -> nn.Module:
    """Qwen-2 (q/k/v projections carry biases)."""
    return _build(Qwen2Config, Qwen2ForCausalLM, attn, seed, **_config_kwargs(n_layers, **overrides))


def tiny_qwen3(seed: int = 0, attn: str = DEFAULT_ATTN, n_layers: int = 2, **overrides: Any) -> nn.Module:
    """Qwen-3 (q/k RMS norms inside attention)."""
    return _build(Qwen3Config, Qwen3ForCausalLM, attn, seed, **_config_kwargs(n_layers, **overrides))


def tiny_gemma3(seed: int = 0, attn: str = DEFAULT_ATTN, n_layers: int = 3, **overrides: Any) -> nn.Module:
    """Gemma-3 text model: sliding (window 4), full, sliding, ... with per-type rotary tables."""
    layer_types = [GEMMA3_LAYER_TYPES[i % len(GEMMA3_LAYER_TYPES)] for i in range(n_layers)]
    kwargs = _config_kwargs(
        n_layers,
        **{
            "sliding_window": SLIDING_WINDOW,
            "layer_types": layer_types,
            "query_pre_attn_scalar": HEAD_DIM,
            **overrides,
        },
    )
    return _build(Gemma3TextConfig, Gemma3ForCausalLM, attn, seed, **kwargs)


FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "gemma3": tiny_gemma3,
}
ARCHS: tuple[str, ...] = tuple(FACTORIES)


def build(arch: str, seed: int = 0, attn: str = DEFAULT_ATTN, **kwargs) -> nn.Module:
    """A fresh tiny ``arch`` model with weights drawn after ``torch.manual_seed(seed)``."""
    return FACTORIES[arch](seed=seed, attn=attn, **kwargs)


def random_ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(n, seqlen)`` int64 token ids, reproducible from ``seed`` (own generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)
