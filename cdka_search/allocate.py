"""Budget allocation: a multiple-choice knapsack solved exactly, or with a certified gap.

Each unit (a group of same-shape targets, or one module of a per-layer plan) takes exactly one
option (cost, value); the total cost must stay within the budget and the total value be maximal.

1. The LP relaxation is solved by walking every unit's upper convex hull by decreasing slope;
   the slope where the budget runs out is the multiplier ``lam`` and the LP value the upper bound
   (at most one unit is fractional).
2. A feasible start rounds that walk down and then spends what is left on the best upgrades.
3. With ``lam``, every option's reduced loss ``delta = max_j (v_j - lam c_j) - (v - lam c)`` bounds
   how much it costs against the LP bound: a solution better than the start has total loss below
   ``upper - start``, so options losing more are dropped, and a dynamic programme over the few
   units left with a choice proves the optimum (or stops at ``node_limit`` with a certified gap),
   the units whose options span the most budget first, each node bounded by the LP of the units left.
   A start already within ``tolerance`` of the bound is not searched when more than SEARCHED_UNITS
   units keep a choice: with thousands of units the rounding loses millionths, and such a search runs
   to its node cap without certifying better (measured by benchmarks/scale.py).

Units are given as ``Unit(front, count, weight)``: the options of ``front`` with cost scaled by
``count`` and value by ``weight * count``. A positive scale changes no option's place on the upper
hull, and a per-layer plan has thousands of units but a handful of distinct fronts (one per shape),
so from VECTORISE_FROM options on, steps 1-3 run on numpy arrays holding each distinct front once
(cdka_search.allocate_arrays): the hulls are computed per front, the multiplier found by bisection
over the units' hull positions, and only a window of options around each unit's tangent screened.
There the search's dynamic programme runs on arrays too, a depth's (state, choice) pairs at once: the
same nodes in the same order, at about a tenth of the cost of a node, so its default node cap is higher.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, pairwise
from numbers import Real
from operator import itemgetter

from cdka_search.documents import brief
from cdka_search.errors import BudgetError
from cdka_search.gc_pause import paused_gc

Option = tuple[int, float]  # (cost, value)
Kept = tuple[float, int, int]  # (reduced loss, cost, option index) of an option the screening keeps
VECTORISE_FROM = 50_000  # options in all: from here steps 1-3 run on numpy arrays (below, importing numpy costs more than it saves)
TOLERANCE = 1e-5  # relative gap of a start that is not searched further: 10x inside the 1e-4 a plan is held to
LP_BOUND_ENTRIES = 300_000  # prefix sums (searched units x hull steps; about 30 MB) up to which a node is bounded by its own LP
NODE_LIMIT = 100_000  # default node cap of the search on Python steps (allocate_arrays.NODE_LIMIT on numpy)
# Units with a choice from which the search runs on arrays even where steps 1-3 did not: a LLaMA-2-7B
# reference plan under `balanced` (224 units, 21,408 options) reached the 100,000-node cap in 0.52 s with a
# gap of 5.2e-6 and finishes exact on arrays in 0.24 s. Below it, preset plans (a few units) import no numpy.
SEARCH_ON_ARRAYS_FROM = 64
SEARCHED_UNITS = 1_000  # units with a choice up to which every start is searched (224 finish in 34,000-80,000 nodes)


@dataclass(frozen=True, eq=False)  # eq=False: comparing or hashing fronts of a thousand options is not free
class Unit:
    """One unit: ``front``'s options at cost ``count * c`` and value ``weight * count * v``.

    Units that share a front should share the object: the numpy steps treat each distinct
    ``front`` object once, whatever the units' counts and weights.
    """

    front: Sequence[Option]
    count: int = 1
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.front)

    def __getitem__(self, i: int) -> Option:
        c, v = self.front[i]
        return self.count * c, self.weight * self.count * v

    def options(self) -> list[Option]:
        scale = self.weight * self.count
        return [(self.count * c, scale * v) for c, v in self.front]


@dataclass(frozen=True)
class Allocation:
    """One option index per unit, its totals, and the best upper bound proven."""

    choice: tuple[int, ...]
    cost: int
    value: float
    upper_bound: float
    nodes: int

    @property
    def gap(self) -> float:
        """Relative optimality gap (0 when proven optimal)."""
        if self.upper_bound <= 0:
            return 0.0
        return max(0.0, (self.upper_bound - self.value) / self.upper_bound)

    @property
    def exact(self) -> bool:
        return self.gap <= 1e-9


def _hull(options: Sequence[Option]) -> list[int]:
    """Option indices along the upper convex hull, from the cheapest (best-valued) option."""
    hull: list[int] = []
    cs: list[int] = []
    vs: list[float] = []
    for c, negative_v, i in sorted([(c, -v, i) for i, (c, v) in enumerate(options)]):
        v = -negative_v
        if vs and v <= vs[-1]:
            continue  # dominated: costs at least as much, worth no more
        while len(vs) >= 2 and (vs[-1] - vs[-2]) * (c - cs[-2]) <= (v - vs[-2]) * (cs[-1] - cs[-2]):
            hull.pop()
            cs.pop()
            vs.pop()
        hull.append(i)
        cs.append(c)
        vs.append(v)
    return hull


@dataclass(frozen=True)
class _Relaxation:
    """The LP optimum: its value, the multiplier, and the integral walk rounded down."""

    upper: float
    lam: float
    start: list[int]


def _relax(units: Sequence[Sequence[Option]], budget: int) -> _Relaxation:
    hulls = [_hull(u) for u in units]
    position = [h[0] for h in hulls]
    cost = sum(units[k][i][0] for k, i in enumerate(position))
    value = sum(units[k][i][1] for k, i in enumerate(position))
    steps = []
    for k, hull in enumerate(hulls):
        u = units[k]
        c0, v0 = u[hull[0]]
        for b in hull[1:]:
            c1, v1 = u[b]
            steps.append((-(v1 - v0) / (c1 - c0), k, c1 - c0, v1 - v0, b))
            c0, v0 = c1, v1
    # By decreasing slope; the sort is stable and a unit's hull slopes strictly fall, so each unit's
    # steps keep their order.
    steps.sort(key=itemgetter(0))
    upper, lam, stopped = None, 0.0, set()
    room = budget - cost
    for slope, k, dc, dv, b in steps:
        if k in stopped:
            continue
        if dc <= room:
            room -= dc
            value += dv
            position[k] = b
            continue
        if upper is None:  # the LP's fractional step: the bound and the multiplier
            upper, lam = value + dv * room / dc, -slope
        stopped.add(k)  # the integral walk keeps filling with later, smaller steps of other units
    return _Relaxation(value if upper is None else upper, lam, position)


def _fill(units: Sequence[Sequence[Option]], choice: list[int], budget: int) -> None:
    """Spend the budget left on the single upgrades worth most, until none fits (in place)."""
    room = budget - sum(units[k][i][0] for k, i in enumerate(choice))
    for _ in range(len(units)):
        best = None
        for k, u in enumerate(units):
            c0, v0 = u[choice[k]]
            for i, (c, v) in enumerate(u):
                if v > v0 and c - c0 <= room and (best is None or v - v0 > best[0]):
                    best = (v - v0, k, i, c - c0)
        if best is None:
            return
        _, k, i, dc = best
        choice[k] = i
        room -= dc


def _multipliers(
    units: Sequence[Sequence[Option]], free: Sequence[int], options: Sequence[Sequence[Kept]],
    lam: float, most: int = 6,
) -> list[float]:
    """lam and up to ``most`` hull slopes of the searched units nearest to it, the LP's breakpoints."""
    slopes = set()
    for k in free:
        kept = [units[k][i] for _, _, i in options[k]]
        hull = _hull(kept)
        slopes.update((kept[b][1] - kept[a][1]) / (kept[b][0] - kept[a][0]) for a, b in pairwise(hull))
    near = sorted(slopes, key=lambda mu: abs(mu - lam))[:most]
    return [lam, *(mu for mu in near if mu >= 0 and mu != lam)]


