"""The plan document: a versioned, validated description of every adapter to build.

Schema (version 1), YAML or JSON::

    cdka_plan: 1
    model: {name, source, total_params}
    budget: {spec, limit, used}
    objective: balanced
    adapter: {alpha, scaling, scale, init, dtype, dropout}
    allocation: {exact, gap}                       # optional, written by the planner
    modules_to_save: {classifier: 1538}            # optional: a task model's new head -> its parameters,
                                                   # trained whole beside the adapters (PEFT's modules_to_save)
    sweep: {study, storage, task, steps, best_trial, best_value, trial0_value,
            improvement, improvement_pct, lr}      # optional, written by cdka sweep (at the end)
    groups:
      - modules: "model.layers.*.mlp.up_proj"       # a pattern (cdka_search.patterns: * stays inside
                                                    # one dotted part, ** crosses parts) or exact name, or a list
        kind: linear                                # or conv1d (GPT-2, weight stored in x out), or
                                                    # experts (3-D MoE parameter, experts x out x in)
        experts: 8                                  # only for kind experts: factors per expert
        shape: [11008, 4096]                        # [d_out, d_in]
        count: 32                                   # modules the patterns must match
        left: [5504, 8]                             # B_i: m1 x n1
        right: [2, 512]                             # A_i: m2 x n2
        r: 4                                        # components
        r1: 2                                       # = m2 (paper)
        r2: 8                                       # = n1 (paper)
        params_each: 69632                          # r * (m1*n1 + m2*n2)
        rank_bound: 64                              # min(d_out, d_in, r*min(m1,n1)*min(m2,n2))
        scores: {capacity, alignment, first_step, objective}   # optional
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from cdka_search.budget import budget_for
from cdka_search.candidates import Design
from cdka_search.documents import (
    MAX_YAML_BYTES,
    YAML12_FLOAT,
    JsonLimits,
    brief,
    named,
    read_file_bytes,
    read_json,
    read_text_file,
    read_yaml,
    reject_unknown,
    strict_dataclass,
)
from cdka_search.errors import BudgetError, PlanError
from cdka_search.fileio import absent, atomic_write_text
from cdka_search.limits import MAX_DIM, MAX_EXPERTS, MAX_MODULES, MAX_TOTAL_PARAMS, check_int
from cdka_search.matching import match_groups, raise_problems
from cdka_search.patterns import MAX_PATTERN_CHARS, match_module
from cdka_search.scoring import OBJECTIVES

SCHEMA_VERSION = 1
SCALINGS = ("alpha/sqrt(r*r2)", "matched", "alpha/r", "alpha/sqrt(r)", "fixed")
#: Scalings whose A factors start with LoRA's entry size (bound 1/sqrt(d_in)) rather than 1/sqrt(d_in/r2).
LORA_INIT_SCALINGS = ("matched",)
INITS = ("kaiming-A-zero-B", "gradient-aligned")
DTYPES = ("float32", "float64", "bfloat16", "float16")
KINDS = ("linear", "conv1d", "experts")
# A group is about one object, five arrays and twenty elements: room for 100,000 groups in 16 MB.
PLAN_JSON_LIMITS = JsonLimits(16 * 1024 * 1024, 200_000, 600_000, 2_000_000)
MAX_ALPHA = 1e6  # |alpha| and |scale|; real plans use 1 to 256
MAX_SAVED_MODULES = 64  # a task head is one to three modules
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]{1,128}(\.[A-Za-z0-9_]{1,128}){0,15}")


def a_fan_in(scaling: str, d_in: int, n2: int) -> int:
    """The fan-in that bounds the initial A entries: d_in under a LoRA-init scaling, else n2 = d_in / r2."""
    return d_in if scaling in LORA_INIT_SCALINGS else n2


class _Report:
    """Collects every problem of a document, so one error lists them all (bounded: a hostile file
    with a million bad groups still gives one short line)."""

    LIMIT = 20

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def check(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, or None with its PlanError recorded."""
        try:
            return fn(*args, **kwargs)
        except PlanError as exc:
            self.add(str(exc))
            return None

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        shown = self.problems[: self.LIMIT]
        more = f" | and {len(self.problems) - self.LIMIT} more" if len(self.problems) > self.LIMIT else ""
        count = f"{len(self.problems)} problems: " if len(self.problems) > 1 else ""
        raise PlanError(count + " | ".join(shown) + more)


