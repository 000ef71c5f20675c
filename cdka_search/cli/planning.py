"""Commands of the data-free pipeline: plan, models, inspect, explain, validate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdka_search.cli.common import (
    BudgetOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    ObjectiveOpt,
    OutputOpt,
    RecipeOpt,
    TargetsOpt,
    from_recipe,
    guarded,
    load_recipe_option,
)
from cdka_search.documents import printable
from cdka_search.errors import ArgumentError, PlanError

app = typer.Typer()

FamilyOpt = Annotated[str, typer.Option("--family", help="cdka (r1 <= r2, powers of two), every (all divisor pairs), lora (r1 = r2 = 1) or lokr (one Kronecker term).")]
R1Opt = Annotated[Optional[int], typer.Option("--r1", help="Pin r1 (= m2, rows of A_i); must divide d_out.")]
R2Opt = Annotated[Optional[int], typer.Option("--r2", help="Pin r2 (= n1, columns of B_i); must divide d_in.")]
ROpt = Annotated[Optional[int], typer.Option("--r", help="Pin the number of components r.")]
MaxROpt = Annotated[
    Optional[int],
    typer.Option("--max-r", help="Largest number of components considered (default 64, doubled while the budget "
                 "costs more than the largest designs under it)."),
]


def _space(family: str, r1: int | None, r2: int | None, r: int | None, max_r: int | None):
    from cdka_search.candidates import CandidateSpace

    return CandidateSpace(r1=r1, r2=r2, r=r, max_r=max_r, family=family)


def _load(model: str):
    from cdka_search.render import info
    from cdka_search.spec import load_spec

    spec = load_spec(model)
    if spec.source == "preset" and model.strip().lower() != spec.name:
        info(f"model {model!r} -> preset {spec.name} ({spec.total_params:,} parameters); see `cdka models`")
    return spec


def _coverage(spec, targets: str, space=None):
    """The selection's coverage of ``spec`` (of what ``space`` adapts of it, where planned); its warnings go
    to stderr."""
    from cdka_search.planner import adaptable_selection
    from cdka_search.render import info
    from cdka_search.targets import coverage, select_targets

    chosen = select_targets(spec, targets) if space is None else adaptable_selection(spec, targets, space)[0]
    covered = coverage(spec, chosen, targets)
    for line in covered.warnings():
        info(line)
    return covered


@app.command()
@guarded
def plan(
    ctx: typer.Context,
    model: ModelOpt = "llama-2-7b",
    budget: BudgetOpt = "0.5%",
    targets: TargetsOpt = "all-linear",
    objective: ObjectiveOpt = "rank",
    family: FamilyOpt = "cdka",
    r1: R1Opt = None,
    r2: R2Opt = None,
    r: ROpt = None,
    max_r: MaxROpt = None,
    output: OutputOpt = Path("plan.yaml"),
    fmt: Annotated[
        Optional[str], typer.Option("--format", help="yaml or json (default: json for an output named .json, else yaml).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the Monte Carlo alignment estimate.")] = 0,
    reference: Annotated[
        Optional[Path], typer.Option("--reference", help="Reference updates from `cdka probe`: score every module on its own update.")
    ] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="List every module as its own group (a budget's remainder is then spent module by module).")] = False,
    all_pairs: Annotated[
        bool, typer.Option("--all-pairs", help="With --reference: measure every (r1, r2) of large updates, not only the data-free front's.")
    ] = False,
    device: DeviceOpt = "auto",
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Choose a component design for every target within a budget and write the plan.

    Examples:

      cdka plan --model llama --budget 0.5%

      cdka plan -m gpt2 -b lora:8 --targets attn -o gpt2.yaml

      cdka plan -m ./my-model/config.json -b 20M --family lora --format json -o plan.json

      cdka plan -m ./my-llama -b 0.5% --reference grad.safetensors --objective alignment

      cdka plan --recipe llama2/7B_cdka_lora8
    """
    from cdka_search.plan import AdapterSettings, save_plan
    from cdka_search.planner import make_plan, record_model_path, unspent_reason
    from cdka_search.render import render
    from cdka_search.views import plan_table

    loaded = load_recipe_option(recipe)
    opts = from_recipe(ctx, loaded, dict(model=model, budget=budget, targets=targets, objective=objective, family=family, max_r=max_r))
    adapter = loaded.adapter if loaded else AdapterSettings()
    if reference is None and (device != "auto" or all_pairs):
        raise ArgumentError("--device and --all-pairs act on --reference planning only: give --reference FILE or leave them out")
    updates = None
    if reference is not None:
        from cdka_search.alignment.reference import load_reference

        updates = load_reference(reference)
    spec = _load(opts["model"])
    space = _space(opts["family"], r1, r2, r, opts["max_r"])
    result = make_plan(
        spec, opts["budget"], targets=opts["targets"], objective=opts["objective"],
        space=space, adapter=adapter, seed=seed, reference=updates, per_layer=per_layer, all_pairs=all_pairs,
        device=device,
    )
    result = record_model_path(result, opts["model"])
    written = save_plan(result, output or Path("plan.yaml"), fmt)
    covered = _coverage(spec, opts["targets"], space)
    render(plan_table(result, written, covered, unspent_reason(result, space)), as_json=as_json)


