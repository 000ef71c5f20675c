"""What a family is, and the building blocks families share (linear, norm, attention, gated MLP, experts).

A family lists EVERY parameter tensor transformers creates for a config, in transformers' own order
and with its own names: the total is their sum, the targets are the ones with a ``kind``. The
conformance tests compare that list with the real class built on the meta device, tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from cdka_search.spec.config_fields import ALIASES, Fields
from cdka_search.spec.model_spec import Kind


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor: its full name, its stored shape, and its target kind (None: not adapted)."""

    name: str
    shape: tuple[int, ...]
    kind: Kind | None = None

    @property
    def numel(self) -> int:
        out = 1
        for d in self.shape:
            out *= d
        return out


@dataclass(frozen=True)
class Family:
    """One architecture family: the model_types it reads, the transformers defaults of the fields it
    reads, every other field known not to change shapes, the tensor list of a config, the fields
    its transformers code accepts as null (a null elsewhere is an error, as it is in transformers),
    and the model classes that tensor list describes."""

    model_types: tuple[str, ...]
    defaults: Mapping[str, object]
    harmless: frozenset[str]
    tensors: Callable[[Fields], list[Tensor]]
    nullable: frozenset[str] = frozenset()
    #: The transformers classes whose module tree ``tensors`` is, names included: a config naming
    #: another class in its ``architectures`` (LlamaModel has no ``model.`` prefix, BertForMaskedLM no
    #: pooler but an MLM transform) is read through transformers instead.
    models: frozenset[str] = frozenset()

    @property
    def fields(self) -> frozenset[str]:
        """Every config key the family understands: those it reads (in either spelling) and the harmless."""
        spellings = {alias for key in self.defaults for alias in ALIASES.get(key, ())}
        return frozenset(self.defaults) | spellings | self.harmless


# Fields of any config that never change a parameter shape (ids, dropout, RoPE, eps, caching, dtype,
# routing behaviour, sliding windows, attention masks, labels, quantisation of stored weights).
COMMON_HARMLESS = frozenset(
    """
    _name_or_path architectures auto_map model_type transformers_version torch_dtype dtype use_cache
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id initializer_range
    hidden_act hidden_activation activation_function attention_dropout rms_norm_eps layer_norm_eps
    layer_norm_epsilon rope_theta rope_scaling rope_parameters rope_type partial_rotary_factor
    max_position_embeddings original_max_position_embeddings sliding_window use_sliding_window
    max_window_layers layer_types sliding_window_pattern _sliding_window_pattern pretraining_tp
    num_experts_per_tok norm_topk_prob output_router_logits router_aux_loss_coef router_jitter_noise
    n_group topk_group topk_method scoring_func routed_scaling_factor rope_interleave
    num_nextn_predict_layers aux_loss_alpha seq_aux ep_size moe_layer_freq
    attn_logit_softcapping final_logit_softcapping query_pre_attn_scalar use_bidirectional_attention
    embd_pdrop resid_pdrop attn_pdrop hidden_dropout_prob attention_probs_dropout_prob classifier_dropout
    id2label label2id num_labels problem_type finetuning_task tokenizer_class prefix task_specific_params
    return_dict output_hidden_states output_attentions torchscript chunk_size_feed_forward
    quantization_config gradient_checkpointing is_encoder_decoder use_return_dict cache_implementation
    rope_local_base_freq
    """.split()
)


def linear(prefix: str, d_out: int, d_in: int, bias: bool = False, kind: Kind | None = "linear") -> list[Tensor]:
    """An nn.Linear: weight (d_out, d_in), optional bias (d_out)."""
    out = [Tensor(f"{prefix}.weight", (d_out, d_in), kind)]
    return out + [Tensor(f"{prefix}.bias", (d_out,))] if bias else out


def norm(prefix: str, size: int, bias: bool = False) -> list[Tensor]:
    """An RMSNorm (weight) or LayerNorm (weight and bias)."""
    out = [Tensor(f"{prefix}.weight", (size,))]
    return out + [Tensor(f"{prefix}.bias", (size,))] if bias else out


def embedding(prefix: str, rows: int, size: int) -> list[Tensor]:
    return [Tensor(f"{prefix}.weight", (rows, size))]


def attention(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool, o_bias: bool) -> list[Tensor]:
    """q, k, v, o projections with grouped-query attention and an explicit head_dim."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return (
        linear(f"{prefix}.q_proj", q, hidden, qkv_bias)
        + linear(f"{prefix}.k_proj", kv, hidden, qkv_bias)
        + linear(f"{prefix}.v_proj", kv, hidden, qkv_bias)
        + linear(f"{prefix}.o_proj", hidden, q, o_bias)
    )


def gated_mlp(prefix: str, hidden: int, intermediate: int, bias: bool = False) -> list[Tensor]:
    """gate_proj, up_proj, down_proj (SwiGLU / GeGLU)."""
    return (
        linear(f"{prefix}.gate_proj", intermediate, hidden, bias)
        + linear(f"{prefix}.up_proj", intermediate, hidden, bias)
        + linear(f"{prefix}.down_proj", hidden, intermediate, bias)
    )


def routed_experts(prefix: str, experts: int, hidden: int, intermediate: int) -> list[Tensor]:
    """transformers 5's fused expert parameters: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    return [
        Tensor(f"{prefix}.gate_up_proj", (experts, 2 * intermediate, hidden), "experts"),
        Tensor(f"{prefix}.down_proj", (experts, hidden, intermediate), "experts"),
    ]


def router(prefix: str, experts: int, hidden: int) -> list[Tensor]:
    """A top-k router's weight (E, H): a plain parameter in transformers 5, counted, never a target."""
    return [Tensor(f"{prefix}.weight", (experts, hidden))]


def causal_lm(fields: Fields, hidden: int, vocab: int, layers: list[Tensor], final_norm: list[Tensor]) -> list[Tensor]:
    """model.embed_tokens, the layers, model.norm, and lm_head unless tied to the embeddings."""
    head = [] if fields.flag("tie_word_embeddings") else linear("lm_head", vocab, hidden, kind=None)
    return embedding("model.embed_tokens", vocab, hidden) + layers + final_norm + head
