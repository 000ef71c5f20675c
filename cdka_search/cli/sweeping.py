"""Commands that train: sweep (an Optuna study over plans) and report (its table and plots)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from cdka_search.cli.common import (
    BudgetOpt,
    JsonOpt,
    ModelOpt,
    ObjectiveOpt,
    RecipeOpt,
    StorageOpt,
    TargetsOpt,
    from_recipe,
    guarded,
    load_recipe_option,
    output_option,
)

app = typer.Typer()

StudyOpt = Annotated[Optional[str], typer.Option("--study", help="Study name (default: cdka-MODEL-BUDGET-TASK); reuse it to resume or to add workers.")]


@app.command()
@guarded
def sweep(
    ctx: typer.Context,
    model: ModelOpt = "llama-2-7b",
    budget: BudgetOpt = "0.5%",
    trials: Annotated[int, typer.Option("--trials", "-n", help="Finished trials the study should hold (all workers together).")] = 20,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Stop starting trials after this many seconds.")] = None,
    storage: StorageOpt = None,
    study: StudyOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampler and training seed (give each worker its own).")] = 0,
    task: Annotated[str, typer.Option("--task", help="proxy (offline, default) or lm (local HF folder + --data).")] = "proxy",
    data: Annotated[Optional[Path], typer.Option("--data", help="lm task: a local .txt, .jsonl or .json file (text, prompt/completion or messages).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per trial.")] = 200,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="proxy task: reference updates (.safetensors) instead of synthetic ones.")] = None,
    pruner: Annotated[str, typer.Option("--pruner", help="median (default), hyperband or none.")] = "median",
    top_k: Annotated[int, typer.Option("--top-k", help="Design families per group taken from the planner's ranking.")] = 6,
    targets: TargetsOpt = "all-linear",
    objective: ObjectiveOpt = "rank",
    output: Annotated[Optional[Path], output_option("Where to write the best plan.")] = Path("best.yaml"),
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refine the heuristic plan by short real training of the adapter in an Optuna study.

    Trial 0 is the plan `cdka plan` would write; the best plan found is written with its value,
    trial 0's value and the improvement. Rerun the same command to resume; start it on more machines
    with one --storage and --study to share the work.

    Examples:

      cdka sweep --model llama-2-7b --budget 0.5% --trials 20

      cdka sweep -m gpt2 -b lora:8 --trials 40 --storage postgresql://cdka@db/cdka --study gpt2-a --seed 1

      cdka sweep -m ./tiny-llama --task lm --data train.jsonl --steps 100 --storage journal:sweep.journal

      cdka sweep --recipe llama2/7B_cdka_lora8 --trials 10
    """
    from cdka_search.render import render
    from cdka_search.sweep.study import SweepConfig, prepare_sweep
    from cdka_search.sweep.views import sweep_table

    loaded = load_recipe_option(recipe)
    opts = from_recipe(ctx, loaded, dict(model=model, budget=budget, targets=targets, objective=objective))
    opts.update(from_recipe(ctx, loaded.sweep if loaded else None, dict(trials=trials, steps=steps, task=task, top_k=top_k, seed=seed)))
    ranges: dict = {}
    if loaded:
        ranges["alpha_range"] = (min(loaded.sweep.alpha), max(loaded.sweep.alpha))
        if opts["task"] == "lm":  # a recipe's lr range is for real LM training, not the proxy's
            ranges["lr_range"] = tuple(loaded.sweep.lr)
    config = SweepConfig(timeout=timeout, storage=storage, study=study, data=data, reference=reference, output=output,
                         pruner=pruner, **opts, **ranges)
    prepared = prepare_sweep(config)  # a bad option or storage is its error line alone, without a progress bar
    with trial_progress(config.trials, enabled=not as_json) as on_trial:
        result = prepared.run(on_trial)
    render(sweep_table(result), as_json=as_json)


@app.command()
@guarded
def report(
    storage: StorageOpt = None,
    study: StudyOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the PNG plots (default: STUDY-report).")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Only print the trial table.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a sweep's trial table and draw its plots (history, parameters vs value, choices per group).

    Examples: cdka report --storage sqlite:///cdka-sweep.db;  cdka report --storage journal:s.journal --study s --out plots
    """
    from cdka_search.render import render
    from cdka_search.sweep.report import study_report
    from cdka_search.sweep.views import report_table

    render(report_table(study_report(storage, study, out, plots=not no_plots)), as_json=as_json)

@contextlib.contextmanager
def trial_progress(total: int, *, enabled: bool = True) -> Iterator[Callable[[int, int, float | None], None]]:
    """Yield ``on_trial(finished, total, best)`` that advances a progress bar (a no-op when disabled)."""
    if not enabled:
        yield lambda finished, total, best: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task("sweep", total=total, best="-")

        def on_trial(finished: int, total_: int, best: float | None) -> None:
            bar.update(task, completed=min(finished, total_), best="-" if best is None else f"{best:.5g}")

        yield on_trial
