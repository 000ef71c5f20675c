"""Planning at the scale of real models: cost per module as module counts grow, in one run.

Rows, side by side:
- make_plan(per_layer), Plan.assign, apply_plan, `cdka validate --model` and `cdka export` (PEFT and
  LyCORIS, of a per-layer lokr-family plan) at 224 / 3,584 / 14,336
  modules (LLaMA-shaped models, 32 / 512 / 2,048 layers, narrow so that they fit in memory);
- allocation of 32 / 224 / 3,584 / 10,000 units (Pareto fronts of LLaMA-2-7B shapes, energy-like
  weights, a LoRA-rank-8 budget), as the planner allocates them (every module of a shape sharing its
  front) and with a front of its own per unit;
- reference planning (`make_plan(..., reference=...)`) of a 32-layer model on synthetic updates
  with a realistic spectrum (decaying low rank plus noise), with the largest energy error against
  an exact float64 SVD on one module per shape.

Each row shows seconds, the cost per module (or unit) and the growth against the first size: a
growth ratio of 1.0 is linear, above 1 worse than linear. "dict of names (floor)" builds one dict of
the model's module names, the least any plan-to-model matcher does: its growth is what the memory
hierarchy alone adds on the machine that runs the benchmark.

    python benchmarks/scale.py [--layers 32 512 2048] [--units 32 224 3584 10000]
                               [--reference-layers 32] [--reference-width 256x688] [--device cpu]

``--reference-width 4096x11008 --reference-layers 32 --reference-dtype bfloat16`` plans a whole
LLaMA-2-7B-shaped reference (224 modules; 13 GB of bfloat16 updates, where float32 would need 27 GB).
``--objective balanced`` plans with an objective that uses the alignment, so every shortlisted pair
is measured; the default objective ignores it and only the chosen designs are measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_config(layers: int, hidden: int, intermediate: int) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False,
    }


def seconds(fn) -> tuple[float, object]:
    # From a collected heap: otherwise a full collection that earlier work made due (0.1 s over torch's
    # objects) lands in whichever call crosses the collector's threshold, here or not by luck.
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_of(repeats: int, fn) -> tuple[float, object]:
    runs = [seconds(fn) for _ in range(repeats)]
    return min(t for t, _ in runs), runs[-1][1]


def per_call(fn, batch_seconds: float = 0.05) -> float:
    """Seconds per call of a fast ``fn``: calls batched to at least ``batch_seconds``, best of 5 batches
    (timeit's way), so that a call of 0.1 ms at 224 modules is timed as well as one of 30 ms at 14,336."""
    def batch(number: int) -> float:  # no result kept: keeping them would time the memory they hold
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - start

    number = 1
    while (took := batch(number)) < batch_seconds:
        number *= 2
    return min([took, *(batch(number) for _ in range(4))]) / number


def table(unit: str, results: dict[str, dict[int, float]], notes: dict[str, dict[int, str]] | None = None) -> None:
    """One line per stage, the sizes side by side: seconds and cost per unit, then the growth of the
    cost per unit from the first size to the last (1.0: linear; above 1: worse than linear)."""
    sizes = sorted({n for by_size in results.values() for n in by_size})
    cells = "".join(f" {f'{n:,} ' + unit:>24}" for n in sizes)
    print(f"\n{'stage':<26}{cells} {'growth':>8}")
    print(f"{'':<26}" + "".join(f" {'s':>10} {'us/' + unit[:-1]:>13}" for _ in sizes))
    for stage, by_size in results.items():
        line = "".join(
            f" {by_size[n]:>10.3f} {1e6 * by_size[n] / n:>13.1f}" if n in by_size else f" {'-':>10} {'-':>13}" for n in sizes
        )
        first, last = min(by_size), max(by_size)
        growth = (by_size[last] / last) / (by_size[first] / first) if last != first and by_size[first] > 0 else float("nan")
        print(f"{stage:<26}{line} {'' if growth != growth else f'{growth:.2f}':>8}")
        for n, note in (notes or {}).get(stage, {}).items():
            print(f"{'':<26}   {n:,} {unit}: {note}")


def module_rows(layer_counts: list[int], workdir: Path) -> None:
    """make_plan(per_layer), assign, apply_plan, validate and export, per module count."""
    import torch
    import transformers

    from cdka_search.adapter import apply_plan
    from cdka_search.candidates import CandidateSpace
    from cdka_search.errors import CdkaError
    from cdka_search.plan import save_plan
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    results: dict[str, dict[int, float]] = {}
    notes: dict[str, dict[int, str]] = {}
    for layers in layer_counts:
        folder = workdir / f"llama-{layers}"
        folder.mkdir()
        config = llama_config(layers, 64, 128)
        (folder / "config.json").write_text(json.dumps(config))
        spec = load_spec(str(folder))
        n = len(spec.targets)
        hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(hf_config)
        names = [name for name, _ in model.named_modules() if name]
        # Best of three where a run leaves nothing behind: the machine is shared and the small sizes are noisy.
        took, plan = best_of(3, lambda: make_plan(spec, "lora:8", per_layer=True))
        measured = {"make_plan(per_layer)": took}
        measured["Plan.assign"] = per_call(lambda: plan.assign(names))
        # The floor under any matcher: one dict of the model's module names. Its cost per module grows
        # with the model on this machine too (hash tables and strings outgrow the CPU caches).
        measured["dict of names (floor)"] = per_call(lambda: {name: i for i, name in enumerate(names)})
        # Best of three fresh models: one run at 14,336 modules varied 1.5x between runs on this machine.
        applied = []
        for run in range(3):
            fresh = model if run == 0 else transformers.LlamaForCausalLM(hf_config)
            start = time.perf_counter()
            apply_plan(fresh, plan)
            applied.append(time.perf_counter() - start)
            del fresh
        measured["apply_plan"] = min(applied)
        for fmt in ("yaml", "json"):
            stage = f"cdka validate ({fmt} plan)"
            try:
                path = save_plan(plan, folder / f"plan.{fmt}")
            except CdkaError as exc:  # a YAML plan too large to read back is not written
                notes.setdefault(stage, {})[n] = str(exc).split(": ", 1)[-1][:110]
                continue
            cmd = [sys.executable, "-m", "cdka_search", "validate", str(path), "--model", str(folder)]
            took, done = seconds(lambda: subprocess.run(cmd, capture_output=True, text=True))
            if done.returncode:
                notes.setdefault(stage, {})[n] = done.stderr.strip().splitlines()[-1][-110:]
            else:
                measured[stage] = took
        # Exports need single Kronecker terms (PEFT / LyCORIS LoKr), so a per-layer plan of the lokr family.
        lokr = save_plan(make_plan(spec, "lora:8", per_layer=True, space=CandidateSpace(family="lokr")), folder / "lokr.json")  # JSON: 14,336 groups are over the YAML size bound
        for target in ("peft", "lycoris"):
            stage = f"cdka export --to {target}"
            cmd = [sys.executable, "-m", "cdka_search", "export", str(lokr), "--to", target, "--model", str(folder),
                   "--out", str(folder / f"export-{target}")]
            took, done = seconds(lambda: subprocess.run(cmd, capture_output=True, text=True))
            if done.returncode:
                notes.setdefault(stage, {})[n] = done.stderr.strip().splitlines()[-1][-110:]
            else:
                measured[stage] = took
        for stage, took in measured.items():
            results.setdefault(stage, {})[n] = took
        del model
    table("modules", results, notes)


def front_units(count: int, seed: int = 0):
    """Units shaped like a reference plan's, as the planner hands them to the allocator: one module per
    unit, every module of a shape sharing that LLaMA-2-7B shape's front, energy-like weights, and a
    LoRA-rank-8 budget. Returns (fronts, counts, weights, budget) for planner.allocate_fronts."""
    from cdka_search.budget import Budget
    from cdka_search.fronts import shipped_front

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    rng = random.Random(seed)
    fronts, weights, limit = {}, {}, 0
    for k in range(count):
        shape = shapes[k % len(shapes)]
        fronts[f"module{k}"] = shipped_front(shape)
        weights[f"module{k}"] = rng.lognormvariate(0, 0.7)
        limit += 8 * (shape[0] + shape[1])  # LoRA rank 8 on every module
    return fronts, {name: 1 for name in fronts}, weights, Budget("lora:8", limit)


def allocation_rows(unit_counts: list[int]) -> None:
    """The planner's path (allocate_fronts: shared fronts, each hull computed once), and the same
    problems as plain option lists with the weights folded in, so that no two units share a front:
    with the default objective's fronts (482-504 designs under the default family, the worst case) and with `balanced`'s
    (100-114 designs), the objective that gives a reference plan's modules fronts of their own."""
    from cdka_search.allocate import allocate
    from cdka_search.candidates import CandidateSpace
    from cdka_search.fronts import front_of
    from cdka_search.planner import allocate_fronts
    from cdka_search.scoring import SpectrumCache, score_shape

    stages: dict[str, dict[int, float]] = {}
    notes: dict[str, dict[int, str]] = {}
    cache = SpectrumCache()
    balanced: dict[tuple[int, int], list] = {}

    def balanced_front(shape: tuple[int, int]) -> list:
        if shape not in balanced:
            balanced[shape] = front_of(score_shape(*shape, CandidateSpace(), "balanced", spectra=cache))
        return balanced[shape]

    def record(stage: str, count: int, took: float, result) -> None:
        stages.setdefault(stage, {})[count] = took
        state = "exact" if result.exact else f"certified gap {result.gap:.1e}"
        notes.setdefault(stage, {})[count] = f"{state}, {result.nodes:,} nodes, {took:.3f} s"

    for count in unit_counts:
        fronts, counts, weights, budget = front_units(count, seed=count)
        took, (_, result) = seconds(lambda: allocate_fronts(fronts, counts, weights, budget))
        record("allocate_fronts (shared)", count, took, result)
        own_fronts = {
            "allocate (every front own)": fronts,
            "allocate (balanced, own)": {k: balanced_front(front[0].design.shape) for k, front in fronts.items()},
        }
        for stage, own in own_fronts.items():
            # built only now: millions of live option tuples slow every garbage collection under way
            lists = [[(s.design.params, weights[k] * s.scores.objective) for s in front] for k, front in own.items()]
            took, result = seconds(lambda: allocate(lists, budget.limit))
            del lists
            record(stage, count, took, result)
    table("units", stages, notes)


def synthetic_update(d_out: int, d_in: int, seed: int):
    """Decaying low rank (sigma_j ~ j^-0.8, 64 directions) plus 2 % Gaussian noise: a fine-tuning delta's spectrum."""
    import torch

    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d_out, 64, generator=g) / torch.arange(1, 65, dtype=torch.float32) ** 0.8
    return U @ torch.randn(64, d_in, generator=g) + 0.02 * torch.randn(d_out, d_in, generator=g)


