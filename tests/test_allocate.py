import itertools
import random

import pytest

from cdka_search import allocate as allocate_module
from cdka_search.allocate import allocate
from cdka_search.errors import BudgetError


@pytest.fixture(params=["python", "numpy"])
def path(request, monkeypatch):
    """Run a test on the pure-Python steps and on the numpy ones (used from VECTORISE_FROM options)."""
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 10**12 if request.param == "python" else 0)
    return request.param


def brute_force(units, budget):
    best = None
    for choice in itertools.product(*(range(len(u)) for u in units)):
        cost = sum(units[k][i][0] for k, i in enumerate(choice))
        if cost <= budget:
            value = sum(units[k][i][1] for k, i in enumerate(choice))
            best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force(seed, path):
    rng = random.Random(seed)
    units = [[(rng.randint(1, 40), rng.random() * 10) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 5))]
    floor = sum(min(c for c, _ in u) for u in units)
    budget = rng.randint(floor, floor + 80)
    result = allocate(units, budget)
    assert result.cost <= budget
    assert result.value == pytest.approx(brute_force(units, budget))
    assert result.exact and result.gap == 0.0


def test_budget_below_the_cheapest_choice_names_the_minimum():
    with pytest.raises(BudgetError, match="smallest possible adapter .*15"):
        allocate([[(10, 1.0)], [(5, 1.0), (9, 2.0)]], 14)


def test_node_limit_reports_a_certified_gap(path):
    rng = random.Random(7)
    units = [[(rng.randint(5, 50), rng.random()) for _ in range(12)] for _ in range(14)]
    budget = sum(min(c for c, _ in u) for u in units) + 150
    capped = allocate(units, budget, node_limit=50)
    full = allocate(units, budget)
    assert full.exact
    assert capped.cost <= budget
    assert capped.value <= full.value + 1e-9
    # The reported bound is a true upper bound on the optimum.
    assert capped.upper_bound >= full.value - 1e-9
    assert capped.gap == pytest.approx((capped.upper_bound - capped.value) / capped.upper_bound)


def dynamic_programming(units, budget):
    """The exact optimum by DP over every integer budget (small integer costs only)."""
    best = [0.0] + [float("-inf")] * budget  # best[b]: max value of the units so far at cost exactly b
    for unit in units:
        nxt = [float("-inf")] * (budget + 1)
        for b, v in enumerate(best):
            if v == float("-inf"):
                continue
            for c, w in unit:
                if b + c <= budget and v + w > nxt[b + c]:
                    nxt[b + c] = v + w
        best = nxt
    return max(best)


@pytest.mark.parametrize("seed", range(12))
def test_many_units_match_dynamic_programming(seed, path):
    # Near-ties everywhere (values from a few levels): the hard case for bounding.
    rng = random.Random(seed)
    units = [[(rng.randint(1, 30), rng.choice([1.0, 1.5, 2.0, 2.5]) * rng.randint(1, 6)) for _ in range(rng.randint(2, 8))] for _ in range(60)]
    floor = sum(min(c for c, _ in u) for u in units)
    budget = floor + rng.randint(0, 600)
    result = allocate(units, budget)
    assert result.cost <= budget
    assert result.exact
    assert result.value == pytest.approx(dynamic_programming(units, budget), abs=1e-9)


def front_shaped_units(count, seed, options=24):
    """Shaped like a per-layer plan's units: Pareto fronts (cost up, value up, concave-ish) times weights."""
    rng = random.Random(seed)
    units = []
    for _ in range(count):
        weight = rng.lognormvariate(0, 0.7)
        costs = sorted(rng.sample(range(100, 40_000), options))
        units.append([(c, weight * (1 - 1 / (1 + c / 3000)) + rng.random() * 1e-3) for c in costs])
    return units


@pytest.mark.parametrize("seed", range(3))
def test_numpy_steps_give_the_python_allocation(seed, monkeypatch):
    units = front_shaped_units(300, seed)
    rng = random.Random(seed)
    for u in units:
        rng.shuffle(u)  # options in any order, with a duplicate and a dominated one
        u.append(u[0])
        u.append((u[1][0] + 5, u[1][1] - 1.0))
    budget = sum(min(c for c, _ in u) for u in units) + 2_000_000
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 10**12)
    python = allocate(units, budget, node_limit=5_000)
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 0)
    vectorised = allocate(units, budget, node_limit=5_000)
    assert vectorised == python
    assert python.nodes > 0 and python.cost <= budget


def test_ten_thousand_front_units_are_certified():
    # Shaped like a per-layer plan's units: Pareto fronts (cost up, value up, concave-ish) times weights.
    rng = random.Random(3)
    units = []
    for _ in range(10_000):
        weight = rng.lognormvariate(0, 0.7)
        costs = sorted(rng.sample(range(100, 40_000), 24))
        units.append([(c, weight * (1 - 1 / (1 + c / 3000)) + rng.random() * 1e-3) for c in costs])
    budget = sum(u[0][0] for u in units) + 50_000_000
    result = allocate(units, budget)
    assert result.cost <= budget
    assert result.gap <= 1e-4
    assert result.upper_bound >= result.value
    assert len(result.choice) == 10_000
