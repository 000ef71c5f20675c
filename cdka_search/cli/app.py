"""The typer application: registers each command module; exit codes are documented in README."""

from __future__ import annotations

from typing import Annotated

import typer

from cdka_search.cli import exporting, planning, probing, sweeping

app = typer.Typer(
    name="cdka",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Plan, refine and export Component Designed Kronecker Adapters (CDKA) under a parameter budget.",
)
app.registered_commands += planning.app.registered_commands
app.registered_commands += sweeping.app.registered_commands
app.registered_commands += exporting.app.registered_commands
app.add_typer(exporting.recipes_app, name="recipes")
app.registered_commands += probing.app.registered_commands


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"cdka {version('cdka')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Plan, refine and export Component Designed Kronecker Adapters (CDKA) under a parameter budget."""


def main() -> None:
    app()