def _require(data: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise PlanError(f"{where}: missing key(s) {', '.join(missing)}")


def _int(value: Any, where: str, low: int = 1, high: int = MAX_DIM) -> int:
    return check_int(value, where, PlanError, low, high)


def _number(value: Any, where: str, low: float = -math.inf, high: float = math.inf, *, open_high: bool = False) -> float:
    """A finite real number (int or float, not bool, not a string) in [low, high] (or [low, high))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{where}: expected a number, got {brief(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise PlanError(f"{where}: {brief(value)} is out of range") from None
    if not math.isfinite(number):
        raise PlanError(f"{where}: must be a finite number, got {brief(value)}")
    if number < low or number > high or (open_high and number >= high):
        closing = ")" if open_high else "]"
        raise PlanError(f"{where}: {brief(value)} is outside [{low:g}, {high:g}{closing}")
    return number


def _text(value: Any, where: str, limit: int = 4096) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise PlanError(f"{where}: expected a non-empty text of at most {limit} characters, got {brief(value)}")
    return value


def _choice(value: Any, allowed: Iterable[str], where: str) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise PlanError(f"{where}: {brief(value)} is not one of {', '.join(allowed)}")
    return value


def _count_as_text(value: Any) -> Any:
    """A budget spec a hand-written plan gives as a number (``spec: 200000``, or ``spec: 2e5``, which YAML
    1.2 reads as a number) as the count it means; anything else as it is, for the text check."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value == int(value):
        return str(int(value))
    return value


def _is_int(value: Any, expected: int) -> bool:
    """``value`` is the integer ``expected``: not a float or bool that compares equal (1.0, True)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == expected


def _pair(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PlanError(f"{where}: expected [rows, cols], got {brief(value)}")
    a, b = (_int(v, where) for v in value)
    return a, b


def scaling_value(scaling: str, alpha: float, r: int, r2: int, scale: float | None = None) -> float:
    """lambda for one adapter (cdka-notes.md section 3, docs/validity.md "Scaling").

    ``alpha/sqrt(r*r2)`` (the paper's) keeps E||grad_B||^2 and the first update's norm independent of
    the design, but A then starts sqrt(r2) times larger than LoRA's, so under Adam (steps of about lr
    per entry) A turns sqrt(r2) times slower relative to its size. ``matched`` starts A at LoRA's
    size and uses lambda = alpha/sqrt(r): both the B-path and the A-path updates of every design then
    have LoRA-with-rsLoRA's Frobenius norm at the same lr (derived), so one lr serves every design.
    """
    if scaling == "fixed":
        if scale is None:
            raise PlanError("scaling 'fixed' needs a scale value (adapter.scale in the plan)")
        return float(scale)
    denominators = {"alpha/sqrt(r*r2)": math.sqrt(r * r2), "matched": math.sqrt(r), "alpha/r": float(r), "alpha/sqrt(r)": math.sqrt(r)}
    if scaling not in denominators:
        raise PlanError(f"unknown scaling {scaling!r}: allowed are {', '.join(SCALINGS)}")
    return float(alpha) / denominators[scaling]


@dataclass(frozen=True)
class AdapterSettings:
    """How every adapter of the plan is built (cdka-notes.md section 3).

    alpha: numerator of the scaling lambda. scaling: "matched" (default: LoRA-sized A and
    lambda = alpha/sqrt(r), so one lr serves every design; docs/validity.md), "alpha/sqrt(r*r2)" (the
    paper's), "alpha/r", "alpha/sqrt(r)", or "fixed" (lambda = ``scale``).
    init: "kaiming-A-zero-B" (dW = 0 at step 0) or "gradient-aligned". dtype: adapter weights'
    dtype (float32 whatever the base model's). dropout: on the adapter input.
    """

    alpha: float = 64.0
    scaling: str = "matched"
    scale: float | None = None
    init: str = "kaiming-A-zero-B"
    dtype: str = "float32"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        report = _Report()
        report.check(_number, self.alpha, "adapter.alpha", -MAX_ALPHA, MAX_ALPHA)
        report.check(_choice, self.scaling, SCALINGS, "adapter.scaling")
        if self.scale is not None:
            report.check(_number, self.scale, "adapter.scale", -MAX_ALPHA, MAX_ALPHA)
        elif self.scaling == "fixed":
            report.add("adapter.scaling 'fixed' needs adapter.scale")
        report.check(_choice, self.init, INITS, "adapter.init")
        report.check(_choice, self.dtype, DTYPES, "adapter.dtype")
        report.check(_number, self.dropout, "adapter.dropout", 0.0, 1.0, open_high=True)
        report.raise_if_any()

    def scaling_value(self, design: Design) -> float:
        """lambda for one design."""
        return scaling_value(self.scaling, self.alpha, design.r, design.r2, self.scale)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["scale"] is None:
            del out["scale"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "AdapterSettings":
        return strict_dataclass(cls, data, "adapter")


@dataclass(frozen=True)
class PlanGroup:
    """Modules sharing one design: patterns (globs or exact names), shape, kind and design."""

    modules: tuple[str, ...]
    shape: tuple[int, int]
    count: int
    design: Design
    kind: str = "linear"
    scores: Mapping[str, float] = field(default_factory=dict)
    experts: int = 1

    def __post_init__(self) -> None:
        # Checked for every group, however made: a plan built in code gets the bounds a file gets,
        # so apply_plan never meets an r whose tensors could not be allocated.
        d = self.design
        if d.shape != tuple(self.shape) or not 1 <= d.r <= min(self.shape) or min(d.m1, d.n1, d.m2, d.n2) < 1:
            raise PlanError(
                f"group {brief(self.modules[0] if self.modules else '')}: design {d.label()} with r = {brief(d.r)} does not fit "
                f"{self.shape[0]}x{self.shape[1]} (the factors must multiply to the shape and 1 <= r <= {min(self.shape)})"
            )
        if not 1 <= self.count <= MAX_MODULES or not 1 <= self.experts <= MAX_EXPERTS:
            raise PlanError(f"group {brief(self.modules[0] if self.modules else '')}: count or experts out of range")

    @property
    def params_each(self) -> int:
        """Trainable parameters of one module (every expert of an expert tensor counted)."""
        return self.experts * self.design.params

    @property
    def params(self) -> int:
        return self.count * self.params_each

    def matches(self, name: str) -> bool:
        return any(match_module(name, p) for p in self.modules)

    def to_dict(self) -> dict[str, Any]:
        d = self.design
        out: dict[str, Any] = {
            "modules": self.modules[0] if len(self.modules) == 1 else list(self.modules),
            "kind": self.kind,
            **({"experts": self.experts} if self.kind == "experts" else {}),
            "shape": list(self.shape),
            "count": self.count,
            "left": [d.m1, d.n1],
            "right": [d.m2, d.n2],
            "r": d.r,
            "r1": d.r1,
            "r2": d.r2,
            "params_each": self.params_each,
            "rank_bound": d.rank_bound,
        }
        if self.scores:
            out["scores"] = dict(self.scores)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "PlanGroup":
        """A validated group; every problem of it is one PlanError listing them all."""
        report = _Report()
        group = report.check(cls._from_dict, data, where, report)
        report.raise_if_any()
        return group

    @classmethod
    def _from_dict(cls, data: Any, where: str, report: _Report) -> "PlanGroup":
        keys = ("modules", "kind", "experts", "shape", "count", "left", "right", "r", "r1", "r2", "params_each", "rank_bound", "scores")
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected a mapping")
        reject_unknown(data, keys, where)
        _require(data, ("modules", "shape", "count", "left", "right", "r"), where)
        modules = data["modules"]
        patterns = (modules,) if isinstance(modules, str) else tuple(modules) if isinstance(modules, list) else ()
        if not patterns or len(patterns) > MAX_MODULES or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_CHARS for p in patterns):
            report.add(f"{where}.modules: expected a module name or glob (at most {MAX_PATTERN_CHARS} characters), or a list of them")
        shape = report.check(_pair, data["shape"], f"{where}.shape")
        left = report.check(_pair, data["left"], f"{where}.left")
        right = report.check(_pair, data["right"], f"{where}.right")
        count = report.check(_int, data["count"], f"{where}.count", 1, MAX_MODULES)
        kind = report.check(_choice, data.get("kind", "linear"), KINDS, f"{where}.kind")
        experts = 1
        if kind == "experts":
            experts = report.check(_int, data.get("experts"), f"{where}.experts", 1, MAX_EXPERTS) if "experts" in data else report.add(f"{where}: missing key(s) experts")
        elif "experts" in data:
            report.add(f"{where}.experts is only allowed with kind: experts")
        # More components than the rank of the update cannot add anything, and bounding r here keeps
        # every size derived from it (params, the tensors apply_plan allocates) that of a real model.
        r = report.check(_int, data["r"], f"{where}.r", 1, min(shape) if shape else MAX_DIM)
        scores = data.get("scores") or {}
        if not isinstance(scores, Mapping) or len(scores) > 16:
            report.add(f"{where}.scores: expected a mapping of at most 16 scores")
        else:
            for name, value in scores.items():
                report.check(_text, name, f"{where}.scores key", 64)
                report.check(_number, value, f"{where}.scores.{str(name)[:64]}")
        if None in (shape, left, right, r, count, kind, experts) or report.problems:
            return None  # type: ignore[return-value]
        (m1, n1), (m2, n2) = left, right
        if (m1 * m2, n1 * n2) != shape:
            raise PlanError(
                f"{where}: left {[m1, n1]} and right {[m2, n2]} give a {m1 * m2}x{n1 * n2} update, not the shape {shape[0]}x{shape[1]}"
            )
        design = Design(m1, n1, m2, n2, r)
        derived = {"r1": design.r1, "r2": design.r2, "params_each": experts * design.params, "rank_bound": design.rank_bound}
        for key, value in derived.items():
            if key in data and not _is_int(data[key], value):
                report.add(f"{where}.{key} is {brief(data[key])}, but left/right/r give the integer {value}")
        return cls(patterns, shape, count, design, kind, dict(scores), experts)


@dataclass(frozen=True)
class SweepRecord:
    """What a sweep measured for the plan it wrote (lower values are better).

    trial0_value is the heuristic plan's value (trial 0); improvement = trial0_value - best_value.
    """

    study: str
    storage: str
    task: str
    steps: int
    best_trial: int
    best_value: float
    trial0_value: float | None = None
    improvement: float | None = None
    improvement_pct: float | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        report = _Report()
        for name in ("study", "storage", "task"):
            report.check(_text, getattr(self, name), f"sweep.{name}")
        report.check(_int, self.steps, "sweep.steps", 1, 10**9)
        report.check(_int, self.best_trial, "sweep.best_trial", 0, 10**9)
        report.check(_number, self.best_value, "sweep.best_value")
        for name in ("trial0_value", "improvement", "improvement_pct"):
            if getattr(self, name) is not None:
                report.check(_number, getattr(self, name), f"sweep.{name}")
        if self.lr is not None:
            report.check(_number, self.lr, "sweep.lr", 0.0, 10.0)
        report.raise_if_any()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> "SweepRecord":
        return strict_dataclass(cls, data, "sweep")


@dataclass(frozen=True)
class Plan:
    """A whole plan; ``assign`` maps real module names to their groups."""

    model_name: str
    model_source: str
    total_params: int
    budget_spec: str
    budget_limit: int
    groups: tuple[PlanGroup, ...]
    adapter: AdapterSettings = AdapterSettings()
    objective: str = "rank"
    exact: bool | None = None
    gap: float | None = None
    sweep: SweepRecord | None = None
    model_path: str | None = None  # the local folder or file the plan was made from, if any
    modules_to_save: tuple[tuple[str, int], ...] = ()  # a task model's new head: (module, parameters), trained whole

    @property
    def used_params(self) -> int:
        """Adapter parameters: what the budget pays for."""
        return sum(g.params for g in self.groups)

    @property
    def trained_params(self) -> int:
        """Every parameter fine-tuning trains: the adapters and the new head (``modules_to_save``)."""
        return self.used_params + sum(n for _, n in self.modules_to_save)

    def with_adapter(self, **changes: Any) -> "Plan":
        """A copy with some adapter settings changed; unknown settings are a PlanError."""
        reject_unknown(changes, [f.name for f in fields(AdapterSettings)], "adapter")
        return replace(self, adapter=replace(self.adapter, **changes))

    def assign(self, module_names: Iterable[str]) -> dict[str, PlanGroup]:
        """Each matched module name (model order) -> its group. A group matching a count other than
        its own, or a module matched twice, is a PlanError listing every such problem."""
        found = match_groups([g.modules for g in self.groups], module_names, counts=[g.count for g in self.groups])
        raise_problems(found.problems)
        return {name: self.groups[g] for name, g in found.owner.items()}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cdka_plan": SCHEMA_VERSION,
            "model": {
                "name": self.model_name,
                "source": self.model_source,
                **({"path": self.model_path} if self.model_path else {}),
                "total_params": self.total_params,
            },
            "budget": {"spec": self.budget_spec, "limit": self.budget_limit, "used": self.used_params},
            "objective": self.objective,
            "adapter": self.adapter.to_dict(),
        }
        # each field only when known, and the gap unrounded, so that a plan read back equals the plan written
        allocation = {k: v for k, v in (("exact", self.exact), ("gap", self.gap)) if v is not None}
        if allocation:
            out["allocation"] = allocation
        if self.modules_to_save:
            out["modules_to_save"] = dict(self.modules_to_save)
        out["groups"] = [g.to_dict() for g in self.groups]
        if self.sweep is not None:
            out["sweep"] = self.sweep.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """A validated plan; every problem found is listed in one PlanError."""
        if not isinstance(data, Mapping):
            raise PlanError("a plan must be a mapping with a 'cdka_plan' version key")
        reject_unknown(data, ("cdka_plan", "model", "budget", "objective", "adapter", "allocation", "modules_to_save",
                              "groups", "sweep"), "plan")
        _require(data, ("cdka_plan", "model", "budget", "groups"), "plan")
        version = data["cdka_plan"]
        if not _is_int(version, SCHEMA_VERSION):
            raise PlanError(f"plan schema version {brief(version)} is not supported (this cdka reads the integer {SCHEMA_VERSION})")
        report = _Report()
        model, budget = data["model"], data["budget"]
        if not isinstance(model, Mapping) or not isinstance(budget, Mapping):
            raise PlanError("plan: 'model' and 'budget' must be mappings")
        reject_unknown(model, ("name", "source", "path", "total_params"), "model")
        reject_unknown(budget, ("spec", "limit", "used"), "budget")
        _require(model, ("name", "total_params"), "model")
        _require(budget, ("limit",), "budget")
        name = report.check(_text, model["name"], "model.name", 256)
        source = report.check(_text, model.get("source", "unknown"), "model.source", 64)
        path = report.check(_text, model["path"], "model.path") if "path" in model else None
        total = report.check(_int, model["total_params"], "model.total_params", 1, MAX_TOTAL_PARAMS)
        limit = report.check(_int, budget["limit"], "budget.limit", 1, MAX_TOTAL_PARAMS)
        spec = report.check(_text, _count_as_text(budget.get("spec", str(budget["limit"]))), "budget.spec", 256)
        objective = report.check(_choice, data.get("objective", "rank"), OBJECTIVES, "objective")
        adapter = report.check(AdapterSettings.from_dict, {} if data.get("adapter") is None else data["adapter"])
        allocation = {} if data.get("allocation") is None else data["allocation"]
        exact = gap = None
        if not isinstance(allocation, Mapping):
            report.add("allocation: expected a mapping")
        else:
            report.check(reject_unknown, allocation, ("exact", "gap"), "allocation")
            if "exact" in allocation and not isinstance(allocation["exact"], bool):
                report.add(f"allocation.exact: expected true or false, got {brief(allocation['exact'])}")
            else:
                exact = allocation.get("exact")
            if "gap" in allocation:
                gap = report.check(_number, allocation["gap"], "allocation.gap", 0.0)
        sweep = report.check(SweepRecord.from_dict, data["sweep"]) if data.get("sweep") is not None else None
        saved = () if data.get("modules_to_save") is None else report.check(_modules_to_save, data["modules_to_save"]) or ()
        groups_data = data["groups"]
        groups: list[PlanGroup] = []
        if not isinstance(groups_data, list) or not groups_data or len(groups_data) > MAX_MODULES:
            report.add("plan: 'groups' must be a non-empty list")
        else:
            for i, g in enumerate(groups_data):
                group = report.check(PlanGroup.from_dict, g, f"groups[{i}]")
                if group is not None:
                    groups.append(group)
                if len(report.problems) > _Report.LIMIT:
                    break
        report.raise_if_any()
        plan = cls(
            model_name=name, model_source=source, total_params=total, budget_spec=spec, budget_limit=limit,
            groups=tuple(groups), adapter=adapter, objective=objective, exact=exact, gap=gap, sweep=sweep, model_path=path,
            modules_to_save=saved,
        )
        if "used" in budget and not _is_int(budget["used"], plan.used_params):
            report.add(f"budget.used is {brief(budget['used'])} but the groups add up to {plan.used_params}")
        _check_budget(plan, report)
        report.raise_if_any()
        return plan


def heads_text(heads: tuple[tuple[str, int], ...], shown: int = 4) -> str:
    """``classifier (1,538), pooler (590,592)``: modules trained whole with their parameters, or ``none``.
    A plan's list may be hostile (64 names of 2,000 characters), so long names are shortened and only
    the first ``shown`` entries listed."""
    listed = ", ".join(f"{named(name)} ({count:,})" for name, count in heads[:shown])
    return listed + (f" and {len(heads) - shown} more" if len(heads) > shown else "") or "none"


def _modules_to_save(data: Any) -> tuple[tuple[str, int], ...]:
    """``modules_to_save``: module name -> its parameter count, a few entries at most."""
    if not isinstance(data, Mapping) or len(data) > MAX_SAVED_MODULES:
        raise PlanError(f"modules_to_save: expected a mapping of at most {MAX_SAVED_MODULES} module names to parameter counts")
    out = []
    for name, count in data.items():
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise PlanError(f"modules_to_save: {brief(name)} is not a module name (dotted parts of letters, digits and _)")
        out.append((name, _int(count, f"modules_to_save.{name}", 1, MAX_TOTAL_PARAMS)))
    return tuple(out)


def _check_budget(plan: Plan, report: _Report) -> None:
    """The groups must fit ``budget.limit``, and the limit be what ``budget.spec`` means for the plan's
    model: its total parameters for a percentage or count, its groups (the targets) for ``lora:R``, as
    the planner computed it."""
    if plan.used_params > plan.budget_limit:
        report.add(f"the groups use {plan.used_params:,} parameters, over the budget limit {plan.budget_limit:,}")
    rank_cost = sum(g.count * g.experts * (g.shape[0] + g.shape[1]) for g in plan.groups)
    try:
        meant = budget_for(plan.budget_spec, total_params=plan.total_params, lora_rank_cost=rank_cost).limit
    except BudgetError as exc:
        report.add(f"budget.spec: {exc}")
        return
    if meant != plan.budget_limit:
        report.add(
            f"budget.limit is {plan.budget_limit:,} but budget.spec {brief(plan.budget_spec)} means {meant:,} "
            f"for model.total_params {plan.total_params:,} and these groups"
        )


def dumps_plan(plan: Plan, fmt: str = "yaml") -> str:
    """The plan as YAML (short lists in flow style) or JSON text, deterministic byte for byte; a budget
    the groups exceed, or whose spec does not mean its limit, is a PlanError, as load_plan would refuse the text."""
    report = _Report()
    _check_budget(plan, report)
    report.raise_if_any()
    data = plan.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt != "yaml":
        raise PlanError(f"unknown plan format {fmt!r}; use yaml or json")
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper: yaml.SafeDumper, value: list) -> Any:
        flow = all(isinstance(v, (int, float)) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    _Dumper.add_representer(list, _list)
    # Text that read_yaml takes for a number (budget "2e5", as YAML 1.2 reads it) is written quoted.
    _Dumper.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)


def loads_plan(text: str, where: str = "plan") -> Plan:
    """Parse YAML or JSON text (strict, safe YAML only) into a validated Plan."""
    data = read_yaml(text, where, PlanError)
    try:
        return Plan.from_dict(data)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None


def _read_as(path: Path) -> str:
    """The format load_plan reads ``path`` in: JSON where it is named .json (in any case), else YAML."""
    return "json" if path.suffix.lower() == ".json" else "yaml"


def save_plan(plan: Plan, path: str | Path, fmt: str | None = None) -> Path:
    """Write atomically; the format follows the suffix (.json) unless given.

    A YAML plan larger than load_plan reads back (MAX_YAML_BYTES: per-layer plans of some 10,000
    modules) is a PlanError and nothing is written: such plans are JSON, read at C speed.
    """
    target = Path(path)
    read_as = _read_as(target)
    chosen = fmt or read_as
    if chosen != "json" and read_as == "json":
        raise PlanError(f"{target}: a .json plan is read as JSON; write {chosen} to another name, or use --format json")
    text = dumps_plan(plan, chosen)
    if chosen == "yaml" and (size := len(text.encode())) > MAX_YAML_BYTES:
        raise PlanError(
            f"{target}: this plan ({len(plan.groups):,} groups) is {size:,} bytes as YAML, more than cdka reads "
            f"back ({MAX_YAML_BYTES:,}); write it as JSON (-o plan.json or --format json)"
        )
    return atomic_write_text(target, text)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file: YAML, or JSON when it is named ``.json``.

    A ``.json`` plan (what save_plan writes there) is read by the JSON reader, at C speed and within
    PLAN_JSON_LIMITS, so the per-layer plan of a model with tens of thousands of modules loads in
    well under a second; YAML stays bounded by MAX_YAML_BYTES.
    """
    file = Path(path)
    if not file.exists():
        raise PlanError(f"{file}: {absent(file, 'plan file')}")
    if _read_as(file) == "json":
        data = read_json(read_file_bytes(file, PlanError, PLAN_JSON_LIMITS.max_bytes), str(file), PlanError, PLAN_JSON_LIMITS)
        try:
            return Plan.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{file}: {exc}") from None
    return loads_plan(read_text_file(file, PlanError), str(file))
