"""One renderer for every table: plain rows in, a rich table or JSON out (data goes to stdout)."""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

from cdka_search.documents import printable


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
    return printable(str(value))


PLAIN_FROM = 100  # rows: rich spends ~0.4 ms a row (1.5 s on a 3,584-module per-layer plan)
_PLAIN_TEXT = frozenset(chr(c) for c in range(0x20, 0x7F))  # one cell each (markup is off)


def _plain_table(table: Table, width: int) -> str | None:
    """The text rich prints for ``table`` without colours, built directly; None where rich would do
    more than pad (wide characters, edge spaces, a table or title that does not fit)."""
    cells = [[_cell(v) for v in row] for row in table.rows]
    texts = [table.title, *table.columns, *(c for row in cells for c in row)]
    if not table.title or any(not _PLAIN_TEXT.issuperset(t) or t != t.strip() for t in texts):
        return None
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(table.columns)]
    total = sum(widths) + 3 * len(widths) + 1
    if total > width or len(table.title) > total:
        return None

    def line(edge: str, inner: str, values: Sequence[str]) -> str:
        padded = (v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
        return edge + inner.join(f" {v} " for v in padded) + edge + "\n"

    rule = ["━" * (w + 2) for w in widths]
    return "".join([
        table.title.ljust(total) + "\n", "┏" + "┳".join(rule) + "┓\n", line("┃", "┃", table.columns),
        "┡" + "╇".join(rule) + "┩\n", *(line("│", "│", row) for row in cells),
        "└" + "┴".join("─" * (w + 2) for w in widths) + "┘\n",
    ])


def render(table: Table, *, as_json: bool = False, stream=None) -> None:
    """Print ``table`` to ``stream`` (stdout) as a rich table, or as one JSON object; OutputError
    naming the stream where it cannot be written (stdout on a full disk, /dev/full)."""
    out = stream or sys.stdout
    try:
        _render(table, as_json, out)
        out.flush()
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # a reader that stopped early (`| head`): quiet, as the CLI ends it
            raise
        from cdka_search.errors import OutputError

        where = "standard output" if out is sys.stdout else getattr(out, "name", "the output")
        raise OutputError(f"{where}: {exc.strerror or exc}") from None


def _render(table: Table, as_json: bool, out) -> None:
    if as_json:
        payload: dict[str, Any] = {"title": table.title, "rows": table.records()}
        if table.extra:
            payload.update(table.extra)
        out.write(json.dumps(payload, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    # Off a terminal (pipes, files, CI logs) use a fixed width so output is the same everywhere. Text from
    # files (module names) is shown as text: no rich markup ("[/]" in a tensor name), no control characters.
    console = Console(file=out, width=Console().width if out.isatty() else 160, highlight=False, markup=False)
    table = replace(table, title=printable(table.title), notes=tuple(map(printable, table.notes)))
    plain = _plain_table(table, console.width) if len(table.rows) >= PLAIN_FROM and console.color_system is None else None
    if plain is not None:
        out.write(plain)
        for note in table.notes:
            console.print(note, soft_wrap=True)
        return
    rich_table = RichTable(title=Text(table.title), title_justify="left")
    for i, column in enumerate(table.columns):
        rich_table.add_column(Text(column), justify="left" if i == 0 else "right", no_wrap=True)
    for row in table.rows:
        rich_table.add_row(*(Text(_cell(v)) for v in row))
    console.print(rich_table)
    for note in table.notes:
        console.print(note, soft_wrap=True)


def info(message: str) -> None:
    """A diagnostic line on stderr (never mixed into data on stdout)."""
    sys.stderr.write(printable(message) + "\n")


def rows_of(values: Sequence[Sequence[Any]]) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(v) for v in values)
