"""Real-training validity: do the planner's choices fine-tune a causal LM better than the obvious ones?

Model: a LLaMA-style causal LM with real ratios (hidden 256, intermediate 688, GQA 4 query / 2 key-value
heads, byte vocabulary), pretrained here on the Python standard library's own sources (code outside
``test/``) and cached under ~/.cache/cdka/validity/<hash of the recipe and the corpus> (CDKA_CACHE
overrides), so a rerun does not pretrain again.

Tasks (data this machine's Python ships, nothing downloaded):
- ``prose``: English prose, the Python documentation topics in ``pydoc_data`` (a domain shift from code).
- ``swapcase``: the standard library's test sources with upper and lower case swapped (the same grammar
  in another byte alphabet: an update far from low rank).

Designs, all at equal budget (``lora:R``, every linear layer): LoRA, the paper's (2,8,r) and (2,2,r) and
other uniform (r1,r2,r) designs (one design on every target, r as large as fits), every objective's plan,
and full fine-tuning as the headroom reference. Every design trains STEPS steps of AdamW (warm-up, cosine)
at every lr of a small grid on seed 0; its own best lr and the one shared lr (best mean over designs) are
then rerun on the other seeds. The table reports held-out loss mean +- spread (max - min over seeds) at
both lrs, and Spearman's rho of every score (parameter-weighted mean over the plan's groups) against
-loss over the adapter designs of each task and budget.

Run:  python benchmarks/validity_lm.py --quick           (one task, lora:2, 2 seeds; <= 5 min on 2 cores)
      python benchmarks/validity_lm.py                   (both tasks, lora:1/2/8, 3 seeds; <= 30 min)
      python benchmarks/validity_lm.py --out benchmarks/results/validity_lm.md
Options: --workers N (processes, one torch thread each), --tasks, --budgets, --seeds, --steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODEL = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
SEQ_LEN = 128
PRETRAIN = {"steps": 600, "batch": 16, "lr": 2e-3, "seed": 0, "code_bytes": 2_400_000}
TASK_BYTES = 600_000
EVAL_BLOCKS = 32
BATCH = 8
STEPS = 100
WARMUP = 5
ADAPTER_LRS = (5e-4, 1.5e-3, 4.5e-3)
FULL_LRS = (1e-4, 3e-4, 1e-3)
UNIFORM_PAIRS = ((1, 1), (2, 2), (2, 8), (8, 2), (4, 4), (2, 4), (4, 8), (8, 8), (16, 16), (4, 16), (1, 4), (4, 1))
PAPER = ((2, 8), (2, 2))
TASKS = ("prose", "swapcase")
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUDGETS = (1, 2, 8)


def stdlib() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, *, test: bool) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel[0] in ("site-packages", "pydoc_data", "lib2to3", "idlelib", "turtledemo"):
            continue
        if (rel[0] == "test") == test:
            out.append(p)
    return out


def _read(files: list[Path], limit: int) -> bytes:
    chunks, size = [], 0
    for p in files:
        data = p.read_bytes()
        if b"\0" in data:
            continue
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"\n\n".join(chunks)[:limit]


def corpus(name: str) -> bytes:
    """Bytes of one corpus; every one comes from this Python's own installation."""
    if name == "code":
        return _read(_files(stdlib(), test=False), PRETRAIN["code_bytes"])
    if name == "prose":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[:TASK_BYTES]
    if name == "swapcase":
        return _read(_files(stdlib(), test=True), TASK_BYTES).decode("utf-8", "replace").swapcase().encode("utf-8")
    raise SystemExit(f"error: unknown task {name!r}; choose from {', '.join(TASKS)}")


def blocks(data: bytes):
    import torch

    n = len(data) // SEQ_LEN
    return torch.frombuffer(bytearray(data[: n * SEQ_LEN]), dtype=torch.uint8).long().view(n, SEQ_LEN)


