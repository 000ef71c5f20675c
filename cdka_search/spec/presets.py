"""The embedded, offline preset table: the shape fields of each model's public config.json, read
by the same family code as a local config (so a preset and its config.json cannot disagree)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from cdka_search.documents import named
from cdka_search.errors import ModelSourceError
from cdka_search.spec.families import FAMILIES, family_spec
from cdka_search.spec.model_spec import ModelSpec


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, **extra,
    }


PRESETS: dict[str, Mapping[str, Any]] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-405b": _llama(16384, 53248, 126, 128, 8, 128256),
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, 32000, model_type="mistral"),
    "mistral-nemo-12b": _llama(5120, 14336, 40, 32, 8, 131072, model_type="mistral", head_dim=128),
    "mixtral-8x7b": _llama(4096, 14336, 32, 32, 8, 32000, model_type="mixtral", num_local_experts=8),
    "qwen2-7b": _llama(3584, 18944, 28, 28, 4, 152064, model_type="qwen2"),
    "qwen3-8b": _llama(4096, 12288, 36, 32, 8, 151936, model_type="qwen3", head_dim=128),
    "qwen3-30b-a3b": _llama(
        2048, 6144, 48, 32, 4, 151936, model_type="qwen3_moe", head_dim=128, num_experts=128, moe_intermediate_size=768
    ),
    "tinyllama-1.1b": _llama(2048, 5632, 22, 32, 4, 32000),
    "roberta-base": {
        "model_type": "roberta", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
}

ALIASES: dict[str, str] = {
    "llama": "llama-2-7b",  # the paper's main model
    "llama2": "llama-2-7b",
    "llama3": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",  # same shapes; 3.1 changed RoPE scaling and the context length only
    "llama-3.1-70b": "llama-3-70b",
    "llama-405b": "llama-3.1-405b",
    "mistral": "mistral-7b",
    "mistral-nemo": "mistral-nemo-12b",
    "mixtral": "mixtral-8x7b",
    "qwen2": "qwen2-7b",
    "qwen3": "qwen3-8b",
    "qwen3-moe": "qwen3-30b-a3b",
    "tinyllama": "tinyllama-1.1b",
    "roberta": "roberta-base",
    "gpt2-small": "gpt2",
}


def resolve_preset_name(name: str) -> str:
    """The preset a name or family alias refers to; unknown names get the nearest suggested."""
    key = name.strip().lower()
    if key in PRESETS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    near = nearest_presets(key)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise ModelSourceError(
        f"unknown model {named(name)}: not a preset, alias or existing path.{hint} "
        "Run `cdka models` for the list."
    )


def nearest_presets(name: str, n: int = 3, cutoff: float = 0.5) -> list[str]:
    """Presets and aliases whose names come nearest to ``name``: a suggestion, never a resolution."""
    return difflib.get_close_matches(name.strip().lower(), [*PRESETS, *ALIASES], n=n, cutoff=cutoff)


# Parts of a Hub repository's name that do not change a model's shapes: Meta-Llama-3-8B-Instruct,
# Llama-2-7b-chat-hf, Mistral-7B-Instruct-v0.2, Mistral-Nemo-Instruct-2407.
_SHAPELESS = re.compile(r"meta|hf|instruct|chat|base|it|v\d+(\.\d+)*|\d{4}")


def preset_like(repository: str) -> str | None:
    """The preset or alias a Hub repository's name (``Meta-Llama-3-8B-Instruct``) most likely shares its
    shapes with, or None: a suggestion for an error message, never a resolution."""
    kept = "-".join(part for part in repository.lower().split("-") if not _SHAPELESS.fullmatch(part))
    near = nearest_presets(kept, n=1, cutoff=0.8)
    return near[0] if near else None


def preset_spec(name: str) -> ModelSpec:
    """The ModelSpec of a preset or alias, built from its config fields by its family."""
    preset = resolve_preset_name(name)
    config = PRESETS[preset]
    return family_spec(config, FAMILIES[config["model_type"]], preset, "preset", preset)
