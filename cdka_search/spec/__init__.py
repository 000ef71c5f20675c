"""Model sources -> ModelSpec: presets, local Hugging Face configs, safetensors headers, live modules."""

from __future__ import annotations

import re
from dataclasses import replace

from cdka_search.documents import brief, named
from cdka_search.errors import ModelSourceError
from cdka_search.fileio import absent
from cdka_search.limits import MAX_DIM, MAX_TOTAL_PARAMS
from cdka_search.registry import resolve
from cdka_search.spec.model_spec import Kind, ModelSpec, TargetModule
from cdka_search.spec.presets import ALIASES, PRESETS, preset_like, resolve_preset_name
from cdka_search.spec.sources import SOURCES, existing_path

__all__ = [
    "ALIASES",
    "PRESETS",
    "SOURCES",
    "Kind",
    "ModelSpec",
    "TargetModule",
    "load_spec",
    "resolve_preset_name",
    "spec_from_module",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")  # owner/name, as the Hub spells repositories


def load_spec(model: str) -> ModelSpec:
    """Read a model given as a preset name, a family alias, or a local path: the first of SOURCES that
    matches reads it (cdka_search/spec/sources.py)."""
    path = existing_path(model)
    for source in SOURCES.values():
        if source.matches(model, path):
            return _bounded(resolve(source.loader)(model if source.reads_name else path), model)
    if path is not None:
        raise ModelSourceError(f"{path}: expected a folder, config.json, .safetensors or .index.json")
    if _HUB_ID.fullmatch(model) and not model.endswith((".json", ".safetensors")):  # those name files
        near = preset_like(model.rsplit("/", 1)[1])
        hint = f"; the preset {near!r} may have its shapes (see `cdka models`)" if near else ""
        raise ModelSourceError(
            f"{named(model)}: no such file or folder, and cdka reads no Hugging Face Hub id (it downloads nothing): "
            f"put the model's config.json in a folder and pass the folder{hint}"
        )
    raise ModelSourceError(f"{named(model)}: {absent(model)}")


def _bounded(spec: ModelSpec, model: str) -> ModelSpec:
    """``spec`` when its size and every target's sides are within the limits, else one error naming
    the source: fields read one by one can still multiply into an absurd model (head_dim x heads, a
    width transformers derives from a ratio), which a plan would otherwise carry to a late failure."""
    if not 1 <= spec.total_params <= MAX_TOTAL_PARAMS:
        raise ModelSourceError(f"{named(model)}: describes a model of {spec.total_params:,} parameters, outside [1, {MAX_TOTAL_PARAMS:,}]")
    spec = _without_empty(spec)
    wide = next((t for t in spec.targets if not (1 <= t.d_out <= MAX_DIM and 1 <= t.d_in <= MAX_DIM)), None)
    if wide is not None:
        raise ModelSourceError(
            f"{named(model)}: weight {brief(wide.name)} is {wide.d_out:,}x{wide.d_in:,}, a side outside [1, {MAX_DIM:,}]"
        )
    return spec


def _without_empty(spec: ModelSpec) -> ModelSpec:
    """``spec`` without its weights of a side 0: they hold nothing to adapt (transformers builds and
    runs Qwen2-MoE's shared expert at shared_expert_intermediate_size 0, DeepSeek-V3's at
    n_shared_experts 0)."""
    if all(t.d_out and t.d_in and t.experts for t in spec.targets):
        return spec
    return replace(spec, targets=tuple(t for t in spec.targets if t.d_out and t.d_in and t.experts))


def spec_from_module(model, name: str | None = None) -> ModelSpec:
    """ModelSpec of a live torch.nn.Module (imports torch)."""
    from cdka_search.spec.torch_module import spec_from_module as _from_module

    return _without_empty(_from_module(model, name))
