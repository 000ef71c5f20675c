"""Model sources -> ModelSpec: presets, local Hugging Face configs, safetensors headers, live modules."""

from __future__ import annotations

from pathlib import Path

from cdka_search.errors import ModelSourceError
from cdka_search.spec.model_spec import Kind, ModelSpec, TargetModule
from cdka_search.spec.presets import ALIASES, PRESETS, preset_spec, resolve_preset_name

__all__ = [
    "ALIASES",
    "PRESETS",
    "Kind",
    "ModelSpec",
    "TargetModule",
    "load_spec",
    "resolve_preset_name",
    "spec_from_module",
]


def load_spec(model: str) -> ModelSpec:
    """Read a model given as a preset name, a family alias, or a local path."""
    path = Path(model).expanduser()
    if path.exists():
        from cdka_search.spec.hf_config import config_spec
        from cdka_search.spec.safetensors_header import safetensors_spec

        if path.is_dir():
            if (path / "config.json").is_file():
                return config_spec(path)
            return safetensors_spec(path)
        if path.name.endswith((".safetensors", ".index.json")):
            return safetensors_spec(path)
        if path.suffix == ".json":
            return config_spec(path)
        raise ModelSourceError(f"{path}: expected a folder, config.json, .safetensors or .index.json")
    if "/" in model or model.endswith((".json", ".safetensors")):
        raise ModelSourceError(f"{model}: no such file or folder")
    return preset_spec(model)


def spec_from_module(model, name: str | None = None) -> ModelSpec:
    """ModelSpec of a live torch.nn.Module (imports torch)."""
    from cdka_search.spec.torch_module import spec_from_module as _from_module

    return _from_module(model, name)
