"""The per-option work of cdka_search.allocate with numpy, for problems of many options.

A per-layer plan of 10,000 modules has about a million options: the hulls, the LP walk and the
reduced-cost screening are the same algorithms as the pure-Python ones in allocate.py, run on a
padded (units x options) array (the hulls column by column for every unit at once). Only the few
steps after the LP's fractional one and the units left with a choice return to Python.
"""

from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np

from cdka_search.allocate import Option

Kept = tuple[float, int, int]  # (reduced loss, cost, option index), as allocate.py keeps them


class Arrays:
    """Every unit's options on one padded array: cost 0 / value -inf where a unit has fewer options."""

    def __init__(self, units: Sequence[Sequence[Option]]) -> None:
        lengths = np.fromiter(map(len, units), np.int64, count=len(units))
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(units)), np.float64, count=2 * int(lengths.sum()))
        rows = np.repeat(np.arange(len(units)), lengths)
        cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.valid = np.zeros((len(units), int(lengths.max())), bool)
        self.valid[rows, cols] = True
        self.cost = np.zeros(self.valid.shape)
        self.cost[rows, cols] = flat[0::2]
        self.value = np.full(self.valid.shape, -np.inf)
        self.value[rows, cols] = flat[1::2]
        self.exact = bool(self.cost.max() < 2.0**52)  # every cost and sum of costs exact in float64


def hulls(a: Arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every unit's upper convex hull as (cost, value, option index) rows and the hull lengths: the
    monotone chain of allocate._hull, one column (the j-th cheapest option) of every unit per step."""
    units, width = a.valid.shape
    order = np.lexsort((np.broadcast_to(np.arange(width), a.valid.shape), -a.value, np.where(a.valid, a.cost, np.inf)), axis=-1)
    cost = np.take_along_axis(a.cost, order, axis=1)
    value = np.take_along_axis(a.value, order, axis=1)
    best_before = np.full(value.shape, -np.inf)
    best_before[:, 1:] = np.maximum.accumulate(value, axis=1)[:, :-1]
    keep = np.take_along_axis(a.valid, order, axis=1) & (value > best_before)  # drop dominated options
    hull_cost, hull_value = np.zeros((units, width)), np.zeros((units, width))
    hull_index = np.zeros((units, width), np.int64)
    size = np.zeros(units, np.int64)
    for j in range(width):
        rows = np.flatnonzero(keep[:, j])
        if not rows.size:
            continue
        c, v = cost[rows, j], value[rows, j]
        test = np.flatnonzero(size[rows] >= 2)
        while test.size:  # pop while the last hull point lies on or below the chord to this one
            r = rows[test]
            c1, v1 = hull_cost[r, size[r] - 1], hull_value[r, size[r] - 1]
            c2, v2 = hull_cost[r, size[r] - 2], hull_value[r, size[r] - 2]
            popped = (v1 - v2) * (c[test] - c2) <= (v[test] - v2) * (c1 - c2)
            test = test[popped]
            size[rows[test]] -= 1
            test = test[size[rows[test]] >= 2]
        at = size[rows]
        hull_cost[rows, at], hull_value[rows, at], hull_index[rows, at] = c, v, order[rows, j]
        size[rows] += 1
    return hull_cost, hull_value, hull_index, size


def relax(a: Arrays, budget: int) -> tuple[float, float, list[int]]:
    """(LP upper bound, multiplier lam, integral walk rounded down): allocate._relax on arrays."""
    hull_cost, hull_value, hull_index, size = hulls(a)
    units, width = hull_cost.shape
    is_step = np.arange(width - 1) < (size - 1)[:, None]
    step_unit = np.broadcast_to(np.arange(units)[:, None], is_step.shape)[is_step]
    step_at = np.broadcast_to(np.arange(1, width), is_step.shape)[is_step]  # hull position the step reaches
    dc = (hull_cost[:, 1:] - hull_cost[:, :-1])[is_step]
    dv = (hull_value[:, 1:] - hull_value[:, :-1])[is_step]
    by_slope = np.argsort(-dv / dc, kind="stable")  # a unit's slopes strictly fall: its steps stay in order
    dc, dv, step_unit, step_at = dc[by_slope], dv[by_slope], step_unit[by_slope], step_at[by_slope]
    room = budget - int(hull_cost[:, 0].sum())
    spent = np.cumsum(dc)
    taken = int(np.searchsorted(spent, room, side="right"))  # every step before the first that does not fit
    reached = np.bincount(step_unit[:taken], minlength=units)
    value = float(np.cumsum(np.concatenate(([sum(hull_value[:, 0].tolist())], dv[:taken])))[-1])
    position = hull_index[np.arange(units), reached].tolist()
    if taken == len(dc):
        return value, 0.0, position
    room -= int(spent[taken - 1]) if taken else 0
    upper, lam = value + float(dv[taken]) * room / float(dc[taken]), float(dv[taken] / dc[taken])
    # After the fractional step the walk keeps filling with later steps of other units; a step that
    # does not fit stops its unit. Steps larger than the room left now stop their unit whatever comes.
    later = np.arange(taken + 1, len(dc))
    first_stop = np.full(units, len(dc))
    first_stop[step_unit[taken]] = taken
    too_big = later[dc[later] > room]
    np.minimum.at(first_stop, step_unit[too_big], too_big)
    fits = later[(dc[later] <= room) & (later < first_stop[step_unit[later]])]
    stopped: set[int] = set()
    for k, c, b in zip(step_unit[fits].tolist(), dc[fits].tolist(), step_at[fits].tolist()):
        if k in stopped:
            continue
        if c <= room:
            room -= int(c)
            position[k] = int(hull_index[k, b])
        else:
            stopped.add(k)
    return upper, lam, position


def screen(
    a: Arrays, units: Sequence[Sequence[Option]], lam: float, budget: int, upper: float, best_value: float
) -> tuple[list[list[Kept]], float]:
    """allocate's reduced-cost screening on arrays: the bound ``upper`` tightened by duality, and per
    unit the options whose reduced loss stays below the gap, cheapest loss first (Python only for the
    few units keeping more than one)."""
    reduced = np.where(a.valid, a.value - lam * a.cost, -np.inf)
    top = reduced.max(axis=1)
    upper = min(upper, lam * budget + sum(top.tolist()))
    eps = 1e-12 * max(1.0, abs(upper))
    kept = reduced > (top - (upper - best_value) - eps)[:, None]
    counts = kept.sum(axis=1)
    options: list[list[Kept]] = [[(0.0, units[k][i][0], i)] for k, i in enumerate(kept.argmax(axis=1).tolist())]
    # Units keeping one option keep their lam-best (reduced loss 0); the others, sorted as allocate sorts them.
    rows, cols = np.nonzero(kept[counts > 1])
    free = np.flatnonzero(counts > 1)[rows]
    loss, cost = top[free] - reduced[free, cols], a.cost[free, cols]
    order = np.lexsort((cols, cost, loss, free))
    entries = list(zip(loss[order].tolist(), cost[order].astype(np.int64).tolist(), cols[order].tolist()))
    start = 0
    for k, count in zip(np.flatnonzero(counts > 1).tolist(), counts[counts > 1].tolist()):
        options[k], start = entries[start:start + count], start + count
    for k in np.flatnonzero(counts == 0).tolist():
        options[k] = []
    return options, upper
