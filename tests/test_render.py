"""The plain renderer of long tables prints what rich prints, character for character."""

from __future__ import annotations

import io
import random

import pytest

from cdka_search import render as render_module
from cdka_search.render import Table, render

WORDS = ("model.layers.0.mlp.up_proj", "cdka_lokr", "(16,8,1)", "factor=-1 r=16 alpha=16", "", " x ", "a_b-c", "x" * 40)


def rendered(table: Table, plain_from: int, monkeypatch) -> str:
    monkeypatch.setattr(render_module, "PLAIN_FROM", plain_from)
    stream = io.StringIO()
    render(table, stream=stream)
    return stream.getvalue()


@pytest.mark.parametrize("seed", range(20))
def test_plain_table_equals_rich(seed, monkeypatch):
    rng = random.Random(seed)
    columns = tuple(rng.choice(("Group", "Modules", "Design (r1,r2,r)", "Config", "Settings", "x")) for _ in range(rng.randint(1, 5)))
    rows = tuple(
        tuple(rng.choice([rng.choice(WORDS), rng.randint(0, 10**7), rng.random() * 100, True, False]) for _ in columns)
        for _ in range(rng.randint(0, 12))
    )
    title = rng.choice(("peft export: 3 groups, 1,234 trainable parameters", "t", "a title longer than most of these small tables are wide"))
    table = Table(title, columns, rows, notes=("wrote a/b.json", "note: something"))
    assert rendered(table, 0, monkeypatch) == rendered(table, 10**9, monkeypatch)


def test_a_per_layer_export_table_takes_the_plain_path(monkeypatch):
    rows = tuple((f"model.layers.{i}.mlp.down_proj", 1, "(16,8,1)", "cdka_lokr", "factor=-1 r=16 alpha=16") for i in range(300))
    table = Table("peft export: 300 groups, 76,800 trainable parameters", ("Group", "Modules", "Design (r1,r2,r)", "Config", "Settings"), rows)
    plain = render_module._plain_table(table, 160)
    assert plain is not None and plain.count("\n") == 300 + 5
    assert rendered(table, 0, monkeypatch) == rendered(table, 10**9, monkeypatch) == plain


@pytest.mark.parametrize("odd", ["wide \u4e2d", " edge", "y" * 170])
def test_what_rich_does_more_with_is_left_to_rich(odd, monkeypatch):
    table = Table("odd cells", ("A", "B"), (("a", odd), ("b", 1)))
    assert render_module._plain_table(table, 160) is None
    assert rendered(table, 0, monkeypatch) == rendered(table, 10**9, monkeypatch)


def test_names_from_files_are_shown_as_text_never_as_markup_or_terminal_controls(monkeypatch):
    """A tensor name is data: rich markup in it ("[/]" closes nothing and made rich raise) is printed as
    typed, and ESC, a right-to-left override or a tab as their escapes, in cells, title and notes."""
    names = ("x[/]y", "[bold]b[/bold]", "red\x1b[31m", "\u202eevil", "tab\there")
    table = Table("t\x1b]0;title\x07", ("Module", "N"), tuple((n, 1) for n in names), notes=("note \x1b[2J [/]",))
    for plain_from in (0, 10**9):
        out = rendered(table, plain_from, monkeypatch)
        assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out and "\t" not in out
        for shown in ("x[/]y", "[bold]b[/bold]", "red\\x1b[31m", "\\u202eevil", "tab\\there", "t\\x1b]0;title\\x07", "note \\x1b[2J [/]"):
            assert shown in out
    assert rendered(table, 0, monkeypatch) == rendered(table, 10**9, monkeypatch)
