"""Check a PEFT export against the real thing: build the model on the meta device (no weight
allocated), apply the written configs with the installed peft, and compare module by module which
adapter each module or parameter got, its rank and scaling, and the trainable parameter count, with
the plan.

Why: PEFT rewrites some configs before applying them. peft 0.21 with transformers 5 converts the LoRA
``target_modules`` of every model type that transformers maps to its "qwen2_moe" or "mixtral" weight
conversion (DeepSeek-V2/V3, Qwen3-MoE, Qwen3-Next, GLM-4-MoE, OLMoE, ...; see
``peft.utils.transformers_weight_conversion._convert_peft_config_moe``): a target equal to or ending in
``.gate_proj``, ``.up_proj``, ``.down_proj`` or ``.gate`` (``w1``/``w2``/``w3``/``gate`` for Mixtral) is
removed from ``target_modules`` and replaced by the bare parameter name ``gate_up_proj`` / ``down_proj`` /
``gate.weight`` in ``target_parameters``, assuming it meant a v4 expert. A dense layer's MLP or a shared
expert listed by full name is therefore silently not adapted (and naming gate_proj without up_proj is a
ValueError). No form of ``target_modules`` escapes this (a regex is first resolved to leaf names, then
converted the same way); ``target_parameters`` are never converted, so such a module's ``weight`` can be
targeted there instead (PEFT's ParamWrapper: the same rank-r factors and scaling, no dropout).
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdka_search.plan import Plan
    from cdka_search.spec.model_spec import ModelSpec

__all__ = ["PeftRefused", "applied_adapters", "meta_model"]


class PeftRefused(Exception):
    """PEFT raised while applying a config (its message, one line)."""


def _config_dict(plan: Plan, spec: ModelSpec | None) -> tuple[Any, str] | None:
    """(a transformers config, where it came from) for the plan's model, or None when none is known."""
    import transformers

    from cdka_search.spec.presets import PRESETS, resolve_preset_name

    if plan.model_source == "preset" or (spec is not None and spec.source == "preset"):
        try:
            name = resolve_preset_name(spec.name if spec is not None else plan.model_name)
        except Exception:  # noqa: BLE001 - an unknown preset: nothing to build
            return None
        data = dict(PRESETS[name])
        return transformers.AutoConfig.for_model(data.pop("model_type"), **data), f"preset {name}"
    if not plan.model_path:
        return None
    path = Path(plan.model_path)
    folder = path if path.is_dir() else path.parent
    file = path if path.is_file() and path.suffix == ".json" and path.name != "model.safetensors.index.json" else folder / "config.json"
    if not file.is_file():
        return None
    from cdka_search.spec.hf_config import read_config

    if not isinstance(read_config(file).get("model_type"), str):
        return None
    return transformers.AutoConfig.from_pretrained(str(file), local_files_only=True, trust_remote_code=False), str(path)


def meta_model(plan: Plan, spec: ModelSpec | None, model: Any = None) -> tuple[Any, str]:
    """The plan's model built on the meta device, and a reason when it cannot be (model None).

    ``model``: a live module (rebuilt from its config on meta when it has one, else copied to meta)."""
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        return None, f"{exc.name or 'peft'} is not installed"
    from cdka_search.spec.torch_module import _build_on_meta

    if model is not None:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "model_type", None):
            with torch.device("meta"):
                return type(model)(copy.deepcopy(config)), ""
        return copy.deepcopy(model).to("meta"), ""
    try:
        found = _config_dict(plan, spec)
    except Exception as exc:  # noqa: BLE001 - an unreadable config: the spec was read from it, so this is rare
        return None, f"its config could not be read ({_one_line(exc)})"
    if found is None:
        return None, "no config of the model is known (pass the model: --model FOLDER, or model= to export_plan)"
    config, where = found
    try:
        return _build_on_meta(config), ""
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a config it cannot build
        return None, f"transformers cannot build {where} ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def applied_adapters(model: Any, configs: dict[str, dict[str, Any]]) -> tuple[dict[tuple[str, str], tuple[int, float]], int]:
    """Apply ``configs`` (name -> adapter_config dict) to ``model`` (on meta; it is changed) as the docs
    load them: {(module or parameter name, config name): (its adapter's parameter count, scaling)} and the
    trainable count. Counts, not ranks: PeftMixedModel.add_adapter builds a LoKr layer with the config's r,
    not its rank_pattern, so the count is what shows whether w2 came out whole.

    A parameter target is named ``module.parameter``. PeftRefused when PEFT raises."""
    import torch
    from peft import PeftConfig, get_peft_model

    names = list(configs)
    single = len(names) == 1
    built = {n: PeftConfig.from_peft_type(**copy.deepcopy(cfg)) for n, cfg in configs.items()}
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            if single:
                wrapped = get_peft_model(model, built[names[0]])
            else:
                wrapped = get_peft_model(model, built[names[0]], adapter_name=names[0], mixed=True)
                for n in names[1:]:
                    wrapped.add_adapter(n, built[n])
                wrapped.set_adapter(names)
        except Exception as exc:  # noqa: BLE001 - PEFT raises ValueError, KeyError, TypeError ... on a config it rejects
            raise PeftRefused(_one_line(exc)) from None
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for name, module in wrapped.named_modules():
        ranks, scalings = getattr(module, "r", None), getattr(module, "scaling", None)
        if not isinstance(ranks, dict) or not isinstance(scalings, dict):
            continue
        bare = re.sub(r"(^|\.)base_layer(?=\.|$)", "", name.removeprefix("base_model.model.")).strip(".")
        parameter = getattr(module, "parameter_name", None)
        key = f"{bare}.{parameter}" if parameter else bare
        own = [(n.split("."), q.numel()) for n, q in module.named_parameters() if "base_layer" not in n.split(".")]
        for adapter in ranks:
            config = names[0] if single and adapter == "default" else adapter
            count = sum(c for parts, c in own if adapter in parts)
            out[(key, config)] = (count, float(scalings.get(adapter, float("nan"))))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return out, trainable
