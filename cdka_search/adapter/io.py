"""Saving and loading adapters as .safetensors: the factor tensors, with the plan in the header.

File layout: one tensor per factor, named ``<module>.cdka_A`` (r, m2, n2) and ``<module>.cdka_B``
(r, m1, n1), and every parameter of the modules the plan trains whole (a task model's new head,
``modules_to_save``) under its own name (``classifier.weight``); the header's ``__metadata__`` holds
``format = "cdka-adapter"``, ``cdka_adapter = "1"`` and ``cdka_plan``, the applied plan as JSON text
(``Plan.to_dict()``). No base weight and no pickle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cdka_search.adapter.model import (
    PLAN_ATTRIBUTE,
    ApplySummary,
    _apply,
    _resolve,
    _unique_params,
    adapter_modules,
    adopt_settings,
    applied_plan,
    factor_shapes,
    head_problems,
    train_whole,
)
from cdka_search.documents import read_json, regular_file
from cdka_search.errors import PlanError
from cdka_search.fileio import absent, atomic_write_bytes, check_path
from cdka_search.matching import summarise

if TYPE_CHECKING:
    from cdka_search.plan import Plan

__all__ = ["FORMAT", "FORMAT_VERSION", "save_adapter", "load_adapter", "read_adapter"]

FORMAT = "cdka-adapter"
FORMAT_VERSION = "1"
_FACTORS = ("cdka_A", "cdka_B")
# The dtypes adapter parameters are trained in; float8 and integer tensors are refused by name (torch has
# no isfinite for float8, so the NaN check below would fail on one with a traceback).
_DTYPES = ("F16", "BF16", "F32", "F64")


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter tensors of ``model`` and its applied plan to ``path`` atomically.

    Merged or not, the file holds the factors A and B (never dW or a base weight).
    """
    from safetensors.torch import save

    plan = applied_plan(model)
    layers = adapter_modules(model)
    if plan is None or not layers:
        raise PlanError("the model carries no applied plan; apply_plan (or load_adapter) before save_adapter")
    values = {**_factors(layers), **_head_params(model, plan)}
    _refuse_meta(values)
    tensors = {key: p.detach().to("cpu").contiguous() for key, p in values.items()}
    broken = _first_nonfinite(tensors)
    if broken is not None:  # load_adapter would refuse the file
        raise PlanError(f"{broken} holds NaN or infinite values (the training diverged); nothing was written to {path}")
    from cdka_search.plan import dumps_plan

    metadata = {"format": FORMAT, "cdka_adapter": FORMAT_VERSION, "cdka_plan": dumps_plan(plan, "json")}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_adapter(path: str | Path) -> tuple["Plan", dict[str, torch.Tensor]]:
    """The plan and the tensors stored in an adapter file; PlanError when it is not one."""
    from safetensors import SafetensorError, safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise PlanError(f"an adapter file is a path (str or os.PathLike), got {type(path).__name__}")
    given = check_path(path, PlanError, "adapter file")
    file = regular_file(given, PlanError, f"{given}: {absent(given, 'adapter file')}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            plan = _stored_plan(file, handle.metadata() or {})
            # Shapes first, values after: a large or foreign file is refused before anything is loaded.
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: tuple(part.get_shape()) for key, part in slices.items()}
            odd = next((key for key, part in slices.items() if part.get_dtype() not in _DTYPES), None)
            if odd is not None:
                raise PlanError(f"{file}: {odd} is {slices[odd].get_dtype()}, expected a floating-point tensor "
                                f"({', '.join(_DTYPES)})")
            stored = sum(math.prod(shape) for shape in shapes.values())
            if stored > plan.trained_params:
                raise PlanError(f"{file}: holds {stored:,} values, more than the {plan.trained_params:,} its plan trains")
            tensors = {key: handle.get_tensor(key) for key in shapes}
    except PlanError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise PlanError(f"{file}: not a readable .safetensors file ({exc})") from None
    broken = _first_nonfinite(tensors)
    if broken is not None:
        raise PlanError(f"{file}: {broken} holds NaN or infinite values; the adapter it came from diverged")
    _check_own_plan(file, plan, tensors)
    return plan, tensors


def _check_own_plan(file: Path, plan: "Plan", tensors: dict[str, torch.Tensor]) -> None:
    """The factors' shapes as the stored plan's designs give them: a file whose plan was edited (r = 2 over
    rank-1 factors) was accepted by a model already carrying those adapters, and its counts were then wrong."""
    modules = list(dict.fromkeys(key.rpartition(".")[0] for key in tensors if key.rpartition(".")[2] in _FACTORS))
    try:
        groups = plan.assign(modules)
    except PlanError as exc:
        raise PlanError(f"{file}: its stored plan does not describe its factors ({exc})") from None
    for name, group in groups.items():
        for factor, shape in factor_shapes(group).items():
            stored = tensors.get(f"{name}.{factor}")  # a missing one is named where the model's list is compared
            if stored is not None and tuple(stored.shape) != shape:
                raise PlanError(f"{file}: {name}.{factor} has shape {tuple(stored.shape)}, but its stored plan's "
                                f"design gives {shape}")


