"""Gemma 3 text models (1B, and the text tower's config): Gemma 2's layout plus q_norm / k_norm."""

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True,
    "attention_bias": False,
}  # transformers Gemma3TextConfig


def tensors(f: Fields) -> list[Tensor]:
    bias = f.flag("attention_bias")
    return decoder(f, qkv_bias=bias, o_bias=bias, qk_norm=True, sandwich_norms=True)


FAMILY = Family(
    ("gemma3_text",), DEFAULTS, COMMON_HARMLESS | {"rope_local_base_freq"}, tensors,
    models=frozenset({"Gemma3ForCausalLM"}),
)
