import itertools
import random

import numpy as np
import pytest

from cdka_search import allocate as allocate_module
from cdka_search import allocate_arrays
from cdka_search.allocate import Unit, allocate, allocate_units
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


@pytest.mark.parametrize("seed", range(30))
def test_the_suffix_lp_bound_is_the_lp_of_the_units_left(seed):
    # The node bound of the search: for every depth and room, the LP relaxation of the units from that
    # depth on, as _relax computes it for those units alone, and never below their integer optimum.
    from cdka_search.allocate import SuffixLP, _relax

    rng = random.Random(seed)
    units = [[(rng.randint(1, 40), rng.random() * 10) for _ in range(rng.randint(2, 6))] for _ in range(5)]
    options = [[(0.0, c, i) for i, (c, _) in enumerate(u)] for u in units]
    free = list(range(5))
    lp = SuffixLP.build(units, free, options)
    for depth in range(6):
        rest = units[depth:]
        floor = sum(min(c for c, _ in u) for u in rest)
        for room in (floor, floor + rng.randint(0, 60), floor + 500):
            bound = lp.bound(depth, room)
            if not rest:
                assert bound == 0.0
                continue
            assert bound == pytest.approx(_relax(rest, room).upper, abs=1e-9)
            assert bound >= brute_force(rest, room) - 1e-9


def test_a_depth_that_would_grow_past_the_node_limit_is_cut_inside_it(path):
    # Four units of 300 near-tied options (value about cost): few nodes are bounded out, and one depth
    # would grow 10,000-13,000 nodes against a limit of 2,000.
    rng = random.Random(0)
    units = [[(c, c * (1 + 0.01 * rng.random())) for c in rng.sample(range(1, 2000), 300)] for _ in range(4)]
    budget = sum(min(c for c, _ in u) for u in units) + 3000
    capped = allocate(units, budget, node_limit=2_000, tolerance=0.0)
    assert 2_000 < capped.nodes <= 2_000 + 300  # at most one state's options past the limit
    optimum = dynamic_programming(units, budget)
    assert capped.cost <= budget and capped.value <= optimum + 1e-9
    assert capped.upper_bound >= optimum - 1e-9  # the certificate is honest
    full = allocate(units, budget)
    assert full.value <= optimum + 1e-9 <= full.upper_bound + 2e-9 and full.gap <= capped.gap


@pytest.mark.parametrize("lp_bound", ["prefix sums", "multipliers"])
def test_the_search_on_arrays_grows_the_nodes_of_the_python_search(lp_bound, monkeypatch):
    # Same problem, same steps 1-3: only the dynamic programme differs, so the solution, the bound and
    # the node count must be identical, bit for bit, whether the search finishes, stops at its cap
    # between depths, or is cut inside a depth.
    if lp_bound == "multipliers":
        monkeypatch.setattr(allocate_module, "LP_BOUND_ENTRIES", 0)
    monkeypatch.setattr(allocate_module, "SEARCH_ON_ARRAYS_FROM", 10**9)  # the Python steps search with _grow
    monkeypatch.setattr(allocate_arrays, "GROWN_BLOCK", 64)  # many blocks per depth, a cut inside one
    python_grow, outcomes = allocate_module._grow, set()
    rng = random.Random(7)
    for _ in range(60):
        units = []
        for _ in range(rng.randint(2, 40)):
            costs = [rng.randint(1, 300) for _ in range(rng.randint(1, 12))]
            near_tied = rng.random() < 0.3  # value about cost: few nodes are bounded out
            units.append([(c, c * (1 + rng.random() * 1e-3) if near_tied else rng.random() * 10) for c in costs])
        budget = sum(min(c for c, _ in u) for u in units) + rng.randint(0, 150 * len(units))
        for limit in (5, 50, 500, 100_000):
            monkeypatch.setattr(allocate_module, "_grow", python_grow)
            python = allocate(units, budget, node_limit=limit, tolerance=0.0)
            monkeypatch.setattr(allocate_module, "_grow", allocate_arrays.grow)
            assert allocate(units, budget, node_limit=limit, tolerance=0.0) == python
            outcomes.add("exact" if python.nodes <= limit else "capped")
    assert outcomes == {"exact", "capped"}


