"""The CDKA adapter module: a frozen linear layer plus lambda * sum_i B_i (x) A_i, never materialised.

Symbols follow cdka-notes.md: the adapted weight W0 has shape (d_out, d_in) = (m1*m2, n1*n2); component i
has a left factor B_i of shape m1 x n1 and a right factor A_i of shape m2 x n2. The paper's component
dimensions are r1 = m2 and r2 = n1. The forward pass contracts the input with the stacked factors in two
matrix products (cdka-notes.md section 2); dW is only formed by :meth:`CdkaLinear.delta_weight`, which
merging and tests use.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from cdka_search.alignment.rearrange import rearrange
from cdka_search.candidates import PaperSymbols
from cdka_search.errors import PlanError
from cdka_search.plan import SCALINGS, a_fan_in, scaling_value
from cdka_search.spec.torch_module import base_kind, linear_features

__all__ = [
    "SCALINGS", "CONTRACTIONS", "CdkaLinear", "base_kind", "base_shape", "check_design", "contraction_order",
    "KroneckerFactors", "fold_into", "gradient_init_", "kron_add", "kron_weight", "resolve_dtype", "uniform_init_",
]

#: Orders of the two contractions. ``auto`` picks the one with fewer multiply-adds.
CONTRACTIONS = ("auto", "A-first", "B-first")
#: Names accepted for the initialisation.
INITS = ("kaiming-A-zero-B",)
#: Default factor applied to B in the gradient-aligned init (see :meth:`CdkaLinear.init_from_gradient`).
GRADIENT_INIT_B_SCALE = 1e-3


def describe_module(module: nn.Module) -> str:
    """What a module that :func:`base_kind` refuses is, for an error message."""
    if isinstance(module, nn.Linear):
        return f"a {type(module).__name__}: its forward does not compute x W^T + b, so it is not adapted as a linear layer"
    return f"a {type(module).__name__}: only nn.Linear and transformers Conv1D are supported"


def base_shape(module: nn.Module, kind: str | None = None) -> tuple[int, int]:
    """(d_out, d_in) of a linear or Conv1D module, in PyTorch (out, in) orientation; ``kind``, when the
    caller already has :func:`base_kind`'s answer, spares probing the module again."""
    kind = kind or base_kind(module)
    if kind == "linear":
        return linear_features(module)
    if kind == "conv1d":
        return (int(module.weight.shape[1]), int(module.weight.shape[0]))
    raise PlanError(f"cannot adapt {describe_module(module)}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float32", "bfloat16", "float64", ...); None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise PlanError(f"unknown adapter dtype {dtype!r}: use float32, float64, bfloat16 or float16")
    return value


#: The second product runs as one dense GEMM against kron(B', I_m2) when m2 (= r1) <= EXPAND_MAX_M2 and
#: that matrix has at most EXPAND_MAX_ROWS rows (r * r1 * r2): it stays small next to dW and the GEMM stays
#: memory-bound, so spending m2 times the multiply-adds is cheaper than strided passes over the output.
EXPAND_MAX_M2 = 4
EXPAND_MAX_ROWS = 256


