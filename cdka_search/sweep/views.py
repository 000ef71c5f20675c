"""Plain-row tables of a sweep result and of a study report, for the one renderer (render.py)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from cdka_search.render import Table, rows_of

if TYPE_CHECKING:
    from cdka_search.sweep.report import StudyReport
    from cdka_search.sweep.study import SweepResult


def sweep_table(result: "SweepResult") -> Table:
    rows = [(group, heuristic, best, "" if heuristic == best else "changed") for group, heuristic, best in result.groups]
    notes = [
        f"best trial {result.best_number}: value {result.best_value:.6g} (lr {result.best_params.get('lr', 0):.4g}, "
        f"alpha {result.best_params.get('alpha', 0):.4g}); {result.complete} complete, {result.pruned} pruned, "
        f"{result.failed} failed; {result.ran_here} run here in {result.seconds:.0f} s",
    ]
    if result.trial0_value is not None:
        notes.append(
            f"trial 0 (heuristic plan): {result.trial0_value:.6g}; improvement {result.improvement:.6g} "
            f"({result.improvement_pct:.2f} %)"
        )
    else:
        notes.append("trial 0 (heuristic plan) has not finished yet: no improvement to report")
    if result.output:
        notes.append(f"best plan written to {result.output}; see it with: cdka report --storage {result.storage} --study {result.study}")
    return Table(
        title=f"cdka sweep: {result.study} ({result.storage})",
        columns=("Group", "Heuristic (r1,r2,r)", "Best (r1,r2,r)", "Change"),
        rows=rows_of(rows),
        notes=tuple(notes),
        extra={"summary": result.summary()},
    )


_STATES = {"complete": "ok", "pruned": "pruned", "fail": "fail", "running": "run", "waiting": "wait"}


def report_table(rep: "StudyReport") -> Table:
    groups = list(rep.rows[0].choices) if rep.rows else []
    short = [g.split(".")[-1].split("@")[0] for g in groups]
    if len(set(short)) < len(short):
        short = [".".join(g.split(".")[-2:]) for g in groups]
    rows = []
    for r in rep.rows:
        rows.append(
            (r.number, _STATES.get(r.state, r.state) + ("*" if r.heuristic else ""),
             "" if r.value is None else f"{r.value:.5g}", "" if r.lr is None else f"{r.lr:.2e}",
             "" if r.alpha is None else f"{r.alpha:.3g}", *(r.choices.get(g, "") for g in groups))
        )
    notes = [f"trial {r.number}: {r.note}" for r in rep.rows if r.note]
    notes.append("designs are r1,r2,r per group; * marks trial 0, the heuristic plan")
    if rep.best_value is not None:
        notes.append(f"best trial {rep.best_number}: {rep.best_value:.6g}" + (
            f"; trial 0 (heuristic, *): {rep.trial0_value:.6g}; improvement "
            f"{rep.trial0_value - rep.best_value:.6g}" if rep.trial0_value is not None else ""))
    if rep.plots:
        notes.append("plots: " + ", ".join(str(p) for p in rep.plots))
    return Table(
        title=f"cdka report: {rep.study} ({rep.storage}), {len(rep.rows)} trials",
        columns=("Trial", "State", "Value", "lr", "alpha", *short),
        rows=rows_of(rows),
        notes=tuple(notes),
        extra={"trials": [asdict(r) for r in rep.rows], "plots": [str(p) for p in rep.plots], "best_trial": rep.best_number, "best_value": rep.best_value,
               "trial0_value": rep.trial0_value},
    )
