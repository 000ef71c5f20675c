"""Mixtral (8x7B, 8x22B): Mistral attention, every layer's MLP is a router plus routed experts."""

from cdka_search.limits import MAX_EXPERTS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor, routed_experts, router
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False,
    "num_experts": 8,
}  # transformers MixtralConfig (config.json files spell num_experts num_local_experts)


def tensors(f: Fields) -> list[Tensor]:
    hidden, intermediate, experts = f.int("hidden_size"), f.int("intermediate_size"), f.int("num_experts", MAX_EXPERTS)

    def mlp(layer: int, prefix: str) -> list[Tensor]:
        return router(f"{prefix}.gate", experts, hidden) + routed_experts(f"{prefix}.experts", experts, hidden, intermediate)

    return decoder(f, qkv_bias=False, o_bias=False, mlp=mlp)


FAMILY = Family(
    ("mixtral",), DEFAULTS, COMMON_HARMLESS, tensors, frozenset({"head_dim"}),
    models=frozenset({"MixtralForCausalLM"}),
)
