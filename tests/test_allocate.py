import itertools
import random

import pytest

from cdka_search.allocate import allocate
from cdka_search.errors import BudgetError


def brute_force(units, budget):
    best = None
    for choice in itertools.product(*(range(len(u)) for u in units)):
        cost = sum(units[k][i][0] for k, i in enumerate(choice))
        if cost <= budget:
            value = sum(units[k][i][1] for k, i in enumerate(choice))
            best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force(seed):
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


def test_node_limit_reports_a_certified_gap():
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
