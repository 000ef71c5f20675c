"""Qwen3 (dense): head_dim 128 by default whatever the width, per-head q_norm / k_norm."""

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    "tie_word_embeddings": False, "attention_bias": False,
}  # transformers Qwen3Config


def tensors(f: Fields) -> list[Tensor]:
    bias = f.flag("attention_bias")
    return decoder(f, qkv_bias=bias, o_bias=bias, qk_norm=True)


FAMILY = Family(
    ("qwen3",), DEFAULTS, COMMON_HARMLESS, tensors, frozenset({"num_key_value_heads"}),
    models=frozenset({"Qwen3ForCausalLM"}),
)