def _screen(
    units: Sequence[Sequence[Option]], lam: float, budget: int, upper: float, best_value: float
) -> tuple[list[list[Kept]], float]:
    """The bound ``upper`` tightened by duality, and per unit the options that can still appear in a
    better solution (reduced loss below the gap), cheapest loss first."""
    reduced = [[v - lam * c for c, v in u] for u in units]
    top = [max(r) for r in reduced]
    upper = min(upper, lam * budget + sum(top))  # the same bound, by duality; min guards rounding
    eps = 1e-12 * max(1.0, abs(upper))
    options = []
    for k, rk in enumerate(reduced):
        floor_k = top[k] - (upper - best_value) - eps
        options.append(sorted((top[k] - r, units[k][i][0], i) for i, r in enumerate(rk) if r > floor_k))
    return options, upper


@dataclass(frozen=True)
class SuffixLP:
    """The LP bound of the searched units from each depth on, for any room: every unit at its cheapest
    kept option, then their hull steps by decreasing slope, the last one in part. Prefix sums per
    depth (``cost``, ``value``: cumulative over the steps by slope) make it one bisection a node."""

    base_cost: list[int]
    base_value: list[float]
    cost: list[list[int]]
    value: list[list[float]]
    slope: list[list[float]]

    @classmethod
    def build(cls, units: Sequence[Sequence[Option]], free: Sequence[int], options: Sequence[Sequence[Kept]]) -> SuffixLP | None:
        """None where the prefix sums would hold more than LP_BOUND_ENTRIES numbers (depths x hull steps)."""
        starts, unit_steps = [], []
        for k in free:
            kept = [units[k][i] for _, _, i in options[k]]
            hull = [kept[i] for i in _hull(kept)]
            starts.append(hull[0])
            unit_steps.append([(-(v1 - v0) / (c1 - c0), c1 - c0, v1 - v0) for (c0, v0), (c1, v1) in pairwise(hull)])
        if len(free) * sum(map(len, unit_steps)) > LP_BOUND_ENTRIES:
            return None
        n = len(free)
        lp = cls([0] * (n + 1), [0.0] * (n + 1), [[] for _ in range(n + 1)], [[] for _ in range(n + 1)], [[] for _ in range(n + 1)])
        steps: list[tuple[float, int, float]] = []  # (-slope, cost, value) of every hull step from depth on
        for depth in range(n - 1, -1, -1):
            lp.base_cost[depth] = lp.base_cost[depth + 1] + starts[depth][0]
            lp.base_value[depth] = lp.base_value[depth + 1] + starts[depth][1]
            steps += unit_steps[depth]
            steps.sort()  # two sorted runs: a linear merge
            lp.cost[depth] = list(accumulate(c for _, c, _ in steps))
            lp.value[depth] = list(accumulate(v for _, _, v in steps))
            lp.slope[depth] = [-negative for negative, _, _ in steps]
        return lp

    def bound(self, depth: int, room: int) -> float:
        """The most the units from ``depth`` on are worth within ``room`` (at least their cheapest options' cost)."""
        cost, value = self.cost[depth], self.value[depth]
        spare = room - self.base_cost[depth]
        taken = bisect_right(cost, spare)
        total = self.base_value[depth] + (value[taken - 1] if taken else 0.0)
        if taken < len(cost):
            total += (spare - (cost[taken - 1] if taken else 0)) * self.slope[depth][taken]
        return total


