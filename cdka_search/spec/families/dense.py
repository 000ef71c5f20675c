"""The LLaMA-style decoder every dense family below shares: attention, gated MLP, RMSNorms."""

from __future__ import annotations

from typing import Callable

from cdka_search.limits import MAX_LAYERS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import Tensor, attention, causal_lm, gated_mlp, norm


def decoder(
    f: Fields,
    *,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool = False,
    qk_norm: bool = False,
    sandwich_norms: bool = False,
    mlp: Callable[[int, str], list[Tensor]] | None = None,
) -> list[Tensor]:
    """A decoder-only causal LM: ``qk_norm`` adds Qwen3/Gemma3's per-head q_norm and k_norm,
    ``sandwich_norms`` Gemma's pre/post feed-forward norms, ``mlp(layer, prefix)`` replaces the
    dense MLP of a layer (MoE blocks)."""
    hidden = f.int("hidden_size")
    intermediate = f.int("intermediate_size")
    vocab = f.int("vocab_size")
    heads, kv_heads = f.heads("num_attention_heads", "num_key_value_heads")
    head_dim = f.head_dim(hidden, heads)
    layers: list[Tensor] = []
    for i in range(f.int("num_hidden_layers", MAX_LAYERS)):
        p = f"model.layers.{i}"
        layers += attention(f"{p}.self_attn", hidden, heads, kv_heads, head_dim, qkv_bias=qkv_bias, o_bias=o_bias)
        if qk_norm:
            layers += norm(f"{p}.self_attn.q_norm", head_dim) + norm(f"{p}.self_attn.k_norm", head_dim)
        layers += mlp(i, f"{p}.mlp") if mlp else gated_mlp(f"{p}.mlp", hidden, intermediate, mlp_bias)
        layers += norm(f"{p}.input_layernorm", hidden) + norm(f"{p}.post_attention_layernorm", hidden)
        if sandwich_norms:
            layers += norm(f"{p}.pre_feedforward_layernorm", hidden) + norm(f"{p}.post_feedforward_layernorm", hidden)
    return causal_lm(f, hidden, vocab, layers, norm("model.norm", hidden))
