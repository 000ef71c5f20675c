"""Real-training validity: do the planner's choices fine-tune a causal LM better than the obvious ones?

Model: a LLaMA-style causal LM with real ratios (hidden 256, intermediate 688, GQA 4 query / 2 key-value
heads, byte vocabulary), pretrained here on the Python standard library's own sources (code outside
``test/``) and cached under ~/.cache/cdka/validity/<hash of the recipe and the corpus> (CDKA_CACHE
overrides), so a rerun does not pretrain again.

Tasks (data this machine's Python ships, nothing downloaded):
- ``prose``: English prose, the Python documentation topics in ``pydoc_data`` (a domain shift from code).
- ``swapcase``: the standard library's test sources with upper and lower case swapped (the same grammar
  in another byte alphabet: an update far from low rank).
- ``rot13``: the ``prose`` task's text with its letters shifted by 13 (ROT13): English under a new
  alphabet, a shift in both the domain and the bytes.

Designs, all at equal budget (``lora:R``, every linear layer): LoRA, the paper's (2,8,r) and (2,2,r) and
other uniform (r1,r2,r) designs (one design on every target, r as large as fits), every objective's plan,
and full fine-tuning as the headroom reference. Every design trains STEPS steps of AdamW (warm-up, cosine)
at every lr of a small grid on seed 0; its own best lr and the one shared lr (best mean over designs) are
then rerun on the other seeds (``--lr ADAPTER:FULL`` skips the grid and trains every design at those).
The table reports held-out loss mean +- spread (max - min over seeds), and Spearman's rho of every score
and objective (mean over the plan's matrices, weighted as allocation weighs them) against -loss over the
adapter designs of each task and budget.

Run:  python benchmarks/validity_lm.py --quick     (prose, lora:2, 6 designs, 2 seeds, calibrated lrs: 96 s on 2 cores)
      python benchmarks/validity_lm.py --cells prose:2 prose:1 prose:8 swapcase:2 --lr 0.0045:0.001 \
          --out benchmarks/results/validity_lm.md  (3 seeds, 132 runs: 18.6 min on 2 cores)
      python benchmarks/validity_lm.py --hidden 512 --knees 0.6 0.75 --cells rot13:8 prose:8 rot13:2 prose:2 \
          --lr 0.0045:0.001 --designs "(1,1," "(2,8," "(16,16," "plan rank" --objectives rank \
          --out benchmarks/results/validity_lm_knee_wide.md  (the knee at a second width: 78 runs, 25 min)
Options: --workers N (processes, one torch thread each), --tasks, --budgets, --seeds, --steps, --hidden W
(model width, a multiple of 128 up to 4096), --knees K... (also plans with the rank objective's knee at K).
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
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")



@dataclass(frozen=True)
class Recipe:
    """The pretrained model and the data: what the cache key hashes."""

    model: tuple = (("vocab_size", 256), ("hidden_size", 256), ("intermediate_size", 688), ("num_hidden_layers", 2),
                    ("num_attention_heads", 4), ("num_key_value_heads", 2), ("max_position_embeddings", 256))
    seq_len: int = 128
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    seed: int = 0
    code_bytes: int = 2_400_000
    task_bytes: int = 600_000
    eval_blocks: int = 32
    batch: int = 8

    @property
    def config(self) -> dict:
        return dict(self.model)


FULL = Recipe()
# The tests' smoke run: the same code on a model small enough to pretrain and fine-tune in seconds.
SMOKE = Recipe(model=(("vocab_size", 256), ("hidden_size", 32), ("intermediate_size", 86), ("num_hidden_layers", 1),
                      ("num_attention_heads", 4), ("num_key_value_heads", 2), ("max_position_embeddings", 64)),
               seq_len=32, pretrain_steps=5, pretrain_batch=4, code_bytes=60_000, task_bytes=20_000, eval_blocks=8,
               batch=4)
STEPS = 80
WARMUP = 5
ADAPTER_LRS = (1.5e-3, 4.5e-3, 1.35e-2)
FULL_LRS = (3e-4, 1e-3, 3e-3)
SPECTRA_LR = 1e-3  # full fine-tuning's best grid lr on prose (benchmarks/results/validity_lm_calibration.md)
UNIFORM_PAIRS = ((1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (2, 8), (8, 2), (4, 8), (8, 4), (2, 4), (4, 2))
PAPER = ((2, 8), (2, 2))
TASKS = ("prose", "swapcase", "rot13")
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUDGETS = (1, 2, 8)
# --quick: the lrs the calibration grid picked (benchmarks/results/validity_lm_calibration.md), and the
# designs it compares: LoRA, the paper's (2,2,r), the best uniform designs there, the default plan.
QUICK_LR = "0.0045:0.001"
QUICK_DESIGNS = ("full", "(1,1,", "(2,2,", "(4,4,", "(16,16,", "plan rank")


def widened(hidden: int) -> Recipe:
    """FULL at another width, the ratios kept: intermediate hidden * 43/16, heads of 64, 2 query heads a key."""
    if not 128 <= hidden <= 4096 or hidden % 128:  # 4096: a 2-layer model of about 0.4B parameters
        raise SystemExit(f"error: --hidden must be a multiple of 128 from 128 to 4096, got {hidden}")
    sizes = {"hidden_size": hidden, "intermediate_size": hidden * 43 // 16, "num_attention_heads": hidden // 64,
             "num_key_value_heads": hidden // 128}
    return replace(FULL, model=tuple((k, sizes.get(k, v)) for k, v in FULL.model))


def register_knees(knees: list[float]) -> list[str]:
    """The rank objective with its knee at each K, as objectives named rank@K in this process only: the
    measurement that set scoring.RANK_KNEE (docs/validity.md)."""
    import functools

    from cdka_search import scoring

    bad = [knee for knee in knees if not 0 < knee <= 2]
    if bad:
        raise SystemExit(f"error: --knees takes capacities in (0, 2], got {bad[0]}")
    names = [f"rank@{knee:g}" for knee in knees]
    for name, knee in zip(names, knees):
        scoring.OBJECTIVES[name] = functools.partial(scoring.rank_objective, knee=knee)
    return names


def stdlib() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, *, test: bool) -> list[Path]:
    """The stdlib's .py files under test/ (test=True) or outside it; installed packages never."""
    skip = ("site-packages", "pydoc_data", "lib2to3", "idlelib", "turtledemo")
    tops = [root / "test"] if test else [p for p in root.iterdir() if p.name not in skip + ("test",)]
    out = []
    for top in tops:
        out += [top] if top.suffix == ".py" else list(top.rglob("*.py")) if top.is_dir() else []
    return sorted(out)


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


