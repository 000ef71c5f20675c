"""Reference updates (checkpoint deltas, gradients) stored as safetensors files.

A reference maps full module names (``model.layers.0.self_attn.q_proj``) to 2-D float tensors in
nn.Linear (d_out, d_in) orientation, and the full names of 3-D MoE expert parameters
(``model.layers.0.mlp.experts.gate_up_proj``) to their (experts, d_out, d_in) update; its
``__metadata__`` holds ``cdka_reference = "1"`` and a ``kind`` of "delta", "gradient" or "tensors".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cdka_search.documents import brief, regular_file
from cdka_search.errors import ReferenceFileError, TargetError, one_line
from cdka_search.fileio import atomic_write_bytes
from cdka_search.spec.checkpoint_experts import per_expert_keys

FORMAT_VERSION = "1"
KINDS = ("delta", "gradient", "tensors")

Progress = Callable[[int, int | None], None]


def save_reference(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], kind: str) -> Path:
    """Write tensors to path atomically (cdka_search.fileio: a temporary file, then a rename)."""
    if kind not in KINDS:
        raise ReferenceFileError(f"reference kind {kind!r} is not one of {', '.join(KINDS)}")
    for name, tensor in tensors.items():
        _check_matrix(name, tensor, f"tensors to save to {path}")
    data = save(
        {name: t.detach().cpu().contiguous() for name, t in tensors.items()},
        metadata={"cdka_reference": FORMAT_VERSION, "kind": kind},
    )
    return atomic_write_bytes(path, data)


def load_reference(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a reference file written by save_reference; ReferenceFileError if it is not one."""
    source = regular_file(
        path, ReferenceFileError,
        f"reference file {path} does not exist; write one with save_reference, delta_reference or gradient_reference",
    )
    try:
        with safe_open(source, framework="pt") as reader:
            _check_metadata(source, reader.metadata() or {})
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except (SafetensorError, OSError) as exc:
        raise ReferenceFileError(f"{source} is not a readable safetensors file ({one_line(exc)})") from None
    return {name: _check_matrix(name, tensor, str(source)) for name, tensor in tensors.items()}


