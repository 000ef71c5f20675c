"""The sweep's search space: per plan group, a categorical choice among the planner's best designs.

Budget guarantee (no trial ever trains a plan over budget): the heuristic plan (``make_plan``) gives
every group a share of the budget; the unused remainder (limit - used) is split among groups in
proportion to their shares. A group's choices are designs whose ``count * params_each`` fits its own
share, so every combination of choices fits the budget by construction (:meth:`SearchSpace.plan_for`
checks it again). The sweep therefore refines designs at (nearly) equal cost per group; moving budget
between groups is the exact allocation's job (``cdka plan``).

Choices of a group, in this order (at most ``top_k + 2``):

1. the heuristic plan's design (so trial 0 is in the space);
2. the planner's ranking (``ScoreTable.ranked(cap)``) walked best first, keeping one design per
   (r1, r2) family (the best r that fits) and skipping "mirrored" designs whose A is larger than B
   (r1 > d_out / r1 or r2 > d_in / r2: the same design with the factors' roles swapped), until
   ``top_k`` families are in;
3. the best LoRA (r1 = r2 = 1) that fits, so LoRA stays in the comparison (``include_lora``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from cdka_search.budget import Budget
from cdka_search.candidates import CandidateSpace, Design, fit_max_r
from cdka_search.errors import SweepError
from cdka_search.limits import MAX_TOP_K, check_int
from cdka_search.plan import Plan
from cdka_search.scoring import ScoredDesign
from cdka_search.spec.model_spec import ModelSpec

_LABEL = re.compile(r"[0-9]+,[0-9]+,[0-9]+")  # choice_label's "r1,r2,r"

DEFAULT_TOP_K = 6


@dataclass(frozen=True)
class GroupChoices:
    """One plan group's categorical parameter: its name in the study and the designs it may take.
    ``count`` is the matrices its design is paid for: every layer's, and every expert of an expert tensor."""

    param: str
    index: int
    shape: tuple[int, int]
    count: int
    cap_each: int
    choices: tuple[ScoredDesign, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(choice_label(c.design) for c in self.choices)

    def design(self, label: str) -> ScoredDesign:
        for c in self.choices:
            if choice_label(c.design) == label:
                return c
        raise SweepError(f"{self.param}: {label!r} is not one of the choices {', '.join(self.labels)}")


def choice_label(design: Design) -> str:
    """The categorical value of a design: "r1,r2,r" (paper symbols)."""
    return f"{design.r1},{design.r2},{design.r}"


def is_choice_label(value: object) -> bool:
    """Whether ``value`` has the form choice_label writes (a stored study may hold anything)."""
    return isinstance(value, str) and _LABEL.fullmatch(value) is not None


def _mirrored(design: Design) -> bool:
    return design.m2 > design.m1 or design.n1 > design.n2


@dataclass(frozen=True)
class SearchSpace:
    """The heuristic plan, each group's choices, and the ranges of alpha and the learning rate."""

    heuristic: Plan
    groups: tuple[GroupChoices, ...]
    budget: Budget
    alpha_range: tuple[float, float] = (4.0, 256.0)
    lr_range: tuple[float, float] = (1e-4, 1e-1)

    def distributions(self) -> dict[str, Any]:
        """Parameter name -> the Optuna distribution a trial draws it from, in drawing order: one design
        label per group, then alpha and the learning rate (both log scale)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out: dict[str, Any] = {g.param: CategoricalDistribution(list(g.labels)) for g in self.groups}
        out["alpha"] = FloatDistribution(*self.alpha_range, log=True)
        out["lr"] = FloatDistribution(*self.lr_range, log=True)
        return out

    def heuristic_params(self, lr: float) -> dict[str, object]:
        """Trial 0: the planner's design everywhere, the plan's alpha and the task's default lr."""
        out: dict[str, object] = {g.param: choice_label(g.choices[0].design) for g in self.groups}
        out["alpha"] = float(self.heuristic.adapter.alpha)
        out["lr"] = float(lr)
        return out

    def plan_for(self, params: Mapping[str, object]) -> Plan:
        """The plan a trial's parameters describe; SweepError if it would exceed the budget."""
        groups = []
        for g, old in zip(self.groups, self.heuristic.groups):
            picked = g.design(str(params[g.param]))
            groups.append(replace(old, design=picked.design, scores=picked.scores.as_dict()))
        alpha = float(params.get("alpha", self.heuristic.adapter.alpha))
        plan = replace(self.heuristic, groups=tuple(groups), exact=None, gap=None).with_adapter(alpha=alpha)
        if plan.used_params > self.budget.limit:
            raise SweepError(f"trial plan uses {plan.used_params:,} parameters, over the budget {self.budget.limit:,}")
        return plan

    def fingerprint(self) -> str:
        """A short hash of everything a resumed study must share with the one it continues."""
        data = {
            "budget": self.budget.limit,
            "groups": [[g.param, list(g.shape), g.count, list(g.labels)] for g in self.groups],
            "alpha": list(self.alpha_range),
            "lr": list(self.lr_range),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def designs_by_shape(self) -> dict[tuple[int, int], list[Design]]:
        """Every design any trial may train, per shape (what a task must be able to scale)."""
        out: dict[tuple[int, int], list[Design]] = {}
        for g in self.groups:
            bucket = out.setdefault(g.shape, [])
            bucket.extend(c.design for c in g.choices if c.design not in bucket)
        return out


def _param_names(plan: Plan) -> list[str]:
    names = [g.modules[0] for g in plan.groups]
    return [
        f"{n}@{g.shape[0]}x{g.shape[1]}" if names.count(n) > 1 else n for n, g in zip(names, plan.groups)
    ]


def build_space(
    spec: ModelSpec,
    budget: str | int | Budget,
    *,
    objective: str = "rank",
    space: CandidateSpace = CandidateSpace(),
    top_k: int = DEFAULT_TOP_K,
    include_lora: bool = True,
    seed: int = 0,
    alpha_range: tuple[float, float] = (4.0, 256.0),
    lr_range: tuple[float, float] = (1e-4, 1e-1),
) -> SearchSpace:
    """The search space around ``make_plan(spec, budget)``; ``spec`` holds the selected targets only."""
    from cdka_search.fronts import front_of
    from cdka_search.planner import plan_from_fronts, resolve_budget, score_tables

    check_int(top_k, "top_k", SweepError, 1, MAX_TOP_K)
    limit = resolve_budget(spec, budget)
    tables = score_tables(spec, fit_max_r(space, spec.matrices, limit.limit), objective, seed=seed)
    # The heuristic plan is make_plan's, allocated from these same tables rather than scored again.
    heuristic = plan_from_fronts(spec, limit, {s: front_of(t) for s, t in tables.items()}, objective=objective)
    lora_tables = {}
    if include_lora:
        # the automatic cap fitted to the budget for each family: a LoRA of the whole budget may need a
        # higher rank than the Kronecker designs need components, and LoRA must stay in the comparison
        lora_space = fit_max_r(CandidateSpace(family="lora", max_r=space.max_r), spec.matrices, limit.limit)
        lora_tables = score_tables(spec, lora_space, objective, seed=seed)
    used = heuristic.used_params
    slack = max(0, limit.limit - used)
    groups = []
    for i, (name, g) in enumerate(zip(_param_names(heuristic), heuristic.groups)):
        share = g.params + (slack * g.params) // used if used else g.params
        matrices = g.count * g.experts
        cap_each = share // matrices
        table = tables[g.shape]
        picked: list[ScoredDesign] = [table.scored(j) for j in table.ranked(None) if table.design(j) == g.design][:1]
        if not picked:
            raise SweepError(f"{name}: the heuristic design {choice_label(g.design)} is not among the candidates")
        families = {(g.design.r1, g.design.r2)}
        for j in table.ranked(cap_each):
            if len(families) >= top_k:
                break
            d = table.design(j)
            if (d.r1, d.r2) in families or _mirrored(d):
                continue
            families.add((d.r1, d.r2))
            picked.append(table.scored(j))
        if include_lora and g.shape in lora_tables:
            lora = lora_tables[g.shape].ranked(cap_each)
            if lora:
                best = lora_tables[g.shape].scored(lora[0])
                if all(p.design != best.design for p in picked):
                    picked.append(best)
        groups.append(GroupChoices(name, i, g.shape, matrices, cap_each, tuple(picked)))
    worst = sum(g.count * max(c.design.params for c in g.choices) for g in groups)
    if worst > limit.limit:  # by construction; a failure here is a bug, not a user error
        raise SweepError(f"search space can exceed the budget: {worst:,} > {limit.limit:,}")
    return SearchSpace(heuristic=heuristic, groups=tuple(groups), budget=limit, alpha_range=alpha_range, lr_range=lr_range)