def cache_dir() -> Path:
    root = Path(os.environ.get("CDKA_CACHE", Path.home() / ".cache" / "cdka")) / "validity"
    code = corpus("code")
    key = json.dumps({"model": MODEL, "seq": SEQ_LEN, "pretrain": PRETRAIN, "corpus": hashlib.sha256(code).hexdigest()},
                     sort_keys=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def pretrained(log=print) -> Path:
    """The pretrained model folder, trained once per recipe (about 3 minutes on one core)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache_dir()
    if (folder / "model.safetensors").is_file():
        return folder
    started = time.monotonic()
    torch.manual_seed(PRETRAIN["seed"])
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    data = blocks(corpus("code"))
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    steps = PRETRAIN["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        batch = data[torch.randint(len(data), (PRETRAIN["batch"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"  pretrain step {step}: loss {float(loss):.3f}")
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(folder)
    log(f"  pretrained in {time.monotonic() - started:.0f} s -> {folder}")
    return folder


# ---- designs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One design of the table: a label, its kind and a plan (None = full fine-tuning)."""

    label: str
    kind: str  # "full", "lora", "paper", "uniform", "objective"
    plan: object


def model_spec(folder: Path):
    from cdka_search.spec import spec_from_module
    from cdka_search.textdata import load_causal_lm

    return spec_from_module(load_causal_lm(folder), "validity-llama")


def uniform_plan(spec, budget, r1: int, r2: int, adapter):
    """One (r1, r2, r) on every target with the largest r that fits, or None if r = 1 does not fit."""
    from cdka_search.candidates import Design
    from cdka_search.planner import build_plan
    from cdka_search.scoring import score_designs

    if any(t.d_out % r1 or t.d_in % r2 for t in spec.targets):
        return None
    per = sum(Design.from_paper(t.d_out, t.d_in, r1, r2, 1).params for t in spec.targets)
    r = budget.limit // per
    if r < 1:
        return None
    picked = {}
    for shape in spec.shapes:
        picked[shape] = score_designs([Design.from_paper(*shape, r1, r2, r)])[0]
    return build_plan(spec, budget, picked, objective="uniform", adapter=adapter)


def entries(spec, rank: int, adapter, objectives) -> list[Entry]:
    from cdka_search.planner import make_plan, resolve_budget

    budget = resolve_budget(spec, f"lora:{rank}")
    out = [Entry("full fine-tuning", "full", None)]
    seen = {}
    for r1, r2 in UNIFORM_PAIRS:
        plan = uniform_plan(spec, budget, r1, r2, adapter)
        if plan is None:
            continue
        r = plan.groups[0].design.r
        kind = "lora" if (r1, r2) == (1, 1) else "paper" if (r1, r2) in PAPER else "uniform"
        out.append(Entry(f"uniform ({r1},{r2},{r})", kind, plan))
        seen[_key(plan)] = out[-1].label
    for objective in objectives:
        plan = make_plan(spec, budget, objective=objective, adapter=adapter)
        key = _key(plan)
        label = f"plan {objective}" + (f" (= {seen[key]})" if key in seen else "")
        out.append(Entry(label, "objective", plan))
        seen.setdefault(key, label)
    return out


def _key(plan) -> tuple:
    return tuple(sorted((g.modules, g.design) for g in plan.groups))


def plan_scores(plan, names) -> dict[str, float]:
    """Every score of the plan, the parameter-weighted mean over its groups."""
    total = sum(g.params for g in plan.groups)
    return {n: sum(g.params * float(g.scores.get(n, 0.0)) for g in plan.groups) / total for n in names}


def describe(plan) -> str:
    if plan is None:
        return "every weight"
    by_role = []
    for g in plan.groups:
        role = g.modules[0].split(".")[-1]
        by_role.append(f"{role}{g.design.label()}")
    return " ".join(by_role)


# ---- training -------------------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(folder: str, tasks: list[str]) -> None:
    import torch

    from cdka_search.textdata import load_causal_lm

    torch.set_num_threads(1)
    _STATE["base"] = load_causal_lm(folder)
    for task in tasks:
        data = blocks(corpus(task))
        # Held-out blocks are an even sample across the corpus, so both halves share its topics.
        held = torch.arange(EVAL_BLOCKS) * (len(data) // EVAL_BLOCKS)
        mask = torch.ones(len(data), dtype=torch.bool)
        mask[held] = False
        _STATE[task] = (data[mask], data[held])


def fine_tune(task: str, plan, lr: float, seed: int, steps: int):
    """(tuned model, held-out loss) after ``steps`` AdamW steps of ``plan`` (None: every weight)."""
    import copy

    import torch

    from cdka_search.adapter import apply_plan

    train, held = _STATE[task]
    torch.manual_seed(seed)
    model = copy.deepcopy(_STATE["base"])
    if plan is not None:
        apply_plan(model, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / WARMUP if s < WARMUP else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (steps - WARMUP)))
    )
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            return model, math.inf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        total = sum(float(model(input_ids=held[i : i + 16], labels=held[i : i + 16]).loss) * len(held[i : i + 16])
                    for i in range(0, len(held), 16))
    return model, total / len(held)


