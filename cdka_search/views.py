"""Library objects -> render.Table rows: what each command shows, kept out of the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cdka_search import scoring
from cdka_search.budget import lora_params
from cdka_search.plan import Plan, heads_text
from cdka_search.planner import ExplainRow
from cdka_search.render import Table, rows_of
from cdka_search.spec.model_spec import ModelSpec
from cdka_search.spec.presets import ALIASES, PRESETS, preset_spec
from cdka_search.targets import Coverage


def plan_table(plan: Plan, written: Path | None = None, covered: Coverage | None = None,
               unspent: str | None = None) -> Table:
    """The plan's groups; ``unspent`` is planner.unspent_reason's note, if any."""
    rows = []
    for g in plan.groups:
        d = g.design
        rows.append(
            (
                g.modules[0] if len(g.modules) == 1 else f"{g.modules[0]} (+{len(g.modules) - 1})",
                g.count,
                f"{g.shape[0]}x{g.shape[1]}",
                d.label(),
                f"{d.m1}x{d.n1} (x) {d.m2}x{d.n2}",
                d.params,
                g.params,
                d.rank_bound,
                float(g.scores.get("objective", 0.0)),
            )
        )
    used, limit = plan.used_params, plan.budget_limit
    optimality = "exact optimum" if plan.exact else f"gap {100 * (plan.gap or 0):.3f}% to the LP bound"
    notes = [
        f"budget {plan.budget_spec}: {used:,} of {limit:,} parameters used ({100 * used / limit:.2f}%), "
        f"{100 * used / plan.total_params:.4f}% of {plan.model_name}'s {plan.total_params:,}; allocation: {optimality}",
    ]
    if unspent:
        notes.append(unspent)
    if plan.modules_to_save:
        notes.append(f"trained whole beside the adapters, outside the budget: the new task head {heads_text(plan.modules_to_save)} "
                     f"(PEFT's modules_to_save); {plan.trained_params:,} trainable parameters in all")
    if covered is not None:
        notes.append(covered.summary())
    if written is not None:
        notes.append(f"plan written to {written}")
    return Table(
        title=f"cdka plan: {plan.model_name}, objective {plan.objective}",
        columns=("Modules", "Count", "Shape", "(r1,r2,r)", "B (x) A", "Each", "Params", "Rank", "Score"),
        rows=rows_of(rows),
        notes=tuple(notes),
        extra={"plan": plan.to_dict(), "written": str(written) if written else None, **coverage_extra(covered)},
    )


def models_table() -> Table:
    aliases: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    rows = []
    for name, config in PRESETS.items():
        spec = preset_spec(name)
        layers = config.get("num_hidden_layers", config.get("n_layer"))
        hidden = config.get("hidden_size", config.get("n_embd"))
        rows.append((name, ", ".join(aliases.get(name, [])), config["model_type"], layers, hidden, len(spec.targets), spec.total_params))
    return Table("Embedded presets (offline)", ("Preset", "Aliases", "Family", "Layers", "Hidden", "Targets", "Total params"), rows_of(rows))


def inspect_table(spec: ModelSpec, covered: Coverage | None = None) -> Table:
    rows = []
    for role, members in spec.roles().items():
        shapes = sorted({m.shape for m in members})
        shape_text = ", ".join(f"{a}x{b}" for a, b in shapes)
        kind = f"experts x{members[0].experts}" if members[0].kind == "experts" else members[0].kind
        rows.append((role, len(members), shape_text, kind, sum(m.weight_params for m in members)))
    notes = [
        f"{len(spec.targets)} targets, {len(spec.shapes)} distinct shapes; base model {spec.total_params:,} parameters "
        f"(source: {spec.source}); LoRA r=8 on all targets = {lora_params(spec.targets, 8):,} parameters",
    ]
    if covered is not None:
        notes.append(covered.summary())
    return Table(
        f"Targets of {spec.name}", ("Module", "Count", "Shape (out x in)", "Kind", "Weights"), rows_of(rows), tuple(notes),
        extra=coverage_extra(covered) or None,
    )


def coverage_extra(covered: Coverage | None) -> dict[str, object]:
    """The coverage figures for JSON output."""
    if covered is None:
        return {}
    return {
        "coverage": {
            "total_params": covered.total,
            "covered_params": covered.covered,
            "left_out_params": covered.left_out_params,
            "unadaptable_params": covered.unadaptable_params,
            "trained_whole_params": covered.trained_whole_params,
            "other_params": covered.other_params,
            "left_out": [{"module": role, "params": w} for role, w in covered.left_out],
            "unadaptable": [{"tensor": role, "params": w} for role, w in covered.unadaptable],
            "trained_whole": [{"module": name, "params": w} for name, w in covered.trained_whole],
            "warnings": covered.warnings(),
        }
    }


def explain_table(shape: tuple[int, int], rows: Sequence[ExplainRow], objective: str, max_params: int | None) -> Table:
    out = []
    for row in rows:
        d = row.design
        out.append(
            (
                d.label(),
                f"{d.m1}x{d.n1}",
                f"{d.m2}x{d.n2}",
                d.params,
                d.rank_bound,
                row.scores["capacity"],
                row.scores["alignment"],
                row.scores["first_step"],
                row.scores["speed"],
                row.scores["objective"],
                row.pareto,
            )
        )
    limit = f" within {max_params:,} parameters" if max_params else ""
    notes = (
        "capacity = log2(1+r*min(m1,n1)*min(m2,n2))/log2(1+min(d_out,d_in)) (1 = full rank, above 1 past it); "
        f"alignment = expected share kept of an update with the measured spectrum sigma_k ~ k^-{scoring.SPECTRUM_BETA:g}; "
        "first_step = sqrt(r*r2/(r1*d_in)); speed = log(1+r*r2/r1)/log(1+d_in); score 'rank' (default) = "
        f"sqrt(min(capacity, {scoring.RANK_KNEE:g}) * size), size = log2(1+P/(d_out+d_in))/log2(1+min(d_out,d_in)); Pareto = no design "
        "has fewer parameters and a higher score. What each predicts in real fine-tuning: docs/validity.md.",
    )
    return Table(
        f"Candidates for {shape[0]}x{shape[1]}{limit}, by {objective}",
        ("(r1,r2,r)", "B (m1xn1)", "A (m2xn2)", "Params", "Rank bound", "Capacity", "Alignment", "First step", "Speed", "Score", "Pareto"),
        rows_of(out),
        notes,
    )
