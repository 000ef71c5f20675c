"""Typed, bounded reads of config.json fields: every number a family uses passes through here.

A config is untrusted input: a field may be missing, null, a string, a float, negative or absurd.
Each read names the field and the allowed range, so a bad config is one clear error line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cdka_search.errors import ConfigError
from cdka_search.limits import MAX_DIM, MAX_EXPERTS, MAX_LAYERS, check_int

# transformers' attribute_map: a config.json may spell a field either way.
ALIASES = {
    "num_experts": ("num_local_experts",),
    "n_routed_experts": ("num_local_experts",),
    "n_embd": ("hidden_size",),  # GPT-2
    "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",),
    "n_positions": ("max_position_embeddings",),
}


def bounded_int(value: Any, key: str, where: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; bools, strings, floats and null are refused."""
    return check_int(value, f"{where}: config field {key!r}", ConfigError, low, high)


@dataclass(frozen=True)
class Fields:
    """A config's fields with the transformers defaults of its model_type behind them.

    ``defaults`` are what the transformers config class assumes for a missing field, so a
    hand-written config.json that omits a field means what it means to transformers.
    """

    config: Mapping[str, Any]
    where: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    nullable: frozenset[str] = frozenset()  # fields transformers reads null as "derive it" (else it fails)

    def raw(self, key: str) -> Any:
        """The config's value of ``key`` (or of its transformers alias), else the default."""
        name = self.spelling(key)
        if name in self.config:
            return self.config[name]
        if key in self.defaults:
            return self.defaults[key]
        raise ConfigError(f"{self.where}: config field {key!r} is missing")

    def spelling(self, key: str) -> str:
        """The name the config gives ``key`` (it may use the alias), so an error names what the file says."""
        return next((name for name in (key, *ALIASES.get(key, ())) if name in self.config), key)

    def has(self, key: str) -> bool:
        """Whether ``key`` is set to a value other than null (in the config or by default); an explicit
        null where transformers does not accept one is an error."""
        name = self.spelling(key)
        if name in self.config and self.config[name] is None and key not in self.nullable:
            raise ConfigError(f"{self.where}: config field {name!r} is null; set it or leave it out")
        try:
            return self.raw(key) is not None
        except ConfigError:
            return False

    def int(self, key: str, high: int = MAX_DIM, low: int = 1) -> int:
        return bounded_int(self.raw(key), self.spelling(key), self.where, low, high)

    def optional_int(self, key: str, high: int = MAX_DIM, low: int = 1) -> int | None:
        """An int, or None when the field is absent or null (transformers' "not used" marker)."""
        return self.int(key, high, low) if self.has(key) else None

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: config field {self.spelling(key)!r} must be true or false, got {value!r}")
        return value

    def int_list(self, key: str, high: int) -> tuple[int, ...]:
        value = self.raw(key)
        if value is None:
            return ()
        name = self.spelling(key)
        if not isinstance(value, list) or len(value) > MAX_LAYERS:
            raise ConfigError(f"{self.where}: config field {name!r} must be a list of integers, got {value!r}")
        return tuple(bounded_int(v, name, self.where, 0, high) for v in value)

    def heads(self, heads_key: str, kv_key: str) -> tuple[int, int]:
        """(heads, kv_heads): kv_heads defaults to heads (null means "same as heads") and must divide it."""
        heads = self.int(heads_key)
        kv = self.optional_int(kv_key) or heads
        if heads % kv:
            raise ConfigError(f"{self.where}: {kv_key} = {kv} must divide {heads_key} = {heads}")
        return heads, kv

    def head_dim(self, hidden: int, heads: int) -> int:
        """head_dim when set (Mistral-NeMo, Qwen3, Gemma), else hidden / heads as transformers computes it."""
        if self.has("head_dim"):
            return self.int("head_dim")
        if hidden % heads:
            raise ConfigError(f"{self.where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; set head_dim")
        return hidden // heads


# Other spellings of layer and expert counts (MPT's n_layers, a vision tower's depth, ERNIE's
# moe_num_experts): a module count under any name is bounded, since building it is what takes time.
# Only the top: a field matched by its name may use -1 or 0 for "none".
_LAYER_COUNT = re.compile(r"(^|_)(layers|n_layer|depth|blocks)$")
_EXPERT_COUNT = re.compile(r"(^|_)experts$")
# And of widths (T5's d_ff, OPT's ffn_dim, GPT-2's n_inner): a side beyond MAX_DIM is refused before a
# build that takes tens of seconds to describe an absurd model.
_WIDTH = re.compile(r"(^|_)(d_ff|ffn_dim|ffn_hidden_size|n_inner|d_kv|head_dim|intermediate_size|hidden_size|d_model|embed_dim|lora_rank)$")


def _count_bound(key: str) -> int | None:
    """The bound of a field not in _SIZE_FIELDS that by its name counts layers or experts, or is a
    weight's side, else None."""
    if _LAYER_COUNT.search(key):
        return MAX_LAYERS
    if _EXPERT_COUNT.search(key):
        return MAX_EXPERTS
    if _WIDTH.search(key):
        return MAX_DIM
    return None


# Fields that set how many modules a transformers class builds: bounded before any config, of any
# model_type, reaches transformers (a config asking for 10^9 layers would otherwise hang the build).
_SIZE_FIELDS = {
    "num_hidden_layers": MAX_LAYERS, "n_layer": MAX_LAYERS, "num_layers": MAX_LAYERS, "num_decoder_layers": MAX_LAYERS,
    "encoder_layers": MAX_LAYERS, "decoder_layers": MAX_LAYERS, "num_attention_heads": MAX_DIM, "n_head": MAX_DIM,
    "num_key_value_heads": MAX_DIM, "hidden_size": MAX_DIM, "n_embd": MAX_DIM, "d_model": MAX_DIM,
    "intermediate_size": MAX_DIM, "vocab_size": MAX_DIM, "num_local_experts": MAX_EXPERTS, "num_experts": MAX_EXPERTS,
}


def check_sizes(config: Mapping[str, Any], where: str) -> None:
    """Bound the module-count and width fields of a config and of its sub-configs (text_config, and
    per-layer ones listed as objects, as DeciLM's block_configs). A field may also be a per-layer list
    (Gemma 3n's intermediate_size): each entry is bounded."""
    pending = [(config, where)]  # a stack, not recursion: a config may nest deeply
    while pending:
        section, place = pending.pop()
        for key, value in section.items():
            if isinstance(value, Mapping):
                pending.append((value, f"{place} ({key})"))
            elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
                pending.extend((v, f"{place} ({key}[{i}])") for i, v in enumerate(value) if isinstance(v, Mapping))
            elif key in _SIZE_FIELDS and isinstance(value, list):
                if len(value) > MAX_LAYERS:
                    raise ConfigError(f"{place}: config field {key!r} lists {len(value):,} values, more than {MAX_LAYERS:,} layers")
                for entry in value:
                    bounded_int(entry, key, place, 0, _SIZE_FIELDS[key])
            elif key in _SIZE_FIELDS and value is not None:
                bounded_int(value, key, place, 0, _SIZE_FIELDS[key])
            elif isinstance(value, int) and not isinstance(value, bool) and value > (_count_bound(str(key)) or value):
                raise ConfigError(f"{place}: config field {key!r} is {value:,}, more than {_count_bound(str(key)):,}")