def train_one(job: tuple) -> tuple:
    """(task, label, plan, lr, seed, steps) -> (task, label, lr, seed, held-out loss, seconds)."""
    task, label, plan, lr, seed, steps = job
    started = time.monotonic()
    _, loss = fine_tune(task, plan, lr, seed, steps)
    return task, label, lr, seed, loss, time.monotonic() - started


def run_jobs(jobs: list[tuple], folder: Path, tasks: list[str], workers: int) -> list[tuple]:
    if workers <= 1:
        _init_worker(str(folder), tasks)
        return [train_one(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, _init_worker, (str(folder), tasks)) as pool:
        return list(pool.imap_unordered(train_one, jobs))


# ---- measured spectra -----------------------------------------------------------------------------


def fit_beta(sigma, first: int = 1, last: int | None = None) -> float:
    """Least-squares slope of -log sigma_k on log k over k = first..last: sigma_k ~ k^-beta."""
    s = [float(v) for v in sigma][first - 1 : last]
    ks = [math.log(k) for k in range(first, first + len(s))]
    ls = [math.log(max(v, 1e-30)) for v in s]
    mk, ml = statistics.fmean(ks), statistics.fmean(ls)
    return -sum((a - mk) * (b - ml) for a, b in zip(ks, ls)) / sum((a - mk) ** 2 for a in ks)


def measure_spectra(folder: Path, tasks: list[str], steps: int, out) -> None:
    """Singular spectra of full fine-tuning deltas and of the early gradient, fitted to k^-beta."""
    import copy

    import torch

    _init_worker(str(folder), tasks)
    out("| task | update | " + " | ".join(ROLES) + " | all |")
    out("|---|---|" + "---:|" * (len(ROLES) + 1))
    for task in tasks:
        train, _ = _STATE[task]
        base = _STATE["base"]
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1000)
        grads = {n: torch.zeros_like(m.weight) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        model = copy.deepcopy(base)
        mods = {n: m for n, m in model.named_modules() if n in grads}
        for _ in range(8):
            batch = train[torch.randint(len(train), (BATCH,), generator=gen)]
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch).loss.backward()
            for n, m in mods.items():
                grads[n] += m.weight.grad
        tuned = dict(fine_tune(task, None, FULL_LRS[1], 0, steps)[0].named_modules())
        for what, mats in (("early gradient (8 batches)", grads),
                           (f"full FT delta ({steps} steps)", {n: tuned[n].weight.detach() - base.get_submodule(n).weight.detach() for n in grads})):
            betas = {role: [] for role in ROLES}
            for n, mat in mats.items():
                s = torch.linalg.svdvals(mat.double())
                betas[n.split(".")[-1]].append(fit_beta(s.tolist(), 1, len(s) // 2))
            mean = {r: statistics.fmean(v) for r, v in betas.items() if v}
            out(f"| {task} | {what} | " + " | ".join(f"{mean[r]:.2f}" for r in ROLES)
                + f" | {statistics.fmean(mean.values()):.2f} |")


# ---- statistics -----------------------------------------------------------------------------------


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def summary(losses: list[float]) -> tuple[float, float]:
    return statistics.fmean(losses), (max(losses) - min(losses) if len(losses) > 1 else 0.0)


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prose at lora:2, 2 seeds, fewer designs")
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--budgets", nargs="*", type=int, default=None, help="LoRA ranks of the budgets")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-designs", type=int, default=None, help="adapter designs per budget (first ones kept)")
    parser.add_argument("--scaling", default="matched", help="adapter scaling rule (cdka_search.plan.SCALINGS)")
    parser.add_argument("--spectra", action="store_true", help="only measure the update spectra (power-law fits)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    tasks = args.tasks or (["prose"] if args.quick else list(TASKS))
    budgets = args.budgets or ([2] if args.quick else list(BUDGETS))
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    most = args.max_designs or (7 if args.quick else None)
    for t in tasks:
        corpus(t)  # unknown names fail before any work

    from cdka_search.plan import AdapterSettings
    from cdka_search.scoring import OBJECTIVES, Scores

    started = time.monotonic()
    lines: list[str] = []

    def out(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    folder = pretrained(log=lambda s: print(s, flush=True))
    if args.spectra:
        out(f"Fitted beta of sigma_k ~ k^-beta (k = 1..d/2), mean over layers; {args.steps} full FT steps at lr {FULL_LRS[1]:g}")
        out()
        measure_spectra(folder, tasks, args.steps, out)
        return 0
    spec = model_spec(folder)
    adapter = AdapterSettings(scaling=args.scaling)
    score_names = [f for f in Scores.__dataclass_fields__ if f != "objective"]
    designs = {}
    for rank in budgets:
        found = entries(spec, rank, adapter, list(OBJECTIVES))
        adapters = [e for e in found if e.kind != "full"]
        if most is not None:
            keep = [e for e in adapters if e.kind in ("lora", "paper") or e.label.startswith("plan ")][:most]
            keep += [e for e in adapters if e not in keep][: max(0, most - len(keep))]
            adapters = keep
        designs[rank] = [found[0]] + adapters

    def lrs(entry: Entry):
        return FULL_LRS if entry.plan is None else ADAPTER_LRS

    # Stage 1: every lr of the grid on seed 0.
    jobs = [(t, f"{rank}|{e.label}", e.plan, lr, seeds[0], args.steps)
            for t in tasks for rank in budgets for e in designs[rank] if "(= " not in e.label for lr in lrs(e)]
    results: dict[tuple, float] = {}
    for task, label, lr, seed, loss, _ in run_jobs(jobs, folder, tasks, args.workers):
        results[(task, label, lr, seed)] = loss
    stage1 = time.monotonic() - started
    # Stage 2: the own best and the shared lr on the other seeds.
    own, shared = {}, {}
    for t in tasks:
        for rank in budgets:
            pool = [e for e in designs[rank] if e.plan is not None and "(= " not in e.label]
            for e in designs[rank]:
                if "(= " in e.label:
                    continue
                key = f"{rank}|{e.label}"
                own[(t, key)] = min(lrs(e), key=lambda lr: results[(t, key, lr, seeds[0])])
            mean_log = {lr: statistics.fmean(math.log(results[(t, f"{rank}|{e.label}", lr, seeds[0])]) for e in pool)
                        for lr in ADAPTER_LRS}
            shared[(t, rank)] = min(ADAPTER_LRS, key=lambda lr: mean_log[lr])
    jobs = []
    for t in tasks:
        for rank in budgets:
            for e in designs[rank]:
                if "(= " in e.label:
                    continue
                key = f"{rank}|{e.label}"
                wanted = {own[(t, key)]} | ({shared[(t, rank)]} if e.plan is not None else set())
                jobs += [(t, key, e.plan, lr, s, args.steps) for lr in sorted(wanted) for s in seeds[1:]]
    for task, label, lr, seed, loss, _ in run_jobs(jobs, folder, tasks, args.workers):
        results[(task, label, lr, seed)] = loss

    out(f"# Real-training validity (benchmarks/validity_lm.py{' --quick' if args.quick else ''})")
    out()
    out(f"Model: LLaMA-style, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, intermediate "
        f"{MODEL['intermediate_size']}, {MODEL['num_attention_heads']}/{MODEL['num_key_value_heads']} heads, byte vocabulary, "
        f"{spec.total_params:,} parameters; pretrained {PRETRAIN['steps']} steps on Python stdlib code. Fine-tuning: "
        f"{args.steps} steps x {BATCH} x {SEQ_LEN} tokens, AdamW, warm-up {WARMUP} + cosine, adapter {adapter.scaling} "
        f"alpha {adapter.alpha:g}; seeds {seeds}; lr grid {list(ADAPTER_LRS)} (full FT {list(FULL_LRS)}). Loss = held-out "
        f"causal-LM loss (nats/byte), mean +- spread (max - min) over seeds. 'own lr' = the design's best grid lr on seed 0; "
        f"'shared lr' = the one grid lr best on average over the budget's designs.")
    rho_rows = []
    for t in tasks:
        for rank in budgets:
            limit = designs[rank][1].plan.budget_limit
            out()
            out(f"## {t}, budget lora:{rank} ({limit:,} parameters), shared lr {shared[(t, rank)]:g}")
            out()
            out("| design | params | own lr | loss at own lr | loss at shared lr | groups |")
            out("|---|---:|---:|---:|---:|---|")
            xs = {n: [] for n in score_names + ["objective", "params"]}
            ys = []
            for e in designs[rank]:
                base = e.label.split(" (= ")[1][:-1] if "(= " in e.label else e.label
                key = f"{rank}|{base}"
                lr = own[(t, key)]
                m, sp = summary([results[(t, key, lr, s)] for s in seeds])
                if e.plan is None:
                    params, shared_text = sum(tt.weight_params for tt in spec.targets), "-"
                else:
                    params = sum(g.params for g in e.plan.groups)
                    ms, ss = summary([results[(t, key, shared[(t, rank)], s)] for s in seeds])
                    shared_text = f"{ms:.4f} +- {ss:.4f}"
                out(f"| {e.label} | {params:,} | {lr:g} | {m:.4f} +- {sp:.4f} | {shared_text} | {describe(e.plan)} |")
                if e.plan is not None and "(= " not in e.label:
                    sc = plan_scores(e.plan, score_names)
                    for n in score_names:
                        xs[n].append(sc[n])
                    xs["params"].append(params)
                    ys.append(-m)
            rho = {n: spearman(v, ys) for n, v in xs.items() if n != "objective"}
            rho_rows.append((t, rank, len(ys), rho))
    out()
    out("## Spearman rho of each score (parameter-weighted over groups) vs -loss at own lr, distinct adapter designs")
    out()
    names = list(rho_rows[0][3]) if rho_rows else []
    out("| task | budget | designs | " + " | ".join(names) + " |")
    out("|---|---|---:|" + "---:|" * len(names))
    for t, rank, n, rho in rho_rows:
        out(f"| {t} | lora:{rank} | {n} | " + " | ".join(f"{rho[k]:+.2f}" for k in names) + " |")
    out()
    out(f"({len(results)} runs, {time.monotonic() - started:.0f} s wall, stage 1 {stage1:.0f} s, {args.workers} workers)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
