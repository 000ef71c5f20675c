"""Recipes: every file under recipes/ loads, validates and plans offline; strict keys; the CLI commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdka_search.cli.app import app
from cdka_search.errors import PlanError
from cdka_search.planner import make_plan
from cdka_search.recipes import (
    Recipe,
    RecipeError,
    list_recipes,
    load_recipe,
    recipes_root,
)
from cdka_search.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent / "recipes"
FILES = sorted(ROOT.rglob("*.yaml"))
runner = CliRunner(env={"COLUMNS": "200"})


def test_the_source_tree_has_recipes_for_every_promised_model():
    models = {load_recipe(p).model for p in FILES}
    assert {"llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2-7b", "roberta-base"} <= models
    assert recipes_root() == ROOT or (recipes_root() / FILES[0].relative_to(ROOT)).is_file()


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_every_recipe_loads_validates_and_plans(path):
    text = path.read_text()
    name = path.relative_to(ROOT).with_suffix("").as_posix()
    assert text.startswith("# "), "a recipe opens with a comment saying what it is for"
    assert f"--recipe {name}" in text, "... and the exact command that runs it"
    recipe = load_recipe(name)
    assert recipe == load_recipe(path) and recipe.name == name
    assert Recipe.from_dict(yaml.safe_load(text), name) == recipe
    assert Recipe.from_dict(recipe.to_dict(), name) == recipe  # round trip
    plan = make_plan(load_spec(recipe.model), **recipe.plan_kwargs())
    assert 0 < plan.used_params <= plan.budget_limit
    assert plan.adapter == recipe.adapter
    assert all(g.design.r == 1 for g in plan.groups) or recipe.family != "lokr"


def test_names_are_family_slash_size_purpose():
    for name in list_recipes():
        family, stem = name.split("/")
        size, purpose = stem.split("_", 1)
        assert family and size and purpose


BASE = {"cdka_recipe": 1, "model": "llama-2-7b"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**BASE, "budjet": "1%"}, "unknown key 'budjet' (did you mean 'budget'?); allowed: cdka_recipe, model"),
        ({**BASE, "sweep": {"trails": 3}}, "sweep: unknown key 'trails' (did you mean 'trials'?)"),
        ({**BASE, "train": {"warmup": 0.1}}, "did you mean 'warmup_ratio'?"),
        ({**BASE, "adapter": {"alpah": 8}}, "did you mean 'alpha'?"),
        ({**BASE, "cdka_recipe": 2}, "recipe schema 1"),
        ({"cdka_recipe": 1}, "missing key 'model'"),
        ({**BASE, "family": "loha"}, "family 'loha' is not one of cdka, every, lora, lokr"),
        ({**BASE, "objective": "best"}, "objective 'best'"),
        ({**BASE, "sweep": {"lr": [1e-3, 1e-5]}}, "0 < low < high"),
        ({**BASE, "sweep": {"task": "glue"}}, "sweep.task 'glue'"),
        ({**BASE, "train": {"warmup_ratio": 3}}, "below 1"),
        ({**BASE, "train": {"batch_size": 0}}, "train.batch_size: must be above 0"),
        ({**BASE, "sweep": {"seed": 2**32}}, "sweep.seed: must be at most 4,294,967,295, got 4294967296"),
        ({**BASE, "train": {"scheduler": "step"}}, "train.scheduler 'step'"),
        ({**BASE, "max_r": "8"}, "max_r: expected an integer"),
        ([1, 2], "expected a mapping"),
        ({**BASE, "budget": "banana"}, "recipe x: budget: budget 'banana' is not understood; use a percentage"),
        ({**BASE, "budget": "lora:0"}, "recipe x: budget: budget 'lora:0': the LoRA rank must be an integer from 1"),
        ({**BASE, "budget": "200%"}, "recipe x: budget: budget '200%': a percentage must be above 0 and at most 100"),
        ({**BASE, "targets": ",,"}, "recipe x: targets: empty target list; use one of all-linear, attn, mlp, experts"),
        ({**BASE, "targets": "x" * 600}, "recipe x: targets: module pattern of 600 characters: the limit is 512"),
    ],
)
def test_bad_recipes_are_one_clear_error(data, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data, "x")
    assert message in str(info.value)
    assert isinstance(info.value, PlanError) and isinstance(info.value, ValueError)


def test_defaults_live_in_the_dataclass():
    r = Recipe.from_dict({**BASE, "budget": 20000000})
    assert r.budget == "20000000" and r.train.lr == 2e-4 and r.train.warmup_ratio == 0.03  # cdka-notes.md section 3
    assert r.train.batch_size == 32 and r.train.max_length == 1024 and r.sweep.task == "proxy"


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(RecipeError, match="did you mean 'llama3/8B_cdka_lora8'"):
        load_recipe("llama3/8B_cdka")


def test_invalid_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cdka_recipe: 1\nmodel: [llama\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_cli_list_and_show():
    listed = runner.invoke(app, ["recipes", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {row["name"] for row in __import__("json").loads(listed.stdout)["rows"]} == set(list_recipes())
    shown = runner.invoke(app, ["recipes", "show", "qwen2/7B_cdka_lora8"])
    assert shown.exit_code == 0 and shown.stdout == (ROOT / "qwen2/7B_cdka_lora8.yaml").read_text()
    missing = runner.invoke(app, ["recipes", "show", "qwen/7B"])
    assert missing.exit_code == 5 and missing.stderr.startswith("error: no recipe 'qwen/7B'")
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("line", "message"), [
    ("budget: banana", "budget: budget 'banana' is not understood"),
    ('targets: ","', "targets: empty target list"),
])
def test_show_and_use_refuse_the_same_recipe(tmp_path, line, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"cdka_recipe: 1\nmodel: gpt2\n{line}\n")
    for args in (["recipes", "show", str(recipe)], ["plan", "--recipe", str(recipe), "-o", str(tmp_path / "p.yaml")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 5 and result.stderr.startswith(f"error: recipe bad: {message}")
        assert result.stderr.count("\n") == 1 and not (tmp_path / "p.yaml").exists()


def test_a_recipe_path_that_is_no_regular_file_is_named_so(tmp_path):
    import os

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)  # reading it would block: refused from its type, before any open
    for given in (fifo, Path("/dev/zero")):
        result = runner.invoke(app, ["plan", "--recipe", str(given), "-o", str(tmp_path / "p.yaml")])
        assert result.exit_code == 5 and result.stderr == f"error: {given}: not a regular file\n"
        assert not (tmp_path / "p.yaml").exists()


def test_cli_export_writes_or_refuses_with_no_file(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    assert runner.invoke(app, ["plan", "-m", "gpt2", "-b", "lora:4", "--family", "lora", "-o", str(plan_file)]).exit_code == 0
    ok = runner.invoke(app, ["export", str(plan_file), "--to", "peft", "-o", str(tmp_path / "cfg.json"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "cfg.json").is_file()
    assert '"fan_in_fan_out": true' in (tmp_path / "cfg.json").read_text()  # GPT-2 Conv1D, weight stored (in, out)
    refused = runner.invoke(app, ["export", str(plan_file), "--to", "lycoris", "--out", str(tmp_path / "ly")])
    assert refused.exit_code == 8 and "Conv1D" in refused.stderr and not (tmp_path / "ly").exists()
    unknown = runner.invoke(app, ["export", str(plan_file), "--to", "onnx"])
    assert unknown.exit_code == 8 and "choose one of peft, lycoris" in unknown.stderr


def test_a_recipe_path_that_is_a_folder_or_a_dead_link_is_named_as_such(tmp_path):
    """Both read "no recipe ...; known recipes: ...", as if a recipe name had been mistyped."""
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "self.yaml").symlink_to(tmp_path / "self.yaml")
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing.yaml")
    for name, why in [("dir.yaml", "a folder; give a recipe's YAML file or name"),
                      ("self.yaml", "a link that leads to nothing (a missing file or a loop)"),
                      ("gone.yaml", "a link that leads to nothing (a missing file or a loop)")]:
        with pytest.raises(RecipeError) as raised:
            load_recipe(str(tmp_path / name))
        assert str(raised.value) == f"--recipe '{tmp_path / name}': {why}"
