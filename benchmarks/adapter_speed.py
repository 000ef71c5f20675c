"""Adapter forward+backward time and memory at LLaMA sizes: CDKA vs LoRA vs torch.kron vs PEFT LoKr.

    python benchmarks/adapter_speed.py                 # cuda if available, else cpu; a few minutes on 2 cores
    python benchmarks/adapter_speed.py --tokens 512 --shapes 4096x4096 --json

What is timed, identically for every method, in one process on the same inputs: the ADAPTER DELTA only,
``out = base_out + delta(x)``, forward and backward, where ``base_out`` is a precomputed tensor standing
for the frozen base layer's output (the base matmul is common to all methods and excluded). ``x`` and
``base_out`` require grad, so the input gradient and the residual pass-through are included, as inside a
network whose earlier layers also train. Times are the best of ``--repeats`` runs after warm-up.

Memory: "saved" is the bytes autograd keeps between forward and backward (tensors packed through
``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage, the inputs and parameters
excluded) -- measured on every device. "peak" is ``torch.cuda.max_memory_allocated`` during forward and
backward, above what was allocated before; on CPU torch has no allocator statistics, so it is n/a.

Methods (same parameter count as the CDKA design, as near as integer ranks allow):
- cdka: CdkaLinear.add_delta (the module's own forward path), design (r1, r2, r) = (2, 8, 4) or the
  nearest one that divides the shape.
- lora: PEFT's form ``base_out + lora_B(lora_A(x)) * scaling`` with two nn.Linear.
- lora-addmm: the same LoRA with the product and the addition fused (torch.addmm), the fastest LoRA.
- kron: dW = lambda * sum_i torch.kron(B_i, A_i), then ``base_out + x @ dW.T``.
- lokr: PEFT LoKr (one Kronecker term, w1 8x8 full, w2 low-rank), its own delta path
  ``_get_delta_activations`` on one nn.Linear.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdka_search.adapter.layer import CdkaLinear  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def nearest_design(d_out: int, d_in: int, r1: int = 2, r2: int = 8) -> tuple[int, int]:
    """(r1, r2) closest to the wanted one among divisors (ties: the smaller)."""
    def pick(d: int, want: int) -> int:
        return min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: (abs(math.log(k / want)), k))
    return pick(d_out, r1), pick(d_in, r2)


def saved_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def measure(step: Callable[[], torch.Tensor], grad: torch.Tensor, leaves: list[torch.Tensor], device: str,
            warmup: int, repeats: int) -> dict[str, float | None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        step().backward(grad)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    peak = None
    if device == "cuda":
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return {"ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3, "peak_mib": peak,
            "saved_mib": saved_bytes(step, leaves) / 2**20}


def bench_shape(d_out: int, d_in: int, tokens: int, device: str, warmup: int, repeats: int,
                slow_repeats: int) -> list[dict]:
    torch.manual_seed(0)
    r1, r2 = nearest_design(d_out, d_in)
    r = 4
    base = nn.Linear(d_in, d_out, bias=False, device=device)
    cdka = CdkaLinear(base, m1=d_out // r1, n1=r2, m2=r1, n2=d_in // r2, r=r)
    with torch.no_grad():
        cdka.cdka_B.normal_(std=0.02)
    params = cdka.cdka_A.numel() + cdka.cdka_B.numel()
    lam = cdka.scaling

    lora_r = max(1, round(params / (d_in + d_out)))
    lora_a = nn.Linear(d_in, lora_r, bias=False, device=device)
    lora_b = nn.Linear(lora_r, d_out, bias=False, device=device)
    nn.init.normal_(lora_b.weight, std=0.02)
    lora_scale = 16.0 / lora_r

    lokr = _peft_lokr(d_out, d_in, params, device)

    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    base_out = torch.randn(tokens, d_out, device=device, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device)

    def kron_step() -> torch.Tensor:
        dw = sum(torch.kron(cdka.cdka_B[i], cdka.cdka_A[i]) for i in range(r)) * lam
        return base_out + x @ dw.T

    methods: list[tuple[str, int, Callable[[], torch.Tensor], list[torch.Tensor], bool]] = [
        (f"cdka ({r1},{r2},{r})", params, lambda: cdka.add_delta(base_out, x), [cdka.cdka_A, cdka.cdka_B], False),
        (f"lora r={lora_r}", lora_r * (d_in + d_out), lambda: base_out + lora_b(lora_a(x)) * lora_scale,
         [lora_a.weight, lora_b.weight], False),
        (f"lora-addmm r={lora_r}", lora_r * (d_in + d_out),
         lambda: torch.addmm(base_out, lora_a(x), lora_b.weight.T, alpha=lora_scale),
         [lora_a.weight, lora_b.weight], False),
        (f"kron ({r1},{r2},{r})", params, kron_step, [cdka.cdka_A, cdka.cdka_B], True),
    ]
    if lokr is not None:
        layer, label, lokr_params = lokr
        lokr_leaves = [p for p in layer.parameters() if p.requires_grad]
        methods.append((label, lokr_params, lambda: base_out + layer._get_delta_activations("default", x),
                        lokr_leaves, True))
    rows = []
    for name, count, step, leaves, slow in methods:
        stats = measure(step, grad, leaves + [x, base_out], device, 1 if slow else warmup,
                        slow_repeats if slow else repeats)
        rows.append({"shape": f"{d_out}x{d_in}", "method": name, "params": count, **stats})
    lora_ms = rows[1]["ms"]
    fused_ms = rows[2]["ms"]
    for row in rows:
        row["x_lora"] = row["ms"] / lora_ms
        row["x_lora_addmm"] = row["ms"] / fused_ms
    return rows


def _peft_lokr(d_out: int, d_in: int, params: int, device: str):
    """PEFT LoKr on one nn.Linear with decompose_factor 8 and r chosen to match ``params``."""
    try:
        from peft import LoKrConfig, get_peft_model
        from peft.tuners.lokr.layer import Linear as LoKrLinear
    except ImportError:
        print("peft not installed: LoKr row skipped", file=sys.stderr)
        return None
    factor = 8
    out_l, out_k = factor, d_out // factor
    in_m, in_n = factor, d_in // factor
    rank = max(1, round((params - out_l * in_m) / (out_k + in_n)))
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(d_in, d_out, bias=False, device=device))
    config = LoKrConfig(r=rank, alpha=rank, target_modules=["proj"], decompose_factor=factor)
    model = get_peft_model(holder, config)
    layer = next(m for m in model.modules() if isinstance(m, LoKrLinear))
    for name, p in layer.named_parameters():  # LoKr zero-inits one factor; any values time the same
        if "lokr" in name:
            nn.init.normal_(p, std=0.02)
    count = sum(p.numel() for n, p in layer.named_parameters() if "lokr" in n)
    w1 = tuple(layer.lokr_w1["default"].shape) if "default" in layer.lokr_w1 else "?"
    return layer, f"peft-lokr w1={w1[0]}x{w1[1]} r={rank}", count


def render(rows: list[dict], device: str, tokens: int) -> str:
    head = (f"{'shape':<12} {'method':<26} {'params':>9} {'fwd+bwd ms':>11} {'x LoRA':>7} {'x addmm':>8} "
            f"{'saved MiB':>10} {'peak MiB':>9}")
    lines = [f"device={device} tokens={tokens} torch={torch.__version__} threads={torch.get_num_threads()}",
             head, "-" * len(head)]
    for row in rows:
        peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        lines.append(f"{row['shape']:<12} {row['method']:<26} {row['params']:>9,} {row['ms']:>11.1f} "
                     f"{row['x_lora']:>7.2f} {row['x_lora_addmm']:>8.2f} {row['saved_mib']:>10.1f} {peak:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shapes", nargs="*", default=[f"{o}x{i}" for o, i in SHAPES],
                        help="d_out x d_in, e.g. 4096x11008")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-repeats", type=int, default=2, help="repeats for kron and LoKr (materialising)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = []
    for text in args.shapes:
        d_out, d_in = (int(v) for v in text.lower().split("x"))
        rows += bench_shape(d_out, d_in, args.tokens, args.device, args.warmup, args.repeats, args.slow_repeats)
        print(f"done {text}", file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2) if args.json else render(rows, args.device, args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
