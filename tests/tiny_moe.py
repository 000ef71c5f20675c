"""Tiny transformers MoE models (Mixtral, Qwen3-MoE, DeepSeek-V3; gpt-oss, which stores its experts
transposed, (E, d_in, d_out), with biases; Llama 4, which stores them transposed without transformers'
layout mark and multiplies the whole stack at once) built from configs made here, with hand-written
plans over their 3-D expert parameters (nothing is downloaded)."""

from __future__ import annotations

from cdka_search.candidates import Design
from cdka_search.plan import Plan, PlanGroup

HIDDEN, MOE_INTERMEDIATE, EXPERTS, LAYERS, VOCAB = 16, 12, 4, 2, 64
FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4")


def tiny_moe(family: str, *, seed: int = 0, experts_implementation: str = "eager"):
    """A CausalLM of ``family`` with EXPERTS experts per layer, gate_up_proj (E, 2*12, 16), down_proj (E, 16, 12)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=MOE_INTERMEDIATE, num_local_experts=EXPERTS)
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=MOE_INTERMEDIATE,
                                             num_experts=EXPERTS, head_dim=8, decoder_sparse_step=1)
        model = transformers.Qwen3MoeForCausalLM(config)
    elif family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common, intermediate_size=32, moe_intermediate_size=MOE_INTERMEDIATE, n_routed_experts=EXPERTS,
            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=8, kv_lora_rank=8,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        )
        model = transformers.DeepseekV3ForCausalLM(config)
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(**common, intermediate_size=MOE_INTERMEDIATE, num_local_experts=EXPERTS,
                                           head_dim=8, layer_types=["full_attention"] * LAYERS)
        model = transformers.GptOssForCausalLM(config)
    elif family == "llama4":  # experts under feed_forward, read by one bmm over all experts (no implementations)
        config = transformers.Llama4TextConfig(**common, intermediate_size=MOE_INTERMEDIATE, intermediate_size_mlp=32,
                                               num_local_experts=EXPERTS, head_dim=8)
        return transformers.Llama4ForCausalLM(config)
    else:
        raise ValueError(family)
    model.set_experts_implementation(experts_implementation)
    return model


def expert_groups(*, gate_up: Design = Design(6, 4, 4, 4, 2), down: Design = Design(4, 3, 4, 4, 3)) -> tuple[PlanGroup, ...]:
    """Groups adapting every layer's gate_up_proj (24x16 per expert) and down_proj (16x12 per expert)."""
    return (
        PlanGroup(("model.layers.*.*.experts.gate_up_proj",), (2 * MOE_INTERMEDIATE, HIDDEN), LAYERS, gate_up,
                  "experts", experts=EXPERTS),
        PlanGroup(("model.layers.*.*.experts.down_proj",), (HIDDEN, MOE_INTERMEDIATE), LAYERS, down,
                  "experts", experts=EXPERTS),
    )


def expert_plan(*extra: PlanGroup, **designs: Design) -> Plan:
    """A plan over the tiny models' expert tensors (plus ``extra`` groups)."""
    groups = (*expert_groups(**designs), *extra)
    return Plan("tiny-moe", "test", 10**7, "1000000", 10**6, groups)  # a spec meaning its limit: the plan saves
