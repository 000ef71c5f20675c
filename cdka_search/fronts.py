"""Pareto fronts: the only candidates allocation needs, and the shipped fronts of the presets.

The default-setting fronts of every embedded preset shape ship in ``data/preset_fronts.json`` so
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
def shipped_fronts() -> dict[tuple[int, int], Front]:
    """The shipped default-setting fronts, by (d_out, d_in)."""
    data = json.loads(SHIPPED.read_text(encoding="utf-8"))
    out: dict[tuple[int, int], Front] = {}
    for key, rows in data["fronts"].items():
        d_out, d_in = (int(v) for v in key.split("x"))
        out[(d_out, d_in)] = tuple(
            ScoredDesign(Design.from_paper(d_out, d_in, int(r1), int(r2), int(r)), Scores(*scores))
            for r1, r2, r, *scores in rows
        )
    return out


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

    document = {"fields": list(_FIELDS), "samples": DEFAULT_SAMPLES, "seed": DEFAULT_SEED,
                "objective": SHIPPED_OBJECTIVE, "fronts": compute_fronts(preset_shapes())}
    atomic_write_text(SHIPPED, json.dumps(document, separators=(",", ":")) + "\n")
    print(f"wrote {SHIPPED} ({len(document['fronts'])} shapes)")