def reference_energies(M, pair: tuple[int, int], r_max: int = 16):
    """Energies r <= r_max to check against: an exact float64 SVD up to 2^22 entries; above, where one
    SVD takes many minutes here, float64 block Krylov run all 24 steps with no early stop (its Ritz
    values only grow towards the true ones; the planner stops at an estimated error of 1e-3)."""
    import torch

    from cdka_search.alignment import topr_energies
    from cdka_search.alignment.energy import factor_sizes
    from cdka_search.alignment.rearrange import rearrange

    sizes = factor_sizes(*M.shape, *pair)
    if M.numel() > 1 << 22:
        return topr_energies(M, *sizes, r_max, max_steps=24, accuracy=1e-300, dtype=torch.float64)
    s2 = torch.linalg.svdvals(rearrange(M.double(), *sizes)).square()
    energies = (s2.cumsum(0) / s2.sum())[:r_max]
    return torch.cat([energies, energies[-1:].expand(r_max - len(energies))])


def reference_row(layers: int, width: str, device: str, objective: str, dtype: str) -> None:
    import torch

    from cdka_search.planner import make_plan
    from cdka_search.spec.model_spec import ModelSpec, TargetModule

    hidden, intermediate = (int(v) for v in width.split("x"))
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden),
              "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}
    targets = tuple(TargetModule(f"model.layers.{i}.{p}", *shapes[p]) for i in range(layers) for p in PROJECTIONS)
    spec = ModelSpec(f"llama-{layers}x{width}", "synthetic", sum(t.weight_params for t in targets) * 2, targets)
    reference = {t.name: synthetic_update(*t.shape, seed=i).to(getattr(torch, dtype)) for i, t in enumerate(targets)}
    took, plan = seconds(lambda: make_plan(spec, "lora:8", reference=reference, device=device, objective=objective))
    # Accuracy: the alignment the plan reports for its chosen design, one module per shape, against
    # exact (or converged float64) energies of the same update.
    worst, checked = 0.0, 0
    owners = plan.assign([t.name for t in targets])
    for shape in sorted(spec.shapes):
        name = next(t.name for t in targets if t.shape == shape)
        group = owners[name]
        exact = reference_energies(reference[name].float(), (group.design.r1, group.design.r2), group.design.r)
        worst = max(worst, abs(group.scores["alignment"] - float(exact[-1])))
        checked += 1
    stage = f"plan --reference {width}"
    note = (f"{len(plan.groups)} groups, objective {plan.objective}, {dtype} updates, device {device}; "
            f"max energy error {worst:.1e} (the chosen design of one module per shape, {checked} checked)")
    table("modules", {stage: {len(targets): took}}, {stage: {len(targets): note}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[32, 512, 2048], help="7 modules per layer")
    parser.add_argument("--units", type=int, nargs="*", default=[32, 224, 3584, 10000])
    parser.add_argument("--reference-layers", type=int, default=32, help="0 skips the reference row")
    parser.add_argument("--reference-width", default="256x688", help="hidden x intermediate of the reference model")
    parser.add_argument("--device", default="cpu", help="torch device for the energies (cuda where present)")
    parser.add_argument("--objective", default=None, help="the reference plan's objective (default: the planner's)")
    parser.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the synthetic updates (bfloat16: a 32-layer 7B reference in 13 GB)")
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.layers:
            module_rows(args.layers, Path(tmp))
    if args.units:
        allocation_rows(args.units)
    if args.reference_layers:
        from cdka_search.scoring import DEFAULT_OBJECTIVE

        reference_row(args.reference_layers, args.reference_width, args.device, args.objective or DEFAULT_OBJECTIVE,
                      args.reference_dtype)


if __name__ == "__main__":
    main()
