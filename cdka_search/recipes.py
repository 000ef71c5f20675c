"""Recipes: ready, validated YAML settings for a model (targets, budget, objective, sweep space, training).

A recipe lives at ``recipes/<family>/<size>_<purpose>.yaml`` and is named by that path without the
suffix (``llama2/7B_cdka_lora8``). Schema (version 1)::

    cdka_recipe: 1
    description: one line                  # what the recipe is for
    model: llama-2-7b                      # preset, alias, or a local folder / config.json
    targets: all-linear                    # all-linear, attn, mlp, or comma-separated names/globs
    budget: lora:8                         # "0.5%", "20M", "lora:8", ...
    objective: balanced                    # balanced, capacity, alignment
    family: cdka                           # cdka, lora, lokr
    max_r: 64                              # a hard cap on r (default: automatic, see CandidateSpace)
    adapter: {alpha, scaling, dropout, init, dtype}          # the plan's adapter block
    sweep: {trials, steps, task, top_k, lr: [lo, hi], alpha: [choices], seed}
    train: {optimizer, lr, weight_decay, warmup_ratio, scheduler, epochs, batch_size, max_length, source}

Every key is optional except ``cdka_recipe`` and ``model``; defaults live in the dataclasses below.
Unknown keys are errors naming the allowed keys and the nearest one. Recipes are found in the source
checkout's top-level ``recipes/`` folder or, in an installed wheel, in the package data
``cdka_search/recipe_files/`` (a link to ``recipes/`` in the source tree).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from cdka_search.budget import check_budget_text
from cdka_search.candidates import FAMILIES, CandidateSpace
from cdka_search.documents import brief, read_text_file, read_yaml, regular_file, reject_unknown
from cdka_search.errors import CdkaError, PlanError
from cdka_search.fileio import absent, user_path
from cdka_search.limits import MAX_DIM, MAX_SEED, MAX_TOP_K, MAX_TRIALS
from cdka_search.plan import AdapterSettings
from cdka_search.targets import selection_items

__all__ = [
    "RECIPE_SCHEMA_VERSION",
    "Recipe",
    "RecipeError",
    "SweepSettings",
    "TrainSettings",
    "list_recipes",
    "load_recipe",
    "recipe_path",
    "recipes_root",
]

RECIPE_SCHEMA_VERSION = 1
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)
_SUFFIX = ".yaml"


class RecipeError(PlanError):
    """A recipe that is missing, malformed or inconsistent (a document error, exit code as PlanError)."""


def _reject_unknown(data: Mapping[str, Any], cls: type, where: str, extra: tuple[str, ...] = ()) -> None:
    allowed = [*extra, *(f.name for f in fields(cls) if f.init and f.name not in ("name", "path"))]
    reject_unknown(data, allowed, where, RecipeError)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _number(value: Any, where: str, *, low: float = 0.0, strict: bool = True, integer: bool = False, high: float = 1e6) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
        raise RecipeError(f"{where}: expected {'an integer' if integer else 'a finite number'}, got {brief(value)}")
    if value < low or (strict and value == low):
        raise RecipeError(f"{where}: must be {'above' if strict else 'at least'} {_bound(low, integer)}, got {brief(value)}")
    if value > high:
        raise RecipeError(f"{where}: must be at most {_bound(high, integer)}, got {brief(value)}")
    return value


def _bound(value: float, integer: bool) -> str:
    """A range end as the user writes it: an integer's in full (4,294,967,295, not 4.29497e+09)."""
    return f"{int(value):,}" if integer else f"{value:g}"