@app.command()
@guarded
def models(as_json: JsonOpt = False) -> None:
    """List the embedded presets and their aliases (all offline).

    Example: cdka models --json
    """
    from cdka_search.render import render
    from cdka_search.views import models_table

    render(models_table(), as_json=as_json)


@app.command()
@guarded
def inspect(
    model: Annotated[Optional[str], typer.Argument(help="Preset, alias, HF folder, config.json or .safetensors file.")] = None,
    model_option: Annotated[Optional[str], typer.Option("--model", "-m", help="The model, as plan takes it (instead of the argument).")] = None,
    targets: TargetsOpt = "all-linear",
    as_json: JsonOpt = False,
) -> None:
    """Show a model's target modules, shapes and counts.

    Examples: cdka inspect llama-2-7b;  cdka inspect -m ./gpt2/model.safetensors --targets attn
    """
    from cdka_search.render import render
    from cdka_search.targets import select_targets
    from cdka_search.views import inspect_table

    if (model is None) == (model_option is None):
        raise ArgumentError("give the model once: cdka inspect MODEL or cdka inspect --model MODEL")
    spec = _load(model if model is not None else model_option)
    covered = _coverage(spec, targets)
    render(inspect_table(select_targets(spec, targets), covered), as_json=as_json)


@app.command()
@guarded
def explain(
    shape: Annotated[str, typer.Option("--shape", help="d_out x d_in, e.g. 4096x11008.")],
    params: Annotated[Optional[str], typer.Option("--params", help="Only candidates with at most this many parameters (20k, 1e5, ...).")] = None,
    objective: ObjectiveOpt = "rank",
    family: FamilyOpt = "cdka",
    r1: R1Opt = None,
    r2: R2Opt = None,
    r: ROpt = None,
    max_r: MaxROpt = None,
    top: Annotated[int, typer.Option(help="How many candidates to list.")] = 15,
    as_json: JsonOpt = False,
) -> None:
    """Rank the candidates of one weight shape, scores explained, Pareto front marked.

    Examples: cdka explain --shape 4096x11008 --params 70000;  cdka explain --shape 768x2304 --family lora
    """
    from cdka_search.planner import explain_shape, parse_shape, shape_budget
    from cdka_search.render import render
    from cdka_search.views import explain_table

    d_out, d_in = parse_shape(shape)
    limit = shape_budget(params, d_out, d_in) if params else None
    rows = explain_shape(d_out, d_in, max_params=limit, objective=objective, space=_space(family, r1, r2, r, max_r), top=top)
    render(explain_table((d_out, d_in), rows, objective, limit), as_json=as_json)


@app.command()
@guarded
def validate(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by cdka plan (or edited by hand).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Also check the plan against this model (default: the local model the plan was made from, if any).")] = None,
) -> None:
    """Check a plan against its schema and, with --model, against a model; list every problem.

    Examples: cdka validate plan.yaml;  cdka validate plan.yaml --model llama-2-7b
    """
    from cdka_search.matching import summarise
    from cdka_search.plan import heads_text, load_plan
    from cdka_search.planner import plan_model, plan_problems

    loaded = load_plan(plan_file)
    checked = plan_model(loaded, model)
    problems = plan_problems(loaded, checked[0]) if checked is not None else []
    if problems:
        raise PlanError(f"{plan_file}: {len(problems)} problem(s): " + summarise(problems, sep=" | "))
    against = f" and matches {checked[1]}" if checked is not None else ""
    heads = f"; trained whole: {heads_text(loaded.modules_to_save)}" if loaded.modules_to_save else ""
    typer.echo(f"{printable(f'{plan_file}: valid plan{against}')} ({len(loaded.groups)} groups, {loaded.used_params:,} of "
               f"{loaded.budget_limit:,} parameters{heads})")
