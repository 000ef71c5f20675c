"""The plan document: a versioned, validated description of every adapter to build.

Schema (version 1), YAML or JSON::

    cdka_plan: 1
    model: {name, source, total_params}
    budget: {spec, limit, used}
    objective: balanced
    adapter: {alpha, scaling, scale, init, dtype, dropout}
    allocation: {exact, gap}                       # optional, written by the planner
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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from cdka_search.candidates import Design
from cdka_search.documents import reject_unknown, strict_dataclass
from cdka_search.errors import PlanError
from cdka_search.fileio import atomic_write_text
from cdka_search.patterns import match_module

SCHEMA_VERSION = 1
SCALINGS = ("alpha/sqrt(r*r2)", "matched", "alpha/r", "alpha/sqrt(r)", "fixed")
#: Scalings whose A factors start with LoRA's entry size (bound 1/sqrt(d_in)) rather than 1/sqrt(d_in/r2).
LORA_INIT_SCALINGS = ("matched",)
INITS = ("kaiming-A-zero-B", "gradient-aligned")
DTYPES = ("float32", "float64", "bfloat16", "float16")
KINDS = ("linear", "conv1d", "experts")


def _require(data: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise PlanError(f"{where}: missing key(s) {', '.join(missing)}")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where}: expected an integer, got {value!r}")
    return value


def _pair(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PlanError(f"{where}: expected [rows, cols], got {value!r}")
    a, b = (_int(v, where) for v in value)
    if a < 1 or b < 1:
        raise PlanError(f"{where}: sizes must be positive, got {value!r}")
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

    alpha: numerator of the scaling lambda. scaling: "alpha/sqrt(r*r2)" (default, the paper's
    gradient-stabilising choice), "alpha/r", "alpha/sqrt(r)", or "fixed" (lambda = ``scale``).
    init: "kaiming-A-zero-B" (dW = 0 at step 0) or "gradient-aligned". dtype: adapter weights'
    dtype (float32 whatever the base model's). dropout: on the adapter input.
    """

    alpha: float = 64.0
    scaling: str = "alpha/sqrt(r*r2)"
    scale: float | None = None
    init: str = "kaiming-A-zero-B"
    dtype: str = "float32"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise PlanError(f"adapter.scaling {self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if self.scaling == "fixed" and self.scale is None:
            raise PlanError("adapter.scaling 'fixed' needs adapter.scale")
        if self.init not in INITS:
            raise PlanError(f"adapter.init {self.init!r} is not one of {', '.join(INITS)}")
        if self.dtype not in DTYPES:
            raise PlanError(f"adapter.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise PlanError(f"adapter.dropout must be in [0, 1), got {self.dropout}")

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
        keys = ("modules", "kind", "experts", "shape", "count", "left", "right", "r", "r1", "r2", "params_each", "rank_bound", "scores")
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected a mapping")
        reject_unknown(data, keys, where)
        _require(data, ("modules", "shape", "count", "left", "right", "r"), where)
        modules = data["modules"]
        patterns = (modules,) if isinstance(modules, str) else tuple(modules) if isinstance(modules, list) else ()
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise PlanError(f"{where}.modules: expected a module name or glob, or a list of them")
        shape = _pair(data["shape"], f"{where}.shape")
        (m1, n1), (m2, n2) = _pair(data["left"], f"{where}.left"), _pair(data["right"], f"{where}.right")
        r = _int(data["r"], f"{where}.r")
        count = _int(data["count"], f"{where}.count")
        if r < 1 or count < 1:
            raise PlanError(f"{where}: r and count must be positive")
        if (m1 * m2, n1 * n2) != shape:
            raise PlanError(
                f"{where}: left {[m1, n1]} and right {[m2, n2]} give a {m1 * m2}x{n1 * n2} update, not the shape {shape[0]}x{shape[1]}"
            )
        design = Design(m1, n1, m2, n2, r)
        kind = data.get("kind", "linear")
        if kind not in KINDS:
            raise PlanError(f"{where}.kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "experts":
            _require(data, ("experts",), where)
            experts = _int(data["experts"], f"{where}.experts")
            if experts < 1:
                raise PlanError(f"{where}.experts must be positive")
        elif "experts" in data:
            raise PlanError(f"{where}.experts is only allowed with kind: experts")
        else:
            experts = 1
        derived = {"r1": design.r1, "r2": design.r2, "params_each": experts * design.params, "rank_bound": design.rank_bound}
        for key, value in derived.items():
            if key in data and data[key] != value:
                raise PlanError(f"{where}.{key} is {data[key]!r} but left/right/r give {value}")
        scores = data.get("scores") or {}
        if not isinstance(scores, Mapping):
            raise PlanError(f"{where}.scores: expected a mapping")
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
    objective: str = "balanced"
    exact: bool | None = None
    gap: float | None = None
    sweep: SweepRecord | None = None

    @property
    def used_params(self) -> int:
        return sum(g.params for g in self.groups)

    def with_adapter(self, **changes: Any) -> "Plan":
        """A copy with some adapter settings changed; unknown settings are a PlanError."""
        reject_unknown(changes, [f.name for f in fields(AdapterSettings)], "adapter")
        return replace(self, adapter=replace(self.adapter, **changes))

    def assign(self, module_names: Iterable[str]) -> dict[str, PlanGroup]:
        """Each matched module name -> its group; a group matching a count other than its own,
        or a module matched twice, is a PlanError naming them."""
        out: dict[str, PlanGroup] = {}
        matched = {id(g): 0 for g in self.groups}
        for name in module_names:
            owners = [g for g in self.groups if g.matches(name)]
            if len(owners) > 1:
                raise PlanError(f"module {name} is matched by {len(owners)} groups ({', '.join(o.modules[0] for o in owners)})")
            if owners:
                out[name] = owners[0]
                matched[id(owners[0])] += 1
        for g in self.groups:
            if matched[id(g)] != g.count:
                raise PlanError(f"group {g.modules[0]!r} matches {matched[id(g)]} modules of the model, but the plan says {g.count}")
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cdka_plan": SCHEMA_VERSION,
            "model": {"name": self.model_name, "source": self.model_source, "total_params": self.total_params},
            "budget": {"spec": self.budget_spec, "limit": self.budget_limit, "used": self.used_params},
            "objective": self.objective,
            "adapter": self.adapter.to_dict(),
        }
        if self.exact is not None:
            out["allocation"] = {"exact": self.exact, "gap": round(self.gap or 0.0, 9)}
        out["groups"] = [g.to_dict() for g in self.groups]
        if self.sweep is not None:
            out["sweep"] = self.sweep.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, Mapping):
            raise PlanError("a plan must be a mapping with a 'cdka_plan' version key")
        reject_unknown(data, ("cdka_plan", "model", "budget", "objective", "adapter", "allocation", "groups", "sweep"), "plan")
        _require(data, ("cdka_plan", "model", "budget", "groups"), "plan")
        if data["cdka_plan"] != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {data['cdka_plan']!r} is not supported (this cdka reads {SCHEMA_VERSION})")
        model, budget = data["model"], data["budget"]
        if not isinstance(model, Mapping) or not isinstance(budget, Mapping):
            raise PlanError("plan: 'model' and 'budget' must be mappings")
        reject_unknown(model, ("name", "source", "total_params"), "model")
        reject_unknown(budget, ("spec", "limit", "used"), "budget")
        _require(model, ("name", "total_params"), "model")
        _require(budget, ("limit",), "budget")
        groups_data = data["groups"]
        if not isinstance(groups_data, list) or not groups_data:
            raise PlanError("plan: 'groups' must be a non-empty list")
        groups = tuple(PlanGroup.from_dict(g, f"groups[{i}]") for i, g in enumerate(groups_data))
        allocation = data.get("allocation") or {}
        if not isinstance(allocation, Mapping):
            raise PlanError("plan: 'allocation' must be a mapping")
        reject_unknown(allocation, ("exact", "gap"), "allocation")
        plan = cls(
            model_name=str(model["name"]),
            model_source=str(model.get("source", "unknown")),
            total_params=_int(model["total_params"], "model.total_params"),
            budget_spec=str(budget.get("spec", budget["limit"])),
            budget_limit=_int(budget["limit"], "budget.limit"),
            groups=groups,
            adapter=AdapterSettings.from_dict(data.get("adapter") or {}),
            objective=str(data.get("objective", "balanced")),
            exact=allocation.get("exact"),
            gap=allocation.get("gap"),
            sweep=SweepRecord.from_dict(data["sweep"]) if data.get("sweep") is not None else None,
        )
        if "used" in budget and budget["used"] != plan.used_params:
            raise PlanError(f"budget.used is {budget['used']!r} but the groups add up to {plan.used_params}")
        if plan.used_params > plan.budget_limit:
            raise PlanError(f"the groups use {plan.used_params:,} parameters, over the budget limit {plan.budget_limit:,}")
        return plan


def dumps_plan(plan: Plan, fmt: str = "yaml") -> str:
    """The plan as YAML (short lists in flow style) or JSON text, deterministic byte for byte."""
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
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)


def loads_plan(text: str, where: str = "plan") -> Plan:
    """Parse YAML or JSON text (safe YAML only) into a validated Plan."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PlanError(f"{where}: not valid YAML/JSON{at}") from None
    try:
        return Plan.from_dict(data)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None


def save_plan(plan: Plan, path: str | Path, fmt: str | None = None) -> Path:
    """Write atomically; the format follows the suffix (.json) unless given."""
    target = Path(path)
    chosen = fmt or ("json" if target.suffix == ".json" else "yaml")
    return atomic_write_text(target, dumps_plan(plan, chosen))


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (YAML or JSON)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{file}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{file}: cannot read ({exc.__class__.__name__})") from None
    return loads_plan(text, str(file))
