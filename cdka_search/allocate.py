"""Budget allocation: a multiple-choice knapsack solved by branch and bound with LP bounds.

Each unit (a group of same-shape targets) takes exactly one option (cost, value); the total
cost must stay within the budget and the total value be maximal. The LP relaxation (upper convex
hull of each unit, increments taken by decreasing slope) bounds every node, so the search is
exact when it finishes and otherwise reports a certified gap to that bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cdka_search.errors import BudgetError

Option = tuple[int, float]  # (cost, value)


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
    order = sorted(range(len(options)), key=lambda i: (options[i][0], -options[i][1]))
    hull: list[int] = []
    for i in order:
        c, v = options[i]
        if hull and v <= options[hull[-1]][1]:
            continue  # dominated: costs at least as much, worth no more
        while len(hull) >= 2:
            (c1, v1), (c2, v2) = options[hull[-2]], options[hull[-1]]
            if (v2 - v1) * (c - c1) <= (v - v1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _increments(options: Sequence[Option], hull: Sequence[int]) -> list[tuple[int, float]]:
    return [(options[b][0] - options[a][0], options[b][1] - options[a][1]) for a, b in zip(hull, hull[1:])]


def _greedy(units: Sequence[Sequence[Option]], hulls: Sequence[list[int]], budget: int) -> tuple[int, ...]:
    """A feasible start: walk every hull by decreasing slope, stopping a unit at its first misfit."""
    position = [0] * len(units)
    steps = sorted(
        ((k, j) for k, hull in enumerate(hulls) for j in range(1, len(hull))),
        key=lambda kj: -(units[kj[0]][hulls[kj[0]][kj[1]]][1] - units[kj[0]][hulls[kj[0]][kj[1] - 1]][1])
        / (units[kj[0]][hulls[kj[0]][kj[1]]][0] - units[kj[0]][hulls[kj[0]][kj[1] - 1]][0]),
    )
    cost = sum(units[k][hull[0]][0] for k, hull in enumerate(hulls))
    stopped: set[int] = set()
    for k, j in steps:
        if k in stopped or position[k] != j - 1:
            continue
        extra = units[k][hulls[k][j]][0] - units[k][hulls[k][j - 1]][0]
        if cost + extra <= budget:
            cost += extra
            position[k] = j
        else:
            stopped.add(k)
    return tuple(hulls[k][position[k]] for k in range(len(units)))


def _lp_bound(increments: Sequence[tuple[int, float]], capacity: int) -> float:
    """Value the LP relaxation adds with ``capacity``; increments sorted by slope, decreasing."""
    gained = 0.0
    for dc, dv in increments:
        if dc <= capacity:
            capacity -= dc
            gained += dv
        else:
            return gained + dv * capacity / dc
    return gained


def allocate(units: Sequence[Sequence[Option]], budget: int, *, node_limit: int = 200_000) -> Allocation:
    """Choose one option per unit maximising total value with total cost <= budget."""
    if not units or any(not u for u in units):
        raise BudgetError("nothing to allocate: every target needs at least one candidate")
    floor = sum(min(c for c, _ in u) for u in units)
    if floor > budget:
        raise BudgetError(f"budget {budget:,} is below the smallest possible adapter on these targets ({floor:,} parameters)")
    n = len(units)
    base_cost = [min(c for c, _ in u) for u in units]
    base_value = [max(v for c, v in u if c == base_cost[k]) for k, u in enumerate(units)]
    hulls = [_hull(u) for u in units]
    increments = [_increments(u, h) for u, h in zip(units, hulls)]
    # suffix[k]: hull increments of units k..n-1 by decreasing slope, for the bound at depth k.
    suffix: list[list[tuple[int, float]]] = [[] for _ in range(n + 1)]
    for k in range(n - 1, -1, -1):
        suffix[k] = sorted(suffix[k + 1] + increments[k], key=lambda inc: -inc[1] / inc[0])
    suffix_base_cost = [sum(base_cost[k:]) for k in range(n + 1)]
    suffix_base_value = [sum(base_value[k:]) for k in range(n + 1)]
    ordered = [sorted(range(len(u)), key=lambda i: (-u[i][1], u[i][0])) for u in units]

    root_bound = suffix_base_value[0] + _lp_bound(suffix[0], budget - suffix_base_cost[0])
    best_choice: tuple[int, ...] = _greedy(units, hulls, budget)
    best_value = sum(units[k][i][1] for k, i in enumerate(best_choice))
    choice = [0] * n
    nodes = 0
    exhausted = True

    def search(k: int, cost: int, value: float) -> None:
        nonlocal best_value, best_choice, nodes, exhausted
        nodes += 1
        if nodes > node_limit:
            exhausted = False
            return
        if k == n:
            if value > best_value + 1e-12:
                best_value, best_choice = value, tuple(choice)
            return
        room = budget - cost - suffix_base_cost[k + 1]
        for i in ordered[k]:
            c, v = units[k][i]
            if c > room:
                continue
            rest = room - c
            bound = value + v + suffix_base_value[k + 1] + _lp_bound(suffix[k + 1], rest)
            if bound <= best_value + 1e-12:
                continue
            choice[k] = i
            search(k + 1, cost + c, value + v)
            if not exhausted:
                return

    search(0, 0, 0.0)
    upper = best_value if exhausted else root_bound
    total_cost = sum(units[k][i][0] for k, i in enumerate(best_choice))
    return Allocation(best_choice, total_cost, best_value, max(upper, best_value), nodes)
