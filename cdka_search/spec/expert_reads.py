"""How an experts module without transformers' layout mark reads its 3-D stacks, watched on its forward.

transformers marks most experts modules ``is_transposed`` (stored (experts, d_in, d_out)) or not. Llama 4's
experts carry no mark and multiply a whole (experts, tokens, d_in) batch by the stack, ``bmm(x, W)``, so
their stacks are (experts, d_in, d_out). A shape cannot say this (a transposed down-projection has the
shape of a plain up-projection), but the forward does: the operand a matrix product contracts over is
the input side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

_PRODUCTS = ("matmul", "__matmul__", "bmm", "mm", "_grouped_mm", "grouped_mm", "grouped_mm_fallback")
_PASS_THROUGH = ("contiguous", "to", "detach", "__getitem__")


def observed_layout(module: nn.Module) -> bool | None:
    """True when ``module``'s forward reads its stacks as (experts, d_in, d_out), False for
    (experts, d_out, d_in), None when that cannot be seen: a module holding anything but 3-D stacks of one
    expert count (buffers, parameters in children), a forward that takes no plain (rows, width) input,
    or a stack used other than by matrix products, or read both ways.

    The input is one row per expert on the meta device, each distinct stack width tried as its width until
    one runs; such a module has no state for the forward to disturb, and no random number is drawn.
    """
    stacks = list(module.parameters(recurse=False))
    if (
        isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        or not stacks
        or any(p.dim() != 3 or p.shape[0] != stacks[0].shape[0] for p in stacks)
        or next(module.buffers(), None) is not None
        or any(next(c.parameters(), None) is not None for c in module.children())
    ):
        return None
    # The forward runs on meta copies of the stacks (no data, no arithmetic), put in place of the real
    # ones for this call only: a watch costs nothing on a real 100B-parameter model.
    try:
        metas = {name: p.detach().to("meta") for name, p in module.named_parameters(recurse=False)}
    except Exception:  # noqa: BLE001 - a tensor subclass (quantized, sharded) that has no meta copy
        return None
    first = stacks[0]
    for width in sorted({int(d) for p in stacks for d in p.shape[1:]}):
        x = torch.zeros(first.shape[0], width, dtype=first.dtype, device="meta")
        watch = _StackReads(list(metas.values()))
        try:
            with torch.no_grad(), watch:
                torch.func.functional_call(module, metas, (x,))
        except Exception:  # noqa: BLE001 - a forward that does not take this input tells nothing
            continue
        if (layout := watch.layout()) is not None:
            return layout
    return None


class _StackReads(TorchFunctionMode):
    """Records in which orientation each matrix product reads each stack.

    ``linear(x, W[e])`` and a stack as first operand (``bmm(W[ids], x)``) read (d_out, d_in) matrices;
    a stack as second operand (``x @ W[e]``, ``bmm(x, W)``, ``grouped_mm(x, W)``) reads (d_in, d_out) ones;
    a transpose of the last two dimensions on the way turns the reading round. Indexing, ``to`` and
    ``contiguous`` pass a stack on; any other use of one spoils the record.
    """

    def __init__(self, stacks: list[torch.Tensor]) -> None:
        super().__init__()
        self.views: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (stack index, turned round)
        for i, p in enumerate(stacks):
            self.views[p] = (i, False)
        self.count = len(stacks)
        self.reads: dict[int, set[bool]] = {}  # stack index -> True for a (d_in, d_out) reading
        self.spoiled = False

    def layout(self) -> bool | None:
        seen = set().union(*self.reads.values()) if self.reads else set()
        if self.spoiled or len(self.reads) != self.count or len(seen) != 1:
            return None
        return seen.pop()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        found = [(k, self.views[a]) for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a in self.views]
        if not found:
            return out
        (position, (stack, turned)), name = found[0], str(getattr(func, "__name__", func)).rsplit(".", 1)[-1]
        if position == 0 and name in _PASS_THROUGH and isinstance(out, torch.Tensor) and out.dim() >= 2:
            self.views[out] = (stack, turned)
        elif position == 0 and name in ("transpose", "swapaxes") and _last_two(args[0].dim(), args[1:3]):
            self.views[out] = (stack, not turned)
        elif name == "linear" and position == 1:
            self.reads.setdefault(stack, set()).add(turned)
        elif name in _PRODUCTS and position in (0, 1):
            self.reads.setdefault(stack, set()).add(turned if position == 0 else not turned)
        elif name not in ("dim", "size", "__get__", "shape", "device", "dtype"):
            self.spoiled = True
        return out


def _last_two(dim: int, dims: tuple) -> bool:
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and sorted(d % dim for d in dims) == [dim - 2, dim - 1]