def corpus(name: str, recipe: Recipe = FULL) -> bytes:
    """Bytes of one corpus; every one comes from this Python's own installation."""
    if name == "code":
        return _read(_files(stdlib(), test=False), recipe.code_bytes)
    if name == "prose":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[: recipe.task_bytes]
    if name == "swapcase":
        return _read(_files(stdlib(), test=True), recipe.task_bytes).decode("utf-8", "replace").swapcase().encode("utf-8")
    if name == "rot13":  # the prose's letters shifted by 13: the same text under a new alphabet
        import codecs

        return codecs.encode(corpus("prose", recipe).decode("utf-8", "replace"), "rot13").encode("utf-8")
    raise SystemExit(f"error: unknown task {name!r}; choose from {', '.join(TASKS)}")


def blocks(data: bytes, seq_len: int):
    import torch

    n = len(data) // seq_len
    return torch.frombuffer(bytearray(data[: n * seq_len]), dtype=torch.uint8).long().view(n, seq_len)


def cache_dir(recipe: Recipe) -> Path:
    """CDKA_CACHE or ~/.cache/cdka, then validity/<hash>; the smoke recipe's model, without CDKA_CACHE,
    stays in the working directory (.cdka-smoke-cache) rather than in the user's cache."""
    default = Path.cwd() / ".cdka-smoke-cache" if recipe == SMOKE else Path.home() / ".cache" / "cdka"
    root = Path(os.environ.get("CDKA_CACHE", default)) / "validity"
    code = corpus("code", recipe)
    key = json.dumps({"recipe": repr(recipe), "corpus": hashlib.sha256(code).hexdigest()}, sort_keys=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def pretrained(recipe: Recipe, log=print) -> Path:
    """The pretrained model folder, trained once per recipe (about 3 minutes on one core)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache_dir(recipe)
    if (folder / "model.safetensors").is_file():
        return folder
    started = time.monotonic()
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(LlamaConfig(**recipe.config))
    data = blocks(corpus("code", recipe), recipe.seq_len)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    steps = recipe.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        batch = data[torch.randint(len(data), (recipe.pretrain_batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"  pretrain step {step}: loss {loss.item():.3f}")
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")  # a half-written folder is never the cache
    model.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(folder)
    log(f"  pretrained in {time.monotonic() - started:.0f} s -> {folder}")
    return folder


def write_task_data(target: Path, folder: Path, tasks: list[str], recipe: Recipe) -> None:
    """The benchmark's model and task texts as files cdka sweep --task lm reads (bytes = the model's tokens)."""
    import shutil

    (target / "model").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, target / "model" / name)
    for task in tasks:
        (target / f"{task}.txt").write_text(corpus(task, recipe).decode("utf-8", "replace"), encoding="utf-8")
    print(f"wrote {target}/model and {', '.join(f'{target}/{t}.txt' for t in tasks)}")


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
    from cdka_search.scoring import DEFAULT_OBJECTIVE

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
    plans = [(f"plan {o}", make_plan(spec, budget, objective=o, adapter=adapter)) for o in objectives]
    if DEFAULT_OBJECTIVE in objectives:
        plans.append((f"plan {DEFAULT_OBJECTIVE}, equal shape weights (before)", unweighted_plan(spec, budget, adapter)))
    for name, plan in plans:
        key = _key(plan)
        label = name + (f" (= {seen[key]})" if key in seen else "")
        out.append(Entry(label, "objective", plan))
        seen.setdefault(key, label)
    return out


def unweighted_plan(spec, budget, adapter):
    """The default objective allocated with every shape weighing 1 (the planner before shape weights)."""
    from cdka_search.candidates import CandidateSpace
    from cdka_search.planner import plan_from_fronts, score_fronts
    from cdka_search.scoring import DEFAULT_OBJECTIVE

    fronts = score_fronts(spec, CandidateSpace(), DEFAULT_OBJECTIVE)
    return plan_from_fronts(spec, budget, fronts, weights={k: 1.0 for k in fronts}, objective=DEFAULT_OBJECTIVE, adapter=adapter)


def reference_entry(spec, task: str, rank: int, adapter) -> Entry:
    """The default objective's plan from a gradient probe of the task (as cdka probe --grad: 8 batches of 4)."""
    import torch

    from cdka_search.alignment.reference import gradient_reference
    from cdka_search.planner import make_plan
    from cdka_search.scoring import DEFAULT_OBJECTIVE

    train, _ = _STATE[task]
    batches = [{"input_ids": train[i : i + 4], "attention_mask": torch.ones_like(train[i : i + 4]), "labels": train[i : i + 4]}
               for i in range(0, 32, 4)]
    grads = gradient_reference(_STATE["base"], batches, [t.name for t in spec.targets])
    plan = make_plan(spec, f"lora:{rank}", objective=DEFAULT_OBJECTIVE, adapter=adapter, reference=grads)
    return Entry(f"plan reference {DEFAULT_OBJECTIVE} (probe --grad)", "reference", plan)