@dataclass(frozen=True)
class SweepSettings:
    """The sweep's defaults: ``trials`` Optuna trials of ``steps`` training steps on ``task`` (proxy or
    lm), ``top_k`` design families per group, the learning rate searched log-uniformly in ``lr`` and
    the adapter alpha among ``alpha``."""

    trials: int = 40
    steps: int = 200
    task: str = "proxy"
    top_k: int = 6
    lr: tuple[float, float] = (5e-5, 1e-3)
    alpha: tuple[float, ...] = (16.0, 32.0, 64.0, 128.0)
    seed: int = 0

    def __post_init__(self) -> None:
        _number(self.trials, "sweep.trials", integer=True, high=MAX_TRIALS)
        _number(self.steps, "sweep.steps", integer=True, high=10**7)
        _number(self.top_k, "sweep.top_k", integer=True, high=MAX_TOP_K)
        _number(self.seed, "sweep.seed", strict=False, integer=True, high=MAX_SEED)
        from cdka_search.sweep.tasks import task_names

        tasks = task_names()
        if self.task not in tasks:
            raise RecipeError(f"sweep.task {brief(self.task)} is not one of {', '.join(tasks)}")
        if len(self.lr) != 2 or not 0 < _number(self.lr[0], "sweep.lr[0]", high=10) < _number(self.lr[1], "sweep.lr[1]", high=10):
            raise RecipeError(f"sweep.lr must be [low, high] with 0 < low < high, got {brief(list(self.lr))}")
        if not self.alpha or len(self.alpha) > 64:
            raise RecipeError("sweep.alpha must list 1 to 64 values")
        for i, a in enumerate(self.alpha):
            _number(a, f"sweep.alpha[{i}]")

    @classmethod
    def from_dict(cls, data: Any) -> "SweepSettings":
        data = dict(_mapping(data, "sweep"))
        _reject_unknown(data, cls, "sweep")
        for key in ("lr", "alpha"):
            if key in data:
                if not isinstance(data[key], list):
                    raise RecipeError(f"sweep.{key}: expected a list, got {brief(data[key])}")
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True)
class TrainSettings:
    """Training defaults. Unless ``source`` says otherwise they are the paper's reference recipe
    (cdka-notes.md section 3): AdamW, lr 2e-4, weight decay 5e-4, 3 % warm-up, cosine, 1 epoch,
    effective batch 32, max length 1024."""

    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 5e-4
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    epochs: float = 1
    batch_size: int = 32
    max_length: int = 1024
    source: str = "CDKA reference code (cdka-notes.md section 3)"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"train.optimizer {brief(self.optimizer)} is not one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise RecipeError(f"train.scheduler {brief(self.scheduler)} is not one of {', '.join(SCHEDULERS)}")
        _number(self.lr, "train.lr", high=10)
        _number(self.weight_decay, "train.weight_decay", strict=False)
        _number(self.warmup_ratio, "train.warmup_ratio", strict=False)
        if self.warmup_ratio >= 1:
            raise RecipeError(f"train.warmup_ratio is a fraction of training, below 1; got {self.warmup_ratio}")
        _number(self.epochs, "train.epochs", high=1000)
        _number(self.batch_size, "train.batch_size", integer=True, high=1 << 16)
        _number(self.max_length, "train.max_length", integer=True, high=1 << 20)
        if not isinstance(self.source, str) or not self.source:
            raise RecipeError("train.source: say where the values come from")

    @classmethod
    def from_dict(cls, data: Any) -> "TrainSettings":
        data = _mapping(data, "train")
        _reject_unknown(data, cls, "train")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``name`` is its path under recipes/ without .yaml (or the file's stem)."""

    model: str
    description: str = ""
    targets: str = "all-linear"
    budget: str = "0.5%"
    objective: str = "rank"
    family: str = "cdka"
    max_r: int | None = None
    adapter: AdapterSettings = AdapterSettings()
    sweep: SweepSettings = SweepSettings()
    train: TrainSettings = TrainSettings()
    name: str = ""
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        from cdka_search.scoring import OBJECTIVES

        for key in ("model", "targets", "budget"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise RecipeError(f"{key}: expected a non-empty string, got {brief(getattr(self, key))}")
        # The form of each value is checked here, so `cdka recipes show` and --recipe accept the same
        # recipes; what depends on the model (a budget it can hold, targets it has) is checked on use.
        for key, check in (("budget", check_budget_text), ("targets", selection_items)):
            try:
                check(getattr(self, key))
            except CdkaError as exc:
                raise RecipeError(f"{key}: {exc}") from None
        if not isinstance(self.description, str):
            raise RecipeError(f"description: expected a text, got {brief(self.description)}")
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise RecipeError(f"objective {brief(self.objective)} is not one of {', '.join(OBJECTIVES)}")
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise RecipeError(f"family {brief(self.family)} is not one of {', '.join(FAMILIES)}")
        if self.max_r is not None:
            _number(self.max_r, "max_r", integer=True, high=MAX_DIM)

    @classmethod
    def from_dict(cls, data: Any, name: str = "", path: Path | None = None) -> "Recipe":
        where = f"recipe {name}" if name else "recipe"
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping with a 'cdka_recipe' version key")
        try:
            _reject_unknown(data, cls, "recipe", extra=("cdka_recipe",))
            if isinstance(data.get("cdka_recipe"), bool) or data.get("cdka_recipe") != RECIPE_SCHEMA_VERSION:
                raise RecipeError(
                    f"'cdka_recipe' is {brief(data.get('cdka_recipe'))}; this cdka reads recipe schema {RECIPE_SCHEMA_VERSION}"
                )
            if "model" not in data:
                raise RecipeError("missing key 'model'")
            values = {k: v for k, v in data.items() if k not in ("cdka_recipe", "adapter", "sweep", "train")}
            if isinstance(values.get("budget"), (int, float)) and not isinstance(values["budget"], bool):
                values["budget"] = f"{values['budget']:g}" if isinstance(values["budget"], float) else str(values["budget"])
            try:
                adapter = AdapterSettings.from_dict(_mapping(data.get("adapter"), "adapter"))
            except PlanError as exc:
                raise RecipeError(str(exc)) from None
            return cls(
                **values,
                adapter=adapter,
                sweep=SweepSettings.from_dict(data.get("sweep")),
                train=TrainSettings.from_dict(data.get("train")),
                name=name,
                path=path,
            )
        except TypeError as exc:  # a wrong type reached a dataclass
            raise RecipeError(f"{where}: {exc}") from None
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cdka_recipe": RECIPE_SCHEMA_VERSION,
            "description": self.description,
            "model": self.model,
            "targets": self.targets,
            "budget": self.budget,
            "objective": self.objective,
            "family": self.family,
            **({"max_r": self.max_r} if self.max_r is not None else {}),
            "adapter": self.adapter.to_dict(),
            "sweep": self.sweep.to_dict(),
            "train": self.train.to_dict(),
        }

    def space(self) -> CandidateSpace:
        return CandidateSpace(max_r=self.max_r, family=self.family)

    def plan_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``make_plan`` (after the spec): make_plan(load_spec(r.model), **r.plan_kwargs())."""
        return {
            "budget": self.budget,
            "targets": self.targets,
            "objective": self.objective,
            "space": self.space(),
            "adapter": self.adapter,
        }


def recipes_root() -> Path:
    """The folder holding the recipes: package data, a link to the source tree's recipes/."""
    packaged = Path(__file__).resolve().parent / "recipe_files"
    if not packaged.is_dir():
        raise RecipeError(f"no recipes folder at {packaged}; reinstall cdka")
    return packaged


def list_recipes(root: Path | None = None) -> list[str]:
    """Every recipe name (``family/size_purpose``), sorted."""
    base = root or recipes_root()
    return sorted(p.relative_to(base).with_suffix("").as_posix() for p in base.rglob(f"*{_SUFFIX}") if p.is_file())


def recipe_path(name: str, root: Path | None = None) -> Path:
    """The file of a recipe given by name (``llama2/7B_cdka_lora8``) or as a path to a YAML file."""
    given = user_path(name, RecipeError, "--recipe")
    if given.exists() and not given.is_dir():  # a file, or a FIFO or device that no name lookup may hide
        return regular_file(given, RecipeError)
    base = root or recipes_root()
    key = name.strip().removesuffix(_SUFFIX)
    candidate = base / f"{key}{_SUFFIX}"
    if key and candidate.is_file():
        return candidate
    if given.is_dir() or given.is_symlink():  # a path the user meant, not a recipe name
        why = "a folder; give a recipe's YAML file or name" if given.is_dir() else absent(given)
        raise RecipeError(f"--recipe {name!r}: {why}")
    names = list_recipes(base)
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.3)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise RecipeError(f"no recipe {name!r}{hint}; known recipes: {', '.join(names)} (see `cdka recipes list`)")


def load_recipe(name: str | Path, root: Path | None = None) -> Recipe:
    """Read and validate a recipe by name or path (strict, safe YAML only)."""
    file = recipe_path(str(name), root)
    try:
        base = (root or recipes_root()).resolve()
    except RecipeError:
        base = None
    full = file.resolve()
    label = full.relative_to(base).with_suffix("").as_posix() if base and full.is_relative_to(base) else file.stem
    data = read_yaml(read_text_file(file, RecipeError), str(file), RecipeError)
    return Recipe.from_dict(data, label, file)
