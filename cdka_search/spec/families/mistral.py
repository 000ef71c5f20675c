"""Mistral (7B, NeMo 12B, Small): head_dim may differ from hidden / heads (NeMo: 128, not 160)."""

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False,
}  # transformers MistralConfig


def tensors(f: Fields) -> list[Tensor]:
    return decoder(f, qkv_bias=False, o_bias=False)


FAMILY = Family(
    ("mistral",), DEFAULTS, COMMON_HARMLESS, tensors, frozenset({"head_dim"}),
    models=frozenset({"MistralForCausalLM"}),
)
