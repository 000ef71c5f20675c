"""GPT-2: Conv1D layers store (in, out); learned positions; the LM head is tied by default."""

from cdka_search.errors import ConfigError
from cdka_search.limits import MAX_LAYERS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor, embedding, linear, norm

DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "tie_word_embeddings": True, "add_cross_attention": False,
}  # transformers GPT2Config
HARMLESS = frozenset(
    "scale_attn_weights scale_attn_by_inverse_layer_idx reorder_and_upcast_attn summary_type summary_use_proj "
    "summary_activation summary_proj_to_labels summary_first_dropout n_ctx".split()
)


def conv1d(prefix: str, d_in: int, d_out: int) -> list[Tensor]:
    return [Tensor(f"{prefix}.weight", (d_in, d_out), "conv1d"), Tensor(f"{prefix}.bias", (d_out,))]


def tensors(f: Fields) -> list[Tensor]:
    if f.flag("add_cross_attention"):
        raise ConfigError(f"{f.where}: add_cross_attention is not supported by the built-in gpt2 family")
    hidden, vocab = f.int("n_embd"), f.int("vocab_size")
    f.int("n_head")
    inner = f.optional_int("n_inner") or 4 * hidden
    out = embedding("transformer.wte", vocab, hidden) + embedding("transformer.wpe", f.int("n_positions"), hidden)
    for i in range(f.int("n_layer", MAX_LAYERS)):
        p = f"transformer.h.{i}"
        out += norm(f"{p}.ln_1", hidden, bias=True)
        out += conv1d(f"{p}.attn.c_attn", hidden, 3 * hidden) + conv1d(f"{p}.attn.c_proj", hidden, hidden)
        out += norm(f"{p}.ln_2", hidden, bias=True)
        out += conv1d(f"{p}.mlp.c_fc", hidden, inner) + conv1d(f"{p}.mlp.c_proj", inner, hidden)
    out += norm("transformer.ln_f", hidden, bias=True)
    return out if f.flag("tie_word_embeddings") else out + linear("lm_head", vocab, hidden, kind=None)


FAMILY = Family(
    ("gpt2",), DEFAULTS, COMMON_HARMLESS | HARMLESS, tensors, frozenset({"n_inner"}),
    models=frozenset({"GPT2LMHeadModel"}),
)
