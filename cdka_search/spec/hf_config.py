"""A local Hugging Face folder or config.json -> ModelSpec, parsed offline by a built-in family,
or through transformers on the meta device for anything else."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from cdka_search.documents import brief, read_file_bytes, read_json
from cdka_search.errors import CdkaWarning, ConfigError, ModelSourceError
from cdka_search.limits import MAX_DIM
from cdka_search.spec.config_fields import bounded_int, check_sizes
from cdka_search.spec.families import family_of, family_spec, unknown_fields
from cdka_search.spec.model_spec import ModelSpec, has_new_head, listed_architectures


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json at ``path`` (a folder or the file itself)."""
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():  # one that is there but not a regular file is read_file_bytes's to name
        raise ModelSourceError(f"{path}: no config.json found")
    data = read_json(read_file_bytes(file, ModelSourceError), f"{file}: not a readable JSON config", ModelSourceError)
    if not isinstance(data, dict):
        raise ModelSourceError(f"{file}: a config must be a JSON object")
    _check_labels(data, str(file))
    return data


def _check_labels(config: dict[str, Any], where: str) -> None:
    """A task head's label count: transformers builds a dict of ``num_labels`` entries for any config
    it reads (10**7 took minutes and gigabytes), and a count below one makes a head of no parameters,
    whose plan load_plan refuses."""
    if config.get("num_labels") is not None:
        bounded_int(config["num_labels"], "num_labels", where, 1, MAX_DIM)
    labels = config.get("id2label")
    if labels is not None and not (isinstance(labels, dict) and labels):
        raise ConfigError(f"{where}: config field 'id2label' must be a non-empty mapping of label ids to names")


def task_head_class(config: dict[str, Any]) -> str | None:
    """The first of the (at most four) ``architectures`` a config names that adds a new head, if any."""
    return next((arch for arch in listed_architectures(config.get("architectures")) if has_new_head(arch)), None)


def config_spec(path: Path) -> ModelSpec:
    """Spec of a local model folder or config.json. A built-in family reads it exactly; a config of
    another model_type, with a field its family does not know, or of a task model with a new head (a
    built-in family describes the base model and its LM head), goes through transformers (meta)."""
    config = read_config(path)
    folder = path if path.is_dir() else path.parent
    name = folder.name or str(path)
    _warn_if_quantized(config, name)
    family = family_of(config)
    unknown = unknown_fields(config, family) if family else []
    head = task_head_class(config)
    listed = listed_architectures(config.get("architectures")) if family else []
    other = next((a for a in listed if a not in family.models), None)
    if family is not None and not unknown and head is None and other is None:
        return family_spec(config, family, name, "hf-config", str(path))
    from cdka_search.spec.torch_module import meta_spec_from_config

    check_sizes(config, str(path))
    try:
        return meta_spec_from_config(path, name)
    except ImportError:
        if head is not None:
            raise ModelSourceError(
                f"{path}: its architectures name {head}, a task model whose new head only transformers knows; "
                "install the 'hf' extra (pip install 'cdka[hf]') to read it"
            ) from None
        if other is not None:
            raise ModelSourceError(
                f"{path}: its architectures name {other}, whose module names the built-in "
                f"{config['model_type']} family does not describe; install the 'hf' extra (pip install 'cdka[hf]') to read it"
            ) from None
        if unknown:
            raise ConfigError(
                f"{path}: config field(s) {', '.join(map(repr, unknown))} are unknown to the built-in "
                f"{config['model_type']} family and might change shapes; install the 'hf' extra "
                "(pip install 'cdka[hf]') to read this config through transformers"
            ) from None
        raise ModelSourceError(
            f"{path}: model_type {config.get('model_type')!r} is not built in; install the 'hf' extra "
            "(pip install 'cdka[hf]') to read any architecture"
        ) from None


def _warn_if_quantized(config: dict[str, Any], name: str) -> None:
    """A config that loads its linears quantized (QLoRA's bitsandbytes 4-bit, GPTQ, AWQ, FP8) is planned
    on its float shapes, which is right, but cdka's adapter wraps only float ``nn.Linear`` weights: said
    here, where the plan is made, rather than when apply_plan meets the quantized layers."""
    quantized = config.get("quantization_config")
    if not isinstance(quantized, dict):
        return
    method = brief(quantized.get("quant_method", "unnamed"))
    warnings.warn(
        f"{name}: its config loads the weights quantized (quant_method {method}); the plan is made on their float "
        "shapes, and cdka's adapter applies to the model loaded without quantization; for quantized layers, export "
        "a --family lora plan with `cdka export --to peft` (PEFT's LoRA wraps them)", CdkaWarning, stacklevel=2,
    )
