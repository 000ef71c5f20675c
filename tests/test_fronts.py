"""The shipped preset fronts are exactly what scoring computes, and plans do not depend on the path."""

import math

import pytest

import cdka_search.planner as planner
from cdka_search.fronts import compute_fronts, preset_shapes, shipped_fronts
from cdka_search.plan import dumps_plan
from cdka_search.spec import PRESETS, load_spec


def test_shipped_fronts_equal_a_fresh_computation():
    fresh = compute_fronts(preset_shapes())
    shipped = shipped_fronts()
    assert set(fresh) == {f"{o}x{i}" for o, i in shipped}
    for key, rows in fresh.items():
        shape = tuple(int(v) for v in key.split("x"))
        got = [[s.design.r1, s.design.r2, s.design.r, s.scores.capacity, s.scores.alignment, s.scores.first_step,
                s.scores.speed, s.scores.objective] for s in shipped[shape]]
        # Designs exact; scores to 1e-12, since numpy builds sum in different orders (last-bit changes).
        assert [g[:3] for g in got] == [w[:3] for w in rows], key
        assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for g, w in zip(got, rows) for a, b in zip(g[3:], w[3:])), key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_plans_are_identical_with_or_without_shipped_fronts(name, monkeypatch):
    spec = load_spec(name)
    shipped = dumps_plan(planner.make_plan(spec, "0.5%"))
    monkeypatch.setattr(planner, "is_shipped_setting", lambda *a: False)
    assert dumps_plan(planner.make_plan(spec, "0.5%")) == shipped


def test_fronts_are_sorted_and_strictly_improving():
    for front in shipped_fronts().values():
        params = [s.design.params for s in front]
        scores = [s.scores.objective for s in front]
        assert params == sorted(params) and all(a < b for a, b in zip(scores, scores[1:]))
