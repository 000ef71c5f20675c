"""Architecture families: model_type -> the exact tensor list of a config (see base.py).

Closed registry: adding a family is one module here plus one line in ``_MODULES``
(docs/extending.md). A config whose model_type is not here, or that sets a field its family does
not know, is read through transformers on the meta device instead (exact, needs the hf extra).
"""

from __future__ import annotations

from typing import Any, Mapping

from cdka_search.spec.config_fields import Fields
from cdka_search.spec.families import bert, deepseek_v3, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe
from cdka_search.spec.families.base import COMMON_HARMLESS, Family, Tensor
from cdka_search.spec.model_spec import ModelSpec, TargetModule, is_embedding, tally_roles

_MODULES = (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gemma2, gemma3_text, phi3, deepseek_v3, gpt2, bert)
FAMILIES: dict[str, Family] = {t: m.FAMILY for m in _MODULES for t in m.FAMILY.model_types}

__all__ = ["FAMILIES", "Family", "Tensor", "family_of", "family_spec", "family_tensors", "unknown_fields"]


def family_of(config: Mapping[str, Any]) -> Family | None:
    """The built-in family of a config's model_type, or None."""
    kind = config.get("model_type")
    return FAMILIES.get(kind) if isinstance(kind, str) else None


def unknown_fields(config: Mapping[str, Any], family: Family) -> list[str]:
    """Fields the family neither reads nor knows to leave every shape alone."""
    return sorted(k for k in config if k not in family.fields and k not in COMMON_HARMLESS)


def family_tensors(config: Mapping[str, Any], family: Family, where: str) -> list[Tensor]:
    """Every parameter tensor transformers builds for ``config``, in its order."""
    return family.tensors(Fields(config, where, family.defaults, family.nullable))


def _target(t: Tensor) -> TargetModule:
    if t.kind == "experts":
        experts, d_out, d_in = t.shape
        return TargetModule(t.name, d_out, d_in, "experts", experts)
    module = t.name.removesuffix(".weight")
    if t.kind == "conv1d":
        return TargetModule(module, t.shape[1], t.shape[0], "conv1d")
    return TargetModule(module, t.shape[0], t.shape[1])


def family_spec(config: Mapping[str, Any], family: Family, name: str, source: str, where: str) -> ModelSpec:
    """The ModelSpec of a config of a built-in family: every tensor counted, targets listed."""
    tensors = family_tensors(config, family, where)
    others = tally_roles((t.name, t.numel) for t in tensors if not t.kind and len(t.shape) >= 2 and not is_embedding(t.name))
    return ModelSpec(name, source, sum(t.numel for t in tensors), tuple(_target(t) for t in tensors if t.kind), others)