def test_the_search_on_arrays_has_its_own_default_node_cap(monkeypatch):
    units = [[(c, c * (1 + 0.01 * random.Random(k).random())) for c in range(1, 300, 7)] for k in range(40)]
    budget = sum(min(c for c, _ in u) for u in units) + 3000
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 0)
    monkeypatch.setattr(allocate_arrays, "NODE_LIMIT", 1_000)
    capped = allocate(units, budget, tolerance=0.0)
    assert 1_000 < capped.nodes < 2_000 and not capped.exact
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 10**12)  # the Python steps keep theirs
    assert allocate(units, budget, tolerance=0.0).nodes > 2_000


def test_a_search_of_many_units_runs_on_arrays_after_python_steps_where_costs_fit(monkeypatch):
    # 80 units of near-tied options: the screening leaves most of them a choice, and the search is long.
    rng = random.Random(3)
    units = [[(c, c * (1 + 0.01 * rng.random())) for c in rng.sample(range(1, 300), 12)] for _ in range(80)]
    budget = sum(min(c for c, _ in u) for u in units) + 5_000
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 10**12)
    monkeypatch.setattr(allocate_arrays, "NODE_LIMIT", 1_000)
    on_arrays = allocate(units, budget, tolerance=0.0)
    assert 1_000 < on_arrays.nodes < 2_000  # the arrays' node cap: their search ran
    monkeypatch.setattr(allocate_module, "SEARCH_ON_ARRAYS_FROM", 10**9)
    assert allocate(units, budget, tolerance=0.0, node_limit=1_000) == on_arrays  # Python: the same nodes under that cap
    # Costs whose sums pass int64, or that are not integers, keep the search in Python, with its own cap.
    monkeypatch.setattr(allocate_module, "SEARCH_ON_ARRAYS_FROM", 64)
    huge = allocate([[(c << 62, v) for c, v in u] for u in units], budget << 62, tolerance=0.0)
    assert huge.nodes > 2_000 and huge.cost <= budget << 62
    halves = [[(c + 0.5, v) for c, v in u] for u in units]
    kept_in_python = allocate(halves, budget, tolerance=0.0)
    assert kept_in_python.nodes > 2_000 and kept_in_python.cost <= budget
    monkeypatch.setattr(allocate_module, "SEARCH_ON_ARRAYS_FROM", 10**9)
    assert allocate(halves, budget, tolerance=0.0) == kept_in_python
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 0)  # nor do the numpy steps read them as int64
    assert allocate(halves, budget, tolerance=0.0) == kept_in_python


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
    python = allocate(units, budget, node_limit=5_000, tolerance=0.0)  # searched, whatever the start's gap
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 0)
    vectorised = allocate(units, budget, node_limit=5_000, tolerance=0.0)
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


def expanded(units):
    return [u.options() for u in units]


def random_grouped(rng, fronts=3, units=6, options=5, max_cost=30):
    """Units over a few shared fronts (the same tuple object), each with its own count and weight."""
    shared = [tuple((rng.randint(1, max_cost), rng.random() * 10) for _ in range(rng.randint(1, options))) for _ in range(fronts)]
    return [Unit(rng.choice(shared), rng.randint(1, 3), rng.choice([0.5, 1.0, 1.0, 2.5, rng.random() * 4])) for _ in range(rng.randint(1, units))]


@pytest.mark.parametrize("seed", range(150))
def test_grouped_units_match_brute_force(seed, path):
    rng = random.Random(1000 + seed)
    units = random_grouped(rng)
    floor = sum(u.count * min(c for c, _ in u.front) for u in units)
    budget = rng.randint(floor, floor + 120)
    result = allocate_units(units, budget)
    assert result.cost <= budget
    assert result.value == pytest.approx(brute_force(expanded(units), budget))
    assert result.exact and result.gap == 0.0
    # The choice indexes each unit's front and its totals are the scaled options'.
    assert result.cost == sum(u.count * u.front[i][0] for u, i in zip(units, result.choice))
    assert result.value == pytest.approx(sum(u.weight * u.count * u.front[i][1] for u, i in zip(units, result.choice)))


def test_grouped_units_with_ties_match_brute_force(path):
    # Duplicated options, equal values at different costs, and identical units (same front, count, weight).
    front = ((4, 1.0), (4, 1.0), (6, 1.0), (8, 2.0), (12, 3.0), (12, 3.0), (16, 3.5))
    other = ((2, 0.5), (6, 1.5), (10, 2.5))
    units = [Unit(front), Unit(front), Unit(front, 2, 1.0), Unit(other, 1, 2.0), Unit(other, 1, 2.0), Unit(front, 1, 0.5)]
    floor = sum(u.count * min(c for c, _ in u.front) for u in units)
    for budget in range(floor, floor + 70, 3):
        result = allocate_units(units, budget)
        assert result.cost <= budget and result.exact
        assert result.value == pytest.approx(brute_force(expanded(units), budget))