def _factors(layers: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Every factor of ``layers`` under its file name (``<module>.cdka_A``)."""
    return {f"{name}.{factor}": getattr(layer, factor) for name, layer in layers.items() for factor in _FACTORS}


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    return next((key for key, t in tensors.items() if not bool(torch.isfinite(t).all())), None)


def _refuse_meta(values: dict[str, torch.Tensor]) -> None:
    """PlanError naming the first of ``values`` (adapter factors, trained-whole parameters, target weights)
    on the meta device, which holds no values to save or to load into. Only these: accelerate's offload
    keeps other base weights on meta."""
    name = next((name for name, value in values.items() if value.is_meta), None)
    if name is not None:
        raise PlanError(f"{name} is on the meta device and holds no values; build or load the model on a real device first")


def _target_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weight each planned name adapts: a module's ``weight``, or a 3-D expert parameter itself."""
    out = {}
    for name in names:
        try:
            out[name] = model.get_parameter(name)
        except AttributeError:
            weight = getattr(model.get_submodule(name), "weight", None)
            if isinstance(weight, torch.Tensor):
                out[name] = weight
    return out


def _stored_plan(file: Path, metadata: dict[str, str]) -> "Plan":
    from cdka_search.plan import Plan

    if metadata.get("format") != FORMAT or "cdka_plan" not in metadata:
        raise PlanError(f"{file}: not a cdka adapter (no cdka_plan in its metadata); save one with save_adapter")
    if metadata.get("cdka_adapter") != FORMAT_VERSION:
        raise PlanError(
            f"{file}: adapter format {metadata.get('cdka_adapter')!r} is not supported "
            f"(this cdka reads {FORMAT_VERSION})"
        )
    stored = read_json(metadata["cdka_plan"], f"{file}: stored plan", PlanError)
    try:
        return Plan.from_dict(stored)
    except PlanError as exc:
        raise PlanError(f"{file}: stored plan: {exc}") from None


def load_adapter(model: nn.Module, path: str | Path) -> ApplySummary:
    """Load an adapter file onto ``model`` and return what is adapted.

    A base model without adapters gets the stored plan applied first (PlanError, model untouched, when
    the plan does not match it). A model that already carries adapters must carry exactly the stored
    ones (same weights and factor shapes, hence the same designs) and none merged; they then take the
    stored plan's adapter settings (alpha, scaling, scale, dropout, dtype) and the stored plan becomes
    the model's applied plan, so the model computes what the saved one did. Every tensor name and shape
    is checked before anything changes; values are copied into the adapter parameters.
    """
    plan, tensors = read_adapter(path)
    layers = adapter_modules(model)
    if layers:
        factors = _factors(layers)
        expected = {key: tuple(p.shape) for key, p in factors.items()}
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:
            raise PlanError(f"{merged[0]} is merged; unmerge_adapters(model) before load_adapter")
        problems = head_problems(dict(model.named_modules()), plan, layers)
        if problems:  # at most three, as apply_plan's check shows: a stored plan may list 64 modules
            raise PlanError(f"{path}: the stored plan does not fit the model: {summarise(problems, shown=3)}")
        heads = _head_params(model, plan)
        _refuse_meta({**factors, **heads})
        expected.update({key: tuple(p.shape) for key, p in heads.items()})
        _check_tensors(Path(path), tensors, expected)
        try:
            plan.assign(layers)
        except PlanError as exc:
            raise PlanError(f"{path}: the stored plan does not fit the model's adapters ({exc})") from None
        for layer in layers.values():
            adopt_settings(layer, plan.adapter)
        trained_whole = train_whole(model, plan)
        setattr(model, PLAN_ATTRIBUTE, plan)
        summary = ApplySummary(tuple(layers), *_counts(model), trained_whole)
    else:
        assignment = _resolve(model, plan)
        heads = _head_params(model, plan)
        _refuse_meta({**_target_weights(model, assignment), **heads})
        expected = {f"{name}.{f}": shape for name, group in assignment.items() for f, shape in factor_shapes(group).items()}
        expected.update({key: tuple(p.shape) for key, p in heads.items()})
        _check_tensors(Path(path), tensors, expected)
        summary = _apply(model, plan, assignment, gradients=None, initialise=False)
        layers = adapter_modules(model)
    with torch.no_grad():
        for key, value in tensors.items():
            if key in heads:
                heads[key].copy_(value)
                continue
            name, _, factor = key.rpartition(".")
            getattr(layers[name], factor).copy_(value)
    return summary


def _head_params(model: nn.Module, plan: "Plan") -> dict[str, nn.Parameter]:
    """Every parameter of the modules ``plan`` trains whole, by full name."""
    out = {}
    for name, _ in plan.modules_to_save:
        for key, p in model.get_submodule(name).named_parameters():
            out[f"{name}.{key}"] = p
    return out


def _check_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"no module for {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
        raise PlanError(f"{file}: adapter tensors do not match the model: {'; '.join(parts)}")
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            raise PlanError(f"{file}: {key} has shape {got}, the model's adapter has {shape}")


def _counts(model: nn.Module) -> tuple[int, int]:
    params = _unique_params(model)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
