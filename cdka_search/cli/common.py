"""Options shared by several commands, declared once, and the error boundary."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

from cdka_search.documents import brief, printable
from cdka_search.errors import ArgumentError, CdkaError, CdkaWarning, one_line
from cdka_search.scoring import RANK_KNEE

F = TypeVar("F", bound=Callable)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Preset (cdka models), family alias (llama, gpt2, ...), HF folder, config.json or .safetensors."),
]
BudgetOpt = Annotated[
    str,
    typer.Option("--budget", "-b", help='Trainable parameters: "0.5%" of the model, "20M", "1.5B", "2e7", or "lora:8".'),
]
TargetsOpt = Annotated[
    str,
    typer.Option("--targets", "-t", help="all-linear (default: every weight incl. MoE experts; no LM head, embeddings or routers), attn, mlp (incl. experts), experts, names/globs, or a comma list of these (their union)."),
]
ObjectiveOpt = Annotated[
    str, typer.Option("--objective", help=f"rank = sqrt(min(capacity, {RANK_KNEE}) * size) (default: what real fine-tuning supports, docs/validity.md), balanced = sqrt(capacity * alignment), or alignment (for --reference).")
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where torch runs: auto (CUDA where present), cpu, cuda or cuda:N.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def file_name(text: str | Path) -> Path:
    """A file to write, checked as typed: pathlib drops a trailing '/', so ``-o out/`` would write a
    file named ``out``, and ``-o -`` a file named ``-`` where Unix tools mean standard output."""
    if isinstance(text, Path):
        return text
    if not text.strip():
        raise typer.BadParameter("is empty; give a file name")
    if text == "-":
        raise typer.BadParameter("'-' (standard output) is not written to; give a file name")
    if text.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{brief(text)} names a folder; give a file name")
    return Path(text)


def output_option(help: str) -> Any:
    """The ``-o`` of a command that writes one file (``file_name`` checks it)."""
    return typer.Option("--output", "-o", parser=file_name, metavar="<file>", help=help)


OutputOpt = Annotated[Optional[Path], output_option("Where to write the plan.")]
StorageOpt = Annotated[
    Optional[str], typer.Option("--storage", help="Optuna storage: sqlite:///file.db (default), postgresql://..., or a journal file path.")
]


RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", help="A recipe name (cdka recipes list) or YAML file; flags given on the command line win."),
]


def from_recipe(ctx: typer.Context, source: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each option the user did not type replaced by ``source``'s attribute of that name."""
    if source is None:
        return values
    merged = dict(values)
    for name in values:
        typed = ctx.get_parameter_source(name)
        if (typed is None or typed.name == "DEFAULT") and hasattr(source, name):
            merged[name] = getattr(source, name)
    return merged


def load_recipe_option(recipe: str | None) -> Any:
    """The Recipe named by --recipe, or None."""
    if recipe is None:
        return None
    from cdka_search.recipes import load_recipe

    return load_recipe(recipe)


def _check_arguments(arguments: dict[str, Any]) -> None:
    """Every path argument checked where it enters (names the system cannot take), and no text argument
    empty (``-m ''`` would name the current folder, ``--study ''`` no study), before any work."""
    from cdka_search.fileio import check_path

    for name, value in arguments.items():
        flag = f"--{name.removesuffix('_option').replace('_', '-')}"
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Path):
                check_path(item, ArgumentError, flag)
            elif isinstance(item, str) and not item.strip():
                raise ArgumentError(f"{flag} is empty")


def guarded(fn: F) -> F:
    """Turn a CdkaError into one line on stderr and its exit code (CDKA_DEBUG=1 shows the traceback),
    and each CdkaWarning into one ``warning:`` line; other libraries' warnings keep their own form."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_arguments(kwargs)
            with warnings.catch_warnings():
                shown = warnings.showwarning

                def show(message, category, filename, lineno, file=None, line=None):
                    if issubclass(category, CdkaWarning):
                        sys.stderr.write(f"warning: {printable(str(message))}\n")
                    else:
                        shown(message, category, filename, lineno, file, line)

                warnings.showwarning = show
                return fn(*args, **kwargs)
        except CdkaError as exc:
            if os.environ.get("CDKA_DEBUG"):
                raise
            sys.stderr.write(f"error: {printable(str(exc))}\n")
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # the system refused a file that no reader's own check caught
            if os.environ.get("CDKA_DEBUG"):
                raise
            where = f"{brief(os.fsdecode(exc.filename))}: " if exc.filename is not None else ""
            sys.stderr.write(f"error: {printable(where + (exc.strerror or one_line(exc)))}\n")
            raise typer.Exit(CdkaError.exit_code) from None

    return wrapper  # type: ignore[return-value]
