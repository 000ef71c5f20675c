"""A .safetensors file or sharded index -> ModelSpec, from headers only (no weight is read)."""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from cdka_search.documents import JsonLimits, brief, read_file_bytes, read_json, regular_file
from cdka_search.errors import CdkaError, CdkaWarning, ModelSourceError
from cdka_search.limits import MAX_DIM, MAX_TENSOR_DIM, MAX_TOTAL_PARAMS, check_int
from cdka_search.spec.checkpoint_experts import fold_checkpoint_experts
from cdka_search.spec.model_spec import TASK_HEAD_MODULES, ModelSpec, TargetModule, is_embedding, tally_roles

# The safetensors format allows 100 MB headers; real ones are far smaller (about 100 bytes a tensor,
# so 8 MB is 80,000 tensors in one file), and parsing a hostile 100 MB header would need gigabytes.
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_SHARDS = 100_000
MAX_TENSORS = 200_000  # tensors in one header (a whole 671B MoE holds about 91,000)
# Each tensor entry is one object with two lists and five commas.
HEADER_LIMITS = JsonLimits(MAX_HEADER_BYTES, MAX_TENSORS + 2, 2 * MAX_TENSORS + 2, 6 * MAX_TENSORS)
# An index is one weight_map object of "tensor": "shard" entries (DeepSeek-V3's holds about 180,000).
INDEX_LIMITS = JsonLimits(64 * 1024 * 1024, 1_000, 1_000, 1_000_000)
# GPT-2 style transformers Conv1D modules store their weight as (in, out).
_CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
_ENTRY_KEYS = ("data_offsets", "dtype", "shape")


