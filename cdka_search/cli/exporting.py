"""Commands that hand a plan to other tools: export (PEFT, LyCORIS) and recipes (list, show)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdka_search.cli.common import JsonOpt, guarded, output_option

app = typer.Typer()
recipes_app = typer.Typer(no_args_is_help=True, help="Ready recipes (model, targets, budget, sweep space, training defaults).")


@app.command()
@guarded
def export(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by cdka plan (YAML or JSON).")],
    to: Annotated[str, typer.Option("--to", help="peft (LoraConfig / LoKrConfig JSON) or lycoris (TOML preset).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The model, to list module names when the plan is not a preset's (default: the local model the plan was made from).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write into (peft: peft_adapter/, lycoris: .).")] = None,
    output: Annotated[Optional[Path], output_option("Single file to write (when the export is one file).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a plan as another tool's adapter config, exactly or not at all.

    PEFT: LoRA groups -> one LoraConfig, single Kronecker terms -> one LoKrConfig per factor; groups
    with r > 1 components are refused by name. LyCORIS: one name_algo_map entry per module.

    Examples:

      cdka plan -m llama --family lokr -o plan.yaml && cdka export plan.yaml --to peft --out adapter/

      cdka export plan.yaml --to lycoris -o preset.toml

      cdka export plan.yaml --to peft --model ./my-model -o adapter_config.json
    """
    from cdka_search.export import export_plan, write_export
    from cdka_search.export.base import export_table
    from cdka_search.plan import load_plan
    from cdka_search.planner import plan_model, record_model_path
    from cdka_search.render import render

    loaded = load_plan(plan_file)
    checked = plan_model(loaded, model)
    spec = checked[0] if checked is not None else None
    if model is not None:  # the model given is the one PEFT's check builds, not a path the plan recorded
        loaded = record_model_path(loaded, model)
    result = export_plan(loaded, to, spec)
    written = write_export(result, out_dir=out, out_file=output)
    render(export_table(result, written), as_json=as_json)


@recipes_app.command("list")
@guarded
def list_(as_json: JsonOpt = False) -> None:
    """List the recipes shipped with cdka.

    Example: cdka recipes list --json
    """
    from cdka_search.recipes import list_recipes, load_recipe, recipes_root
    from cdka_search.render import Table, render

    recipes = [load_recipe(name) for name in list_recipes()]
    rows = tuple((r.name, r.model, r.budget, r.family, r.description) for r in recipes)
    render(
        Table(f"Recipes in {recipes_root()}", ("Name", "Model", "Budget", "Family", "Description"), rows,
              notes=("Use one: cdka plan --recipe NAME;  see it: cdka recipes show NAME",)),
        as_json=as_json,
    )


@recipes_app.command("show")
@guarded
def show(
    name: Annotated[str, typer.Argument(help="A recipe name from `cdka recipes list`, or a YAML file.")],
    as_json: JsonOpt = False,
) -> None:
    """Print a recipe (the file as written, comments included), after validating it.

    Examples: cdka recipes show llama2/7B_cdka_lora8;  cdka recipes show ./my_recipe.yaml --json
    """
    import json

    from cdka_search.documents import printable
    from cdka_search.recipes import load_recipe

    recipe = load_recipe(name)
    if as_json:
        typer.echo(json.dumps({"name": recipe.name, "path": str(recipe.path), **recipe.to_dict()}, indent=2))
    else:
        text = recipe.path.read_text(encoding="utf-8")  # type: ignore[union-attr]
        typer.echo("".join(printable(line) + "\n" for line in text.splitlines()), nl=False)
