"""A .safetensors file or sharded index -> ModelSpec, from headers only (no weight is read)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from cdka_search.errors import ModelSourceError
from cdka_search.spec.model_spec import ModelSpec, TargetModule

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_NOT_TARGETS = ("wte", "wpe", "lm_head", "shared")
# GPT-2 style transformers Conv1D modules store their weight as (in, out).
_CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")


def read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    try:
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelSourceError(f"{file}: too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size == 0 or size > MAX_HEADER_BYTES:
                raise ModelSourceError(f"{file}: header size {size} is not plausible (limit {MAX_HEADER_BYTES})")
            body = fh.read(size)
    except OSError as exc:
        raise ModelSourceError(f"{file}: cannot read ({exc.strerror})") from None
    if len(body) != size:
        raise ModelSourceError(f"{file}: truncated header ({len(body)} of {size} bytes)")
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelSourceError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{file}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)):
            raise ModelSourceError(f"{file}: corrupt safetensors header entry {name!r}")
    return header


def index_headers(index: Path) -> dict[str, Any]:
    """The merged headers of every shard named by a model.safetensors.index.json."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelSourceError(f"{index}: not a safetensors index (needs a 'weight_map' object)") from None
    merged: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        merged.update(read_header(index.parent / str(shard)))
    return merged


def is_target(module: str) -> bool:
    """Every 2-D weight is a target except embeddings and the LM head."""
    return not any(seg in _NOT_TARGETS or "embed" in seg for seg in module.split("."))


def spec_from_header(header: dict[str, Any], name: str, source: str) -> ModelSpec:
    """Targets are the 2-D ``*.weight`` tensors except embeddings and the LM head."""
    total = 0
    targets: list[TargetModule] = []
    for tensor, info in header.items():
        shape = [int(d) for d in info["shape"]]
        total += math.prod(shape)
        if len(shape) != 2 or not tensor.endswith(".weight"):
            continue
        module = tensor[: -len(".weight")]
        if not is_target(module):
            continue
        if module.rsplit(".", 1)[-1] in _CONV1D_LEAVES:
            targets.append(TargetModule(module, shape[1], shape[0], "conv1d"))
        else:
            targets.append(TargetModule(module, shape[0], shape[1]))
    if not targets:
        raise ModelSourceError(f"{source}: no 2-D weight tensors that could be adapted")
    # Headers list tensors alphabetically; order layers numerically (2 before 10).
    targets.sort(key=lambda t: [int(p) if p.isdigit() else p for p in t.name.split(".")])
    return ModelSpec(name, source, total, tuple(targets))


def safetensors_spec(path: Path) -> ModelSpec:
    """Spec of a .safetensors file, an index.json, or a folder holding either."""
    if path.is_dir():
        for candidate in ("model.safetensors.index.json", "model.safetensors"):
            if (path / candidate).is_file():
                return safetensors_spec(path / candidate)
        raise ModelSourceError(f"{path}: no model.safetensors or model.safetensors.index.json")
    name = path.parent.name if path.name.startswith("model.") else path.stem
    if path.name.endswith(".index.json"):
        return spec_from_header(index_headers(path), name or path.stem, "safetensors-index")
    return spec_from_header(read_header(path), name or path.stem, "safetensors")
