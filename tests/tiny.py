"""Tiny Hugging Face models built from configs made here (nothing is downloaded)."""

from __future__ import annotations


def tiny_llama(*, hidden: int = 32, intermediate: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               vocab: int = 64, seed: int = 0):
    """A LlamaForCausalLM small enough for CPU tests; k and v are (kv_heads * hidden / heads) x hidden."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)
