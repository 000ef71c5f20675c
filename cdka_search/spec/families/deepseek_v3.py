"""DeepSeek-V3 / R1: multi-head latent attention (q_a/q_b or plain q_proj when q_lora_rank is null,
kv_a_proj_with_mqa, kv_b_proj), dense MLPs in the first first_k_dense_replace layers, then routed
experts plus always-on shared experts. Multi-token-prediction layers are not built by transformers."""

from cdka_search.limits import MAX_EXPERTS, MAX_LAYERS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor, causal_lm, gated_mlp, linear, norm, routed_experts, router

DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": None, "n_shared_experts": 1,
    "n_routed_experts": 256, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "first_k_dense_replace": 3, "tie_word_embeddings": False,
    "attention_bias": False,
}  # transformers DeepseekV3Config


def tensors(f: Fields) -> list[Tensor]:
    hidden, vocab = f.int("hidden_size"), f.int("vocab_size")
    heads, _ = f.heads("num_attention_heads", "num_key_value_heads")
    q_rank, kv_rank = f.optional_int("q_lora_rank"), f.int("kv_lora_rank")
    rope, nope, v_dim = f.int("qk_rope_head_dim"), f.int("qk_nope_head_dim"), f.int("v_head_dim")
    experts, shared = f.int("n_routed_experts", MAX_EXPERTS), f.int("n_shared_experts", MAX_EXPERTS, low=0)
    dense, expert_intermediate = f.int("intermediate_size"), f.int("moe_intermediate_size")
    first_moe, bias = f.int("first_k_dense_replace", MAX_LAYERS, low=0), f.flag("attention_bias")
    layers = []
    for i in range(f.int("num_hidden_layers", MAX_LAYERS)):
        a = f"model.layers.{i}.self_attn"
        if q_rank is None:
            layers += linear(f"{a}.q_proj", heads * (nope + rope), hidden)
        else:
            layers += linear(f"{a}.q_a_proj", q_rank, hidden, bias) + norm(f"{a}.q_a_layernorm", q_rank)
            layers += linear(f"{a}.q_b_proj", heads * (nope + rope), q_rank)
        layers += linear(f"{a}.kv_a_proj_with_mqa", kv_rank + rope, hidden, bias) + norm(f"{a}.kv_a_layernorm", kv_rank)
        layers += linear(f"{a}.kv_b_proj", heads * (nope + v_dim), kv_rank) + linear(f"{a}.o_proj", hidden, heads * v_dim, bias)
        m = f"model.layers.{i}.mlp"
        if i < first_moe:
            layers += gated_mlp(m, hidden, dense)
        else:
            layers += routed_experts(f"{m}.experts", experts, hidden, expert_intermediate) + router(f"{m}.gate", experts, hidden)
            layers += gated_mlp(f"{m}.shared_experts", hidden, expert_intermediate * shared)
        layers += norm(f"model.layers.{i}.input_layernorm", hidden) + norm(f"model.layers.{i}.post_attention_layernorm", hidden)
    return causal_lm(f, hidden, vocab, layers, norm("model.norm", hidden))


# qk_head_dim and head_dim are derived (nope + rope, rope); transformers overwrites them.
FAMILY = Family(
    ("deepseek_v3",), DEFAULTS, COMMON_HARMLESS | {"qk_head_dim", "head_dim"}, tensors,
    frozenset({"num_key_value_heads", "q_lora_rank"}), models=frozenset({"DeepseekV3ForCausalLM"}),
)
