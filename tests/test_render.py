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


@pytest.mark.parametrize("odd", ["[bold]x[/bold]", "wide \u4e2d", "tab\there", " edge", "y" * 170])
def test_what_rich_does_more_with_is_left_to_rich(odd, monkeypatch):
    table = Table("odd cells", ("A", "B"), (("a", odd), ("b", 1)))
    assert render_module._plain_table(table, 160) is None
    assert rendered(table, 0, monkeypatch) == rendered(table, 10**9, monkeypatch)