def _check_entry(name: Any, info: Any, data_bytes: int, where: str) -> None:
    """One tensor entry: known dtype, a shape of bounded sizes, offsets inside the data that hold
    exactly the bytes the shape needs."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ModelSourceError(f"{where}: a tensor name is not a text of 1 to 1024 characters")
    label = brief(name)
    if not isinstance(info, dict) or sorted(info) != list(_ENTRY_KEYS):
        raise ModelSourceError(f"{where}: tensor {label} needs exactly the keys {', '.join(_ENTRY_KEYS)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ModelSourceError(f"{where}: tensor {label} has an unknown dtype {brief(dtype)}")
    if not isinstance(shape, list) or len(shape) > 8:
        raise ModelSourceError(f"{where}: tensor {label} shape must be a list of at most 8 sizes")
    for size in shape:
        check_int(size, f"{where}: tensor {label} shape", ModelSourceError, 0, MAX_TENSOR_DIM)
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise ModelSourceError(f"{where}: tensor {label} data_offsets must be [begin, end]")
    begin, end = (check_int(o, f"{where}: tensor {label} data_offsets", ModelSourceError, 0, data_bytes) for o in offsets)
    need = -(-math.prod(shape) * DTYPE_BITS[dtype] // 8)
    if end - begin != need:
        raise ModelSourceError(
            f"{where}: tensor {label} ({dtype} {'x'.join(map(str, shape)) or 'scalar'}) needs {need:,} bytes "
            f"but its data_offsets span {end - begin:,}"
        )


def read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}, every
    entry checked against the format and the file's size. Messages never quote the file's bytes."""
    regular_file(file, ModelSourceError)
    try:
        file_size = file.stat().st_size
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelSourceError(f"{file}: too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size < 2 or size > min(MAX_HEADER_BYTES, file_size - 8):
                raise ModelSourceError(
                    f"{file}: not a safetensors file (its header length is impossible for a {file_size:,}-byte file; "
                    f"cdka reads headers up to {MAX_HEADER_BYTES:,} bytes)"
                )
            body = fh.read(size)
    except OSError as exc:
        raise ModelSourceError(f"{file}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if len(body) != size:
        raise ModelSourceError(f"{file}: truncated header")
    if body.startswith(b"\xef\xbb\xbf"):  # read_json drops one, as editors write it; safetensors refuses it
        raise ModelSourceError(f"{file}: corrupt safetensors header (it starts with a byte-order mark)")
    header = read_json(body, f"{file}: corrupt safetensors header", ModelSourceError, HEADER_LIMITS)
    if not isinstance(header, dict):
        raise ModelSourceError(f"{file}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelSourceError(f"{file}: safetensors __metadata__ must map texts to texts")
    data_bytes = file_size - 8 - size
    for name, info in header.items():
        _check_entry(name, info, data_bytes, str(file))
    return header


def shard_files(index: Path, error: type[CdkaError] = ModelSourceError) -> dict[str, Path]:
    """Tensor name -> shard file of a model.safetensors.index.json. Shards must be files inside the
    index's folder: an absolute name or one with '..' is refused, so an index cannot make cdka open
    (or quote) a file elsewhere. Links inside the folder are followed, as the Hugging Face cache uses them."""
    data = read_json(read_file_bytes(index, error, INDEX_LIMITS.max_bytes), str(index), error, INDEX_LIMITS)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index}: not a safetensors index (needs a non-empty 'weight_map' object)")
    files: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or len(shard) > 1024:
            raise error(f"{index}: weight_map entry {brief(tensor)} must name a shard file")
        relative = PurePosixPath(shard.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts or PureWindowsPath(shard).drive:
            raise error(f"{index}: shard {brief(shard)} is outside the index's folder")
        files[tensor] = index.parent / relative
    if len(set(files.values())) > MAX_SHARDS:
        raise error(f"{index}: more than {MAX_SHARDS:,} shards")
    return files


def index_headers(index: Path) -> dict[str, Any]:
    """The merged headers of every shard named by a model.safetensors.index.json, which must agree with
    the index: each tensor it lists is in the shard it names, and no tensor is in two shards (loading
    would fail, or keep one of them)."""
    files = shard_files(index)
    merged: dict[str, Any] = {}
    held: dict[str, Path] = {}
    for shard in sorted(set(files.values())):
        if not shard.exists():  # a FIFO or folder exists: read_header says it is not a regular file
            raise ModelSourceError(f"{index}: shard {shard.name} is missing")
        header = read_header(shard)
        for tensor in header:
            if held.setdefault(tensor, shard) != shard:
                raise ModelSourceError(f"{index}: tensor {brief(tensor)} is in two shards, {held[tensor].name} and {shard.name}")
        merged.update(header)
    misplaced = [tensor for tensor, shard in files.items() if held.get(tensor) != shard]
    if misplaced:
        first = misplaced[0]
        raise ModelSourceError(
            f"{index}: {len(misplaced):,} tensor(s) are not in the shard the index names, e.g. {brief(first)} in "
            f"{files[first].name}" + (f" (it is in {held[first].name})" if first in held else "")
        )
    return merged


#: Tensor name endings of quantized checkpoints whose weights are stored packed (two 4-bit values a
#: byte, eight a 32-bit word), so that a header's shapes are not the layers' shapes.
_PACKED = {
    ".weight.absmax": "bitsandbytes 4-bit", ".weight.quant_map": "bitsandbytes 4-bit",
    ".qweight": "GPTQ or AWQ", ".qzeros": "GPTQ or AWQ",
}


def _check_not_packed(header: dict[str, Any], source: str) -> None:
    for tensor in header:
        kind = next((kind for end, kind in _PACKED.items() if tensor.endswith(end)), None)
        if kind is not None:
            raise ModelSourceError(
                f"{source}: a {kind} checkpoint ({brief(tensor)}): its weights are stored packed, so the header does "
                "not give the layers' shapes; plan the model's folder (its config.json) or a float checkpoint"
            )


def spec_from_header(header: dict[str, Any], name: str, source: str) -> ModelSpec:
    """Targets are the 2-D ``*.weight`` tensors except embeddings and the LM head; a header of packed
    quantized weights is refused (``_PACKED``)."""
    _check_not_packed(header, source)
    total = 0
    targets: list[TargetModule] = []
    for tensor, info in header.items():
        shape = info["shape"]
        total += math.prod(shape)
        if len(shape) != 2 or not tensor.endswith(".weight"):
            continue
        module = tensor[: -len(".weight")]
        if is_embedding(module):
            continue
        if not 0 < min(shape) <= max(shape) <= MAX_DIM:
            raise ModelSourceError(f"{source}: weight {brief(tensor)} of shape {shape[0]}x{shape[1]} has a side outside [1, {MAX_DIM:,}]")
        if module.rsplit(".", 1)[-1] in _CONV1D_LEAVES:
            targets.append(TargetModule(module, shape[1], shape[0], "conv1d"))
        else:
            targets.append(TargetModule(module, shape[0], shape[1]))
    if total > MAX_TOTAL_PARAMS:
        raise ModelSourceError(f"{source}: {total:,} parameters is more than a model can have ({MAX_TOTAL_PARAMS:,})")
    if not targets:
        raise ModelSourceError(f"{source}: no 2-D weight tensors that could be adapted")
    unfolded = {t.name for t in targets}
    targets = fold_checkpoint_experts(targets)
    folded_away = unfolded - {t.name for t in targets}
    routers = {n for n in folded_away if n.endswith(".gate")}  # counted, no target: as in the built model
    others = tally_roles(
        (tensor, math.prod(info["shape"])) for tensor, info in header.items()
        if len(info["shape"]) >= 2 and not is_embedding(tensor)
        and (tensor.removesuffix(".weight") not in unfolded or tensor.removesuffix(".weight") in routers)
    )
    # Headers list tensors alphabetically; order layers numerically (2 before 10).
    targets.sort(key=lambda t: [int(p) if p.isdigit() else p for p in t.name.split(".")])
    heads = [t.name for t in targets if t.name.split(".")[0] in TASK_HEAD_MODULES]
    if heads and len(heads) < len(targets):
        warnings.warn(
            f"{name}: {', '.join(heads[:3])} {'looks' if len(heads) == 1 else 'look'} like the new head of a task "
            "model, which is trained whole, not adapted, but a header alone does not say so, so it is planned as a "
            "target; plan the checkpoint's folder (with its config.json) to train the head whole", CdkaWarning, stacklevel=2,
        )
    return ModelSpec(name, source, total, tuple(targets), others)


def safetensors_spec(path: Path) -> ModelSpec:
    """Spec of a .safetensors file, an index.json, or a folder holding either."""
    if path.is_dir():
        for candidate in ("model.safetensors.index.json", "model.safetensors"):
            if (path / candidate).exists():
                return safetensors_spec(path / candidate)
        raise ModelSourceError(f"{path}: no model.safetensors or model.safetensors.index.json")
    name = path.parent.name if path.name.startswith("model.") else path.stem
    if path.name.endswith(".index.json"):
        return spec_from_header(index_headers(path), name or path.stem, "safetensors-index")
    return spec_from_header(read_header(path), name or path.stem, "safetensors")