def delta_reference(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    module_names: Sequence[str],
    *,
    conv1d_names: Iterable[str] = (),
    expert_names: Iterable[str] = (),
    transposed_names: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """finetuned - base of ``<module>.weight`` for each module, float32, (d_out, d_in).

    Weights must be floating point in both files (an integer or bool tensor is a ReferenceFileError naming
    it); floats of different precision are compared in float32, as a bf16 base and its fp32 fine-tune are.
    Checkpoints identical on every module are a ReferenceFileError: their delta is zero, nothing to plan on.

    base and finetuned are .safetensors files or folders holding model.safetensors or a sharded
    model.safetensors.index.json. Tensors are read one at a time, so neither model is ever whole
    in memory. Modules in conv1d_names are GPT-2 Conv1D, stored (d_in, d_out), and get transposed.
    Names in expert_names are 3-D expert parameters: their delta is (experts, d_out, d_in), read from
    the fused tensor or assembled from the per-expert tensors checkpoints store (see _expert_keys);
    those also in transposed_names are stored (experts, d_in, d_out), as gpt-oss stores them.
    """
    conv1d, experts, transposed = set(conv1d_names), set(expert_names), set(transposed_names)
    base_files, tuned_files = _weight_files(Path(base)), _weight_files(Path(finetuned))
    deltas: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers: dict[Path, Any] = {}

        def tensor(files: Mapping[str, Path], key: str) -> torch.Tensor:
            file = files[key]
            if file not in readers:
                readers[file] = stack.enter_context(_open_checkpoint(file))
            value = readers[file].get_tensor(key)
            if not value.is_floating_point():  # an integer weight subtracted as floats is no update (I32 bytes of F32)
                raise ReferenceFileError(
                    f"tensor {brief(key)} in {file} is {str(value.dtype).removeprefix('torch.')}, not a floating-point "
                    "weight; a delta needs float weights in both checkpoints"
                )
            if value.element_size() == 1:  # float8 checkpoints keep scales beside their weights (weight_scale_inv)
                raise ReferenceFileError(
                    f"tensor {brief(key)} in {file} is {str(value.dtype).removeprefix('torch.')}: a float8 weight means "
                    "something only with its checkpoint's scales; dequantize both checkpoints (to bfloat16) first"
                )
            return value

        def read(files: Mapping[str, Path], source: Path, module: str) -> torch.Tensor:
            if module in experts:
                layout = _expert_keys(module, files, source)
                if isinstance(layout, str):
                    return tensor(files, layout)
                return torch.stack([torch.cat([tensor(files, key) for key in keys]) for keys in layout])
            key = f"{module}.weight"
            if key not in files:
                raise ReferenceFileError(f"module {module}: tensor {key!r} is missing from {source}")
            return tensor(files, key)

        for module in module_names:
            before = read(base_files, Path(base), module)
            after = read(tuned_files, Path(finetuned), module)
            if before.shape != after.shape:
                raise ReferenceFileError(
                    f"module {module}: base weight has shape {tuple(before.shape)} but finetuned "
                    f"has {tuple(after.shape)}; are both checkpoints of the same architecture?"
                )
            if before.dim() != (3 if module in experts else 2):
                expected = "a 3-D (experts, d_out, d_in) stack" if module in experts else "a 2-D matrix"
                raise ReferenceFileError(f"module {module}: weight has shape {tuple(before.shape)}, expected {expected}")
            delta = after.float() - before.float()
            if module in conv1d or module in transposed:
                delta = delta.transpose(-2, -1).contiguous()
            deltas[module] = delta
    if deltas and not any(bool(delta.any()) for delta in deltas.values()):
        raise ReferenceFileError(
            f"the two checkpoints are identical on every target ({len(deltas)} modules of {base} and {finetuned}): "
            "nothing to measure"
        )
    return deltas


def gradient_reference(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    module_names: Sequence[str],
    *,
    conv1d_names: Iterable[str] = (),
    transposed_names: Iterable[str] = (),
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Sum over batches of d(loss)/d(weight) for each module, (d_out, d_in), float32, on the CPU
    (an expert parameter's name: (experts, d_out, d_in)).

    model is a causal LM whose forward returns ``.loss`` for batches holding input_ids,
    attention_mask and labels. Only the target weights require grad during the call (the rest is
    frozen) and dropout is off; requires_grad flags and train/eval mode are restored. Each weight's
    gradient is added to a CPU float32 sum the moment backward produces it and then released, so
    the model's device holds the model plus about one layer's gradients, not all of them.
    progress(i, n) is called after batch i (1-based); n is None when batches has no len().
    """
    stored_transposed = set(conv1d_names) | set(transposed_names)  # Conv1D (d_in, d_out), gpt-oss experts (E, d_in, d_out)
    weights = {name: _target_weight(model, name) for name in module_names}
    flags = {param: param.requires_grad for param in model.parameters()}
    was_training = model.training
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    total = len(batches) if hasattr(batches, "__len__") else None
    sums = {name: torch.zeros(weight.shape, dtype=torch.float32) for name, weight in weights.items()}

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            sums[name] += param.grad.detach().to("cpu", torch.float32)
            param.grad = None

        return hook

    handles = []
    try:
        for param in flags:
            param.requires_grad_(False)
        for name, weight in weights.items():
            weight.requires_grad_(True)
            weight.grad = None
            handles.append(weight.register_post_accumulate_grad_hook(accumulate(name)))
        model.eval()
        with torch.enable_grad():
            for index, batch in enumerate(batches, start=1):
                output = model(**{key: value.to(device) for key, value in batch.items()})
                loss = getattr(output, "loss", None)
                if loss is None:
                    raise ReferenceFileError(
                        f"batch {index} gave no loss; each batch needs input_ids, attention_mask "
                        f"and labels (got keys {sorted(batch)})"
                    )
                loss.backward()
                if progress is not None:
                    progress(index, total)
        return {name: g.transpose(-2, -1).contiguous() if name in stored_transposed else g for name, g in sums.items()}
    finally:
        for handle in handles:
            handle.remove()
        for weight in weights.values():
            weight.grad = None
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)


def _target_weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """A module's 2-D weight, or the 3-D expert parameter of that full name."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        owner, _, leaf = name.rpartition(".")
        try:
            stack = getattr(model.get_submodule(owner), leaf, None) if owner else None
        except AttributeError:
            stack = None
        if isinstance(stack, torch.nn.Parameter) and stack.dim() == 3:
            return stack
        raise TargetError(f"model has no module named {name!r} (nor a 3-D expert parameter)") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
        raise TargetError(f"module {name!r} has no 2-D weight parameter to take a gradient of")
    return weight


def _expert_keys(name: str, files: Mapping[str, Path], source: Path) -> str | list[list[str]]:
    """The checkpoint key of the fused expert parameter ``name``, or for each expert the keys whose
    concatenation is its slice: checkpoints, and transformers 5's own save_pretrained, store experts one
    2-D weight each (Mixtral's ``block_sparse_moe.experts.0.w1.weight``, Qwen3-MoE's and DeepSeek-V3's
    ``mlp.experts.0.gate_proj.weight``; cdka_search.spec.checkpoint_experts)."""
    if name in files:
        return name
    experts = per_expert_keys(name, files)
    if experts is None:
        raise ReferenceFileError(
            f"expert parameter {name}: {source} holds neither {name!r} nor a complete set of per-expert weights "
            "in the Mixtral or Qwen2-MoE naming"
        )
    return experts


def _weight_files(source: Path) -> dict[str, Path]:
    """Map each tensor name of a checkpoint (file or folder, sharded or not) to its file."""
    if source.exists() and not source.is_dir():  # a file, or a FIFO that _open_checkpoint names
        return {name: source for name in _tensor_names(source)}
    single, index = source / "model.safetensors", source / "model.safetensors.index.json"
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if index.is_file():
        from cdka_search.spec.safetensors_header import shard_files

        return shard_files(index, ReferenceFileError)
    raise ReferenceFileError(
        f"{source} is neither a .safetensors file nor a folder holding model.safetensors or "
        "model.safetensors.index.json"
    )


def _tensor_names(file: Path) -> list[str]:
    with _open_checkpoint(file) as reader:
        return list(reader.keys())


def _open_checkpoint(file: Path) -> Any:
    regular_file(file, ReferenceFileError, f"checkpoint file {file} does not exist")
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ReferenceFileError(f"{file} is not a readable safetensors file: {exc}") from exc


def _check_metadata(source: Path, metadata: Mapping[str, str]) -> None:
    if metadata.get("cdka_reference") != FORMAT_VERSION or metadata.get("kind") not in KINDS:
        raise ReferenceFileError(
            f"{source} is a safetensors file but not a cdka reference (metadata {brief(dict(metadata))}); "
            f"expected cdka_reference={FORMAT_VERSION!r} and kind in {KINDS}"
        )


def _check_matrix(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor`` if it is a finite 2-D or 3-D float tensor, float8 widened to bfloat16 (exactly: every
    float8 value is a bfloat16 one, and torch computes little in float8); else ReferenceFileError."""
    if tensor.dim() not in (2, 3) or not tensor.is_floating_point():
        raise ReferenceFileError(
            f"{where}: {brief(name)} must be a 2-D float tensor, or 3-D (experts, d_out, d_in) for an expert "
            f"parameter, got {tuple(tensor.shape)} {tensor.dtype}"
        )
    if tensor.element_size() == 1:
        try:
            tensor = tensor.to(torch.bfloat16)
        except (RuntimeError, NotImplementedError):  # float4, two values packed in a byte
            raise ReferenceFileError(
                f"{where}: {brief(name)} is {tensor.dtype}, which torch cannot widen; write the reference "
                "in bfloat16, float16 or float32"
            ) from None
    if not bool(torch.isfinite(tensor).all()):
        raise ReferenceFileError(f"{where}: {brief(name)} has NaN or infinite entries; a reference update must be finite")
    return tensor
