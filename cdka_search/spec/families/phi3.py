"""Phi-3 / Phi-3.5 / Phi-4: fused qkv_proj (q, then k and v of the kv heads) and fused gate_up_proj."""

from cdka_search.limits import MAX_LAYERS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor, causal_lm, linear, norm

DEFAULTS = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False,
}  # transformers Phi3Config


def tensors(f: Fields) -> list[Tensor]:
    hidden, intermediate, vocab = f.int("hidden_size"), f.int("intermediate_size"), f.int("vocab_size")
    heads, kv_heads = f.heads("num_attention_heads", "num_key_value_heads")
    head_dim = f.head_dim(hidden, heads)
    layers = []
    for i in range(f.int("num_hidden_layers", MAX_LAYERS)):
        p = f"model.layers.{i}"
        layers += linear(f"{p}.self_attn.o_proj", hidden, heads * head_dim)  # registered before qkv_proj
        layers += linear(f"{p}.self_attn.qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden)
        layers += linear(f"{p}.mlp.gate_up_proj", 2 * intermediate, hidden) + linear(f"{p}.mlp.down_proj", hidden, intermediate)
        layers += norm(f"{p}.input_layernorm", hidden) + norm(f"{p}.post_attention_layernorm", hidden)
    return causal_lm(f, hidden, vocab, layers, norm("model.norm", hidden))


FAMILY = Family(
    ("phi3",), DEFAULTS, COMMON_HARMLESS, tensors, frozenset({"num_key_value_heads"}),
    models=frozenset({"Phi3ForCausalLM"}),
)