def packed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides ``torch.empty`` gives its shape (those of a parameter, and of DDP's bucket views).

    ``.contiguous()`` is not enough: it keeps any stride on a size-1 dimension (a LoRA-shaped B (r, m1, 1),
    any factor with r = 1), which DDP reports as a gradient layout unlike its bucket's, copying it every
    step, and which torch.kron cannot view.
    """
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _CdkaDelta(torch.autograd.Function):
    """out = base_out + lam * sum_i (B_i (x) A_i) x in the A-first order, with a hand-written backward.

    Shapes: x (N, d_in), base_out (N, d_out), A (r, m2, n2), B (r, m1, n1); K = r * n1.
    First product: t = x.reshape(N*n1, n2) @ A.reshape(r*m2, n2).T, read as t[n, (q, i), a].
    Second product, Y[n, p, a] = sum_k B'[p, k] t[n, k, a] with B'[p, (q, i)] = B[i, p, q]:

    - m2 <= EXPAND_MAX_M2 and K*m2 <= EXPAND_MAX_ROWS: one GEMM (N, K*m2) @ kron(B'^T, I_m2) of shape
      (K*m2, d_out), fused with the addition (addmm). It spends m2 times the multiply-adds of the second
      product but writes the output in its final layout, so no strided pass over (N, d_out) is needed
      (measured faster for m2 <= 4 on CPU).
    - otherwise: (N*m2, K) @ B'^T gives Y in (n, a, p) layout; the addition reads it transposed, and the
      gradient is transposed by the scaling multiplication, so no pass is spent on a bare copy.
    """

    @staticmethod
    def forward(ctx: Any, base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                lam: float) -> torch.Tensor:
        r, m2, n2 = A.shape
        _, m1, n1 = B.shape
        n, k = x.shape[0], n1 * r
        t = x.reshape(n * n1, n2) @ A.reshape(r * m2, n2).T                 # t[(n, q), (i, a)]
        bq = B.permute(1, 2, 0).reshape(m1, k)                              # B'[p, (q, i)] = B[i, p, q]
        ctx.lam, ctx.expand = lam, m2 <= EXPAND_MAX_M2 and k * m2 <= EXPAND_MAX_ROWS
        if ctx.expand:
            t = t.view(n, k * m2)
            expanded = packed(bq.T)                                         # (K*m2, d_out)
            if m2 > 1:
                expanded = torch.kron(expanded, torch.eye(m2, dtype=bq.dtype, device=bq.device))
            if base_out.dtype == t.dtype:
                out = torch.addmm(base_out, t, expanded, alpha=lam)
            else:
                out = torch.empty_like(base_out, memory_format=torch.contiguous_format)
                torch.add(base_out, t @ expanded, alpha=lam, out=out)
            ctx.save_for_backward(x, A, B, t, expanded)
            return out
        tt = t.view(n, k, m2).transpose(1, 2).reshape(n * m2, k)             # small: N * r * r1 * r2
        yt = tt @ bq.T                                                      # yt[(n, a), p]
        # Written through a view but returned whole: a view made inside a custom Function may not be
        # modified in place later (Falcon adds to its fused QKV output), a plain tensor may.
        out = torch.empty((n, m1 * m2), dtype=base_out.dtype, device=base_out.device)
        torch.add(base_out.reshape(n, m1, m2), yt.view(n, m2, m1).transpose(1, 2), alpha=lam, out=out.view(n, m1, m2))
        ctx.save_for_backward(x, A, B, tt, bq)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, t, mat = ctx.saved_tensors
        r, m2, n2 = A.shape
        _, m1, n1 = B.shape
        n, k = x.shape[0], n1 * r
        need_base, need_x, need_a, need_b, _ = ctx.needs_input_grad
        grad_b = grad_a = grad_x = gt = None
        if ctx.expand:
            g = grad.to(A.dtype) if grad.dtype != A.dtype else grad
            if need_b:
                full = (t.T @ g).view(k, m2, m1, m2)                        # only its (a, a) blocks count
                grad_b = torch.diagonal(full, dim1=1, dim2=3).sum(-1).mul_(ctx.lam)       # (K, m1)
                grad_b = packed(grad_b.T.reshape(m1, n1, r).permute(2, 0, 1))
            if need_a or need_x:
                gt = (g @ mat.T).mul_(ctx.lam).view(n * n1, r * m2)
        else:
            gy = torch.empty((n, m2, m1), dtype=A.dtype, device=A.device)
            torch.mul(grad.reshape(n, m1, m2).transpose(1, 2), ctx.lam, out=gy)
            gy = gy.view(n * m2, m1)
            if need_b:
                grad_b = packed((gy.T @ t).view(m1, n1, r).permute(2, 0, 1))
            if need_a or need_x:
                gt = (gy @ mat).view(n, m2, k).transpose(1, 2).reshape(n * n1, r * m2)
        if need_a:
            grad_a = packed((gt.T @ x.reshape(n * n1, n2)).view(r, m2, n2))
        if need_x:
            grad_x = (gt @ A.reshape(r * m2, n2)).view(n, n1 * n2)
        return (grad if need_base else None), grad_x, grad_a, grad_b, None


class _PackedGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient :func:`packed`, for factors used in autograd's own ops."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return packed(grad)


def _delta_b_first(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """sum_i (B_i (x) A_i) x contracting B first; cheaper only when r1 and r2 are both large."""
    r, m2, n2 = A.shape
    _, m1, n1 = B.shape
    n = x.shape[0]
    u = torch.matmul(B.reshape(r * m1, n1), x.reshape(n, n1, n2))           # u[n, (i, p), b]
    y = torch.einsum("nipb,iab->npa", u.view(n, r, m1, n2), A)
    return y.reshape(n, m1 * m2)


def check_design(d_out: int, d_in: int, m1: int, n1: int, m2: int, n2: int, r: int, *, what: str, dropout: float,
                 init: str, contraction: str) -> None:
    """PlanError unless (m1, n1, m2, n2, r) is a positive design whose kron has ``what``'s shape d_out x d_in."""
    dims = (m1, n1, m2, n2, r)
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in dims):
        raise PlanError(f"design (m1, n1, m2, n2, r) = {dims} must be positive integers")
    if m1 * m2 != d_out or n1 * n2 != d_in:
        raise PlanError(
            f"design B {m1}x{n1} (x) A {m2}x{n2} gives a {m1 * m2}x{n1 * n2} update, "
            f"but {what} is {d_out}x{d_in} (d_out x d_in)"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise PlanError(f"adapter dropout {dropout!r} must lie in [0, 1)")
    if init not in INITS:
        raise PlanError(f"unknown init {init!r}: allowed are {', '.join(INITS)}")
    if contraction not in CONTRACTIONS:
        raise PlanError(f"unknown contraction {contraction!r}: allowed are {', '.join(CONTRACTIONS)}")


def contraction_order(contraction: str, m1: int, n1: int, m2: int, n2: int) -> str:
    """``A-first`` or ``B-first``: the one asked for, or under ``auto`` the one with fewer multiply-adds."""
    if contraction != "auto":
        return contraction
    d_out, d_in = m1 * m2, n1 * n2
    return "A-first" if m2 * d_in + n1 * d_out <= m1 * d_in + n2 * d_out else "B-first"


def kron_add(base2: torch.Tensor, xa: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
             order: str) -> torch.Tensor:
    """``base2 + scaling * sum_i (B_i (x) A_i) xa`` for 2-D ``base2`` (N, d_out) and ``xa`` (N, d_in).

    ``xa`` is already in the factors' dtype; the result has ``base2``'s dtype. The adapter keeps its own
    dtype under autocast too (the products would otherwise run in the autocast dtype in forward and in
    the adapter dtype in backward). Outside autocast no context is entered: it costs time per call, and
    devices without autocast (meta, for dry runs of a plan on a model too large to allocate) refuse it.
    """
    device = xa.device.type
    autocasting = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    with torch.autocast(device_type=device, enabled=False) if autocasting else nullcontext():
        if order == "A-first":
            return _CdkaDelta.apply(base2, xa, A, B, scaling)
        delta = _delta_b_first(xa, _PackedGrad.apply(A), _PackedGrad.apply(B)) * scaling
        return base2 + delta.to(base2.dtype)


def kron_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """sum_i kron(B_i, A_i) for A (..., r, m2, n2) and B (..., r, m1, n1): shape (..., m1*m2, n1*n2)."""
    r, m2, n2 = A.shape[-3:]
    m1, n1 = B.shape[-2:]
    dw = torch.einsum("...ipq,...iab->...paqb", B, A)
    return dw.reshape(*A.shape[:-3], m1 * m2, n1 * n2)


@torch.no_grad()
def fold_into(weight: torch.Tensor, dw: torch.Tensor, sign: float) -> None:
    """weight += sign * dw in place, accumulating in the wider of the two dtypes and rounding once; a
    weight stored packed (a quantized linear's) is a PlanError, not a silent cast."""
    if not weight.is_floating_point() or weight.shape != dw.shape:
        raise PlanError(f"cannot merge into a {weight.dtype} weight of shape {tuple(weight.shape)}: merging needs the "
                        f"dense {tuple(dw.shape)} weight; keep the adapter unmerged")
    dw = dw.to(device=weight.device)
    if weight.dtype == dw.dtype:
        weight.add_(dw, alpha=sign)
    else:
        wide = torch.promote_types(weight.dtype, dw.dtype)
        weight.copy_(weight.to(wide).add_(dw.to(wide), alpha=sign))


@torch.no_grad()
def gradient_init_(A: torch.Tensor, B: torch.Tensor, grad: torch.Tensor, b_scale: float, fan_in: int) -> None:
    """Set A (r, m2, n2) and B (r, m1, n1) in place to the gradient-aligned init from G = dL/dW (d_out, d_in).

    See :meth:`CdkaLinear.init_from_gradient`; A and B may be views (one expert's slice of batched factors).
    ``fan_in`` is the adapter's A fan-in (``a_fan_in``): A keeps that Kaiming-uniform entry size.
    """
    r, m2, n2 = A.shape
    _, m1, n1 = B.shape
    work = torch.float64 if grad.dtype == torch.float64 else torch.float32
    rg = rearrange(-grad.to(device=A.device, dtype=work), m1, n1, m2, n2)
    k = min(r, *rg.shape)
    if min(rg.shape) <= 512:
        u, s, vh = torch.linalg.svd(rg, full_matrices=False)
        u, s, v = u[:, :k], s[:k], vh[:k].T
    else:
        u, s, v = torch.svd_lowrank(rg, q=min(k + 8, *rg.shape), niter=4)
        u, s, v = u[:, :k], s[:k], v[:, :k]
    uniform_init_(A, fan_in)
    B.zero_()
    if s.numel() == 0 or s[0] <= 0:
        return
    keep = s > s[0] * torch.finfo(work).eps * max(rg.shape)
    weight = torch.sqrt(s / s[0]) * keep
    a_rms = math.sqrt(m2 * n2 / (3.0 * fan_in))
    a_new = (v * weight).T.reshape(k, m2, n2) * a_rms
    b_new = (u * weight).T.reshape(k, m1, n1) * b_scale
    A[:k][keep] = a_new[keep].to(A.dtype)
    B[:k] = b_new.to(B.dtype)


@torch.no_grad()
def uniform_init_(A: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> None:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): ``kaiming_uniform_(a=sqrt(5))``, fan_in = n2 = d_in / r2 by default.

    torch would read the fan-in of a 3-D tensor as m2*n2, so the bound is computed here: gain
    sqrt(2/(1+5)) times sqrt(3/fan_in). A generator draws in float64 so a seed gives the same values
    in every adapter dtype.
    """
    bound = 1.0 / math.sqrt(fan_in)
    if generator is None:
        A.uniform_(-bound, bound)
    else:
        sample = torch.rand(A.shape, generator=generator, dtype=torch.float64, device=generator.device)
        A.copy_((sample * 2.0 - 1.0) * bound)


class KroneckerFactors(nn.Module, PaperSymbols):
    """What every CDKA adapter module holds: its design, scaling and init, and the factors ``cdka_A``
    (*lead, r, m2, n2) and ``cdka_B`` (*lead, r, m1, n1); ``lead`` is () for one weight, (E,) for E experts."""

    def init_factors(
        self, d_out: int, d_in: int, lead: tuple[int, ...], device: torch.device, *, m1: int, n1: int, m2: int,
        n2: int, r: int, alpha: float, scaling: str, scale: float | None, dropout: float,
        dtype: torch.dtype | str | None, init: str, contraction: str,
    ) -> None:
        """Set the design and its settings (checked by the caller with :func:`check_design`), then make
        and initialise the factors."""
        self.d_out, self.d_in = d_out, d_in
        self.m1, self.n1, self.m2, self.n2, self.r = m1, n1, m2, n2, r
        self.alpha = float(alpha)
        self.scaling = scaling_value(scaling, alpha, r, n1, scale)
        self.a_fan_in = a_fan_in(scaling, d_in, n2)
        self.init = init
        self.contraction = contraction
        self.merged = False
        self.dropout = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        adapter_dtype = resolve_dtype(dtype)
        self.cdka_A = nn.Parameter(torch.empty((*lead, r, m2, n2), dtype=adapter_dtype, device=device))
        self.cdka_B = nn.Parameter(torch.empty((*lead, r, m1, n1), dtype=adapter_dtype, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A_i ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (see :func:`uniform_init_`), B_i = 0, so dW = 0 at step 0;
        fan_in is n2, or d_in under the ``matched`` scaling (LoRA's A entry size, whatever the design)."""
        uniform_init_(self.cdka_A, self.a_fan_in, generator)
        self.cdka_B.zero_()

    def _order(self) -> str:
        return contraction_order(self.contraction, self.m1, self.n1, self.m2, self.n2)


class WrapsBaseLayer(nn.Module):
    """A module that wraps ``base_layer`` and reads, from it, every attribute it lacks itself: model code
    written for the base module (``in_features``, ``bias``, ``weight``, Conv1D's ``nf``, an experts module's
    ``num_experts``) keeps working once the module is replaced."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError as missing:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or not hasattr(base, name):
                raise missing from None
            return getattr(base, name)


class CdkaLinear(WrapsBaseLayer, KroneckerFactors):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus a CDKA adapter (cdka-notes.md section 1).

    ``y = base_layer(x) + lambda * sum_{i=1..r} (B_i (x) A_i) x`` with ``cdka_A`` of shape (r, m2, n2) and
    ``cdka_B`` of shape (r, m1, n1), where d_out = m1*m2 and d_in = n1*n2 (paper: r1 = m2, r2 = n1).
    The base module stays inside as ``base_layer``, so its state-dict names gain ``.base_layer``.

    Args:
        base_layer: the module to adapt; its parameters are frozen here.
        m1, n1, m2, n2, r: the design (B_i is m1 x n1, A_i is m2 x n2, r components).
        alpha: numerator of the scaling.
        scaling: one of :data:`SCALINGS`; ``alpha/sqrt(r*r2)`` by default (cdka-notes.md section 3).
        scale: lambda itself when ``scaling == "fixed"``.
        dropout: dropout probability on the adapter input (the base path sees x unchanged).
        dtype: adapter parameter dtype, float32 unless given, whatever the base dtype; the input is cast
            to it and the adapter output cast back to the base output dtype.
        init: ``kaiming-A-zero-B`` (A Kaiming-uniform with fan_in = n2, B = 0, so dW = 0 at step 0).
        contraction: ``auto`` (fewer multiply-adds), ``A-first`` or ``B-first``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
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
        kind = base_kind(base_layer)
        if kind is None:
            raise PlanError(f"cannot adapt {describe_module(base_layer)}")
        d_out, d_in = base_shape(base_layer, kind)
        check_design(d_out, d_in, m1, n1, m2, n2, r, what="the layer", dropout=dropout, init=init,
                     contraction=contraction)
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.kind = kind
        self.init_factors(d_out, d_in, (), base_layer.weight.device, m1=m1, n1=n1, m2=m2, n2=n2, r=r, alpha=alpha,
                          scaling=scaling, scale=scale, dropout=dropout, dtype=dtype, init=init, contraction=contraction)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, d_out={self.d_out}, d_in={self.d_in}, B={self.m1}x{self.n1}, "
            f"A={self.m2}x{self.n2}, r={self.r}, scaling={self.scaling:.6g}, merged={self.merged}"
        )

    # initialisation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor, *, b_scale: float = GRADIENT_INIT_B_SCALE) -> None:
        """Gradient-aligned init from G = dL/dW0 in (d_out, d_in) orientation (for Conv1D pass weight.grad.T).

        With U S V^T the top-r SVD of R(-G) (R: cdka-notes.md section 4) and s_i = S_i / S_0:
        ``A_i = sqrt(s_i) * v_i.reshape(m2, n2) * sqrt(m2*n2/(3*fan_in))`` so A has the element RMS of
        the Kaiming-uniform default (fan_in = n2, or d_in under the ``matched`` scaling), and ``B_i = b_scale * sqrt(s_i) * u_i.reshape(m1, n1)``, so B_i (x) A_i is
        the i-th rank-one term of R(-G) rescaled by s_i and dW starts small (b_scale = 1e-3 by default)
        while the first update of B already points along the top-r part of -G. Components past the rank
        of R(G) keep a zero B and a random A. The model output moves by lambda * dW; nothing is
        subtracted from the base weight.
        """
        if self.merged:
            raise PlanError("unmerge the adapter before re-initialising it")
        g = torch.as_tensor(grad)
        if tuple(g.shape) != (self.d_out, self.d_in):
            raise PlanError(f"gradient has shape {tuple(g.shape)}, expected {(self.d_out, self.d_in)} (d_out, d_in)")
        gradient_init_(self.cdka_A, self.cdka_B, g, b_scale, self.a_fan_in)

    # maths ------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """lambda * sum_i kron(B_i, A_i) in (d_out, d_in) orientation and adapter dtype (merging, tests)."""
        return kron_weight(self.cdka_A, self.cdka_B) * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        return self.add_delta(out, x)

    def add_delta(self, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base_out + lambda * sum_i (B_i (x) A_i) x``: the adapter half of :meth:`forward`.

        ``x`` is cast to the adapter dtype (and passed through dropout); the result has ``base_out``'s
        dtype and shape. Exposed so that benchmarks can time the adapter without the base matmul.
        """
        lead = x.shape[:-1]
        xa = self.dropout(x.to(self.cdka_A.dtype)).reshape(-1, self.d_in)
        y = kron_add(base_out.reshape(-1, self.d_out), xa, self.cdka_A, self.cdka_B, self.scaling, self._order())
        return y.reshape(*lead, self.d_out)

    # merging ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold lambda * dW into the base weight (Conv1D: its transpose); the forward then skips the adapter."""
        if self.merged:
            return
        self._fold(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract lambda * dW from the base weight again (exact up to rounding in the base dtype)."""
        if not self.merged:
            return
        self._fold(-1.0)
        self.merged = False

    def _fold(self, sign: float) -> None:
        dw = self.delta_weight()
        fold_into(self.base_layer.weight, dw.T if self.kind == "conv1d" else dw, sign)