def test_a_budget_that_fits_only_the_cheapest_options(path):
    rng = random.Random(5)
    units = random_grouped(rng, fronts=4, units=8, options=7)
    cheapest = [min(range(len(u.front)), key=lambda i: (u.front[i][0], -u.front[i][1])) for u in units]
    budget = sum(u.count * u.front[i][0] for u, i in zip(units, cheapest))
    result = allocate_units(units, budget)
    assert result.exact and result.cost == budget
    assert [u.front[i][0] for u, i in zip(units, result.choice)] == [u.front[i][0] for u, i in zip(units, cheapest)]
    assert result.value == pytest.approx(brute_force(expanded(units), budget))
    with pytest.raises(BudgetError, match=f"smallest possible adapter .*{budget:,}"):
        allocate_units(units, budget - 1)


def test_a_budget_that_fits_everything_takes_every_best_option(path):
    rng = random.Random(6)
    units = random_grouped(rng, fronts=4, units=8, options=7)
    budget = sum(u.count * max(c for c, _ in u.front) for u in units)
    result = allocate_units(units, budget)
    assert result.exact and result.upper_bound == result.value
    assert result.value == pytest.approx(sum(u.weight * u.count * max(v for _, v in u.front) for u in units))


def test_a_unit_of_weight_zero_takes_its_cheapest_option(path):
    front = ((3, 1.0), (9, 5.0), (20, 6.0))
    units = [Unit(front, 1, 0.0), Unit(front, 1, 1.0), Unit(front, 2, 0.25)]
    result = allocate_units(units, 3 + 20 + 2 * 9)
    assert result.choice == (0, 2, 1) and result.exact
    assert result.value == pytest.approx(6.0 + 0.25 * 2 * 5.0)


@pytest.mark.parametrize("unit", [Unit(((1, 1.0),), 1, -1.0), Unit(((1, 1.0),), 0, 1.0), Unit(((1, 1.0),), 1, float("nan"))])
def test_bad_counts_and_weights_are_budget_errors(unit):
    with pytest.raises(BudgetError, match="count >= 1 and a finite weight >= 0"):
        allocate_units([unit], 10)


@pytest.mark.parametrize("seed", range(6))
def test_grouped_units_match_dynamic_programming(seed, path):
    # Many units over few fronts with near-tied values: the screening leaves real choices to search.
    rng = random.Random(seed)
    fronts = [tuple((rng.randint(1, 30), rng.choice([1.0, 1.5, 2.0, 2.5]) * rng.randint(1, 6)) for _ in range(rng.randint(2, 8))) for _ in range(4)]
    units = [Unit(rng.choice(fronts), rng.randint(1, 2), rng.choice([1.0, 2.0, 0.5])) for _ in range(60)]
    floor = sum(u.count * min(c for c, _ in u.front) for u in units)
    budget = floor + rng.randint(0, 600)
    result = allocate_units(units, budget)
    assert result.cost <= budget and result.exact
    assert result.value == pytest.approx(dynamic_programming(expanded(units), budget), abs=1e-9)
    capped = allocate_units(units, budget, node_limit=20)
    assert capped.cost <= budget
    assert capped.upper_bound >= result.value - 1e-9  # an honest bound on the true optimum


@pytest.mark.parametrize("walked", [1, 4, -10**6])  # -10**6: the bisection brackets the LP's step as tightly as it can
def test_shared_fronts_on_numpy_give_the_python_allocation(walked, monkeypatch):
    monkeypatch.setattr(allocate_arrays, "WALKED_PER_UNIT", walked)
    rng = random.Random(11)
    fronts = []
    for _ in range(3):
        front = [(c, 1 - 1 / (1 + c / 3000) + rng.random() * 1e-3) for c in sorted(rng.sample(range(100, 40_000), 40))]
        rng.shuffle(front)
        fronts.append(tuple(front + [front[0], (front[1][0] + 5, front[1][1] - 1.0)]))  # a duplicate, a dominated option
    units = [Unit(rng.choice(fronts), rng.randint(1, 4), rng.lognormvariate(0, 0.7)) for _ in range(400)]
    budget = sum(u.count * min(c for c, _ in u.front) for u in units) + 3_000_000
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 10**12)
    python = allocate_units(units, budget, node_limit=5_000, tolerance=0.0)  # searched, whatever the start's gap
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 0)
    vectorised = allocate_units(units, budget, node_limit=5_000, tolerance=0.0)
    assert vectorised.choice == python.choice and vectorised.value == python.value and vectorised.nodes == python.nodes
    assert vectorised.upper_bound == pytest.approx(python.upper_bound, rel=1e-12)
    assert python.nodes > 0 and python.cost <= budget


