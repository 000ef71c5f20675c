"""LLaMA 1/2/3 (also TinyLlama and most LLaMA derivatives): head_dim, GQA, attention_bias, mlp_bias."""

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}  # transformers LlamaConfig


def tensors(f: Fields) -> list[Tensor]:
    bias = f.flag("attention_bias")
    return decoder(f, qkv_bias=bias, o_bias=bias, mlp_bias=f.flag("mlp_bias"))


FAMILY = Family(
    ("llama",), DEFAULTS, COMMON_HARMLESS, tensors, frozenset({"head_dim", "num_key_value_heads"}),
    models=frozenset({"LlamaForCausalLM"}),
)