def allocate(
    units: Sequence[Sequence[Option]], budget: int, *, node_limit: int | None = None, tolerance: float = TOLERANCE
) -> Allocation:
    """Choose one option per unit maximising total value with total cost <= budget (equal option
    lists become one shared front)."""
    return allocate_units([Unit(front) for front in _shared(units)], budget, node_limit=node_limit, tolerance=tolerance)


def _shared(fronts: Sequence[Sequence[Option]]) -> list[Sequence[Option]]:
    """``fronts`` with equal ones the same object (lists and tuples kept as given, not copied).

    Only fronts whose length and end options agree are hashed in full: hashing or copying every option
    cost more than allocating 10,000 distinct fronts of 700 options (benchmarks/scale.py).
    """
    first: dict[tuple[int, Option, Option] | None, Sequence[Option]] = {}  # signature -> the first front with it
    hashed: dict[tuple[Option, ...], Sequence[Option]] = {}  # full options -> front, for signatures seen twice
    out = []
    for given in fronts:
        front = given if isinstance(given, (list, tuple)) else tuple(given)
        signature = (len(front), tuple(front[0]), tuple(front[-1])) if front else None
        earlier = first.setdefault(signature, front)
        if earlier is not front:
            hashed.setdefault(tuple(map(tuple, earlier)), earlier)
            front = hashed.setdefault(tuple(map(tuple, front)), front)
        out.append(front)
    return out