def test_ten_thousand_units_over_shared_fronts_are_certified():
    rng = random.Random(4)
    fronts = [tuple((c, 1 - 1 / (1 + c / 3000) + rng.random() * 1e-3) for c in sorted(rng.sample(range(100, 400_000), 600))) for _ in range(3)]
    units = [Unit(fronts[k % 3], 1, rng.lognormvariate(0, 0.7)) for k in range(10_000)]
    budget = sum(u.front[0][0] for u in units) + 500_000_000
    result = allocate_units(units, budget)
    assert result.cost <= budget
    assert result.gap <= 1e-4
    assert result.upper_bound >= result.value


def test_a_start_within_the_tolerance_is_searched_only_with_few_units_keeping_a_choice(monkeypatch):
    # 3,000 units: rounding the LP's walk down loses about one unit's step in 3,000, far below 1e-3;
    # screening leaves 699 of them a choice.
    rng = random.Random(5)
    front = tuple((c, 1 - 1 / (1 + c / 3000)) for c in sorted(rng.sample(range(100, 40_000), 60)))
    units = [Unit(front, 1, rng.lognormvariate(0, 0.7)) for _ in range(3_000)]
    budget = 3_000 * front[0][0] + 20_000_000
    searched = allocate_units(units, budget, tolerance=1e-3, node_limit=20_000)
    monkeypatch.setattr(allocate_module, "SEARCHED_UNITS", 600)
    quick = allocate_units(units, budget, tolerance=1e-3, node_limit=20_000)
    assert searched.nodes > 20_000 and quick.nodes == 0
    assert 0 < quick.gap <= 1e-3 and quick.cost <= budget and searched.value >= quick.value
    # The unsearched start's bound is the searched one's: no solution found by searching beats it.
    assert searched.value <= quick.upper_bound and quick.upper_bound == pytest.approx(searched.upper_bound, rel=1e-9)
    monkeypatch.setattr(allocate_module, "SEARCHED_UNITS", 800)
    assert allocate_units(units, budget, tolerance=1e-3, node_limit=20_000) == searched


def test_costs_beyond_float64_stay_exact(path):
    # Costs above 2**53 cannot be read into float64 exactly: such problems stay on the Python steps.
    big = 2**60
    front = ((big, 1.0), (big + 1, 2.0), (big + 3, 2.5))
    units = [Unit(front), Unit(front, 1, 2.0)]
    result = allocate_units(units, 2 * big + 2)
    assert result.cost == 2 * big + 2 and result.exact
    assert result.choice == (1, 1) and result.value == pytest.approx(6.0)


def test_equal_fronts_given_apart_become_one_front_without_copying():
    a = [(1, 1.0), (2, 3.0), (4, 3.5)]
    same_as_a = ((1, 1.0), (2, 3.0), (4, 3.5))
    same_ends = [(1, 1.0), (3, 3.0), (4, 3.5)]  # the signature's length and ends, other options
    shared = allocate_module._shared([a, same_as_a, same_ends, iter(a), []])
    assert shared[0] is a and shared[1] is a and shared[3] is a  # lists are not copied
    assert shared[2] is same_ends and shared[4] == []
    assert allocate([a, same_as_a, same_ends], 9) == allocate([a, list(a), same_ends], 9)


