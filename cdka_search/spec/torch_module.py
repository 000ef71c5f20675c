"""A live torch.nn.Module (or a transformers config instantiated on the meta device) -> ModelSpec."""

from __future__ import annotations

from pathlib import Path

from cdka_search.errors import ModelSourceError, one_line
from cdka_search.spec.model_spec import ModelSpec, TargetModule


def spec_from_module(model, name: str | None = None) -> ModelSpec:
    """Targets are every nn.Linear and transformers Conv1D except the output embedding."""
    import torch.nn as nn

    excluded: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and get_out() is not None:
        excluded.add(id(get_out()))
    targets: list[TargetModule] = []
    for module_name, module in model.named_modules():
        if id(module) in excluded or module_name.split(".")[-1] == "lm_head":
            continue
        if isinstance(module, nn.Linear):
            targets.append(TargetModule(module_name, module.out_features, module.in_features))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            d_in, d_out = module.weight.shape
            targets.append(TargetModule(module_name, int(d_out), int(d_in), "conv1d"))
    if not targets:
        raise ModelSourceError(f"{name or type(model).__name__}: no nn.Linear or Conv1D modules to adapt")
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return ModelSpec(name or type(model).__name__, "module", total, tuple(targets))


def meta_spec_from_config(folder: Path, name: str) -> ModelSpec:
    """Any architecture transformers knows, built on the meta device (no weight allocated)."""
    from cdka_search.spec.hf_config import read_config
    from cdka_search.textdata import refuse_remote_code

    kind = read_config(folder).get("model_type")
    if not isinstance(kind, str) or not kind.strip():
        raise ModelSourceError(f"{folder}: config.json has no model_type, so its architecture is unknown")
    refuse_remote_code(folder, "config.json")  # both before importing torch: bad input fails fast
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelSourceError(
            f"{folder}: model_type not built in; install the 'hf' extra (pip install 'cdka[hf]') to read any architecture"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = transformers.AutoModel.from_config(config)
    except Exception as exc:  # transformers raises many unrelated types for a bad config
        raise ModelSourceError(f"{folder}: transformers cannot build this config ({one_line(exc)})") from None
    spec = spec_from_module(model, name)
    return ModelSpec(name, "hf-config", spec.total_params, spec.targets)
