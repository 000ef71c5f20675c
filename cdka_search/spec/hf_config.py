"""A local Hugging Face folder or config.json -> ModelSpec, parsed offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdka_search.documents import read_file_bytes, read_json
from cdka_search.errors import ModelSourceError
from cdka_search.spec.model_spec import ModelSpec
from cdka_search.spec.presets import Architecture, target_modules, total_params

_LLAMA_LIKE = {"llama", "mistral", "qwen2"}


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json at ``path`` (a folder or the file itself)."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelSourceError(f"{path}: no config.json found")
    data = read_json(read_file_bytes(file, ModelSourceError), f"{file}: not a readable JSON config", ModelSourceError)
    if not isinstance(data, dict):
        raise ModelSourceError(f"{file}: a config must be a JSON object")
    return data


def architecture_from_config(config: dict[str, Any], where: str) -> Architecture | None:
    """The Architecture of a known model_type, or None when the type is not built in."""
    kind = str(config.get("model_type", "")).lower()
    try:
        if kind in _LLAMA_LIKE:
            heads = int(config["num_attention_heads"])
            return Architecture(
                "llama",
                int(config["hidden_size"]),
                int(config["intermediate_size"]),
                int(config["num_hidden_layers"]),
                heads,
                int(config.get("num_key_value_heads") or heads),
                int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
            )
        if kind == "gpt2":
            hidden = int(config["n_embd"])
            return Architecture(
                "gpt2",
                hidden,
                int(config.get("n_inner") or 4 * hidden),
                int(config["n_layer"]),
                int(config["n_head"]),
                int(config["n_head"]),
                int(config["vocab_size"]),
                tied=True,
                max_positions=int(config["n_positions"]),
            )
        if kind in ("bert", "roberta"):
            heads = int(config["num_attention_heads"])
            return Architecture(
                kind,
                int(config["hidden_size"]),
                int(config["intermediate_size"]),
                int(config["num_hidden_layers"]),
                heads,
                heads,
                int(config["vocab_size"]),
                max_positions=int(config["max_position_embeddings"]),
                type_vocab=int(config.get("type_vocab_size", 2)),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelSourceError(f"{where}: config of model_type {kind!r} lacks or garbles {exc}") from None
    return None


def config_spec(path: Path) -> ModelSpec:
    """Spec of a local model folder or config.json; unknown types go through transformers (meta)."""
    config = read_config(path)
    name = (path if path.is_dir() else path.parent).name or str(path)
    arch = architecture_from_config(config, str(path))
    if arch is not None:
        return ModelSpec(name, "hf-config", total_params(arch), tuple(target_modules(arch)))
    from cdka_search.spec.torch_module import meta_spec_from_config

    return meta_spec_from_config(path if path.is_dir() else path.parent, name)
