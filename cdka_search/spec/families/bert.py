"""BERT and RoBERTa encoders, named as a task model names them (``roberta.encoder.layer.0...``);
the total is the base model with its pooler, the number their model cards quote."""

from cdka_search.errors import ConfigError
from cdka_search.limits import MAX_LAYERS
from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor, embedding, linear, norm

DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 512, "type_vocab_size": 2,
    "is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute",
}  # transformers BertConfig (RobertaConfig differs only in vocab_size, which its configs set)


def tensors(f: Fields) -> list[Tensor]:
    root = str(f.raw("model_type"))
    for key in ("is_decoder", "add_cross_attention"):
        if f.flag(key):
            raise ConfigError(f"{f.where}: {key} is not supported by the built-in {root} family")
    if f.raw("position_embedding_type") not in ("absolute", None):
        raise ConfigError(f"{f.where}: position_embedding_type {f.raw('position_embedding_type')!r} is not supported; only 'absolute'")
    hidden, intermediate = f.int("hidden_size"), f.int("intermediate_size")
    f.heads("num_attention_heads", "num_attention_heads")
    e = f"{root}.embeddings"
    words = embedding(f"{e}.word_embeddings", f.int("vocab_size"), hidden)
    positions = embedding(f"{e}.position_embeddings", f.int("max_position_embeddings"), hidden)
    types = embedding(f"{e}.token_type_embeddings", f.int("type_vocab_size", low=0), hidden) + norm(f"{e}.LayerNorm", hidden, bias=True)
    out = words + positions + types if root == "bert" else words + types + positions  # RoBERTa registers positions last
    for i in range(f.int("num_hidden_layers", MAX_LAYERS)):
        p = f"{root}.encoder.layer.{i}"
        for leaf in ("query", "key", "value"):
            out += linear(f"{p}.attention.self.{leaf}", hidden, hidden, bias=True)
        out += linear(f"{p}.attention.output.dense", hidden, hidden, bias=True) + norm(f"{p}.attention.output.LayerNorm", hidden, bias=True)
        out += linear(f"{p}.intermediate.dense", intermediate, hidden, bias=True)
        out += linear(f"{p}.output.dense", hidden, intermediate, bias=True) + norm(f"{p}.output.LayerNorm", hidden, bias=True)
    return out + linear(f"{root}.pooler.dense", hidden, hidden, bias=True, kind=None)


FAMILY = Family(("bert", "roberta"), DEFAULTS, COMMON_HARMLESS | {"tie_word_embeddings", "layer_norm_eps"}, tensors)
