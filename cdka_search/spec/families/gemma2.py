"""Gemma 2: head_dim 256 by default, sandwich norms around the MLP, tied embeddings."""

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True,
    "attention_bias": False,
}  # transformers Gemma2Config


def tensors(f: Fields) -> list[Tensor]:
    bias = f.flag("attention_bias")
    return decoder(f, qkv_bias=bias, o_bias=bias, sandwich_norms=True)


FAMILY = Family(("gemma2",), DEFAULTS, COMMON_HARMLESS, tensors, models=frozenset({"Gemma2ForCausalLM"}))