@pytest.mark.parametrize("enabled", [True, False])
def test_allocation_pauses_the_cyclic_gc_and_restores_it_even_on_failure(enabled, monkeypatch):
    import gc

    seen = []
    search = allocate_module._search
    monkeypatch.setattr(allocate_module, "_search", lambda *a: seen.append(gc.isenabled()) or search(*a))
    (gc.enable if enabled else gc.disable)()
    try:
        assert allocate([[(1, 1.0), (2, 3.0)], [(1, 0.5)]], 3).value == 3.5
        assert seen == [False] and gc.isenabled() is enabled
        with pytest.raises(BudgetError, match="smallest possible adapter"):
            allocate([[(5, 1.0)]], 4)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_counts_beyond_int64_stay_exact(path):
    front = ((1, 1.0), (2, 3.0))
    result = allocate_units([Unit(front, 2**70), Unit(front, 1)], 2**70 + 2)
    assert result.exact and result.choice == (0, 1) and result.cost == 2**70 + 2


@pytest.mark.parametrize(("fault", "at"), [(None, 0), *((f, at) for f in ("flat", "bent") for at in range(4, 9))])
def test_concave_chains_checks_every_option_across_its_blocks(monkeypatch, fault, at):
    """Blocks of 4 options over fronts of 3 to 6: a value equal to the one before, or one below the chord
    of its neighbours, is found wherever it lies in the second front (options 3 to 8), seams included."""
    lengths = np.array([3, 6, 4, 5])
    cost = np.concatenate([np.arange(1.0, n + 1) for n in lengths])
    value = np.sqrt(cost) * np.repeat(np.arange(1.0, len(lengths) + 1), lengths)
    if fault == "flat":
        value[at] = value[at - 1]
    elif fault == "bent" and at < 8:
        value[at] = value[at - 1] + (value[at + 1] - value[at - 1]) / 4
    expected = fault is None or (fault == "bent" and at == 8)  # option 8 ends its front: no chord through it
    for block in (4, 1 << 16):
        monkeypatch.setattr(allocate_arrays, "CHAIN_BLOCK", block)
        assert allocate_arrays.concave_chains(lengths, cost, value) is expected


def test_fronts_that_are_their_own_hulls_skip_the_hull_chain_and_give_the_same_arrays(monkeypatch):
    # Concave chains by rising cost, as the rank objective's fronts are: every option is a hull point.
    rng = random.Random(9)
    fronts = [tuple((c, (1 + k) * c**0.5) for c in sorted(rng.sample(range(100, 40_000), rng.randint(1, 40)))) for k in range(50)]
    units = [Unit(rng.choice(fronts), rng.randint(1, 3), rng.lognormvariate(0, 0.7)) for _ in range(2_000)]
    flat = (np.array([len(f) for f in fronts]), np.array([c for f in fronts for c, _ in f], float), np.array([v for f in fronts for _, v in f]))
    assert allocate_arrays.concave_chains(*flat)
    # A point on its neighbours' chord, or a dominated option, is not; cost falling between two fronts is fine.
    assert not allocate_arrays.concave_chains(np.array([3]), np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    assert not allocate_arrays.concave_chains(np.array([3]), np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))
    assert allocate_arrays.concave_chains(np.array([2, 2]), np.array([1.0, 2.0, 1.0, 2.0]), np.array([1.0, 2.0, 5.0, 6.0]))
    budget = sum(u.count * u.front[0][0] for u in units) + 4_000_000
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 10**12)
    python = allocate_units(units, budget, node_limit=5_000, tolerance=0.0)
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", 0)
    vectorised = allocate_units(units, budget, node_limit=5_000, tolerance=0.0)
    assert vectorised.choice == python.choice and vectorised.value == python.value
    fast = allocate_arrays.Fronts(units)
    monkeypatch.setattr(allocate_arrays, "concave_chains", lambda *_: False)
    padded = allocate_arrays.Fronts(units)
    assert fast.own_hulls and not padded.own_hulls
    for field in ("option_cost", "option_value", "hull_cost", "hull_value", "start", "size", "options_end", "scale", "count"):
        assert np.array_equal(getattr(fast, field), getattr(padded, field)), field
    # The index maps the fast path computes instead of storing: every unit's every option and hull point.
    unit = np.repeat(np.arange(len(units)), fast.size)
    hull_point = np.arange(len(unit)) - np.repeat(np.cumsum(fast.size) - fast.size, fast.size)
    flat_hull = fast.start[unit] + hull_point
    for method, args in (("first_option", (flat_hull,)), ("options_after", (flat_hull,)), ("hull_option", (unit, hull_point)),
                         ("option_index", (unit, flat_hull))):
        assert np.array_equal(getattr(fast, method)(*args), getattr(padded, method)(*args)), method
    assert fast.option_index(unit, flat_hull).max() == max(map(len, fronts)) - 1


