"""Tiny local model folders (config + safetensors + a word-level tokenizer) for CLI and loader tests."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def word_tokenizer(n_words: int = 400):
    """A fast word-level tokenizer whose vocabulary is the most common words of Python's docs."""
    from collections import Counter
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for text in topics.values() for w in re.findall(r"\w+|[^\w\s]", text))
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for word, _ in counts.most_common(n_words - len(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def save_tiny_llama(path: Path, seed: int = 0, nan_layer: str | None = None) -> Path:
    """Save a seeded 2-block LLaMA with GQA and a word tokenizer to ``path``; optionally poison a layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    if nan_layer:
        dict(model.named_modules())[nan_layer].weight.data[0, 0] = float("nan")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