def _key(plan) -> tuple:
    return tuple(sorted((g.modules, g.design) for g in plan.groups))


def rank_score(design) -> float:
    """The rank bound on a log scale without the cap at full rank."""
    d_min = min(design.shape)
    return math.log2(1 + design.r * min(design.m1, design.n1) * min(design.m2, design.n2)) / math.log2(1 + d_min)


def plan_scores(plan, names) -> dict[str, float]:
    """Every score of the plan: its mean over the plan's matrices weighted as allocation weighs them
    (scoring.shape_weight), so a plan's objective score is what the planner maximised."""
    from cdka_search.scoring import shape_weight

    weights = [g.count * shape_weight(*g.shape) for g in plan.groups]

    def value(g, n: str) -> float:
        return rank_score(g.design) if n == "rank" and n not in g.scores else float(g.scores.get(n, 0.0))

    return {n: sum(w * value(g, n) for w, g in zip(weights, plan.groups)) / sum(weights) for n in names}


def objective_scores(plan) -> dict[str, float]:
    """Every objective's score of the plan ("objective NAME"), weighted over its matrices as plan_scores."""
    from cdka_search.scoring import OBJECTIVES, score_designs, shape_weight

    weights = [g.count * shape_weight(*g.shape) for g in plan.groups]
    return {f"objective {name}": sum(w * score_designs([g.design], name)[0].scores.objective
                                     for w, g in zip(weights, plan.groups)) / sum(weights) for name in OBJECTIVES}


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


