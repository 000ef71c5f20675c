"""The data-free pipeline in one call: spec -> targets -> candidates -> scores -> allocation -> Plan."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping

from cdka_search.allocate import Allocation, Option, Unit, allocate_units
from cdka_search.budget import Budget, parse_budget
from cdka_search.candidates import CandidateSpace, Design, enumerate_candidates, fit_max_r, largest_params, spans
from cdka_search.documents import brief
from cdka_search.errors import ArgumentError, BudgetError, CdkaWarning, TargetError
from cdka_search.fronts import Front, front_of, is_shipped_setting, shipped_front
from cdka_search.limits import MAX_DIM, MAX_SEED, check_int
from cdka_search.matching import ModuleIndex, match_groups, raise_problems, summarise
from cdka_search.plan import AdapterSettings, Plan, PlanGroup, heads_text
from cdka_search.scoring import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    ScoredDesign,
    ScoreTable,
    SpectrumCache,
    score_shape,
    shape_weight,
)
from cdka_search.spec.model_spec import ModelSpec, TargetModule
from cdka_search.targets import PRESET_SELECTIONS, select_targets, selection_items


@dataclass(frozen=True)
class ExplainRow:
    """One ranked candidate of a shape, for ``cdka explain``."""

    design: Design
    scores: dict[str, float]
    pareto: bool


def score_tables(
    spec: ModelSpec,
    space: CandidateSpace,
    objective: str,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[tuple[int, int], ScoreTable]:
    """One score table per distinct target shape: cost follows shapes, not layers."""
    cache = SpectrumCache(samples, seed)
    return {shape: score_shape(*shape, space, objective, spectra=cache) for shape in sorted(spec.shapes)}


def _group_patterns(role: str, members: list[TargetModule], index: ModuleIndex, role_hits: dict[str, list[str]]) -> tuple[str, ...]:
    """The role glob when it matches exactly these members among all the model's targets, else their names.

    ``role_hits`` memoises each role glob's matches, so a per-layer plan looks each role up once.
    """
    if "*" in role:
        if role not in role_hits:
            role_hits[role] = index.find(role)
        hits = role_hits[role]
        if len(hits) == len(members) and set(hits) == {m.name for m in members}:
            return (role,)
    return tuple(m.name for m in members)


def resolve_budget(spec: ModelSpec, budget: str | int | Budget) -> Budget:
    """A Budget for ``spec``'s selected targets ("lora:8" counts LoRA on exactly those)."""
    if isinstance(budget, Budget):
        return budget
    return parse_budget(str(budget), total_params=spec.total_params, targets=spec.targets)


def _picked_for(target: TargetModule, picked: Mapping[Any, ScoredDesign]) -> ScoredDesign:
    """The design picked for the target's name, else for its role and shape, else for its shape."""
    for key in (target.name, (target.role, target.shape), target.shape):
        if key in picked:
            return picked[key]
    raise KeyError(target.name)


def build_plan(
    spec: ModelSpec,
    budget: Budget,
    picked: Mapping[Any, ScoredDesign],
    *,
    objective: str = "rank",
    adapter: AdapterSettings = AdapterSettings(),
    allocation: Allocation | None = None,
    per_layer: bool = False,
) -> Plan:
    """The Plan giving every selected target the design picked for it (see :func:`_picked_for`).

    Groups follow roles (``model.layers.*.mlp.up_proj``) and designs, so a plan reads like the
    model; ``per_layer`` lists every module as its own group.
    """
    groups = []
    # Every target of the model, selected or not: a role glob matching more than its group's members
    # there would claim modules the plan leaves out (``--targets 'model.layers.1*.mlp.*'``).
    index, role_hits = ModuleIndex([*(t.name for t in spec.targets), *spec.unselected]), {}
    for role, members in spec.roles().items():
        by_design: dict[tuple, list[TargetModule]] = {}
        for m in members:
            best = _picked_for(m, picked)
            key = (m.name,) if per_layer else (m.shape, m.experts, best.design)
            by_design.setdefault(key, []).append(m)
        for same in by_design.values():
            first = same[0]
            best = _picked_for(first, picked)
            groups.append(
                PlanGroup(
                    modules=_group_patterns(role, same, index, role_hits),
                    shape=first.shape,
                    count=len(same),
                    design=best.design,
                    kind=first.kind,
                    scores=best.scores.as_dict(),
                    experts=first.experts,
                )
            )
    return Plan(
        model_name=spec.name,
        model_source=spec.source,
        total_params=spec.total_params,
        budget_spec=budget.spec,
        budget_limit=budget.limit,
        groups=tuple(groups),
        adapter=adapter,
        objective=objective,
        exact=allocation.exact if allocation else None,
        gap=allocation.gap if allocation else None,
        modules_to_save=spec.modules_to_save,
    )


