"""The typer application: registers each command module; exit codes are documented in README."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.exceptions import TyperException

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
    """The console entry point. Click's own usage errors (an unknown option, a value that is not a
    number) become one ``error:`` line with ArgumentError's exit code, as every other error does: click
    draws a box of several lines and exits 2, the budget's code. No arguments at all prints the help."""
    import sys

    from cdka_search.documents import printable
    from cdka_search.errors import ArgumentError, OutputError, first_line

    if sys.stdout is None:  # started with stdout closed (`cdka models >&-`): nothing could be printed
        if sys.stderr is not None:
            sys.stderr.write("error: standard output is closed\n")
        sys.exit(OutputError.exit_code)
    try:
        code = app(standalone_mode=False, prog_name="cdka")  # also under `python -m cdka_search`
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(1)
    except TyperException as exc:  # click's ClickException, whose usage errors carry the command
        if type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        context = getattr(exc, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"error: {printable(first_line(message) or type(exc).__name__)}{hint}\n")
        sys.exit(ArgumentError.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