def _init_worker(folder: str, tasks: list[str], recipe: Recipe) -> None:
    import torch

    from cdka_search.textdata import load_causal_lm

    torch.set_num_threads(1)
    _STATE["base"] = load_causal_lm(folder)
    _STATE["batch"] = recipe.batch
    for task in tasks:
        data = blocks(corpus(task, recipe), recipe.seq_len)
        # Held-out blocks are an even sample across the corpus, so both halves share its topics.
        held = torch.arange(recipe.eval_blocks) * (len(data) // recipe.eval_blocks)
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
        opt, lambda s: (s + 1) / WARMUP if s < WARMUP else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / max(1, steps - WARMUP)))
    )
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (_STATE["batch"],), generator=gen)]
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


def run_jobs(jobs: list[tuple], folder: Path, tasks: list[str], recipe: Recipe, workers: int, what: str) -> list[tuple]:
    """Every job's result; progress on stderr."""
    done: list[tuple] = []
    started = time.monotonic()

    def progress(result: tuple) -> None:
        done.append(result)
        if len(done) % max(1, len(jobs) // 10) == 0 or len(done) == len(jobs):
            print(f"  {what}: {len(done)}/{len(jobs)} runs, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    if workers <= 1:
        _init_worker(str(folder), tasks, recipe)
        for j in jobs:
            progress(train_one(j))
        return done
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, _init_worker, (str(folder), tasks, recipe)) as pool:
        for result in pool.imap_unordered(train_one, jobs):
            progress(result)
    return done


# ---- measured spectra -----------------------------------------------------------------------------


def fit_beta(sigma, first: int = 1, last: int | None = None) -> float:
    """Least-squares slope of -log sigma_k on log k over k = first..last: sigma_k ~ k^-beta."""
    s = [float(v) for v in sigma][first - 1 : last]
    ks = [math.log(k) for k in range(first, first + len(s))]
    ls = [math.log(max(v, 1e-30)) for v in s]
    mk, ml = statistics.fmean(ks), statistics.fmean(ls)
    return -sum((a - mk) * (b - ml) for a, b in zip(ks, ls)) / sum((a - mk) ** 2 for a in ks)


def measure_spectra(folder: Path, tasks: list[str], recipe: Recipe, steps: int, out) -> dict:
    """Singular spectra of full fine-tuning deltas and of the early gradient, fitted to k^-beta, and the
    share of each update the uniform designs at lora:2 keep (parameter-weighted over targets)."""
    import copy

    import torch

    from cdka_search.alignment.energy import factor_sizes, topr_energies
    from cdka_search.plan import AdapterSettings
    from cdka_search.planner import resolve_budget

    _init_worker(str(folder), tasks, recipe)
    spec = model_spec(folder)
    budget = resolve_budget(spec, "lora:2")
    uniform = [p for p in (uniform_plan(spec, budget, r1, r2, AdapterSettings()) for r1, r2 in UNIFORM_PAIRS) if p]
    betas_out: dict = {}
    rows = []
    out("| task | update | " + " | ".join(ROLES) + " | all |")
    out("|---|---|" + "---:|" * (len(ROLES) + 1))
    for task in tasks:
        train, _ = _STATE[task]
        base = _STATE["base"]
        gen = torch.Generator().manual_seed(1000)
        names = [t.name for t in spec.targets]
        grads = {n: torch.zeros_like(base.get_submodule(n).weight) for n in names}
        model = copy.deepcopy(base)
        for _ in range(8):
            batch = train[torch.randint(len(train), (recipe.batch,), generator=gen)]
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch).loss.backward()
            for n in names:
                grads[n] += model.get_submodule(n).weight.grad
        tuned = fine_tune(task, None, SPECTRA_LR, 0, steps)[0]
        deltas = {n: tuned.get_submodule(n).weight.detach() - base.get_submodule(n).weight.detach() for n in names}
        for what, mats in (("early gradient (8 batches)", grads), (f"full FT delta ({steps} steps)", deltas)):
            betas = {role: [] for role in ROLES}
            for n, mat in mats.items():
                s = torch.linalg.svdvals(mat.double())
                betas[n.split(".")[-1]].append(fit_beta(s.tolist(), 1, len(s) // 2))
            mean = {r: statistics.fmean(v) for r, v in betas.items() if v}
            betas_out[(task, what)] = statistics.fmean(mean.values())
            out(f"| {task} | {what} | " + " | ".join(f"{mean[r]:.2f}" for r in ROLES)
                + f" | {statistics.fmean(mean.values()):.2f} |")
            for plan in uniform:
                kept, total = 0.0, 0.0
                for g in plan.groups:
                    d = g.design
                    for n in names:
                        if g.matches(n):
                            e = topr_energies(mats[n], *factor_sizes(*g.shape, d.r1, d.r2), d.r)[-1]
                            kept += float(e) * float(mats[n].pow(2).sum())
                            total += float(mats[n].pow(2).sum())
                rows.append((task, what, plan.groups[0].design.label(), kept / total))
    out()
    out("Share of ||update||^2 the best fit of each uniform lora:2 design keeps (all targets):")
    out()
    out("| task | update | " + " | ".join(r[2] for r in rows[: len(uniform)]) + " |")
    out("|---|---|" + "---:|" * len(uniform))
    for i in range(0, len(rows), len(uniform)):
        chunk = rows[i : i + len(uniform)]
        out(f"| {chunk[0][0]} | {chunk[0][1]} | " + " | ".join(f"{r[3]:.3f}" for r in chunk) + " |")
    return betas_out


def rescore(reports: list[Path], folder: Path, out) -> None:
    """Spearman's rho of today's scores and objectives vs -loss, read back from a written report.

    Each table row's groups column (role(r1,r2,r) ...) gives the designs; every group is rescored with
    the current scoring (weighted over the matrices as plan_scores does), so a report stays comparable
    after the scores change. Cells of several reports (run at the same lr and seeds) are pooled; a
    design listed twice counts once.
    """
    import re

    from cdka_search.candidates import Design
    from cdka_search.scoring import OBJECTIVES, score_designs, shape_weight

    spec = model_spec(folder)
    shapes = {t.name.split(".")[-1]: t.shape for t in spec.targets}
    counts = {role: sum(1 for t in spec.targets if t.name.endswith(role)) for role in shapes}
    cells: dict[str, list[tuple[float, dict[str, float]]]] = {}
    seen: set[tuple[str, str]] = set()
    cell = None
    lines = [line for report in reports for line in report.read_text(encoding="utf-8").splitlines()]
    for line in lines:
        if line.startswith("## ") and "budget" in line:
            cell = line[3:].split(" (")[0]
            cells.setdefault(cell, [])
        elif cell and line.startswith("| ") and "(" in line and "|" in line[2:] and not line.startswith("| design"):
            cols = [c.strip() for c in line.strip("|").split("|")]
            if cols[0] == "full fine-tuning" or "(= " in cols[0] or (cell, cols[-1]) in seen:
                continue
            seen.add((cell, cols[-1]))
            groups = re.findall(r"(\w+)\((\d+),(\d+),(\d+)\)", cols[-1])
            values: dict[str, float] = {}
            total = 0
            for role, r1, r2, r in groups:
                d = Design.from_paper(*shapes[role], int(r1), int(r2), int(r))
                weight = shape_weight(*d.shape) * counts[role] / len([g for g in groups if g[0] == role])
                total += weight
                for name in OBJECTIVES:
                    sc = score_designs([d], name)[0].scores
                    values[f"objective {name}"] = values.get(f"objective {name}", 0.0) + weight * sc.objective
                    for field in ("capacity", "alignment", "first_step", "speed"):
                        values[field] = values.get(field, 0.0) + weight * getattr(sc, field) / len(OBJECTIVES)
            values = {k: v / total for k, v in values.items()}
            values["params"] = float(cols[1].replace(",", ""))
            cells[cell].append((float(cols[3].split("+-")[0]), values))
    names = list(next(iter(cells.values()))[0][1]) if cells else []
    out("| cell | designs | " + " | ".join(names) + " |")
    out("|---|---:|" + "---:|" * len(names))
    for name, rows in cells.items():
        ys = [-loss for loss, _ in rows]
        out(f"| {name} | {len(rows)} | " + " | ".join(f"{spearman([v[n] for _, v in rows], ys):+.2f}" for n in names) + " |")


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
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 3 steps: the tests' run (seconds)")
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--budgets", nargs="*", type=int, default=None, help="LoRA ranks of the budgets")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-designs", type=int, default=None, help="adapter designs per budget (first ones kept)")
    parser.add_argument("--scaling", default="matched", help="adapter scaling rule (cdka_search.plan.SCALINGS)")
    parser.add_argument("--cells", nargs="*", default=None, help="task:rank cells (default: every task x budget)")
    parser.add_argument("--lr", default=None, help="ADAPTER:FULL fixed lrs instead of a calibration grid")
    parser.add_argument("--designs", nargs="*", default=None, help="keep only designs whose label contains one of these")
    parser.add_argument("--objectives", nargs="*", default=None, help="objectives whose plans to train (default: all)")
    parser.add_argument("--calibrate", default=None, help="task:rank cell that runs the lr grid (default: the first)")
    parser.add_argument("--reference", action="store_true", help="also a plan from a gradient probe of each task (--reference)")
    parser.add_argument("--write-task-data", type=Path, default=None, metavar="DIR",
                        help="write DIR/model (the pretrained model) and DIR/<task>.txt for cdka sweep --task lm, then stop")
    parser.add_argument("--rescore", type=Path, nargs="*", default=None, metavar="REPORT",
                        help="print Spearman's rho of today's scores against the losses of a written report")
    parser.add_argument("--spectra", action="store_true", help="only measure the update spectra (power-law fits)")
    parser.add_argument("--hidden", type=int, default=None, help="model width (default 256; a new width pretrains once)")
    parser.add_argument("--knees", nargs="*", type=float, default=[],
                        help="also plan with the rank objective's knee at each K (objectives rank@K)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    argv_text = list(sys.argv[1:] if argv is None else argv)
    recipe = SMOKE if args.smoke else FULL if args.hidden is None else widened(args.hidden)
    knee_objectives = register_knees(args.knees)
    if args.objectives is not None:
        args.objectives += [k for k in knee_objectives if k not in args.objectives]
    if args.smoke:
        args.steps, args.seeds, args.workers, args.max_designs = min(args.steps, 3), args.seeds or 2, 1, args.max_designs or 3
        args.budgets = args.budgets or [1]
    if args.quick:
        args.lr = args.lr or QUICK_LR
        args.designs = args.designs or list(QUICK_DESIGNS)
        args.objectives = ["rank"] if args.objectives is None else args.objectives
    tasks = args.tasks or (["prose"] if args.quick or args.smoke else list(TASKS))
    budgets = args.budgets or ([2] if args.quick else list(BUDGETS))
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    most = args.max_designs
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells] if args.cells else [(t, b) for t in tasks for b in budgets]
    tasks = list(dict.fromkeys(t for t, _ in cells))
    for t in tasks:
        corpus(t, recipe)  # unknown names fail before any work

    from cdka_search.plan import AdapterSettings
    from cdka_search.scoring import OBJECTIVES, Scores

    started = time.monotonic()
    lines: list[str] = []

    def out(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    folder = pretrained(recipe, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.rescore:
        out(f"# Today's scores vs the losses of {', '.join(map(str, args.rescore))} (loss at the shared lr)")
        out()
        rescore(args.rescore, folder, out)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return 0
    if args.write_task_data:
        write_task_data(args.write_task_data, folder, tasks, recipe)
        return 0
    if args.spectra:
        out(f"# Update spectra (benchmarks/validity_lm.py {' '.join(argv_text)})")
        out()
        out(f"Fitted beta of sigma_k ~ k^-beta (k = 1..d/2, least squares in log-log), mean over layers; full FT "
            f"{args.steps} steps at lr {SPECTRA_LR:g}, seed 0.")
        out()
        measure_spectra(folder, tasks, recipe, args.steps, out)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return 0
    spec = model_spec(folder)
    adapter = AdapterSettings(scaling=args.scaling)
    score_names = [f for f in Scores.__dataclass_fields__ if f != "objective"]
    if args.reference:
        _init_worker(str(folder), tasks, recipe)
    designs: dict[tuple[str, int], list[Entry]] = {}
    for rank in sorted({b for _, b in cells}):
        found = entries(spec, rank, adapter, list(OBJECTIVES) if args.objectives is None else args.objectives)
        adapters = [e for e in found if e.kind != "full" and (not args.designs or any(d in e.label for d in args.designs))]
        kept = {e.label for e in adapters}
        # A duplicate whose original was filtered out runs under its own name.
        adapters = [Entry(e.label.split(" (= ")[0], e.kind, e.plan) if "(= " in e.label and e.label.split(" (= ")[1][:-1] not in kept
                    else e for e in adapters]
        if most is not None:
            keep = [e for e in adapters if e.kind in ("lora", "paper") or e.label.startswith("plan ")][:most]
            keep += [e for e in adapters if e not in keep][: max(0, most - len(keep))]
            adapters = keep
        for t in [t for t, b in cells if b == rank]:
            full = [found[0]] if not args.designs or "full" in args.designs else []
            designs[(t, rank)] = full + adapters + ([reference_entry(spec, t, rank, adapter)] if args.reference else [])

    def lrs(entry: Entry):
        return FULL_LRS if entry.plan is None else ADAPTER_LRS

    def runs(t: str, rank: int) -> list[Entry]:
        return [e for e in designs[(t, rank)] if "(= " not in e.label]

    def run_key(rank: int, e: Entry) -> str:
        """Full fine-tuning is the same run in every cell of a task: one key, trained once."""
        return e.label if e.plan is None else f"{rank}|{e.label}"

    results: dict[tuple, float] = {}
    if args.lr:  # lrs given: no calibration cell
        calib, own = None, {}
        shared, full_lr = (float(v) for v in args.lr.split(":"))
    else:
        # Stage 1: every lr of the grid on seed 0, in the calibration cell.
        calib = cells[0] if args.calibrate is None else (args.calibrate.split(":")[0], int(args.calibrate.split(":")[1]))
        if calib not in designs:
            raise SystemExit(f"error: --calibrate {calib[0]}:{calib[1]} is not one of the task:budget cells run")
        jobs = [(calib[0], run_key(calib[1], e), e.plan, lr, seeds[0], args.steps) for e in runs(*calib) for lr in lrs(e)]
        for task, label, lr, seed, loss, _ in run_jobs(jobs, folder, tasks, recipe, args.workers, "lr grid, seed 0"):
            results[(task, label, lr, seed)] = loss
        # Every design's own best lr and the one shared lr (best mean log-loss over adapter designs).
        own = {e.label: min(lrs(e), key=lambda lr: results[(calib[0], run_key(calib[1], e), lr, seeds[0])])
               for e in runs(*calib)}
        mean_log = {lr: statistics.fmean(math.log(results[(calib[0], run_key(calib[1], e), lr, seeds[0])])
                                         for e in runs(*calib) if e.plan is not None) for lr in ADAPTER_LRS}
        shared = min(ADAPTER_LRS, key=lambda lr: mean_log[lr])
        full_lr = own.get("full fine-tuning", FULL_LRS[1])
    stage1 = time.monotonic() - started

    def lr_for(e: Entry) -> float:
        return full_lr if e.plan is None else shared

    # Stage 2: the calibration cell's other seeds at both lrs; every other cell at the shared lr.
    jobs, queued = [], set(results)
    for (t, rank) in designs:
        for e in runs(t, rank):
            key = run_key(rank, e)
            if (t, rank) == calib:
                wanted = [(lr, s) for lr in sorted({own[e.label], lr_for(e)}) for s in seeds[1:]]
            else:
                wanted = [(lr_for(e), s) for s in seeds]
            for lr, s in wanted:
                if (t, key, lr, s) not in queued:
                    queued.add((t, key, lr, s))
                    jobs.append((t, key, e.plan, lr, s, args.steps))
    for task, label, lr, seed, loss, _ in run_jobs(jobs, folder, tasks, recipe, args.workers, "seeds"):
        results[(task, label, lr, seed)] = loss

    out(f"# Real-training validity (benchmarks/validity_lm.py{' ' + ' '.join(argv_text) if argv_text else ''})")
    out()
    cfg = recipe.config
    out(f"Model: LLaMA-style, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, intermediate "
        f"{cfg['intermediate_size']}, {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, byte vocabulary, "
        f"{spec.total_params:,} parameters; pretrained {recipe.pretrain_steps} steps on Python stdlib code. Fine-tuning: "
        f"{args.steps} steps x {recipe.batch} x {recipe.seq_len} tokens, AdamW, warm-up {WARMUP} + cosine, adapter {adapter.scaling} "
        f"alpha {adapter.alpha:g}; seeds {seeds}. Loss = held-out causal-LM loss (nats/byte), mean +- spread (max - min) "
        f"over seeds. Shared lr: adapters {shared:g}, full fine-tuning {full_lr:g}"
        + (" (given)." if calib is None else
           f", the grid lr ({list(ADAPTER_LRS)}; full FT {list(FULL_LRS)}) best on average over the calibration cell "
           f"{calib[0]}:lora:{calib[1]} on seed 0, used in every cell. 'own lr' = the design's best grid lr there."))
    rho_rows = []
    for (t, rank) in designs:
        cell = designs[(t, rank)]
        is_calib = (t, rank) == calib
        out()
        limit = next(e.plan.budget_limit for e in cell if e.plan is not None)
        out(f"## {t}, budget lora:{rank} ({limit:,} parameters)" + (" (lr calibration cell)" if is_calib else ""))
        out()
        out("| design | params | rank bound | loss at shared lr | own lr | loss at own lr | groups |")
        out("|---|---:|---:|---:|---:|---:|---|")
        xs: dict[str, list[float]] = {n: [] for n in [f"objective {o}" for o in OBJECTIVES] + score_names + ["rank", "params"]}
        ys, ys_own = [], []
        for e in cell:
            base = e.label.split(" (= ")[1][:-1] if "(= " in e.label else e.label
            key = run_key(rank, Entry(base, e.kind, e.plan))
            m, sp = summary([results[(t, key, lr_for(e), s)] for s in seeds])
            own_text = "- | -"
            if is_calib:
                mo, so = summary([results[(t, key, own[base], s)] for s in seeds])
                own_text = f"{own[base]:g} | {mo:.4f} +- {so:.4f}"
            if e.plan is None:
                params, bound = sum(tt.weight_params for tt in spec.targets), "full"
            else:
                params = sum(g.params for g in e.plan.groups)
                bound = f"{plan_scores(e.plan, ['rank'])['rank']:.2f}"
            out(f"| {e.label} | {params:,} | {bound} | {m:.4f} +- {sp:.4f} | {own_text} | {describe(e.plan)} |")
            if e.plan is not None and "(= " not in e.label:
                sc = plan_scores(e.plan, score_names + ["rank"]) | objective_scores(e.plan)
                for n in sc:
                    xs[n].append(sc[n])
                xs["params"].append(params)
                ys.append(-m)
                if is_calib:
                    ys_own.append(-mo)
        rho_rows.append((f"{t} | lora:{rank} | shared lr", len(ys), {n: spearman(v, ys) for n, v in xs.items()}))
        if is_calib:
            rho_rows.append((f"{t} | lora:{rank} | own lr", len(ys), {n: spearman(v, ys_own) for n, v in xs.items()}))
    out()
    out("## Spearman rho of each score vs -loss over the distinct adapter designs of a cell")
    out()
    out("Scores are means over a plan's matrices weighted by d_out + d_in (as allocation weighs them); "
        "rank = log2(1 + r min(m1,n1) min(m2,n2)) / "
        "log2(1 + min(d_out, d_in)), the rank bound on a log scale without the cap at full rank.")
    out()
    names = list(rho_rows[0][2]) if rho_rows else []
    out("| task | budget | lr | designs | " + " | ".join(names) + " |")
    out("|---|---|---|---:|" + "---:|" * len(names))
    for label, n, rho in rho_rows:
        out(f"| {label} | {n} | " + " | ".join(f"{rho[k]:+.2f}" for k in names) + " |")
    out()
    out(f"({len(results)} runs, {time.monotonic() - started:.0f} s wall, stage 1 {stage1:.0f} s, {args.workers} workers)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
