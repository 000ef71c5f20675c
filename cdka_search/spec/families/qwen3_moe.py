"""Qwen3-MoE (30B-A3B, 235B-A22B): routed experts on every decoder_sparse_step-th layer not in
mlp_only_layers, a dense MLP elsewhere; the router is counted, not adapted."""

from cdka_search.limits import MAX_EXPERTS, MAX_LAYERS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor, gated_mlp, routed_experts, router
from cdka_search.spec.families.dense import decoder

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "tie_word_embeddings": False,
    "attention_bias": False, "moe_intermediate_size": 768, "num_experts": 128, "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}  # transformers Qwen3MoeConfig


def tensors(f: Fields) -> list[Tensor]:
    hidden, experts = f.int("hidden_size"), f.int("num_experts", MAX_EXPERTS, low=0)
    dense_intermediate, expert_intermediate = f.int("intermediate_size"), f.int("moe_intermediate_size")
    step, dense_only = f.int("decoder_sparse_step", MAX_LAYERS), set(f.int_list("mlp_only_layers", MAX_LAYERS))

    def mlp(layer: int, prefix: str) -> list[Tensor]:
        if layer not in dense_only and experts > 0 and (layer + 1) % step == 0:
            return routed_experts(f"{prefix}.experts", experts, hidden, expert_intermediate) + router(f"{prefix}.gate", experts, hidden)
        return gated_mlp(prefix, hidden, dense_intermediate)

    bias = f.flag("attention_bias")
    return decoder(f, qkv_bias=bias, o_bias=bias, qk_norm=True, mlp=mlp)


FAMILY = Family(("qwen3_moe",), DEFAULTS, COMMON_HARMLESS, tensors, models=frozenset({"Qwen3MoeForCausalLM"}))
