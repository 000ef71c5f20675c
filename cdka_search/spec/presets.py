"""The embedded, offline preset table (facts from shared/model-shapes.md) and family aliases."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from cdka_search.errors import ModelSourceError
from cdka_search.spec.model_spec import ModelSpec, TargetModule


@dataclass(frozen=True)
class Architecture:
    """The few numbers that fix every linear shape and the parameter count of a known family."""

    family: str  # "llama" (LLaMA / Mistral / Qwen2 / TinyLlama), "gpt2", "roberta", "bert"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    max_positions: int = 0  # learned position embeddings (GPT-2, RoBERTa)
    type_vocab: int = 0  # RoBERTa token-type embeddings


PRESETS: dict[str, Architecture] = {
    "llama-2-7b": Architecture("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Architecture("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": Architecture("llama", 8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": Architecture("llama", 4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": Architecture("llama", 8192, 28672, 80, 64, 8, 128256),
    "mistral-7b": Architecture("llama", 4096, 14336, 32, 32, 8, 32000),
    "qwen2-7b": Architecture("llama", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
    "tinyllama-1.1b": Architecture("llama", 2048, 5632, 22, 32, 4, 32000),
    "roberta-base": Architecture("roberta", 768, 3072, 12, 12, 12, 50265, max_positions=514, type_vocab=1),
    "gpt2": Architecture("gpt2", 768, 3072, 12, 12, 12, 50257, tied=True, max_positions=1024),
}

ALIASES: dict[str, str] = {
    "llama": "llama-2-7b",  # the paper's main model
    "llama2": "llama-2-7b",
    "llama3": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
    "mistral": "mistral-7b",
    "qwen2": "qwen2-7b",
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
    near = difflib.get_close_matches(key, [*PRESETS, *ALIASES], n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise ModelSourceError(
        f"unknown model {name!r}: not a preset, alias or existing path.{hint} "
        "Run `cdka models` for the list."
    )


def preset_spec(name: str) -> ModelSpec:
    """The ModelSpec of a preset or alias, built from its architecture numbers."""
    preset = resolve_preset_name(name)
    arch = PRESETS[preset]
    return ModelSpec(preset, "preset", total_params(arch), tuple(target_modules(arch)))


def target_modules(arch: Architecture) -> list[TargetModule]:
    """Every per-block linear weight with its Hugging Face module name."""
    h, i = arch.hidden, arch.intermediate
    out: list[TargetModule] = []
    if arch.family == "llama":
        kv = arch.kv_heads * (h // arch.heads)
        for n in range(arch.layers):
            p = f"model.layers.{n}"
            out += [
                TargetModule(f"{p}.self_attn.q_proj", h, h),
                TargetModule(f"{p}.self_attn.k_proj", kv, h),
                TargetModule(f"{p}.self_attn.v_proj", kv, h),
                TargetModule(f"{p}.self_attn.o_proj", h, h),
                TargetModule(f"{p}.mlp.gate_proj", i, h),
                TargetModule(f"{p}.mlp.up_proj", i, h),
                TargetModule(f"{p}.mlp.down_proj", h, i),
            ]
    elif arch.family == "gpt2":
        for n in range(arch.layers):
            p = f"transformer.h.{n}"
            out += [
                TargetModule(f"{p}.attn.c_attn", 3 * h, h, "conv1d"),
                TargetModule(f"{p}.attn.c_proj", h, h, "conv1d"),
                TargetModule(f"{p}.mlp.c_fc", i, h, "conv1d"),
                TargetModule(f"{p}.mlp.c_proj", h, i, "conv1d"),
            ]
    elif arch.family in ("roberta", "bert"):
        for n in range(arch.layers):
            p = f"{arch.family}.encoder.layer.{n}"
            out += [
                TargetModule(f"{p}.attention.self.query", h, h),
                TargetModule(f"{p}.attention.self.key", h, h),
                TargetModule(f"{p}.attention.self.value", h, h),
                TargetModule(f"{p}.attention.output.dense", h, h),
                TargetModule(f"{p}.intermediate.dense", i, h),
                TargetModule(f"{p}.output.dense", h, i),
            ]
    else:
        raise ModelSourceError(f"unknown architecture family {arch.family!r}")
    return out


def total_params(arch: Architecture) -> int:
    """Every parameter of the base model (embeddings, norms, biases, untied head, pooler)."""
    h, i, v = arch.hidden, arch.intermediate, arch.vocab
    if arch.family == "llama":
        kv = arch.kv_heads * (h // arch.heads)
        attn = 2 * h * h + 2 * kv * h + ((h + 2 * kv) if arch.qkv_bias else 0)
        block = attn + 3 * h * i + 2 * h  # two RMSNorm weights
        head = 0 if arch.tied else v * h
        return v * h + arch.layers * block + h + head
    if arch.family == "gpt2":
        block = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        return v * h + arch.max_positions * h + arch.layers * block + 2 * h
    if arch.family in ("roberta", "bert"):
        embeddings = (v + arch.max_positions + arch.type_vocab) * h + 2 * h
        block = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        pooler = h * h + h
        return embeddings + arch.layers * block + pooler
    raise ModelSourceError(f"unknown architecture family {arch.family!r}")