def score_fronts(
    spec: ModelSpec,
    space: CandidateSpace,
    objective: str,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[tuple[int, int], Front]:
    """The Pareto front of every distinct target shape: shipped for preset shapes under default
    settings (no numpy needed), computed otherwise."""
    if is_shipped_setting(space, objective, samples, seed):
        shipped = {shape: shipped_front(shape) for shape in sorted(spec.shapes)}
        if all(front is not None for front in shipped.values()):
            return shipped  # type: ignore[return-value]
    return {shape: front_of(t) for shape, t in score_tables(spec, space, objective, samples=samples, seed=seed).items()}


def allocate_fronts(
    fronts: Mapping[Any, Front], counts: Mapping[Any, int], weights: Mapping[Any, float], budget: Budget
) -> tuple[dict[Any, ScoredDesign], Allocation]:
    """Pick one front design per unit: cost count * params, value weight * count * objective."""
    floor = sum(counts[k] * front[0].design.params for k, front in fronts.items())  # front[0] is the cheapest
    if floor > budget.limit:
        raise BudgetError(
            f"budget {brief(budget.spec)} ({budget.limit:,} parameters) is below the cheapest adapter the candidate "
            f"space allows on these targets: {floor:,} parameters (the cheapest design of every target, under any "
            f"pins such as --r); raise the budget, narrow --targets or relax the pins"
        )
    keys = list(fronts)
    options = front_options(fronts)
    result = allocate_units([Unit(options[k], counts[k], weights[k]) for k in keys], budget.limit)
    picked = {k: fronts[k][i] for k, i in zip(keys, result.choice)}
    return picked, result


def front_options(fronts: Mapping[Any, Front]) -> dict[Any, tuple[Option, ...]]:
    """Every front as allocation options (params, objective). Equal fronts share one tuple, so that the
    allocator treats them once: a reference plan gives every module its own front object, mostly
    equal to the others of its shape."""
    by_object: dict[int, tuple[Option, ...]] = {}
    by_content: dict[tuple[Option, ...], tuple[Option, ...]] = {}
    options = {}
    for k, front in fronts.items():
        if id(front) not in by_object:
            content = tuple((s.design.params, s.scores.objective) for s in front)
            by_object[id(front)] = by_content.setdefault(content, content)
        options[k] = by_object[id(front)]
    return options


def _check_family_adapts(chosen: ModelSpec, space: CandidateSpace) -> None:
    """TargetError when ``--family lokr`` meets targets no LoKr tool adapts (PEFT LoKr and LyCORIS take
    nn.Linear modules only): the plan would be one no export can write."""
    if space.family != "lokr":
        return
    other = list(dict.fromkeys(t.role for t in chosen.targets if t.kind != "linear"))
    if other:
        said = {"conv1d": "transformers Conv1D", "experts": "3-D expert tensors"}
        kinds = sorted({said.get(t.kind, t.kind) for t in chosen.targets if t.kind != "linear"})
        raise TargetError(
            f"--family lokr: PEFT LoKr and LyCORIS adapt nn.Linear modules only, and {len(other)} target group(s) are "
            f"{' / '.join(kinds)} ({summarise(other, sep=', ')}); plan them with --family lora (PEFT LoRA adapts them) "
            "or leave them out with --targets"
        )


def adaptable_selection(spec: ModelSpec, targets: str, space: CandidateSpace) -> tuple[ModelSpec, tuple[TargetModule, ...]]:
    """The selection's targets, and those it leaves out: where only preset selections (all-linear, attn,
    ...) chose them, the weights no design of the space adapts for fewer parameters than the weight
    itself (ELECTRA's 1 x hidden discriminator head under --family lora), one of which refused the whole
    plan. A weight the selection names is kept, and scoring refuses it by name."""
    chosen = select_targets(spec, targets)
    if not all(item in PRESET_SELECTIONS for item in selection_items(targets)):
        return chosen, ()
    bare = {shape for shape in {t.shape for t in chosen.targets} if not spans(*shape, space)}
    left = tuple(t for t in chosen.targets if t.shape not in bare)
    if not bare or not left:
        return chosen, ()
    return chosen.with_targets(left), tuple(t for t in chosen.targets if t.shape in bare)


def adaptable_targets(spec: ModelSpec, targets: str, space: CandidateSpace) -> ModelSpec:
    """adaptable_selection's targets, with one warning naming what it leaves out."""
    chosen, dropped = adaptable_selection(spec, targets, space)
    if dropped:
        shapes = ", ".join(f"{d_out}x{d_in}" for d_out, d_in in sorted({t.shape for t in dropped}))
        warnings.warn(
            f"{summarise([t.name for t in dropped], shown=3, sep=', ')} ({shapes}): no design of --family {space.family} "
            f"adapts it for fewer parameters than the weight itself, so --targets {targets} leaves it out (fine-tune "
            "it directly, or plan it with another --family)", CdkaWarning, stacklevel=3,
        )
    return chosen


def make_plan(
    spec: ModelSpec,
    budget: str | int | Budget = "0.5%",
    *,
    targets: str = "all-linear",
    objective: str = "rank",
    space: CandidateSpace = CandidateSpace(),
    adapter: AdapterSettings = AdapterSettings(),
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    reference: Mapping[str, Any] | None = None,
    per_layer: bool = False,
    all_pairs: bool = False,
    device: str | None = "auto",
) -> Plan:
    """Plan adapters for ``spec`` within ``budget``.

    Data-free (default): same-shape targets share one design, scored once per shape. With a
    ``reference`` (module name -> reference update tensor, see cdka_search.alignment) every module
    is scored on its own update and weighted by that update's energy: a per-layer plan
    (``all_pairs`` measures every divisor pair instead of the data-free front's; the energies run on
    ``device``: cpu, cuda or auto).
    """
    check_int(seed, "seed", ArgumentError, 0, MAX_SEED)
    check_int(samples, "samples", ArgumentError, 1, 1 << 16)
    chosen = adaptable_targets(spec, targets, space)
    _check_family_adapts(chosen, space)
    limit = resolve_budget(chosen, budget)
    space = fit_max_r(space, chosen.matrices, limit.limit)
    if reference is None:
        fronts = score_fronts(chosen, space, objective, samples=samples, seed=seed)
        return plan_from_fronts(chosen, limit, fronts, objective=objective, adapter=adapter, per_layer=per_layer)
    from cdka_search.alignment.planning import ReferenceScores

    scores = ReferenceScores(chosen, reference, space, objective, seed=seed, all_pairs=all_pairs, device=device)
    counts = {t.name: t.experts for t in chosen.targets if t.name in scores.tables}  # an expert tensor pays for every expert
    fronts = {k: front_of(t) for k, t in scores.tables.items()}
    while True:  # allocate on bounded energies; measure what the choice rests on; until nothing does
        picked, result = allocate_fronts(fronts, counts, scores.weights, limit)
        rescored = scores.refine({k: s.design for k, s in picked.items()})
        if not rescored:
            break
        fronts.update({k: front_of(scores.tables[k]) for k in rescored})
    return build_plan(chosen, limit, picked, objective=objective, adapter=adapter, allocation=result, per_layer=True)


def allocation_units(spec: ModelSpec, per_layer: bool = False) -> dict[Any, tuple[tuple[int, int], int]]:
    """The finer units a budget's remainder is spent on, each with its shape and the matrices it pays for
    (an expert tensor counts every expert): a role of one shape (``model.layers.*.mlp.up_proj``), or
    with ``per_layer`` every target."""
    units: dict[Any, tuple[tuple[int, int], int]] = {}
    for t in spec.targets:
        key = t.name if per_layer else (t.role, t.shape)
        units[key] = (t.shape, units[key][1] + t.experts if key in units else t.experts)
    return units


def plan_from_fronts(
    spec: ModelSpec,
    budget: Budget,
    fronts: Mapping[tuple[int, int], Front],
    *,
    weights: Mapping[tuple[int, int], float] | None = None,
    objective: str = "rank",
    adapter: AdapterSettings = AdapterSettings(),
    per_layer: bool = False,
) -> Plan:
    """Allocate ``budget`` over ``fronts`` (by shape) into a Plan, in two exact stages.

    1. One design per shape: a unit's value is weight * matrices * objective (``weights`` by shape,
       default scoring.shape_weight). This is the allocation benchmarks/validity_lm.py measured.
    2. What that leaves is spent on :func:`allocation_units`, each choosing on its shape's front from
       the stage-1 design upwards. One design per shape is coarser than the plan's groups: on
       LLaMA-2-7B one more LoRA rank on all 128 q/k/v/o matrices costs 1.05M parameters, and a 0.05 %
       budget (3.37M) was left 11.5 % unspent. Only upgrades are offered, so a remainder never turns
       a measured uniform design into a mixture of others.
    """
    by_shape = {shape: shape_weight(*shape) for shape in fronts} if weights is None else weights
    counts = spec.matrices
    picked, result = allocate_fronts(fronts, counts, by_shape, budget)
    units = allocation_units(spec, per_layer)
    # each shape's front from its stage-1 design on: one tuple per shape, so the allocator sees it once
    upward = {shape: fronts[shape][fronts[shape].index(picked[shape]):] for shape in fronts}
    left = budget.limit - sum(counts[shape] * picked[shape].design.params for shape in fronts)
    steps = [count * (upward[shape][1].design.params - upward[shape][0].design.params)
             for shape, count in units.values() if len(upward[shape]) > 1]
    if steps and min(steps) <= left:
        picked, result = allocate_fronts(
            {k: upward[shape] for k, (shape, _) in units.items()},
            {k: count for k, (_, count) in units.items()},
            {k: by_shape[shape] for k, (shape, _) in units.items()},
            budget,
        )
    return build_plan(spec, budget, picked, objective=objective, adapter=adapter, allocation=result, per_layer=per_layer)


#: A plan using less of its budget than this says why (:func:`unspent_reason`).
UNSPENT_SHARE = 0.9


def unspent_reason(plan: Plan, space: CandidateSpace = CandidateSpace()) -> str | None:
    """Why a plan leaves more than 1 - UNSPENT_SHARE of its budget unspent, or None: no group has a
    larger candidate (full rank, --max-r, the frozen weight's size), or the cheapest larger one
    costs more than what is left."""
    left = plan.budget_limit - plan.used_params
    if plan.used_params >= UNSPENT_SHARE * plan.budget_limit:
        return None
    matrices: dict[tuple[int, int], int] = {}
    for g in plan.groups:
        matrices[g.shape] = matrices.get(g.shape, 0) + g.count * g.experts
    space = fit_max_r(space, matrices, plan.budget_limit)  # the cap make_plan planned with
    steps = []
    for g in plan.groups:
        larger = [d.params for d in enumerate_candidates(*g.shape, space) if d.params > g.design.params]
        if larger:
            steps.append(((min(larger) - g.design.params) * g.count * g.experts, g.modules[0]))
    if not steps:
        uncapped = replace(space, max_r=MAX_DIM)
        capped = space.r is None and any(largest_params(*g.shape, uncapped) > g.design.params for g in plan.groups)
        advice = f"raise --max-r (now {space.cap}), widen --targets or lower the budget" if capped else \
            "widen --targets or lower the budget"
        return (f"the budget cannot be spent usefully on these targets: no candidate goes past full rank, --max-r, or the "
                f"size of the frozen weight it adapts (where fine-tuning the weight is cheaper and exact), so {left:,} "
                f"parameters are left unspent; {advice}")
    cost, where = min(steps)
    finer = "" if all(g.count == 1 for g in plan.groups) else "; --per-layer spends it module by module"
    return (f"{left:,} parameters are left unspent: the cheapest larger design, on {where}, costs {cost:,} more "
            f"than its group has now{finer}")


def record_model_path(plan: Plan, model: str) -> Plan:
    """``plan`` noting the local folder or file it was made from (absolute), so that export and
    validate find the model again without --model; unchanged for a preset or alias."""
    from pathlib import Path

    path = Path(model).expanduser()
    return replace(plan, model_path=str(path.resolve())) if path.exists() else plan


def plan_model(plan: Plan, model: str | None) -> tuple[ModelSpec, str] | None:
    """The model to check ``plan`` against and the name of what was read: ``model`` if given, else the
    preset a preset plan names (a ``path`` beside it is not read), else the local path the plan
    recorded (ModelSourceError if it is gone), else None (a plan of a live module: only the module can
    check it)."""
    from pathlib import Path

    from cdka_search.errors import ModelSourceError
    from cdka_search.spec import load_spec

    if model:
        return load_spec(model), model
    if plan.model_source == "preset":
        return load_spec(plan.model_name), f"preset {plan.model_name}"
    if plan.model_path is None:
        return None
    if not Path(plan.model_path).exists():
        raise ModelSourceError(f"the plan was made from {plan.model_path}, which no longer exists; give the model with --model")
    return load_spec(plan.model_path), plan.model_path


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x11008"`` -> (4096, 11008); each side an integer in [1, MAX_DIM]."""
    import re

    match = re.fullmatch(r"\s*(\d{1,30})\s*[xX*,]\s*(\d{1,30})\s*", text)
    if not match:
        raise TargetError(f"--shape {brief(text)}: expected two positive sizes like 4096x11008")
    d_out, d_in = int(match.group(1)), int(match.group(2))
    for size in (d_out, d_in):
        if not 1 <= size <= MAX_DIM:
            raise TargetError(f"--shape {brief(text)}: each size must be in [1, {MAX_DIM:,}]")
    return d_out, d_in


def shape_budget(text: str, d_out: int, d_in: int) -> int:
    """The parameter limit ``text`` means for one d_out x d_in weight ("lora:8" is LoRA rank 8 on it)."""
    return parse_budget(text, total_params=d_out * d_in, targets=(TargetModule("weight", d_out, d_in),)).limit


def explain_shape(
    d_out: int,
    d_in: int,
    *,
    max_params: int | None = None,
    objective: str = "rank",
    space: CandidateSpace = CandidateSpace(),
    top: int = 15,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[ExplainRow]:
    """The best ``top`` candidates of a shape by objective, within ``max_params`` if given."""
    check_int(top, "--top", ArgumentError, 1, 100_000)
    check_int(seed, "seed", ArgumentError, 0, MAX_SEED)
    check_int(samples, "samples", ArgumentError, 1, 1 << 16)
    for size in (d_out, d_in):
        check_int(size, "--shape", TargetError, 1, MAX_DIM)
    if max_params is not None:
        space = fit_max_r(space, {(d_out, d_in): 1}, max_params)
    table = score_shape(d_out, d_in, space, objective, spectra=SpectrumCache(samples, seed))
    front = set(table.pareto())
    ranked = table.ranked(max_params)
    if not ranked:
        cheapest = int(table.params.min())
        raise BudgetError(f"no candidate of {d_out}x{d_in} fits {max_params:,} parameters; the smallest needs {cheapest:,}")
    rows: list[ExplainRow] = []
    seen: set[tuple[int, int, float]] = set()
    for i in ranked:
        # A design and its mirror (r1 <-> d_out/r1, r2 <-> d_in/r2) tie on every allocation score;
        # list the one with the smaller r1 (ranked first) only.
        key = (int(table.params[i]), int(table.rank_bound[i]), round(float(table.objective[i]), 12))
        if key in seen:
            continue
        seen.add(key)
        s = table.scored(i)
        rows.append(ExplainRow(s.design, s.scores.as_dict(), i in front))
        if len(rows) == top:
            break
    return rows


def plan_problems(plan: Plan, spec: ModelSpec) -> list[str]:
    """Every way ``plan`` does not fit ``spec``: missing modules, counts, shapes, kinds, budget (one pass)."""
    by_name = {t.name: t for t in spec.targets}
    found = match_groups(
        [g.modules for g in plan.groups], ModuleIndex(by_name), counts=[g.count for g in plan.groups], model=spec.name
    )
    problems = list(found.problems)
    for g, hits in zip(plan.groups, found.hits):
        if g.design.params >= g.shape[0] * g.shape[1]:
            problems.append(
                f"group {g.modules[0]!r}: its design has {g.design.params:,} parameters per matrix, not fewer than the "
                f"{g.shape[0]}x{g.shape[1]} weight's {g.shape[0] * g.shape[1]:,} (fine-tune the weight instead)"
            )
        # One problem per group and mismatch, naming its first module: a plan for another model
        # stays a readable line however many layers it has.
        wrong: dict[str, list[str]] = {}
        for n in hits:
            t = by_name[n]
            if t.shape != g.shape:
                wrong.setdefault(f"the model's weight is {t.d_out}x{t.d_in}, the plan says {g.shape[0]}x{g.shape[1]}", []).append(n)
            elif t.kind != g.kind:
                wrong.setdefault(f"the model has a {t.kind} module, the plan says {g.kind}", []).append(n)
            elif t.experts != g.experts:
                wrong.setdefault(f"the model has {t.experts} experts, the plan says {g.experts}", []).append(n)
        for what, names in wrong.items():
            more = f" (and {len(names) - 1} more of group {g.modules[0]!r})" if len(names) > 1 else ""
            problems.append(f"module {names[0]}: {what}{more}")
    if plan.total_params != spec.total_params:
        problems.append(
            f"model.total_params is {plan.total_params:,} but {spec.name} has {spec.total_params:,} (a plan for another model?)"
        )
    if dict(plan.modules_to_save) != dict(spec.modules_to_save):
        problems.append(f"modules_to_save is {heads_text(plan.modules_to_save)} but {spec.name}'s new task head is "
                        f"{heads_text(spec.modules_to_save)}")
    return problems


def check_plan(plan: Plan, spec: ModelSpec) -> None:
    """Raise PlanError listing every problem of ``plan`` against ``spec``."""
    raise_problems(plan_problems(plan, spec))