# The search allocates states by the hundred thousand: with a plan's fronts live (millions of objects
# for thousands of modules) the collector's full passes doubled the time of 10,000 units.
@paused_gc()
def allocate_units(
    units: Sequence[Unit], budget: int, *, node_limit: int | None = None, tolerance: float = TOLERANCE
) -> Allocation:
    """Choose one option per unit maximising total value with total cost <= budget: the optimum, or a
    solution whose gap to the bound is certified (``node_limit`` reached: by default NODE_LIMIT, or
    allocate_arrays.NODE_LIMIT where the steps run on numpy; or, with more than SEARCHED_UNITS units
    keeping a choice, a start within ``tolerance``; with ``tolerance=0`` only an optimal one)."""
    if not units or any(not u.front for u in units):
        raise BudgetError("nothing to allocate: every target needs at least one candidate")
    if any(not (isinstance(u.count, int) and u.count >= 1 and math.isfinite(u.weight) and u.weight >= 0) for u in units):
        raise BudgetError("every allocation unit needs a count >= 1 and a finite weight >= 0")
    if sum(len(u.front) for u in units) >= VECTORISE_FROM and sum(u.count for u in units) < 2**62:
        from cdka_search import allocate_arrays

        try:
            fronts = allocate_arrays.Fronts(units)
        except (TypeError, ValueError):  # an option numpy cannot read as two numbers
            _check_options(units)
            raise
        if not fronts.numbers_valid:
            _check_options(units)
        if fronts.fits_int64():
            _check_floor(fronts.floor(), budget)
            lam, best, options, upper = allocate_arrays.relax_and_screen(fronts, budget)
            return _search(units, budget, lam, best, options, upper, node_limit, tolerance, True)
    _check_options(units)
    expanded = [u.options() for u in units]
    _check_floor(sum(min(c for c, _ in u) for u in expanded), budget)
    lp = _relax(expanded, budget)
    best = list(lp.start)
    if len(expanded) <= 64:  # the quadratic fill only where it is cheap; big problems rarely need it
        _fill(expanded, best, budget)
    options, upper = _screen(expanded, lp.lam, budget, lp.upper, sum(expanded[k][i][1] for k, i in enumerate(best)))
    return _search(expanded, budget, lp.lam, best, options, upper, node_limit, tolerance, False)


def _check_options(units: Sequence[Unit]) -> None:
    """BudgetError naming the first option that is not (a finite cost >= 0, a finite value): a nan or a
    negative cost would pass every comparison of the search unnoticed and yield a wrong allocation."""
    seen: set[int] = set()
    for k, u in enumerate(units):
        if id(u.front) in seen:
            continue
        seen.add(id(u.front))
        for i, option in enumerate(u.front):
            try:
                cost, value = option
                valid = _finite(cost) and cost >= 0 and _finite(value)
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise BudgetError(f"allocation unit {k}, option {i}: {brief(option, 60)} is not a (cost, value) pair "
                                  "of a finite cost >= 0 and a finite value")


def _finite(x: object) -> bool:
    return isinstance(x, Real) and math.isfinite(x)


def _check_floor(floor: int, budget: int) -> None:
    if floor > budget:
        raise BudgetError(f"budget {budget:,} is below the smallest possible adapter on these targets ({floor:,} parameters)")


@dataclass(frozen=True)
class Tree:
    """The search's dynamic programme: per depth (the units with a choice, in search order) the unit's
    choices (cost, value, option index), and what the units after the depth can add: their cheapest
    cost, their lam-best options' cost and value, and their bounds (``exact_lp``, else the Lagrangian
    ``mu * room + after[g][depth]`` for each ``mu = grid[g]``; ``grid[0]`` is lam)."""

    budget: int
    lam: float
    eps: float
    choices: list[list[tuple[int, float, int]]]
    cheapest_after: list[int]
    top_cost_after: list[int]
    top_value_after: list[float]
    grid: list[float]
    after: list[list[float]]
    exact_lp: SuffixLP | None


