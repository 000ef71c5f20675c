"""Pareto fronts: the only candidates allocation needs, and the shipped fronts of the presets.

The default-setting fronts of every embedded preset shape ship in ``data/preset_fronts.json`` (a JSON
header line, then one line per shape: ``4096x4096 [[r1, r2, r, scores...], ...]``) so
that planning a preset needs neither numpy nor the Monte Carlo spectra; they are exactly what
``score_shape(...).pareto()`` computes (tests/test_fronts.py recomputes every one).
Regenerate after changing candidates or scoring:  python scripts/make_preset_fronts.py
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from cdka_search.candidates import CandidateSpace, Design
from cdka_search.scoring import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    ScoredDesign,
    Scores,
    ScoreTable,
    SpectrumCache,
    score_shape,
)

Front = tuple[ScoredDesign, ...]  # by parameters ascending, objective strictly increasing
SHIPPED = Path(__file__).resolve().parent / "data" / "preset_fronts.json"
SHIPPED_OBJECTIVE = "rank"
_FIELDS = ("r1", "r2", "r", "capacity", "alignment", "first_step", "speed", "objective")


def front_of(table: ScoreTable) -> Front:
    """The Pareto front of a score table (fewer parameters, higher objective)."""
    return tuple(table.scored(i) for i in table.pareto())


def is_shipped_setting(space: CandidateSpace, objective: str, samples: int, seed: int) -> bool:
    """Whether the shipped fronts apply: default candidate space, objective, samples and seed."""
    return space == CandidateSpace() and objective == SHIPPED_OBJECTIVE and samples == DEFAULT_SAMPLES and seed == DEFAULT_SEED


@lru_cache(maxsize=1)  # a read-only file of the installed package: read once per process
def _shipped_rows() -> dict[str, str]:
    """Each shape's rows as unparsed JSON text: the file is a header line, then one line per shape
    (``4096x4096 [[r1, r2, r, scores...], ...]``), so a plan parses only the shapes it needs (the
    whole 4 MB took 0.04 s to parse)."""
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()[1:]
    return dict(line.split(" ", 1) for line in lines if line)


@lru_cache(maxsize=None)  # one entry per preset shape at most
def shipped_front(shape: tuple[int, int]) -> Front | None:
    """The shipped default-setting front of one (d_out, d_in), or None if no preset has that shape.

    Only the shapes asked for are built: the default objective's fronts hold about 40,000 designs in
    all, and building every one took 0.2 s of a 0.4 s preset plan.
    """
    d_out, d_in = shape
    text = _shipped_rows().get(f"{d_out}x{d_in}")
    if text is None:
        return None
    rows = json.loads(text)
    return tuple(
        ScoredDesign(Design.from_paper(d_out, d_in, int(r1), int(r2), int(r)), Scores(*scores)) for r1, r2, r, *scores in rows
    )


def shipped_fronts() -> dict[tuple[int, int], Front]:
    """Every shipped default-setting front, by (d_out, d_in)."""
    shapes = (tuple(int(v) for v in key.split("x")) for key in _shipped_rows())
    return {(d_out, d_in): shipped_front((d_out, d_in)) for d_out, d_in in shapes}  # type: ignore[misc]


def compute_fronts(shapes: list[tuple[int, int]]) -> dict[str, list[list[float]]]:
    """Default-setting fronts of ``shapes`` as JSON-ready rows (r1, r2, r, then the scores)."""
    cache = SpectrumCache(DEFAULT_SAMPLES, DEFAULT_SEED)
    out = {}
    for d_out, d_in in sorted(set(shapes)):
        front = front_of(score_shape(d_out, d_in, CandidateSpace(), SHIPPED_OBJECTIVE, spectra=cache))
        out[f"{d_out}x{d_in}"] = [
            [s.design.r1, s.design.r2, s.design.r, *(getattr(s.scores, f) for f in _FIELDS[3:])] for s in front
        ]
    return out


def preset_shapes() -> list[tuple[int, int]]:
    from cdka_search.spec.presets import PRESETS, preset_spec

    return sorted({t.shape for name in PRESETS for t in preset_spec(name).targets})


def main() -> None:
    from cdka_search.fileio import atomic_write_text

    header = {"fields": list(_FIELDS), "samples": DEFAULT_SAMPLES, "seed": DEFAULT_SEED, "objective": SHIPPED_OBJECTIVE}
    fronts = compute_fronts(preset_shapes())
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [f"{key} {json.dumps(rows, separators=(',', ':'))}" for key, rows in fronts.items()]
    atomic_write_text(SHIPPED, "\n".join(lines) + "\n")
    print(f"wrote {SHIPPED} ({len(fronts)} shapes)")
