"""Applying a plan to a live model, and folding the adapters into the base weights and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from cdka_search.adapter.experts import CdkaExperts, ExpertAdapter, expert_parameters
from cdka_search.adapter.layer import CdkaLinear, base_kind, base_shape, describe_module, resolve_dtype
from cdka_search.documents import named
from cdka_search.errors import PlanError
from cdka_search.gc_pause import paused_gc
from cdka_search.matching import summarise
from cdka_search.plan import scaling_value
from cdka_search.spec.torch_module import expert_layout

if TYPE_CHECKING:
    from cdka_search.plan import AdapterSettings, Plan, PlanGroup

__all__ = [
    "PLAN_ATTRIBUTE",
    "ApplySummary",
    "adapter_modules",
    "adopt_settings",
    "applied_plan",
    "apply_plan",
    "factor_shapes",
    "idle_adapters",
    "merge_adapters",
    "unmerge_adapters",
]

#: Attribute under which apply_plan leaves the plan it applied (with overrides folded in) on the model.
PLAN_ATTRIBUTE = "cdka_plan"


@dataclass(frozen=True)
class ApplySummary:
    """What apply_plan did: the adapted module names and the parameter counts after it.

    ``trainable_params`` equals the plan's ``trained_params``: its adapters and the new head it trains
    whole (``trained_whole``, the plan's ``modules_to_save``); ``total_params`` counts every distinct
    parameter of the model, base and adapters together.
    """

    modules: tuple[str, ...]
    trainable_params: int
    total_params: int
    trained_whole: tuple[str, ...] = ()

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


#: One adapted weight: a wrapped linear layer, or the factors of one 3-D expert parameter.
Adapter = CdkaLinear | ExpertAdapter


def adapter_modules(model: nn.Module) -> dict[str, Adapter]:
    """Every adapter of ``model`` by the name of the weight it adapts, in module order.

    A CdkaLinear is named as the module it replaced (``model.layers.0.mlp.up_proj``), an expert adapter
    as its 3-D parameter (``model.layers.0.mlp.experts.gate_up_proj``), as the plan names them.
    """
    found: dict[str, Adapter] = {}
    for name, module in model.named_modules():
        if isinstance(module, CdkaLinear):
            found[name] = module
        elif isinstance(module, CdkaExperts):
            for parameter, adapter in module.adapters.items():
                found[f"{name}.{parameter}" if name else parameter] = adapter
    return found


def idle_adapters(model: nn.Module) -> list[str]:
    """The adapters (named as :func:`adapter_modules` names them) that got no gradient: call it after a
    backward pass. Their forward never ran, or its output did not reach the loss: the model reads the
    base weight directly (Mamba's ``dt_proj``), or the module is unused on this input (a pooler, a
    cross-attention without encoder states). Training leaves them as they started."""
    return [name for name, a in adapter_modules(model).items() if a.cdka_A.grad is None and a.cdka_B.grad is None]


def idle_warning(names: list[str], shown: int = 3) -> str:
    """One line naming the idle adapters (the first ``shown`` of them)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (f"{len(names)} adapter(s) got no gradient and will not train: {', '.join(names[:shown])}{more} "
            "(the model reads their weight directly or does not use them; see docs/adapter.md)")


def factor_shapes(group: "PlanGroup") -> dict[str, tuple[int, ...]]:
    """The shapes of ``cdka_A`` and ``cdka_B`` for one weight of ``group`` (a leading experts axis for experts)."""
    d = group.design
    lead = (group.experts,) if group.kind == "experts" else ()
    return {"cdka_A": (*lead, d.r, d.m2, d.n2), "cdka_B": (*lead, d.r, d.m1, d.n1)}


def adopt_settings(adapter: Adapter, settings: "AdapterSettings") -> None:
    """Give an unmerged adapter the plan's alpha, scaling, dropout and dtype (its design is unchanged).

    The factors keep their Parameter objects; only their dtype changes when it differs.
    """
    if adapter.merged:
        raise PlanError("unmerge the adapter before changing its settings")
    adapter.alpha = float(settings.alpha)
    adapter.scaling = scaling_value(settings.scaling, settings.alpha, adapter.r, adapter.n1, settings.scale)
    adapter.dropout = (nn.Dropout(float(settings.dropout)) if settings.dropout else nn.Identity()).train(adapter.training)
    dtype = resolve_dtype(settings.dtype)
    for factor in (adapter.cdka_A, adapter.cdka_B):
        if factor.dtype != dtype:
            factor.data = factor.data.to(dtype)
            factor.grad = None  # a gradient of the old dtype could not accumulate with the new one


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _describe(kind: str | None, shape: tuple[int, int] | None, module: nn.Module) -> str:
    if kind is None:
        return describe_module(module)
    return f"{kind} {shape[0]}x{shape[1]}"


def _expert_weights(modules: dict[str, nn.Module]) -> dict[str, tuple[str, str, torch.Tensor]]:
    """Every 3-D expert parameter by full name -> (owning module name, parameter name, parameter)."""
    out = {}
    for owner, module in modules.items():
        for parameter, weight in expert_parameters(module).items():
            out[f"{owner}.{parameter}" if owner else parameter] = (owner, parameter, weight)
    return out


def _resolve(model: nn.Module, plan: "Plan") -> dict[str, "PlanGroup"]:
    """Map weight names (modules, and 3-D expert parameters) to groups and check every kind and shape;
    raises PlanError listing all problems."""
    if adapter_modules(model):
        raise PlanError("the model already carries CDKA adapters; apply a plan to a fresh base model "
                        "(or load_adapter, which reuses adapters that match)")
    modules = dict(model.named_modules())
    experts = _expert_weights(modules)
    assignment = plan.assign([name for name in modules if name] + list(experts))
    problems = []
    for name, group in assignment.items():
        planned = f"{group.kind} {group.shape[0]}x{group.shape[1]} (d_out x d_in)"
        if group.kind == "experts":
            planned = f"experts {group.experts}x{group.shape[0]}x{group.shape[1]} (experts x d_out x d_in)"
        if name in experts:
            owner, _, weight = experts[name]
            e, d_out, d_in = weight.shape
            if expert_layout(modules[owner]) is True:  # stored (experts, d_in, d_out)
                d_out, d_in = d_in, d_out
            if (group.kind, group.experts, tuple(group.shape)) != ("experts", e, (d_out, d_in)):
                problems.append(f"{name}: the plan has {planned} but the model has experts "
                                f"{e}x{d_out}x{d_in}")
            continue
        module = modules[name]
        kind = base_kind(module)
        shape = base_shape(module, kind) if kind else None
        if kind != group.kind or shape != tuple(group.shape):
            problems.append(
                f"{name}: the plan has {planned} but the model has {_describe(kind, shape, module)}"
            )
    problems.extend(head_problems(modules, plan, assignment))
    if problems:
        raise PlanError("plan does not match the model: " + summarise(problems, shown=3))
    return assignment


def head_problems(modules: dict[str, nn.Module], plan: "Plan", assignment: Mapping[str, object]) -> list[str]:
    """Each module the plan trains whole must be in the model, hold the parameters the plan counts, hold
    no adapted weight, and share no parameter with another listed module (one inside another, or tied):
    the plan would count those parameters twice."""
    problems = []
    owners: dict[int, str] = {}  # id of each listed module's parameter -> the first module listing it
    for name, count in plan.modules_to_save:
        module = modules.get(name)
        if module is None:
            problems.append(f"modules_to_save: the model has no module {named(name)}")
            continue
        shared = next((owners[id(p)] for p in module.parameters() if id(p) in owners), None)
        if shared is not None:
            problems.append(f"modules_to_save: {named(name)} shares parameters with {named(shared)}, which the plan also lists")
        owners.update((id(p), name) for p in module.parameters())
        held = sum(p.numel() for p in module.parameters())
        if held != count:
            problems.append(f"modules_to_save: {named(name)} has {held:,} parameters, the plan counts {count:,} "
                            "(a head for another number of labels?)")
        adapted = next((n for n in assignment if n == name or n.startswith(f"{name}.")), None)
        if adapted is not None:
            problems.append(f"modules_to_save: {named(name)} holds {adapted}, which the plan adapts")
    return problems


def train_whole(model: nn.Module, plan: "Plan") -> tuple[str, ...]:
    """Make the modules ``plan`` trains whole (``modules_to_save``) trainable; their names."""
    for name, _ in plan.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    return tuple(name for name, _ in plan.modules_to_save)


def apply_plan(
    model: nn.Module,
    plan: "Plan",
    *,
    alpha: float | None = None,
    scaling: str | None = None,
    scale: float | None = None,
    dropout: float | None = None,
    dtype: str | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> ApplySummary:
    """Replace every planned module with a CdkaLinear, wrap every experts module with planned 3-D
    parameters in a CdkaExperts, leave the new head of a task model (the plan's ``modules_to_save``)
    trainable, and freeze everything else.

    The plan is checked against the model first (each weight exists and has the planned kind, (d_out,
    d_in) and expert count); on any mismatch a PlanError names the module and both shapes and the model is left
    untouched. Keyword arguments override the plan's ``adapter`` settings; the plan actually applied is
    left on the model as ``model.cdka_plan`` for :func:`save_adapter`. ``gradients`` maps module names to
    dL/dW in (d_out, d_in) orientation (expert parameter names to (experts, d_out, d_in)) and is required
    when the plan's init is ``gradient-aligned``.
    """
    overrides = {"alpha": alpha, "scaling": scaling, "scale": scale, "dropout": dropout, "dtype": dtype}
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        try:
            plan = plan.with_adapter(**changes)
        except TypeError as exc:
            raise PlanError(f"adapter override: {exc}") from None
    assignment = _resolve(model, plan)
    if plan.adapter.init == "gradient-aligned":
        missing = [n for n in assignment if gradients is None or n not in gradients]
        if missing:
            raise PlanError(
                f"the plan's init is 'gradient-aligned' but no gradient was given for {missing[0]}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; pass gradients={{name: dL/dW}} "
                "or set adapter.init to kaiming-A-zero-B"
            )
        for name, group in assignment.items():
            gradient = gradients[name]  # type: ignore[index]
            if not (isinstance(gradient, torch.Tensor) and gradient.is_floating_point() and not gradient.is_meta):
                kind = f"a {gradient.dtype} tensor" if isinstance(gradient, torch.Tensor) else f"a {type(gradient).__name__}"
                where = " on the meta device" if isinstance(gradient, torch.Tensor) and gradient.is_meta else ""
                raise PlanError(f"gradient for {name} is {kind}{where}; expected a real floating-point tensor with values")
            if not bool(torch.isfinite(gradient).all()):
                raise PlanError(f"gradient for {name} holds NaN or infinite values; its SVD would not converge")
            got = tuple(gradient.shape)
            if group.kind == "experts" and got != (group.experts, *group.shape):
                raise PlanError(f"gradient for {name} has shape {got}, expected {(group.experts, *group.shape)} "
                                "(experts, d_out, d_in)")
            if group.kind != "experts" and got != tuple(group.shape):
                raise PlanError(f"gradient for {name} has shape {got}, expected {tuple(group.shape)} (d_out, d_in)")
    return _apply(model, plan, assignment, gradients=gradients, initialise=True)


# apply_plan's cost per module grew 2.2x from 224 to 14,336 modules with the collector running, about
# 1.2x without (benchmarks/scale.py).
@paused_gc()
def _apply(
    model: nn.Module,
    plan: "Plan",
    assignment: dict[str, "PlanGroup"],
    *,
    gradients: Mapping[str, torch.Tensor] | None,
    initialise: bool,
) -> ApplySummary:
    """Build every CdkaLinear (restoring requires_grad flags if one fails), then swap and freeze."""
    settings = plan.adapter
    adapter_dtype = resolve_dtype(settings.dtype)
    params = {id(p): p for p in _unique_params(model)}
    flags = {key: p.requires_grad for key, p in params.items()}
    modules = dict(model.named_modules())
    experts = _expert_weights(modules)
    try:
        built: list[str] = []
        replacements: dict[str, nn.Module] = {}
        for name, group in assignment.items():
            d = group.design
            options = dict(m1=d.m1, n1=d.n1, m2=d.m2, n2=d.n2, r=d.r, alpha=settings.alpha, scaling=settings.scaling,
                           scale=settings.scale, dropout=settings.dropout, dtype=adapter_dtype)
            if name in experts:
                owner, parameter, _ = experts[name]
                wrapper = replacements.get(owner)
                if wrapper is None:
                    wrapper = replacements[owner] = CdkaExperts(modules[owner])
                adapter = wrapper.add_adapter(parameter, **options)  # type: ignore[operator]
                if initialise and settings.init == "gradient-aligned":
                    adapter.init_from_gradient(gradients[name])  # type: ignore[index]
            else:
                layer = replacements[name] = CdkaLinear(modules[name], **options)
                if initialise and settings.init == "gradient-aligned":
                    layer.init_from_gradient(gradients[name])  # type: ignore[index]
            built.append(name)
    except BaseException:
        for key, p in params.items():
            p.requires_grad_(flags[key])
        raise

    for p in params.values():
        p.requires_grad_(False)
    for name, replacement in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    heads = train_whole(model, plan)
    setattr(model, PLAN_ATTRIBUTE, plan)
    everything = _unique_params(model)
    trainable = sum(p.numel() for p in everything if p.requires_grad)
    if trainable != plan.trained_params:  # by construction; a failure here is a bug, not a user error
        raise PlanError(f"applied {trainable} trainable parameters but the plan counts {plan.trained_params}")
    return ApplySummary(tuple(built), trainable, sum(p.numel() for p in everything), heads)


def _adapters_or_raise(model: nn.Module) -> dict[str, Adapter]:
    found = adapter_modules(model)
    if not found:
        raise PlanError("the model carries no CDKA adapters; apply_plan or load_adapter first")
    return found


def merge_adapters(model: nn.Module) -> int:
    """Fold lambda * dW into every adapted base weight; the forward then skips the adapter path.

    Returns how many modules were merged (already merged ones are left as they are). In a low-precision
    base dtype, merge followed by unmerge is exact only up to that dtype's rounding.
    """
    count = 0
    for layer in _adapters_or_raise(model).values():
        if not layer.merged:
            layer.merge()
            count += 1
    return count


def unmerge_adapters(model: nn.Module) -> int:
    """Subtract lambda * dW from every merged base weight again; returns how many were unmerged."""
    count = 0
    for layer in _adapters_or_raise(model).values():
        if layer.merged:
            layer.unmerge()
            count += 1
    return count


def applied_plan(model: nn.Module) -> "Plan | None":
    """The plan apply_plan left on ``model`` (overrides included), or None."""
    return getattr(model, PLAN_ATTRIBUTE, None)