@dataclass(frozen=True)
class Grown:
    """What the dynamic programme found: the best value, the (depth, state) of the best completed
    solution if it beat the start, each depth's (previous state, option) per state, the nodes grown,
    and whether every state was extended or bounded out (else ``upper`` certifies the gap)."""

    best_value: float
    completed: tuple[int, int] | None
    parents: list[list[tuple[int, int]]] | list[list[list[int]]]
    nodes: int
    exhausted: bool
    upper: float


def _search(
    units: Sequence[Sequence[Option]], budget: int, lam: float, best: list[int], options: list[list[Kept]],
    upper: float, node_limit: int | None, tolerance: float, on_arrays: bool,
) -> Allocation:
    """From a feasible start ``best`` and the options screening kept, the optimum, or the best
    solution found and the bound that certifies its gap. The dynamic programme runs on arrays where
    steps 1-3 did (``on_arrays``) or from SEARCH_ON_ARRAYS_FROM units with a choice on."""
    best_value = sum(units[k][i][1] for k, i in enumerate(best))
    eps = 1e-12 * max(1.0, abs(upper))
    fixed = [k for k, o in enumerate(options) if len(o) == 1]
    # Units whose options span the most budget first (by powers of two), which bounds the room of all
    # the others early; then by the loss of their second-best option. (Loss order alone left a 9-unit
    # DeepSeek-V2-Lite plan at its node cap with a gap of 9.5e-4; this order proves it optimal.)
    def span(k: int) -> int:
        costs = [c for _, c, _ in options[k]]
        return int(max(costs) - min(costs)).bit_length()

    free = [k for k, o in enumerate(options) if len(o) > 1]
    if len(free) > SEARCHED_UNITS and upper - best_value <= tolerance * max(upper, 0.0):
        return Allocation(tuple(best), sum(units[k][i][0] for k, i in enumerate(best)), best_value, max(upper, best_value), 0)
    free.sort(key=lambda k: (-span(k), -options[k][1][0], k))
    if not on_arrays and len(free) >= SEARCH_ON_ARRAYS_FROM:  # where every node's cost is an int64
        costs = [[c for _, c, _ in options[k]] for k in free]
        on_arrays = all(isinstance(c, int) for c in chain.from_iterable(costs)) and budget + sum(map(max, costs)) < 2**62
    if on_arrays:
        from cdka_search import allocate_arrays

        limit, grow = allocate_arrays.NODE_LIMIT, allocate_arrays.grow
    else:
        limit, grow = NODE_LIMIT, _grow
    fixed_value = sum(units[k][options[k][0][2]][1] for k in fixed)
    fixed_cost = sum(options[k][0][1] for k in fixed)
    # Node bounds: the Lagrangian mu * room + sum over the units left of max (v - mu c) is an upper
    # bound for every mu >= 0; a few mu around lam make it close to the node's own LP bound. Where the
    # prefix sums fit, that LP bound itself (tighter wherever a node's room is far from the root's), and
    # lam alone stays for the cheap first test.
    exact_lp = SuffixLP.build(units, free, options)
    grid = [lam] if exact_lp else _multipliers(units, free, options, lam)
    after = [[0.0] * (len(free) + 1) for _ in grid]
    cheapest_after = [0] * (len(free) + 1)
    for depth in range(len(free) - 1, -1, -1):
        k = free[depth]
        cheapest_after[depth] = cheapest_after[depth + 1] + min(c for _, c, _ in options[k])
        for g, mu in enumerate(grid):
            after[g][depth] = after[g][depth + 1] + max(units[k][i][1] - mu * c for _, c, i in options[k])
    # Completing a state with every later unit's lam-best option, where it fits, gives solutions.
    top_cost_after, top_value_after = [0] * (len(free) + 1), [0.0] * (len(free) + 1)
    for depth in range(len(free) - 1, -1, -1):
        _, c, i = options[free[depth]][0]
        top_cost_after[depth] = top_cost_after[depth + 1] + c
        top_value_after[depth] = top_value_after[depth + 1] + units[free[depth]][i][1]
    choices = [[(c, units[k][i][1], i) for _, c, i in options[k]] for k in free]
    tree = Tree(budget, lam, eps, choices, cheapest_after, top_cost_after, top_value_after, grid, after, exact_lp)
    states = [(fixed_cost, fixed_value)] if all(options) else []
    found = grow(tree, states, best_value, upper, limit if node_limit is None else node_limit)
    best_value, completed, parents, nodes, upper = found.best_value, found.completed, found.parents, found.nodes, found.upper
    if completed is not None:
        depth, s = completed
        candidate = list(best)
        for k in fixed:
            candidate[k] = options[k][0][2]
        for later in free[depth + 1:]:
            candidate[later] = options[later][0][2]
        for earlier in range(depth, -1, -1):
            s, candidate[free[earlier]] = parents[earlier][s]
        best = candidate
    best_value = sum(units[k][i][1] for k, i in enumerate(best))
    if found.exhausted:
        upper = best_value  # every state was extended or bounded out: optimal
    total_cost = sum(units[k][i][0] for k, i in enumerate(best))
    return Allocation(tuple(best), total_cost, best_value, max(upper, best_value), nodes)


