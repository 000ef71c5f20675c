"""Expert-adapter forward+backward time and memory on one Mixtral experts module: CDKA vs PEFT LoRA
(target_parameters) vs a materialised per-expert torch.kron.

    python benchmarks/experts_speed.py                      # E=8, H=1024, I=1536, 512 tokens, top-2, CPU
    python benchmarks/experts_speed.py --experts 4 --hidden 64 --intermediate 96 --tokens 32 --repeats 1

What is timed, identically for every method, in one process on the same inputs: one forward and backward
of the experts module (transformers' MixtralExperts, the given ``--implementation``) on routed tokens
whose hidden states require grad; the router is outside. Times are the best of ``--repeats`` runs after
two warm-ups, the methods taking turns run by run so that all see the same machine load. "saved" is the
bytes autograd keeps between forward and backward (saved-tensor hooks, deduplicated by storage, the frozen
expert weights and the input excluded).

Methods, on both 3-D parameters (gate_up_proj (E, 2I, H) and down_proj (E, H, I)):
- base: the frozen experts alone (no adapter), for reference.
- cdka: CdkaExperts, design (r1, r2, r) = (2, 8, 4) per expert (never forms a dW).
- peft-lora: PEFT 0.21's ParamWrapper (LoraConfig(target_parameters=...)) with the rank giving about the
  same parameters; it folds W + scaling * B @ A for the whole stack into one baddbmm every forward.
- kron: W + lambda * sum_i kron(B[e, i], A[e, i]) for every expert, materialised every forward (what a
  parametrization of the Kronecker design would do).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter_speed import saved_bytes  # noqa: E402  (this folder is on sys.path when run as a script)
from cdka_search.adapter.experts import CdkaExperts  # noqa: E402
from cdka_search.adapter.layer import kron_weight  # noqa: E402


class Holder(nn.Module):
    """A parent for the experts module, so that adapters can replace it (PEFT and cdka both wrap)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, hidden, index, weights):
        return self.experts(hidden, index, weights)


class _KronStack(nn.Module):
    def __init__(self, experts: int, r: int, m1: int, n1: int, m2: int, n2: int, scaling: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(experts, r, m2, n2) / n2**0.5)
        self.B = nn.Parameter(torch.randn(experts, r, m1, n1) * 1e-3)
        self.scaling = scaling

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + kron_weight(self.A, self.B) * self.scaling


def experts_module(args: argparse.Namespace) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_local_experts=args.experts,
        num_experts_per_tok=2, experts_implementation=args.implementation,
    )
    experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
    return Holder(experts)


def design(d_out: int, d_in: int, r1: int = 2, r2: int = 8, r: int = 4) -> dict[str, int]:
    return dict(m1=d_out // r1, n1=r2, m2=r1, n2=d_in // r2, r=r)


def per_expert_params(d: dict[str, int]) -> int:
    return d["r"] * (d["m1"] * d["n1"] + d["m2"] * d["n2"])


def build(method: str, args: argparse.Namespace) -> nn.Module:
    model = experts_module(args)
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = {"gate_up_proj": (2 * args.intermediate, args.hidden), "down_proj": (args.hidden, args.intermediate)}
    if method == "cdka":
        wrapper = CdkaExperts(model.experts)
        for name, (d_out, d_in) in shapes.items():
            wrapper.add_adapter(name, **design(d_out, d_in))
        model.experts = wrapper
    elif method == "peft-lora":
        import peft

        ranks = {f"experts.{n}": max(1, round(per_expert_params(design(*s)) / sum(s))) for n, s in shapes.items()}
        config = peft.LoraConfig(target_modules=[], target_parameters=list(ranks), r=8,
                                 rank_pattern={f"^{k}$": v for k, v in ranks.items()}, lora_alpha=16)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
    elif method == "kron":
        for name, (d_out, d_in) in shapes.items():
            d = design(d_out, d_in)
            nn.utils.parametrize.register_parametrization(
                model.experts, name, _KronStack(args.experts, d["r"], d["m1"], d["n1"], d["m2"], d["n2"], 0.5))
    elif method != "base":
        raise ValueError(method)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementation", default="grouped_mm", choices=("eager", "batched_mm", "grouped_mm"))
    parser.add_argument("--methods", nargs="+", default=["base", "cdka", "peft-lora", "kron"])
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen)
    index = torch.stack([torch.randperm(args.experts, generator=gen)[:2] for _ in range(args.tokens)])
    weights = torch.softmax(torch.randn(args.tokens, 2, generator=gen), dim=-1)
    print(f"experts={args.experts} hidden={args.hidden} intermediate={args.intermediate} tokens={args.tokens} "
          f"top-2 implementation={args.implementation} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'method':<10} {'trainable':>11} {'fwd+bwd ms':>11} {'x base':>7} {'saved MiB':>10}")
    models = {method: build(method, args) for method in args.methods}

    def step(model: nn.Module) -> torch.Tensor:
        x = hidden.clone().requires_grad_()
        return model(x, index, weights)

    saved = {}
    for method, model in models.items():
        frozen = [p for p in model.parameters() if not p.requires_grad]
        saved[method] = saved_bytes(lambda model=model: step(model), frozen + [hidden])
        step(model).sum().backward()
    times: dict[str, list[float]] = {method: [] for method in models}
    for _ in range(args.repeats):  # round robin, so that every method sees the same machine load
        for method, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = step(model)
            out.backward(torch.ones_like(out))
            times[method].append((time.perf_counter() - start) * 1e3)
    base_ms = min(times["base"]) if "base" in times else None
    for method, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        best = min(times[method])
        ratio = f"{best / base_ms:7.2f}" if base_ms else "    n/a"
        print(f"{method:<10} {trainable:>11,} {best:>11.1f} {ratio} {saved[method] / 2**20:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
