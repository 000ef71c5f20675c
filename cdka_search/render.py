"""One renderer for every table: plain rows in, a rich table or JSON out (data goes to stdout)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Table:
    """Rows of plain values under named columns, with an optional title and footer lines."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] | None = None  # carried into JSON output only

    def records(self) -> list[dict[str, Any]]:
        keys = [c.lower().replace(" ", "_") for c in self.columns]
        return [dict(zip(keys, row)) for row in self.rows]


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render(table: Table, *, as_json: bool = False, stream=None) -> None:
    """Print ``table`` to ``stream`` (stdout) as a rich table, or as one JSON object."""
    out = stream or sys.stdout
    if as_json:
        payload: dict[str, Any] = {"title": table.title, "rows": table.records()}
        if table.extra:
            payload.update(table.extra)
        out.write(json.dumps(payload, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    # Off a terminal (pipes, files, CI logs) use a fixed width so output is the same everywhere.
    console = Console(file=out, width=Console().width if out.isatty() else 160, highlight=False)
    rich_table = RichTable(title=table.title, title_justify="left")
    for i, column in enumerate(table.columns):
        rich_table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in table.rows:
        rich_table.add_row(*(_cell(v) for v in row))
    console.print(rich_table)
    for note in table.notes:
        console.print(note, soft_wrap=True)


def info(message: str) -> None:
    """A diagnostic line on stderr (never mixed into data on stdout)."""
    sys.stderr.write(message + "\n")


def rows_of(values: Sequence[Sequence[Any]]) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(v) for v in values)
