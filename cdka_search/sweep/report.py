"""``cdka report``: the trial table of a study and PNG plots drawn with matplotlib (Agg, no display).

Plots written to the output folder:
- ``history.png``: every finished trial's value by trial number, the best value so far as a step line,
  the heuristic plan's trial (trial 0) marked;
- ``params.png``: value against the learning rate, alpha and the trial's adapter parameters;
- ``choices.png``: one panel per plan group, value of each completed trial by the design it chose
  ("r1,r2,r"), the heuristic choice and the best trial's choice marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdka_search.errors import OutputError, SweepError
from cdka_search.sweep.bookkeeping import SKIPPED
from cdka_search.sweep.objective import HEURISTIC, PARAMS_USED, PRUNED_REASON


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str
    value: float | None
    lr: float | None
    alpha: float | None
    params_used: int | None
    seconds: float | None
    heuristic: bool
    choices: dict[str, str]
    note: str


def trial_rows(trials: list[Any]) -> list[TrialRow]:
    """One row per trial (Optuna FrozenTrials checked by stored.readable_trials)."""
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        choices = {k: str(v) for k, v in t.params.items() if k not in ("lr", "alpha")}
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name.lower(),
                value=float(t.value) if t.value is not None else None,
                lr=t.params.get("lr"),
                alpha=t.params.get("alpha"),
                params_used=t.user_attrs.get(PARAMS_USED),
                seconds=seconds,
                heuristic=bool(t.user_attrs.get(HEURISTIC)),
                choices=choices,
                note=str(t.user_attrs.get(PRUNED_REASON, "") or (f"skipped: {t.user_attrs[SKIPPED]}" if SKIPPED in t.user_attrs else "")),
            )
        )
    return rows


def short_group(name: str) -> str:
    """model.layers.*.self_attn.q_proj -> self_attn.q_proj (the last two path segments)."""
    return ".".join(name.split(".")[-2:])


def write_plots(rows: list[TrialRow], folder: Path, title: str) -> list[Path]:
    """Draw the three plots into ``folder`` (created); returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.state == "complete" and r.value is not None]
    if not done:
        raise SweepError("the study has no completed trial to plot yet")
    _check_plot_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the plot folder {folder}: {exc.strerror or exc}") from None
    out = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r.number for r in done], [r.value for r in done], s=18, label="complete", color="tab:blue")
    pruned = [r for r in rows if r.state == "pruned"]
    best, xs, ys = float("inf"), [], []
    for r in sorted(done, key=lambda r: r.number):
        best = min(best, r.value)  # type: ignore[type-var]
        xs.append(r.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    heur = [r for r in done if r.heuristic]
    if heur:
        ax.scatter([r.number for r in heur], [r.value for r in heur], marker="*", s=160, color="tab:orange",
                   label="trial 0 (heuristic plan)", zorder=3)
    if pruned:
        ax.text(0.99, 0.98, f"{len(pruned)} pruned", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.set(xlabel="trial", ylabel="value (lower is better)", title=f"{title}: optimisation history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, folder / "history.png"))

    panels = [("lr", "learning rate", True), ("alpha", "alpha", True), ("params_used", "adapter parameters", False)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, (key, label, log) in zip(axes, panels):
        pts = [(getattr(r, key), r.value) for r in done if getattr(r, key) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel("value")
    fig.suptitle(f"{title}: parameters vs value")
    fig.tight_layout()
    out.append(_save(fig, folder / "params.png"))

    groups = list(done[0].choices)
    cols = min(4, max(1, len(groups)))
    nrows = -(-len(groups) // cols) if groups else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.0 * nrows), squeeze=False, sharey=True)
    best_row = min(done, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
    for ax, group in zip(axes.flat, groups):
        labels = sorted({r.choices.get(group, "?") for r in done}, key=lambda s: [int(x) for x in s.split(",")] if s.replace(",", "").isdigit() else [0])
        pos = {label: i for i, label in enumerate(labels)}
        ax.scatter([pos[r.choices.get(group, "?")] for r in done], [r.value for r in done], s=14, alpha=0.7)
        if heur:
            ax.scatter([pos[heur[0].choices.get(group, "?")]], [heur[0].value], marker="*", s=140, color="tab:orange",
                       zorder=3)
        ax.scatter([pos[best_row.choices.get(group, "?")]], [best_row.value], marker="D", s=50, color="tab:red", zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.set_title(short_group(group), fontsize=9)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"{title}: value by design choice (r1,r2,r); star = trial 0, diamond = best")
    fig.tight_layout()
    out.append(_save(fig, folder / "choices.png"))
    return out


def _check_plot_folder(folder: Path) -> None:
    """OutputError when ``folder`` or a folder above it is a file (nothing is created here)."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file; give a folder for the plots" if path == folder else f"cannot be created: {path} is a file"
                raise OutputError(f"--out {folder} {what}")
            return


def _save(fig: Any, path: Path) -> Path:
    """Save atomically (temporary file beside it, then replace) and close the figure."""
    import io

    import matplotlib.pyplot as plt

    from cdka_search.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


@dataclass(frozen=True)
class StudyReport:
    study: str
    storage: str
    rows: list[TrialRow]
    plots: list[Path]
    best_number: int | None
    best_value: float | None
    trial0_value: float | None


def study_report(storage: str | None, study: str | None, folder: Path | None, *, plots: bool = True) -> StudyReport:
    """Load a study (read-only use) and, unless ``plots`` is False, draw its plots into ``folder``."""
    import warnings

    import optuna

    from cdka_search.sweep.storage import normalise, redact, storage_file
    from cdka_search.sweep.stored import readable_trials
    from cdka_search.sweep.study import open_study

    if plots and folder is not None:
        _check_plot_folder(folder)  # before loading anything: a bad --out is one quick error
    url = normalise(storage)
    file = storage_file(url)
    # Opening a missing file would create an empty storage; a report only reads.
    if file is not None and not file.exists():
        raise SweepError(f"--storage {redact(url)}: no such file; run `cdka sweep` first or check the path")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    loaded = open_study(storage, study, heartbeat=False)
    rows = trial_rows(readable_trials(loaded))
    done = [r for r in rows if r.state == "complete" and r.value is not None]
    best = min(done, key=lambda r: (r.value, r.number)) if done else None  # type: ignore[arg-type]
    heur = [r.value for r in done if r.heuristic]
    paths = write_plots(rows, folder or Path(f"{loaded.study_name}-report"), loaded.study_name) if plots and done else []
    return StudyReport(
        study=loaded.study_name,
        storage=redact(normalise(storage)),
        rows=rows,
        plots=paths,
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        trial0_value=min(heur) if heur else None,  # type: ignore[type-var]
    )
