"""Qwen2 / Qwen2.5: q, k, v carry a bias, o does not (fixed in the architecture, not a field)."""

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None, "tie_word_embeddings": False,
}  # transformers Qwen2Config


def tensors(f: Fields) -> list[Tensor]:
    return decoder(f, qkv_bias=True, o_bias=False)


# Qwen2's modeling code hardcodes its biases and ignores a stray attention_bias.
FAMILY = Family(
    ("qwen2",), DEFAULTS, COMMON_HARMLESS | {"attention_bias"}, tensors, frozenset({"num_key_value_heads"}),
    models=frozenset({"Qwen2ForCausalLM"}),
)