@pytest.mark.parametrize("by_cost", [True, False])
@pytest.mark.parametrize("seed", range(30))
def test_the_hulls_of_many_fronts_at_once_are_each_fronts_python_hull(seed, by_cost):
    """Ragged fronts with dominated options, collinear runs and convex stretches; given by strictly rising
    cost (no sort) or in any order with tied costs (sorted first): every front's hull is allocate._hull's."""
    rng = random.Random(seed)
    fronts = []
    for _ in range(rng.randint(1, 40)):
        n = rng.randint(1, 60)
        if by_cost:
            steps = [rng.choice([0.0, 1.0, 1.0, 2.0, -1.0]) * rng.choice([1.0, rng.random()]) for _ in range(n)]
            fronts.append(list(zip(sorted(rng.sample(range(1, 5_000), n)), itertools.accumulate(steps))))
        else:
            fronts.append([(rng.randint(0, 12), float(rng.randint(0, 8))) for _ in range(n)])
    lengths = np.array([len(f) for f in fronts])
    cost, value = (np.array([o[i] for f in fronts for o in f], float) for i in (0, 1))
    hull, size, (by_cost_cost, by_cost_value, index) = allocate_arrays.hulls(lengths, cost, value)
    start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    if by_cost:  # nothing reordered: an option's index is its place in its front, not stored
        assert index is None
        index = np.arange(len(cost)) - start
    hull_options = np.split(index[hull], np.cumsum(size)[:-1])
    assert [h.tolist() for h in hull_options] == [allocate_module._hull(f) for f in fronts]
    assert np.array_equal(by_cost_cost, cost[start + index]) and np.array_equal(by_cost_value, value[start + index])


@pytest.mark.parametrize("bound", ["lp", "multipliers"])  # multipliers: where the LP's prefix sums would not fit
@pytest.mark.parametrize("seed", range(40))
def test_grouped_units_with_concave_and_ragged_fronts_match_dynamic_programming(seed, path, bound, monkeypatch):
    # Few units with counts (a MoE plan's groups), fronts either concave chains (the numpy fast path)
    # or ragged with ties and dominated options; exact against a DP over every integer budget.
    rng = random.Random(seed)
    units = []
    for _ in range(rng.randint(1, 9)):
        if rng.random() < 0.5:
            front = tuple((c, 3 * c**0.5) for c in sorted(rng.sample(range(1, 60), rng.randint(1, 30))))
        else:
            front = tuple(sorted({(rng.randint(1, 25), round(rng.random() * 10, rng.choice([1, 6]))) for _ in range(rng.randint(1, 30))}))
        units.append(Unit(front, rng.choice([1, 1, 2, 3, 7, 16]), rng.choice([1.0, 0.5, 2.0, rng.lognormvariate(0, 1)])))
    budget = sum(u.count * min(c for c, _ in u.front) for u in units) + rng.randint(0, 300)
    if bound == "multipliers":
        monkeypatch.setattr(allocate_module, "LP_BOUND_ENTRIES", -1)
    result = allocate_units(units, budget)
    assert result.cost <= budget and result.exact
    assert result.value == pytest.approx(dynamic_programming([u.options() for u in units], budget), abs=1e-9)


# The numpy steps read what numpy reads as a number (the text "3" too); the Python ones take numbers only.
@pytest.mark.parametrize(("bad", "vectorise_from"), [
    *((bad, at) for bad in [(float("nan"), 1.0), (float("inf"), 1.0), (-3, 1.0), (3, float("nan")), (3, float("-inf")), (3, None)]
      for at in (0, 10**12)),
    (("3", 1.0), 10**12),
])
def test_an_option_that_is_no_finite_cost_and_value_is_refused_by_name(bad, vectorise_from, monkeypatch):
    monkeypatch.setattr(allocate_module, "VECTORISE_FROM", vectorise_from)
    fronts = [tuple((c, (1 + k) * c**0.5) for c in range(1, 30)) for k in range(5)]
    fronts[3] = fronts[3][:7] + (bad,) + fronts[3][8:]
    with pytest.raises(BudgetError, match=r"^allocation unit 3, option 7: .* is not a \(cost, value\) pair of a finite cost >= 0"):
        allocate_units([Unit(f) for f in fronts], 400)
    fronts[3] = fronts[3][:7] + ((7, 3.0),) + fronts[3][8:]
    assert allocate_units([Unit(f) for f in fronts], 400).cost <= 400