def _grow(tree: Tree, states: list[tuple[int, float]], best_value: float, upper: float, node_limit: int) -> Grown:
    """The search's dynamic programme over ``tree``'s units, one at a time, from the (cost, value)
    ``states`` of the units fixed: keep the states that no other state dominates and whose bound can
    still beat the best known solution, up to about ``node_limit`` nodes."""
    budget, lam, eps, exact_lp = tree.budget, tree.lam, tree.eps, tree.exact_lp
    completed: tuple[int, int] | None = None  # (depth, state) of the best completed solution
    parents: list[list[tuple[int, int]]] = []  # per depth: (previous state, option) of each state
    nodes, exhausted, n = len(states), True, len(tree.choices)
    for depth, choices in enumerate(tree.choices):
        rest = tree.cheapest_after[depth + 1]
        grown: list[tuple[int, float, int, int]] = []  # (total cost, -value, state, option)
        # Loop invariants hoisted: this loop visits every node (up to node_limit of them).
        root_after = tree.after[0][depth + 1]
        bounds = [(mu, tree.after[g][depth + 1]) for g, mu in enumerate(tree.grid)]
        lp = exact_lp.bound if exact_lp else None
        beat = best_value + eps
        cut = False
        for s, (cost, value) in enumerate(states):
            for c, w, i in choices:
                total = cost + c
                room = budget - total
                if room < rest:
                    continue
                v = value + w
                if v + lam * room + root_after <= beat:
                    continue  # the root multiplier alone already rules it out
                if v + (lp(depth + 1, room) if lp else min([mu * room + a for mu, a in bounds])) <= beat:
                    continue
                grown.append((total, -v, s, i))
            if nodes + len(grown) > node_limit and depth + 1 < n and s + 1 < len(states):
                cut = True  # one depth can grow hundreds of thousands of nodes: stop within it
                break
        # Cheapest first, then most valuable; ties stay in visiting order (s, then i: a unit's options
        # with equal cost and value sort by index), so the plain tuple order needs no key function.
        grown.sort()
        previous, states, links, top_value = states, [], [], None
        top_cost, top_rest = tree.top_cost_after[depth + 1], tree.top_value_after[depth + 1]
        for total, negative_v, s, i in grown:
            v = -negative_v
            if top_value is None or v > top_value:
                if budget - total >= top_cost and v + top_rest > best_value + eps:
                    best_value, completed = v + top_rest, (depth, len(states))
                states.append((total, v))
                links.append((s, i))
                top_value = v
        parents.append(links)
        nodes += len(grown)
        if nodes > node_limit and depth + 1 < n:
            exhausted = False
            # Every better solution extends a state this depth started from (a surviving state, where
            # the depth was finished): their best bound certifies the gap.
            at, open_states = (depth, previous) if cut else (depth + 1, states)
            upper = max([best_value] + [
                v + (exact_lp.bound(at, budget - c) if exact_lp else
                     min(mu * (budget - c) + tree.after[g][at] for g, mu in enumerate(tree.grid)))
                for c, v in open_states
            ])
            break
    return Grown(best_value, completed, parents, nodes, exhausted, upper)
