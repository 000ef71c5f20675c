"""Do the planner's data-free scores predict training? Spearman correlation of score vs trained error.

For each target shape: every (r1, r2) family (mirrored designs excluded) at the r whose parameter
count is closest to a fixed budget P (LoRA rank R_EQ on that shape), kept if within +-TOLERANCE of P;
at least 12 and at most 25 designs per shape (an even subsample when more qualify). Each design trains on the proxy task (cdka_search.sweep.tasks.proxy:
synthetic low-rank-head + full-rank-tail target, anisotropic inputs, the real CdkaLinear, AdamW at the
proxy's default lr and alpha 64) for STEPS steps, with SEEDS problem seeds (a new W0, dW*, inputs and
init per seed). The printed rho is Spearman(score, -error) per shape (positive = a higher score means a
lower trained error), then the mean over shapes.

Run:  python benchmarks/validity.py                                      (about 2-5 minutes on 2 CPU cores)
      python benchmarks/validity.py --shapes 256x1024 768x768 1024x256 --seed-offset 3     (held out)
      python benchmarks/validity.py --shapes 256x1024 768x768 1024x256 --seed-offset 3 --seeds 2 \
          --all-orientations --max-designs 40                             (every orientation)
      python benchmarks/validity.py --steps 5 --seeds 1 --shapes 128x128      (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

SHAPES = [(512, 512), (688, 512), (512, 688), (384, 1536)]
R_EQ = 16
TOLERANCE = 0.15
STEPS = 200
MAX_DESIGNS = 25
SEEDS = (0, 1, 2)
OBJECTIVES = ("capacity", "alignment", "first_step", "speed", "balanced", "rank")


def designs_for(shape: tuple[int, int], budget: int, *, all_orientations: bool = False, most: int = MAX_DESIGNS):
    from cdka_search.candidates import Design, divisors

    d_out, d_in = shape
    out = []
    for r1 in divisors(d_out):
        for r2 in divisors(d_in):
            # Outside the paper's orientation (r1 <= m1, r2 <= n2) B and A trade roles; skipped unless asked.
            if not all_orientations and (r1 > d_out // r1 or r2 > d_in // r2):
                continue
            per = (d_out // r1) * r2 + r1 * (d_in // r2)
            r = max(1, round(budget / per))
            d = Design.from_paper(d_out, d_in, r1, r2, r)
            if abs(d.params - budget) <= TOLERANCE * budget:
                out.append(d)
    if len(out) > most:  # an even, deterministic subsample that keeps LoRA (the first)
        step = len(out) / most
        out = [out[int(i * step)] for i in range(most)]
    return out


def ranks(values):
    import numpy as np

    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="mergesort")
    r = np.empty(len(values))
    r[order] = np.arange(len(values))
    for v in np.unique(values):  # average ranks of ties
        tie = values == v
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    import numpy as np

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per design")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="problem seeds per design")
    parser.add_argument("--shapes", nargs="*", default=[f"{o}x{i}" for o, i in SHAPES], help="d_outxd_in ...")
    parser.add_argument("--seed-offset", type=int, default=0, help="first problem seed (held-out runs)")
    parser.add_argument("--all-orientations", action="store_true", help="also designs with r1 > d_out/r1 or r2 > d_in/r2")
    parser.add_argument("--max-designs", type=int, default=MAX_DESIGNS, help="designs per shape (even subsample)")
    args = parser.parse_args()
    steps, seeds = args.steps, tuple(range(args.seed_offset, args.seed_offset + args.seeds))
    shapes = [tuple(int(v) for v in text.split("x")) for text in args.shapes]

    import numpy as np
    import torch

    from cdka_search.plan import AdapterSettings
    from cdka_search.scoring import score_designs
    from cdka_search.sweep.tasks.proxy import ProxyTask, fit, make_problem

    torch.set_num_threads(1)
    lr = ProxyTask.default_lr
    started = time.monotonic()
    table = {o: [] for o in OBJECTIVES}
    print(f"proxy task, {steps} steps, seeds {list(seeds)}, lr {lr}, alpha 64; rho = Spearman(score, -error)")
    for shape in shapes:
        budget = R_EQ * (shape[0] + shape[1])
        designs = designs_for(shape, budget, all_orientations=args.all_orientations, most=args.max_designs)
        if len(designs) < 12:
            sys.exit(f"{shape}: only {len(designs)} designs within {TOLERANCE:.0%} of {budget} parameters")
        errors = np.zeros((len(seeds), len(designs)))
        for s, seed in enumerate(seeds):
            problems = {shape: make_problem(shape, seed)}
            result = fit(problems, [(shape, d) for d in designs], AdapterSettings(), lr=lr, steps=steps, seed=seed)
            errors[s] = [result[(shape, d)] for d in designs]
        mean_err = errors.mean(axis=0)
        line = [f"{shape[0]}x{shape[1]} ({len(designs)} designs, {budget:,} +-{TOLERANCE:.0%} params)"]
        scored = {objective: [s.scores for s in score_designs(designs, objective)] for objective in ("rank", "balanced")}
        values = {
            "capacity": [sc.capacity for sc in scored["rank"]],
            "alignment": [sc.alignment for sc in scored["rank"]],
            "first_step": [sc.first_step for sc in scored["rank"]],
            "speed": [sc.speed for sc in scored["rank"]],
            "balanced": [sc.objective for sc in scored["balanced"]],
            "rank": [sc.objective for sc in scored["rank"]],
        }
        for objective in OBJECTIVES:
            rho = spearman(values[objective], -mean_err)
            table[objective].append(rho)
            line.append(f"{objective} {rho:+.2f}")
        best = int(mean_err.argmin())
        worst = int(mean_err.argmax())
        lora = [i for i, d in enumerate(designs) if d.is_lora]
        line.append(f"best {designs[best].label()} {mean_err[best]:.3f}, worst {designs[worst].label()} {mean_err[worst]:.3f}"
                    + (f", LoRA {designs[lora[0]].label()} {mean_err[lora[0]]:.3f}" if lora else ""))
        print(" | ".join(line), flush=True)
    print("mean rho over shapes: " + ", ".join(f"{o} {np.nanmean(table[o]):+.2f}" for o in OBJECTIVES))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
