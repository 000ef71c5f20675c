"""Steps 1-3 of cdka_search.allocate with numpy, and its search's dynamic programme, for problems of many options.

A per-layer plan of 10,000 modules has millions of options but a handful of distinct fronts (one per
shape), each unit scaling one of them by a count (cost) and a weight (value). A positive scale keeps
every hull point a hull point, and unit k's hull slopes are its front's slopes times ``weight``, so

- each distinct front's hull is computed once (``Fronts``);
- the LP multiplier is bracketed by bisection: for a slope ``lam`` every unit's hull position is a
  binary search over its front's hull, and the cost of those positions falls as ``lam`` grows; the
  few hull steps left between the bracket's ends are then walked in slope order, exactly as
  allocate._relax walks all of them;
- the reduced-cost screening looks only at a window of each unit's options: the unit's reduced value
  along its hull is concave, so the options that can come within the gap of the best lie between the
  hull points on either side where it falls below that gap.

Costs are int64 (exact; allocate checks the sums fit), values float64 computed as allocate.Unit
computes them. Nothing here is per option of every unit: the work is per distinct front option, plus
a few binary searches per unit.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from itertools import chain

import numpy as np

from cdka_search.allocate import Grown, Kept, Option, SuffixLP, Tree, Unit

Positions = np.ndarray  # per unit, a position on its hull (0 = the cheapest hull point)
CHAIN_BLOCK = 1 << 16  # options per block of concave_chains: its temporaries stay in cache
# The bisection stops once at most this many hull steps per unit (+ 1,024) are left to walk. At 10,000 units
# 1 walks 14-15 thousand heap steps where 4 walked 30-39 thousand, for two more bisection rounds.
WALKED_PER_UNIT = 1
# The search's default node cap here: a node costs about a tenth of one on the Python steps, and a LLaMA-2-7B
# reference plan's 224 units needed 118,000 nodes to finish exact (benchmarks/scale.py, seed 225).
NODE_LIMIT = 250_000
GROWN_BLOCK = 1 << 15  # (state, choice) pairs the search tests at once: bounded memory, and the node cap checked per block


class Fronts:
    """The distinct fronts of ``units``, each once: its hull and its options by cost, flat over all
    fronts, and per unit where its front's hull starts, its count and its value scale ``weight * count``.
    The maps between hull points and options (``first_option``, ``options_after``, ``option_index``,
    ``hull_option``) are computed rather than stored where they are the identity: where every front is its
    own hull (``own_hulls``), where no cost repeats within a front, and where fronts are given by cost.
    At millions of options each stored map is tens of MB of fresh pages, which cost more than its use."""

    def __init__(self, units: Sequence[Unit]) -> None:
        index: dict[int, int] = {}
        fronts: list[tuple[Option, ...]] = []
        of_unit = []
        for u in units:
            f = index.setdefault(id(u.front), len(fronts))
            if f == len(fronts):
                fronts.append(u.front)
            of_unit.append(f)
        lengths = np.fromiter(map(len, fronts), np.int64, count=len(fronts))
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(fronts)), np.float64, count=2 * int(lengths.sum()))
        offset = np.cumsum(lengths) - lengths
        given_cost, given_value = flat[0::2], flat[1::2]
        # Every cost finite and >= 0, every value finite, with no temporary: the sum of finite numbers is nan
        # or inf only where it overflows (allocate's exact check then clears them).
        self.numbers_valid = bool(given_cost.min() >= 0 and np.isfinite(flat.sum()))
        # Every front its own hull (a concave chain by rising cost): nothing to chain,
        # and a hull point is its option, so no per-option index is stored (at 4.9 million options those
        # arrays were 200 MB of fresh pages, a third of the first call).
        self.own_hulls = concave_chains(lengths, given_cost, given_value)
        self._first_at = self._last_after = self._option_index = None  # the identity maps
        if self.own_hulls:
            self.largest_cost = float(given_cost.max())
            self.option_cost, self.option_value = _int64(given_cost), given_value
            self.whole_costs = bool((self.option_cost == given_cost).all())  # nothing for int64 to drop
            self.hull_cost, self.hull_value = self.option_cost, self.option_value
            hull_size = lengths
        else:
            hull, hull_size, (cost, value, self._option_index) = hulls(lengths, given_cost, given_value)
            self.largest_cost = float(cost.max())
            self.option_cost, self.option_value = _int64(cost), value
            self.whole_costs = bool((self.option_cost == cost).all())
            self.hull_cost, self.hull_value = self.option_cost[hull], value[hull]
            # A hull point is the first option of its cost (the best-valued one): where its cost begins and
            # where the options of its front and cost end. Fronts given by strictly rising cost (no index:
            # not sorted) repeat no cost, so their options end just after each hull point.
            self._first_at = hull
            if self._option_index is not None:
                new_cost = np.ones(len(cost), bool)
                new_cost[1:] = cost[1:] != cost[:-1]
                new_cost[offset] = True
                if not new_cost.all():
                    run_start = np.flatnonzero(new_cost)
                    self._last_after = np.append(run_start[1:], len(cost))[np.cumsum(new_cost)[hull] - 1]
        front_of = np.asarray(of_unit, np.int64)
        self.count = np.fromiter((u.count for u in units), np.int64, count=len(units))
        weight = np.fromiter((u.weight for u in units), np.float64, count=len(units))
        self.scale = weight * self.count  # as Unit scales values: weight * count, then times v
        self.start = (np.cumsum(hull_size) - hull_size)[front_of]
        # A unit of weight 0 values every option 0: its hull is its cheapest option alone.
        self.size = np.where(weight > 0, hull_size[front_of], 1)
        self.options_start, self.options_end = offset[front_of], (offset + lengths)[front_of]

    def first_option(self, p: np.ndarray) -> np.ndarray:
        """Flat index of the first option at the cost of flat hull point p."""
        return p if self._first_at is None else self._first_at[p]

    def options_after(self, p: np.ndarray) -> np.ndarray:
        """Flat index just past the last option at the cost of flat hull point p."""
        return self.first_option(p) + 1 if self._last_after is None else self._last_after[p]

    def option_index(self, k: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Index, in the front as given, of flat option ``at`` of units k."""
        return at - self.options_start[k] if self._option_index is None else self._option_index[at]

    def hull_option(self, k: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Index, in the front as given, of hull point j of units k."""
        return self.option_index(k, self.first_option(self.start[k] + j))

    def fits_int64(self) -> bool:
        """Whether every cost is a whole number read exactly and every sum of costs fits int64."""
        return self.whole_costs and self.largest_cost < 2.0**53 and int(self.count.sum()) * self.largest_cost < 2.0**62

    def floor(self) -> int:
        """The cost of every unit's cheapest option."""
        return int(self.cost(np.arange(len(self.size)), np.zeros_like(self.size)).sum())

    def cost(self, k: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Cost of hull point j of units k."""
        return self.count[k] * self.hull_cost[self.start[k] + j]

    def value(self, k: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Value of hull point j of units k."""
        return self.scale[k] * self.hull_value[self.start[k] + j]

    def slope(self, k: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Slope of the hull step from point j to j + 1 of units k (as allocate._relax computes it)."""
        return (self.value(k, j + 1) - self.value(k, j)) / (self.cost(k, j + 1) - self.cost(k, j))

    def reduced(self, k: np.ndarray, j: np.ndarray, lam: float) -> np.ndarray:
        """v - lam c of hull point j of units k."""
        return self.value(k, j) - lam * self.cost(k, j)


def _int64(cost: np.ndarray) -> np.ndarray:
    """``cost`` as int64; a fraction, nan or inf comes out as some other number, which
    Fronts.whole_costs then reports (comparing the copy with ``cost`` needs no float temporary)."""
    with np.errstate(invalid="ignore"):
        return cost.astype(np.int64)


def _blocks(lengths: np.ndarray, *arrays: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Flat per-option ``arrays`` of fronts of ``lengths`` options, block by block (overlapping by the two
    options a chord test reaches ahead), each block with a last array: whether each pair (i, i + 1) of
    it lies inside one front. The temporaries of millions of options, allocated whole, cost more in page
    faults than the arithmetic (0.28 s against 0.04 s at 4.9 million options, benchmarks/scale.py)."""
    n = len(arrays[0])
    within = np.ones(max(n - 1, 0), bool)
    within[(np.cumsum(lengths) - 1)[:-1]] = False
    for lo in range(0, n - 1, CHAIN_BLOCK):
        hi = min(lo + CHAIN_BLOCK + 2, n)
        yield (*(a[lo:hi] for a in arrays), within[lo:hi - 1])


def _rising(x: np.ndarray, within: np.ndarray) -> bool:
    return bool(((np.diff(x) > 0) | ~within).all())


def _rising_fronts(lengths: np.ndarray, x: np.ndarray) -> bool:
    """Whether ``x`` rises strictly along every front."""
    return all(_rising(block, within) for block, within in _blocks(lengths, x))


def concave_chains(lengths: np.ndarray, cost: np.ndarray, value: np.ndarray) -> bool:
    """Whether every front (``lengths`` options each, flat) lists its options by strictly rising cost
    and value with each one strictly above the chord of its neighbours: then ``hulls`` would keep every
    option in the given order, and each front is its own hull."""
    for c, v, w in _blocks(lengths, cost, value):
        if not (_rising(c, w) and _rising(v, w)):
            return False
        c0, c1, c2, v0, v1, v2 = c[:-2], c[1:-1], c[2:], v[:-2], v[1:-1], v[2:]
        if not (((v1 - v0) * (c2 - c0) > (v2 - v0) * (c1 - c0)) | ~(w[:-1] & w[1:])).all():
            return False
    return True


def hulls(lengths: np.ndarray, cost: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The upper convex hull of every front (``lengths`` options each, flat ``cost`` and ``value``), as
    allocate._hull gives it.

    Returns (hull, size, by_cost): by_cost holds the options front by front, each front by cost then
    best value first, as flat (cost, value, index in the front as given, None where that is the place in
    the front: the fronts were given by cost); hull the flat positions in
    by_cost of every front's hull points, front by front from the cheapest; size their number per front.
    Fronts given by strictly rising cost, as the planner builds them, are neither sorted nor padded.
    """
    index = None
    if not _rising_fronts(lengths, cost):
        order = np.lexsort((-value, cost, np.repeat(np.arange(len(lengths)), lengths)))  # stable: ties keep their order
        cost, value, index = cost[order], value[order], order - np.repeat(np.cumsum(lengths) - lengths, lengths)
    if _rising_fronts(lengths, value):
        return (*_chain(lengths, cost, value), (cost, value, index))
    # Drop dominated options (worth no more than a cheaper one of their front) before the chain.
    padded = np.full((len(lengths), int(lengths.max())), -np.inf)
    listed = np.arange(padded.shape[1]) < lengths[:, None]
    padded[listed] = value
    kept = listed.copy()
    kept[:, 1:] &= padded[:, 1:] > np.maximum.accumulate(padded, axis=1)[:, :-1]
    hull, size = _chain(kept.sum(axis=1), cost[kept[listed]], value[kept[listed]])
    return np.flatnonzero(kept[listed])[hull], size, (cost, value, index)


def _chain(lengths: np.ndarray, cost: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotone chain of allocate._hull on fronts of strictly rising cost and value (flat, ``lengths``
    options each), one option of every front per step. Returns the flat positions of the hull points,
    front by front from the cheapest, and their number per front.

    Fronts are walked longest first, so that those with a j-th option are a prefix. Each stack's top two
    points are also held in arrays, so that the pop test of a step, which every front takes, is arithmetic
    on whole arrays; only the fronts that pop gather from their stacks (gathering both points of every
    front per step made the chain 4-5 times slower at 10,000 fronts)."""
    rows = np.argsort(-lengths, kind="stable")
    start, longer = (np.cumsum(lengths) - lengths)[rows], -lengths[rows]
    stack, size = np.empty(len(cost), np.int64), np.zeros(len(lengths), np.int64)
    top_cost, top_value, below_cost, below_value = (np.zeros(len(lengths)) for _ in range(4))
    for j in range(int(lengths.max(initial=0))):
        m = int(np.searchsorted(longer, -j))  # fronts with more than j options
        at = start[:m] + j
        c, v = cost[at], value[at]
        pops = (top_value[:m] - below_value[:m]) * (c - below_cost[:m]) <= (v - below_value[:m]) * (top_cost[:m] - below_cost[:m])
        r = np.flatnonzero(pops & (size[:m] >= 2))
        while r.size:  # pop while the last hull point lies on or below the chord to this one
            size[r] -= 1
            top_cost[r], top_value[r] = below_cost[r], below_value[r]
            r = r[size[r] >= 2]
            below = stack[start[r] + size[r] - 2]
            below_cost[r], below_value[r] = cost[below], value[below]
            r = r[(top_value[r] - below_value[r]) * (c[r] - below_cost[r]) <= (v[r] - below_value[r]) * (top_cost[r] - below_cost[r])]
        stack[start[:m] + size[:m]] = at
        below_cost[:m], below_value[:m] = top_cost[:m], top_value[:m]
        top_cost[:m], top_value[:m] = c, v
        size[:m] += 1
    in_order = np.empty_like(size)
    in_order[rows] = size
    # The first ``size`` places of each front: a running sum of +1 where a front starts, -1 where its hull ends.
    edge = np.zeros(len(cost) + 1, np.int8)
    np.add.at(edge, np.cumsum(lengths) - lengths, 1)
    np.add.at(edge, np.cumsum(lengths) - lengths + in_order, -1)
    return stack[np.cumsum(edge[:-1], dtype=np.int8) > 0], in_order


def first_true(lo: np.ndarray, hi: np.ndarray, test: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Per unit k, the least j in [lo_k, hi_k) with test(k, j), hi_k if none: a binary search for
    every unit at once (``test`` false then true along each range)."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        k = np.flatnonzero(lo < hi)
        if not k.size:
            return lo
        mid = (lo[k] + hi[k]) // 2
        true = test(k, mid)
        hi[k[true]] = mid[true]
        lo[k[~true]] = mid[~true] + 1


def positions(fronts: Fronts, lam: float, within: tuple[Positions, Positions] | None = None) -> Positions:
    """Every unit's hull point once the steps of slope above ``lam`` are taken; ``within`` = (the
    positions of a greater slope, those of a smaller one), which bound these, narrows each search."""
    lo, hi = within if within is not None else (np.zeros_like(fronts.size), fronts.size - 1)
    return first_true(lo, hi, lambda k, j: fronts.slope(k, j) <= lam)


def total_cost(fronts: Fronts, at: Positions) -> int:
    return int(fronts.cost(np.arange(len(at)), at).sum())


def bracket(fronts: Fronts, budget: int, window: int, top: Positions) -> Positions:
    """Hull positions that fit the budget, with at most about ``window`` hull steps between them and
    the first positions that do not (``budget`` must not fit ``top``, the positions of slope 0)."""
    with_steps = np.flatnonzero(fronts.size > 1)
    last = fronts.slope(with_steps, fronts.size[with_steps] - 2)
    lo, at_lo = 0.0, top
    hi, at_hi = float(fronts.slope(with_steps, np.zeros_like(with_steps)).max()), np.zeros_like(fronts.size)
    # Bisection on a log scale (the slopes of real fronts span decades), from below every positive slope.
    mid = float(last[last > 0].min()) / 2 if (last > 0).any() else hi / 2
    for _ in range(200):
        if int((at_lo - at_hi).sum()) <= window or hi <= lo * (1 + 1e-12):
            break
        at = positions(fronts, mid, within=(at_hi, at_lo))  # the bracket's ends bound every unit's position
        if total_cost(fronts, at) <= budget:
            hi, at_hi = mid, at
        else:
            lo, at_lo = mid, at
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 2
    return at_hi


def relax(fronts: Fronts, budget: int) -> tuple[float, float, Positions]:
    """(LP upper bound, multiplier lam, integral walk rounded down) as allocate._relax gives them, the
    walk starting from bracketed positions: only the steps near the budget's end are walked."""
    units = np.arange(len(fronts.size))
    top = positions(fronts, 0.0)
    if total_cost(fronts, top) <= budget:
        return float(fronts.value(units, top).sum()), 0.0, top
    start = bracket(fronts, budget, window=WALKED_PER_UNIT * len(units) + 1024, top=top)
    room = budget - total_cost(fronts, start)
    value = float(fronts.value(units, start).sum())
    ahead = np.flatnonzero(start < fronts.size - 1)
    slopes = fronts.slope(ahead, start[ahead])
    heap = list(zip((-slopes[slopes > 0]).tolist(), ahead[slopes > 0].tolist()))
    heapq.heapify(heap)  # by decreasing slope, then unit: the order of allocate._relax's stable sort
    at, size, first = start.tolist(), fronts.size.tolist(), fronts.start.tolist()
    count, scale = fronts.count.tolist(), fronts.scale.tolist()
    hull_cost, hull_value = fronts.hull_cost.item, fronts.hull_value.item  # a few points per step walked
    upper, lam = None, 0.0
    while heap:
        negative_slope, k = heapq.heappop(heap)
        h = first[k] + at[k]
        dc = count[k] * hull_cost(h + 1) - count[k] * hull_cost(h)
        dv = scale[k] * hull_value(h + 1) - scale[k] * hull_value(h)
        if dc > room:
            if upper is None:  # the LP's fractional step: the bound and the multiplier
                upper, lam = value + dv * room / dc, -negative_slope
            continue  # the unit stops; later, smaller steps of other units may still fit
        room -= dc
        value += dv
        at[k] += 1
        if at[k] + 1 < size[k]:
            slope = (scale[k] * hull_value(h + 2) - scale[k] * hull_value(h + 1)) / (
                count[k] * hull_cost(h + 2) - count[k] * hull_cost(h + 1))
            if slope > 0:
                heapq.heappush(heap, (-slope, k))
    return value if upper is None else upper, lam, np.asarray(at, np.int64)


def screen(
    fronts: Fronts, lam: float, budget: int, upper: float, best_value: float
) -> tuple[list[list[Kept]], float]:
    """allocate._screen on a window of each unit's options: the bound ``upper`` tightened by duality,
    and per unit the options whose reduced loss stays below the gap, cheapest loss first."""
    units = np.arange(len(fronts.size))
    size = fronts.size
    tangent = positions(fronts, lam)  # the hull point of greatest reduced value v - lam c

    def reduced(k: np.ndarray, j: np.ndarray) -> np.ndarray:
        return fronts.reduced(k, j, lam)

    near = np.maximum(reduced(units, np.maximum(tangent - 1, 0)), reduced(units, np.minimum(tangent + 1, size - 1)))
    near = np.maximum(near, reduced(units, tangent))  # the neighbours too: slopes tie to rounding
    floor = near - (upper - best_value) - 1e-12 * max(1.0, abs(upper))
    # Reduced values rise along the hull up to the tangent and fall after it; every option lies on or
    # below its hull, so none outside [the point before the first at the floor, the first after the
    # tangent below it] can reach the floor.
    left = first_true(np.zeros_like(size), tangent, lambda k, j: reduced(k, j) >= floor[k])
    right = first_true(np.minimum(tangent + 1, size), size, lambda k, j: reduced(k, j) < floor[k])
    begin = fronts.first_option(fronts.start + np.maximum(left - 1, 0))
    end = np.where(right < size, fronts.options_after(fronts.start + np.minimum(right, size - 1)), fronts.options_end)
    lengths = end - begin  # at least 1: the window holds the tangent
    offsets = np.cumsum(lengths) - lengths
    unit = np.repeat(units, lengths)
    at = np.arange(int(lengths.sum())) - np.repeat(offsets - begin, lengths)
    cost = fronts.count[unit] * fronts.option_cost[at]
    gain = fronts.scale[unit] * fronts.option_value[at] - lam * cost  # v - lam c, as allocate._screen computes it
    top = np.maximum.reduceat(gain, offsets)
    upper = min(upper, lam * budget + sum(top.tolist()))  # the same bound, by duality; min guards rounding
    kept = np.flatnonzero(gain > (top - (upper - best_value) - 1e-12 * max(1.0, abs(upper)))[unit])
    loss, index = top[unit[kept]] - gain[kept], fronts.option_index(unit[kept], at[kept])
    order = np.lexsort((index, cost[kept], loss, unit[kept]))
    entries = list(zip(loss[order].tolist(), cost[kept][order].tolist(), index[order].tolist()))
    options, taken = [], 0
    for n in np.bincount(unit[kept], minlength=len(units)).tolist():
        options.append(entries[taken:taken + n])
        taken += n
    return options, upper


def relax_and_screen(fronts: Fronts, budget: int) -> tuple[float, list[int], list[list[Kept]], float]:
    """(multiplier lam, the rounded walk as option indices, the options screening keeps, upper bound)."""
    upper, lam, at = relax(fronts, budget)
    every = np.arange(len(fronts.size))
    start = fronts.hull_option(every, at).tolist()
    options, upper = screen(fronts, lam, budget, upper, sum(fronts.value(every, at).tolist()))
    return lam, start, options, upper


class _SuffixBounds:
    """allocate.SuffixLP.bound for arrays of rooms, each depth's prefix sums read into arrays once."""

    def __init__(self, lp: SuffixLP) -> None:
        self.lp = lp
        self.read: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def __call__(self, depth: int, room: np.ndarray) -> np.ndarray:
        if depth not in self.read:
            cost, value, slope = self.lp.cost[depth], self.lp.value[depth], self.lp.slope[depth]
            # Padded so that no steps taken reads 0 and every step taken adds nothing more: the same sums
            # as the scalar bound's branches.
            self.read[depth] = (np.asarray(cost, np.int64), np.asarray([0, *cost], np.int64),
                                np.asarray([0.0, *value]), np.asarray([*slope, 0.0]))
        cost, cost_before, value_before, slope = self.read[depth]
        spare = room - self.lp.base_cost[depth]
        taken = np.searchsorted(cost, spare, side="right")
        return self.lp.base_value[depth] + value_before[taken] + (spare - cost_before[taken]) * slope[taken]


def grow(tree: Tree, states: list[tuple[int, float]], best_value: float, upper: float, node_limit: int) -> Grown:
    """allocate._grow on arrays: the same nodes in the same order, hence the same solution, bound and
    node count, each depth's (state, choice) pairs tested in blocks of GROWN_BLOCK."""
    budget, lam, eps, n = tree.budget, tree.lam, tree.eps, len(tree.choices)
    grid, after = np.asarray(tree.grid)[:, None], np.asarray(tree.after)

    def bound(depth: int, room: np.ndarray) -> np.ndarray:
        if exact is not None:
            return exact(depth, room)
        return np.min(grid * room + after[:, depth, None], axis=0)  # as min([mu * room + a, ...])

    exact = _SuffixBounds(tree.exact_lp) if tree.exact_lp else None
    cost = np.asarray([c for c, _ in states], np.int64)
    value = np.asarray([v for _, v in states], np.float64)
    completed: tuple[int, int] | None = None
    parents: list[list[list[int]]] = []
    nodes, exhausted = len(states), True
    for depth, choices in enumerate(tree.choices):
        c = np.asarray([x[0] for x in choices], np.int64)
        w = np.asarray([x[1] for x in choices], np.float64)
        index = np.asarray([x[2] for x in choices], np.int64)
        rest, root_after, beat = tree.cheapest_after[depth + 1], float(after[0, depth + 1]), best_value + eps
        per_block = max(1, GROWN_BLOCK // len(c))
        parts, grown, cut = [], 0, False
        for first in range(0, len(cost), per_block):
            total = (cost[first:first + per_block, None] + c).ravel()
            room = budget - total
            v = (value[first:first + per_block, None] + w).ravel()
            at = np.flatnonzero((room >= rest) & (v + lam * room + root_after > beat))
            at = at[v[at] + bound(depth + 1, room[at]) > beat]
            state = first + at // len(c)
            if depth + 1 < n:
                # The scalar loop stops after the first state (not the last) whose nodes pass the cap.
                reached = nodes + grown + np.cumsum(np.bincount(state - first, minlength=min(per_block, len(cost) - first)))
                over = np.flatnonzero((reached > node_limit) & (first + np.arange(len(reached)) + 1 < len(cost)))
                if len(over):
                    cut = True
                    at, state = at[state <= first + over[0]], state[state <= first + over[0]]
            parts.append((total[at], v[at], state, index[at % len(c)]))
            grown += len(at)
            if cut:
                break
        total, v, state, option = (np.concatenate(part) for part in zip(*parts)) if parts else (
            np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64))
        order = np.lexsort((option, state, -v, total))  # the scalar loop's tuple order (cost, -value, state, option)
        total, v, state, option = total[order], v[order], state[order], option[order]
        keep = np.ones(len(v), bool)
        keep[1:] = v[1:] > np.maximum.accumulate(v)[:-1]  # more valuable than every cheaper state
        total, v = total[keep], v[keep]
        completes = v + tree.top_value_after[depth + 1]
        for q in np.flatnonzero((budget - total >= tree.top_cost_after[depth + 1]) & (completes > best_value + eps)).tolist():
            if completes[q] > best_value + eps:  # in order, each against the best so far
                best_value, completed = float(completes[q]), (depth, q)
        previous = (cost, value)
        cost, value = total, v
        parents.append(np.stack((state[keep], option[keep]), axis=1).tolist())
        nodes += grown
        if nodes > node_limit and depth + 1 < n:
            exhausted = False
            # As in _grow: the best bound of the states every better solution extends certifies the gap.
            open_depth, (open_cost, open_value) = (depth, previous) if cut else (depth + 1, (cost, value))
            upper = max(best_value, float(np.max(open_value + bound(open_depth, budget - open_cost), initial=-np.inf)))
            break
    return Grown(best_value, completed, parents, nodes, exhausted, upper)
