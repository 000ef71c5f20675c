"""CDKA adapters for 3-D MoE expert parameters, batched over experts and never materialised in training.

transformers 5 stores the experts of Mixtral, Qwen3-MoE, DeepSeek-V3 and others as parameters of shape
(experts, d_out, d_in) on one experts module (``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj``
(E, H, I)); its forward reads them in one of three ways, chosen by ``config._experts_implementation``:

- ``eager``: ``F.linear(x_e, W[e])`` per expert that got tokens;
- ``batched_mm``: ``torch.bmm(W[ids], x.unsqueeze(-1))`` with one row per (token, expert) pair;
- ``grouped_mm`` (the default where torch has it): ``torch._grouped_mm(x_sorted, W.transpose(-2, -1),
  offs=offsets)`` with the rows sorted by expert.

A stack marked ``is_transposed`` (gpt-oss) is stored (experts, d_in, d_out) and read as ``x_e @ W[e]``,
``torch.bmm(x.unsqueeze(1), W[ids])`` and ``grouped_mm(x_sorted, W, offs)``; the adapter keeps the
(d_out, d_in) orientation and only merging transposes. Llama 4 stores its stacks the same way without
the mark (``expert_layout`` watches its forward) and reads them all at once, ``torch.bmm(x, W)`` on an
(experts, rows, d_in) batch; ``torch.bmm(x, W.transpose(-2, -1))`` is the same read of an
(experts, d_out, d_in) stack.

:class:`CdkaExperts` wraps the experts module and runs its forward unchanged under a torch function mode
(:class:`_ExpertCalls`) that recognises those reads of an adapted parameter and adds
``lambda * sum_i (B_{e,i} (x) A_{e,i}) x`` to the rows of each expert with the same two-product
contraction as :class:`~cdka_search.adapter.layer.CdkaLinear`, on that expert's slice of the batched
factors ``cdka_A`` (E, r, m2, n2) and ``cdka_B`` (E, r, m1, n1). No dW is formed, not even for the
experts that got tokens, and experts without tokens cost nothing. Any other use of an adapted
parameter inside the forward is a PlanError naming it, never a silently dropped update.

PEFT's ``target_parameters`` takes the other route: it parametrizes the whole parameter as W + dW for
the forward, which forms an (E, d_out, d_in) tensor at every step; that is simple and works with any
experts code, but costs a full copy of the expert stack in memory and time per step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from cdka_search.adapter.layer import (
    GRADIENT_INIT_B_SCALE,
    KroneckerFactors,
    WrapsBaseLayer,
    check_design,
    fold_into,
    gradient_init_,
    kron_add,
    kron_weight,
)
from cdka_search.errors import PlanError
from cdka_search.spec.torch_module import expert_layout

__all__ = ["CdkaExperts", "ExpertAdapter", "expert_parameters"]

_GROUPED_MM = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")


def expert_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 3-D parameters held directly by ``module`` (experts, d_out, d_in), by name; none for convolutions."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, CdkaExperts)):
        return {}
    return {name: p for name, p in module.named_parameters(recurse=False) if p.dim() == 3}


class ExpertAdapter(KroneckerFactors):
    """The CDKA factors of one 3-D expert parameter: every expert gets its own factors of one design.

    ``cdka_A`` has shape (E, r, m2, n2) and ``cdka_B`` (E, r, m1, n1); expert e's update is
    ``lambda * sum_i kron(B[e, i], A[e, i])`` in (d_out, d_in) orientation, whether the parameter stores
    its experts (E, d_out, d_in) or transposed (E, d_in, d_out) (``transposed``, gpt-oss). The adapted
    parameter stays on the experts module; this module only reaches it (through its owner
    :class:`CdkaExperts`) to merge.
    """

    kind = "experts"

    def __init__(
        self,
        owner: "CdkaExperts",
        parameter_name: str,
        *,
        m1: int,
        n1: int,
        m2: int,
        n2: int,
        r: int,
        alpha: float = 64.0,
        scaling: str = "alpha/sqrt(r*r2)",
        scale: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | str | None = None,
        init: str = "kaiming-A-zero-B",
        contraction: str = "auto",
    ) -> None:
        super().__init__()
        weight = getattr(owner.base_layer, parameter_name)
        experts, d_out, d_in = weight.shape
        self.transposed = owner.transposed
        if self.transposed:
            d_out, d_in = d_in, d_out
        check_design(d_out, d_in, m1, n1, m2, n2, r, what=f"each expert of {parameter_name}", dropout=dropout,
                     init=init, contraction=contraction)
        self._owner = (owner,)  # a tuple, so that nn.Module does not register the owner as a child
        self.parameter_name = parameter_name
        self.experts = experts
        self.init_factors(d_out, d_in, (experts,), weight.device, m1=m1, n1=n1, m2=m2, n2=n2, r=r, alpha=alpha,
                          scaling=scaling, scale=scale, dropout=dropout, dtype=dtype, init=init, contraction=contraction)

    @property
    def weight(self) -> torch.Tensor:
        """The adapted 3-D parameter of the experts module, as it is stored."""
        return getattr(self._owner[0].base_layer, self.parameter_name)

    def extra_repr(self) -> str:
        return (
            f"{self.parameter_name}: experts={self.experts}, d_out={self.d_out}, d_in={self.d_in}, "
            f"B={self.m1}x{self.n1}, A={self.m2}x{self.n2}, r={self.r}, scaling={self.scaling:.6g}, "
            f"merged={self.merged}"
        )

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor, *, b_scale: float = GRADIENT_INIT_B_SCALE) -> None:
        """Gradient-aligned init of every expert from G = dL/dW of shape (E, d_out, d_in), expert by expert
        as :meth:`CdkaLinear.init_from_gradient` does for one weight."""
        if self.merged:
            raise PlanError("unmerge the adapter before re-initialising it")
        g = torch.as_tensor(grad)
        expected = (self.experts, self.d_out, self.d_in)
        if tuple(g.shape) != expected:
            raise PlanError(f"gradient has shape {tuple(g.shape)}, expected {expected} (experts, d_out, d_in)")
        for expert in range(self.experts):
            gradient_init_(self.cdka_A[expert], self.cdka_B[expert], g[expert], b_scale, self.a_fan_in)

    def delta_weight(self) -> torch.Tensor:
        """lambda * sum_i kron(B[e, i], A[e, i]) for every expert: (E, d_out, d_in) (merging and tests only)."""
        return kron_weight(self.cdka_A, self.cdka_B) * self.scaling

    def factors_each(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(A_e for each expert, B_e for each expert) as views of the batched factors.

        Unbind once per forward and reuse the views: the backward of one unbind assembles every expert's
        gradient in one pass, where indexing the factors once per expert would write a full-size zero
        gradient per expert.
        """
        return self.cdka_A.unbind(0), self.cdka_B.unbind(0)

    def add_segments(self, base2: torch.Tensor, x2: torch.Tensor, counts: list[int],
                     each: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
        """``base2`` plus each expert's update applied to its rows; rows come sorted by expert, ``counts[e]``
        of them for expert e, and rows past ``sum(counts)`` are left as they are. ``each``: the
        :meth:`factors_each` of this forward, if already taken."""
        if not any(counts):
            return base2
        a_each, b_each = each or self.factors_each()
        sizes = [*counts, base2.shape[0] - sum(counts)]
        xa = self.dropout(x2.to(self.cdka_A.dtype))
        # one split per call, for the same reason as one unbind: its backward is a single cat
        base_rows, x_rows = base2.split(sizes), xa.split(sizes)
        order = self._order()
        pieces = [
            kron_add(base_rows[e], x_rows[e], a_each[e], b_each[e], self.scaling, order) if count else base_rows[e]
            for e, count in enumerate(counts)
        ]
        return torch.cat([*pieces, base_rows[-1]])

    def add_expert(self, base2: torch.Tensor, x2: torch.Tensor, expert: int,
                   each: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
        """``base2`` plus expert ``expert``'s update applied to every row of ``x2``."""
        a_each, b_each = each or self.factors_each()
        xa = self.dropout(x2.to(self.cdka_A.dtype))
        return kron_add(base2, xa, a_each[expert], b_each[expert], self.scaling, self._order())

    def add_rows(self, base2: torch.Tensor, x2: torch.Tensor, ids: torch.Tensor,
                 each: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
        """``base2`` plus, row by row, the update of expert ``ids[row]``."""
        sorted_ids, perm = torch.sort(ids, stable=True)
        counts = torch.bincount(sorted_ids, minlength=self.experts).tolist()
        out = self.add_segments(base2[perm], x2[perm], counts, each)
        return out[torch.argsort(perm)]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every expert's lambda * dW into its slice of the parameter; the forward then skips it."""
        if not self.merged:
            self._fold(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every expert's lambda * dW again (exact up to rounding in the base dtype)."""
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    def _fold(self, sign: float) -> None:
        weight = self.weight
        for expert in range(self.experts):  # one expert's dW at a time, never the whole stack
            dw = kron_weight(self.cdka_A[expert], self.cdka_B[expert]) * self.scaling
            fold_into(weight[expert], dw.T if self.transposed else dw, sign)


class CdkaExperts(WrapsBaseLayer):
    """An experts module with CDKA adapters on some of its 3-D parameters.

    The experts module stays inside as ``base_layer`` (its state-dict names gain ``.base_layer``, as a
    CdkaLinear's do) and its forward runs unchanged; ``adapters`` maps each adapted parameter's name to
    its :class:`ExpertAdapter`.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.transposed = expert_layout(base_layer) is True  # (experts, d_in, d_out), gpt-oss
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()

    def __getattr__(self, name: str) -> Any:
        adapters = self.__dict__.get("_modules", {}).get("adapters")
        if adapters is not None and name in adapters:
            # Computing with the bare parameter outside this module's forward would drop the update silently.
            raise AttributeError(
                f"{name} is adapted by cdka: the update is applied inside the experts module's forward; "
                f"read the base parameter as .base_layer.{name}"
            )
        return super().__getattr__(name)

    def add_adapter(self, parameter_name: str, **design: Any) -> ExpertAdapter:
        """Adapt ``parameter_name`` of the experts module with the given design and settings."""
        if parameter_name not in expert_parameters(self.base_layer):
            raise PlanError(f"{type(self.base_layer).__name__} has no 3-D parameter {parameter_name!r}")
        adapter = ExpertAdapter(self, parameter_name, **design)
        self.adapters[parameter_name] = adapter
        return adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = {name: a for name, a in self.adapters.items() if not a.merged}
        if not live:
            return self.base_layer(*args, **kwargs)
        with _ExpertCalls(self.base_layer, live):
            return self.base_layer(*args, **kwargs)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _name(func: Callable) -> str:
    return str(getattr(func, "__name__", func)).rsplit(".", 1)[-1]


def _read_kind(transposed: bool, name: str, how: str, args: tuple, weight: Any) -> str | None:
    """Which read of an adapted stack ``func(args)`` is: "one" (eager: ``F.linear(x, W[e])``, or ``x @ W[e]``
    from a transposed stack), "rows" (batched_mm: ``bmm(W[ids], x.unsqueeze(-1))``, or
    ``bmm(x.unsqueeze(1), W[ids])``), "segments" (grouped_mm on ``W.transpose(-2, -1)``, or on the
    transposed stack itself) or "stack" (every expert's rows at once, ``bmm(x, W)`` on an (experts,
    rows, d_in) batch as Llama 4 does, or ``bmm(x, W.transpose(-2, -1))``); None for anything else."""
    second = len(args) > 1 and args[1] is weight
    if how == "one" and second and name in (("matmul", "__matmul__") if transposed else ("linear",)):
        return "one"
    if how == "rows" and name == "bmm" and (second if transposed else bool(args) and args[0] is weight):
        return "rows"
    if how == ("param" if transposed else "stack-T") and second:
        if name in _GROUPED_MM:
            return "segments"
        if name in ("bmm", "matmul", "__matmul__") and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            return "stack"
    return None


class _ExpertCalls(TorchFunctionMode):
    """Adds the adapters' updates where the experts forward multiplies by an adapted parameter.

    Reads of an adapted parameter are tagged (``W[e]``: one expert; ``W[ids]``: one expert per row;
    ``W.transpose(-2, -1)``: the whole stack for a grouped product), and the product consuming a tagged
    tensor gets the update added. Ops that only read metadata pass; anything else that consumes an
    adapted parameter is a PlanError, so an update is never silently left out.
    """

    def __init__(self, experts: nn.Module, adapters: dict[str, ExpertAdapter]) -> None:
        super().__init__()
        self.module_name = type(experts).__name__
        self.params = [(getattr(experts, name), adapter) for name, adapter in adapters.items()]
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.each: dict[str, Any] = {}

    def _each(self, adapter: ExpertAdapter) -> Any:
        """The adapter's per-expert factor views, taken once for this forward."""
        if adapter.parameter_name not in self.each:
            self.each[adapter.parameter_name] = adapter.factors_each()
        return self.each[adapter.parameter_name]

    def _adapter_of(self, tensor: Any) -> ExpertAdapter | None:
        return next((a for p, a in self.params if p is tensor), None)

    def _refuse(self, adapter: ExpertAdapter, what: str) -> PlanError:
        return PlanError(
            f"{self.module_name}.{adapter.parameter_name}: the experts forward {what}, which the cdka expert "
            "adapter cannot follow; use experts_implementation eager, batched_mm or grouped_mm"
        )

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if args and func is torch.Tensor.__getitem__ and (adapter := self._adapter_of(args[0])) is not None:
            return self._index(adapter, func, args)
        if args and _name(func) == "transpose" and (adapter := self._adapter_of(args[0])) is not None:
            if adapter.transposed:
                raise self._refuse(adapter, "transposes its (experts, d_in, d_out) stack")
            dims = sorted(d % 3 for d in (tuple(args[1:3]) or (kwargs.get("dim0"), kwargs.get("dim1"))))
            if dims != [1, 2]:
                raise self._refuse(adapter, f"transposes it over dims {dims}")
            out = func(*args, **kwargs)
            self.tags[out] = (adapter, "stack-T", None)
            return out
        found = [(t, self.tags.get(t) or ((a, "param", None) if (a := self._adapter_of(t)) else None))
                 for t in _tensors((args, kwargs))]
        found = [(t, tag) for t, tag in found if tag is not None]
        if not found:
            return func(*args, **kwargs)
        (weight, (adapter, how, selector)), name = found[0], _name(func)
        read = _read_kind(adapter.transposed, name, how, args, weight)
        out = func(*args, **kwargs)
        if read == "one":  # one expert's rows
            y = adapter.add_expert(out.reshape(-1, adapter.d_out), args[0].reshape(-1, adapter.d_in), selector,
                                   self._each(adapter))
            return y.reshape(out.shape)
        if read == "rows":  # one row per (token, expert): (S, d_out, 1), or (S, 1, d_out) from a transposed stack
            row_dim, x = (1, args[0]) if adapter.transposed else (-1, args[1])
            y = adapter.add_rows(out.squeeze(row_dim), x.squeeze(row_dim), selector, self._each(adapter))
            return y.unsqueeze(row_dim)
        if read == "stack":  # (E, T, d_out) from (E, T, d_in): T rows for every expert
            x = args[0]
            if x.shape[0] != adapter.experts:
                raise self._refuse(adapter, f"multiplies a batch of {x.shape[0]} by its {adapter.experts} experts")
            rows = x.shape[0] * x.shape[1]
            y = adapter.add_segments(out.reshape(rows, adapter.d_out), x.reshape(rows, adapter.d_in),
                                     [x.shape[1]] * adapter.experts, self._each(adapter))
            return y.reshape(out.shape)
        if read == "segments":  # (S, d_out), rows sorted by expert
            offsets = kwargs.get("offs", args[2] if len(args) > 2 else None)
            if offsets is None:
                raise self._refuse(adapter, f"calls {name} without offsets")
            counts = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1, dtype=torch.int64)).tolist()
            return adapter.add_segments(out, args[0], counts, self._each(adapter))
        if _tensors(out):
            raise self._refuse(adapter, f"passes it to {name}")
        return out

    def _index(self, adapter: ExpertAdapter, func: Callable, args: tuple) -> torch.Tensor:
        index = args[1]
        out = func(*args)
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0
                                      and not index.is_floating_point() and index.dtype != torch.bool):
            self.tags[out] = (adapter, "one", int(index))
        elif isinstance(index, torch.Tensor) and index.dim() == 1 and index.dtype in (torch.int64, torch.int32):
            self.tags[out] = (adapter, "rows", index.to(torch.int64))
        else:
            raise self._refuse(adapter, f"indexes it with {index!r}")
        return out
