"""Per-module score tables from reference updates: the data-aware half of planning.

Rule for spreading the budget: a module's value is w_m * objective_m with w_m = shape_weight(shape) *
||M_m||_F^2 / mean ||M_k||_F^2 over the modules k of the same shape (module_weights): across shapes
the budget is spread as data-free planning spreads it, and within a shape modules whose update
carries more energy earn more budget (with ``--objective alignment``, more of the energy kept).

Expert tensors (E, d_out, d_in) are scored on the stacked update: every expert trains its own
factors of the tensor's one design, so the best fit keeps, expert by expert, the best rank-r fit of
that expert's slice, and the share kept of the whole stack is the energy-weighted mean of the
experts' shares, sum_e ||M_e||^2 e_e(r) / sum_e ||M_e||^2 (an unweighted mean would let an expert
that barely moved count as much as the one carrying the update). Its energy in w_m is the stack's
||M||_F^2, while the allocation charges it E times the design's parameters.

Which (r1, r2) are measured: every divisor pair of updates of at most 2^12 entries (cheap at that
size) or with ``all_pairs``; otherwise the shape's data-free Pareto front plus LoRA
(``shortlist_pairs``: 7 pairs on LLaMA sizes), so that a 1376 x 512 module no longer measures its
120 pairs and costs more than a 4096 x 11008 one. How deep: see ReferenceScores (16 components
first, more only where the allocation's choice needs them). One shape's shortlist is computed once
for all its modules, and each update is upcast and moved to the device once per module and round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from cdka_search.alignment.device import resolve_device
from cdka_search.alignment.energy import energy_curve, log2_energy, scaled_squared_norm
from cdka_search.candidates import CandidateSpace, Design
from cdka_search.documents import brief
from cdka_search.errors import ReferenceFileError
from cdka_search.scoring import ScoreTable, SpectrumCache, check_objective, score_shape, shape_weight
from cdka_search.spec.model_spec import ModelSpec

SMALL_UPDATE = 1 << 12
#: Components measured on a first pass (a Krylov block of 32 columns, not 80 for r up to 64).
FIRST_DEPTH = 16


def uses_alignment(objective: str) -> bool:
    """Whether ``objective`` changes with the alignment score, probed on a grid of the other scores.

    An objective that does not (the default ``rank``) cannot let a reference change which design a
    module gets, only the module's weight, so nothing needs measuring before the allocation.
    """
    combine = check_objective(objective)
    grid = [(c, s, z) for c in (0.05, 0.3, 0.6, 1.2) for s in (0.1, 0.9) for z in (1e-4, 0.01, 0.3)]
    return any(float(combine(c, 0.1, s, z)) != float(combine(c, 0.9, s, z)) for c, s, z in grid)


def module_weights(spec: ModelSpec, energy: Mapping[str, float]) -> dict[str, float]:
    """w_m = shape_weight(shape) * ||M_m||^2 / mean ||M_k||^2 over the modules k of m's shape.

    Across shapes the budget is spread as in data-free planning (scoring.shape_weight: raw update
    energies of different shapes are not comparable, and weighting by them alone put k/v and o on the
    same footing as the MLP); within a shape, modules whose update carries more energy earn more.
    A shape whose updates are all zero keeps weight 0.
    """
    by_shape: dict[tuple[int, int], list[float]] = {}
    for t in spec.targets:
        by_shape.setdefault(t.shape, []).append(energy[t.name])
    means = {shape: sum(values) / len(values) for shape, values in by_shape.items()}
    return {t.name: shape_weight(*t.shape) * energy[t.name] / means[t.shape] if means[t.shape] > 0 else 0.0
            for t in spec.targets}


def update_energies(spec: ModelSpec, reference: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """||M_m||_F^2 of every target's update, those of one shape divided by one power of four (near the
    shape's largest): module_weights compares energies within a shape alone, so the weights are those of
    the true energies, and neither entries of 3e38 nor of 1e-30 overflow or underflow (scaled_squared_norm).
    ReferenceFileError naming a module whose update is not finite."""
    scaled = {t.name: scaled_squared_norm(reference[t.name]) for t in spec.targets}
    for name, (total, _) in scaled.items():
        if not math.isfinite(total):
            raise ReferenceFileError(f"reference {brief(name)} has NaN or infinite entries; a reference update must be finite")
    tops: dict[tuple[int, int], int] = {}
    for t in spec.targets:
        total, power = scaled[t.name]
        if total > 0:
            tops[t.shape] = max(tops.get(t.shape, -(1 << 30)), log2_energy(total, power) // 2)
    return {t.name: math.ldexp(scaled[t.name][0], 2 * (scaled[t.name][1] - tops.get(t.shape, 0))) for t in spec.targets}


def shortlist_pairs(
    shape: tuple[int, int], space: CandidateSpace, objective: str, cache: SpectrumCache | None = None
) -> set[tuple[int, int]]:
    """The (r1, r2) worth measuring on a reference update: the data-free front's pairs, and LoRA."""
    free = score_shape(*shape, space, objective, spectra=cache or SpectrumCache())
    return {(int(free.r1[i]), int(free.r2[i])) for i in free.pareto()} | {(1, 1)}


def check_reference(spec: ModelSpec, reference: Mapping[str, torch.Tensor]) -> None:
    """Every selected target needs a finite (d_out, d_in) tensor, an expert tensor (experts, d_out, d_in);
    errors name the modules."""
    missing = [t.name for t in spec.targets if t.name not in reference]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ReferenceFileError(
            f"the reference has no update for {len(missing)} target module(s): {shown}; probe them or narrow --targets"
        )
    for t in spec.targets:
        shape = tuple(reference[t.name].shape)
        if t.kind == "experts" and shape != (t.experts, *t.shape):
            raise ReferenceFileError(f"reference {t.name} is {shape}, but the model's expert parameter is "
                                     f"{t.experts}x{t.d_out}x{t.d_in} (experts, d_out, d_in)")
        if t.kind != "experts" and shape != t.shape:
            raise ReferenceFileError(f"reference {t.name} is {shape}, but the model's weight is {t.d_out}x{t.d_in}")


class ReferenceScores:
    """Score table and budget weight of every target, from its own reference update, measured lazily.

    A (module, pair) is first measured up to ``first_depth`` (FIRST_DEPTH) components only (a Krylov block a third
    as wide as the full r range needs); beyond that its table holds an upper bound, e(r0) + (r - r0)
    times the last measured singular value's share, capped at 1 (singular values never grow). For an
    objective that ignores the alignment (``uses_alignment``) the first depth is 0: every table holds
    the bound 1 and only the designs the allocation picks are measured (their alignment is reported). The
    planner allocates on these tables and calls ``refine`` with its choice: every chosen design that
    rests on a bound is measured in full and its module re-scored, until none does. The objective
    grows with the alignment, so the final choice, all measured, is optimal for the true energies as
    well (its value equals its bound, which no other choice's bound exceeds).
    """

    def __init__(
        self,
        spec: ModelSpec,
        reference: Mapping[str, torch.Tensor],
        space: CandidateSpace,
        objective: str,
        *,
        seed: int = 0,
        all_pairs: bool = False,
        device: str | torch.device | None = "auto",
        first_depth: int | None = None,
    ) -> None:
        check_reference(spec, reference)
        resolve_device(device)  # a bad device fails before any work
        self._spec, self._reference, self._space, self._objective = spec, reference, space, objective
        self._seed, self._device = seed, device
        self._deepen_fully = uses_alignment(objective)
        self._first_depth = (FIRST_DEPTH if self._deepen_fully else 0) if first_depth is None else first_depth
        self._by_name = {t.name: t for t in spec.targets}
        cache = SpectrumCache(seed=seed)
        self._pairs = {
            shape: None if all_pairs or shape[0] * shape[1] <= SMALL_UPDATE else shortlist_pairs(shape, space, objective, cache)
            for shape in spec.shapes
        }
        energy = update_energies(spec, reference)
        if not any(e > 0 for e in energy.values()):
            raise ReferenceFileError("every reference update is zero: nothing to align with")
        self.weights = module_weights(spec, energy)
        self._measured: dict[tuple[str, tuple[int, int]], list[float]] = {}
        self.measurements = 0  # (module, pair) curves measured, first passes and refinements together
        self.tables: dict[str, ScoreTable] = {t.name: self._score(t.name, {}) for t in spec.targets}

    def _score(self, name: str, deepen: Mapping[tuple[int, int], int]) -> ScoreTable:
        """Module ``name``'s table, measuring each pair in ``deepen`` to its r (in full where the objective
        uses the alignment: a deeper choice would need another round) and new pairs to first_depth."""
        target = self._by_name[name]
        measure = None

        def curve(r1: int, r2: int, r_max: int) -> list[float]:
            nonlocal measure
            key = (name, (r1, r2))
            known = self._measured.get(key)
            if (r1, r2) in deepen:
                wanted = r_max if self._deepen_fully else min(deepen[(r1, r2)], r_max)
            else:
                wanted = min(self._first_depth, r_max)
            if wanted == 0 and known is None:
                return [1.0] * r_max  # nothing measured: the trivial upper bound
            if known is None or len(known) < wanted:
                if measure is None:  # the update is upcast and moved once per module and round
                    measure = stacked_curve(self._reference[name], seed=self._seed, device=self._device)
                known = self._measured[key] = measure(r1, r2, wanted)
                self.measurements += 1
            return bounded(known, r_max)

        return score_shape(target.d_out, target.d_in, self._space, self._objective, alignment=curve, pairs=self._pairs[target.shape])

    def refine(self, chosen: Mapping[str, Design]) -> set[str]:
        """Measure every chosen design's pair that its table only bounds (see _score); the modules re-scored."""
        pending: dict[str, dict[tuple[int, int], int]] = {}
        for name, design in chosen.items():
            if len(self._measured.get((name, (design.r1, design.r2)), ())) < design.r:
                pending.setdefault(name, {})[(design.r1, design.r2)] = design.r
        for name, pairs in pending.items():
            self.tables[name] = self._score(name, pairs)
        return set(pending)


def stacked_curve(M: torch.Tensor, *, seed: int, device: str | torch.device | None) -> Callable[[int, int, int], list[float]]:
    """energy_curve of a (d_out, d_in) update; of an (experts, d_out, d_in) one, the energy-weighted mean
    of its experts' curves (module docstring). The mean of non-increasing increments is non-increasing,
    so ``bounded`` holds for it as for one matrix."""
    if M.dim() == 2:
        return energy_curve(M, seed=seed, device=device)
    scaled = [scaled_squared_norm(e) for e in M]
    # one power of four for every expert: the shares are ratios, and stay finite in float64
    top = max((log2_energy(total, power) // 2 for total, power in scaled if total > 0), default=0)
    norms = [math.ldexp(total, 2 * (power - top)) for total, power in scaled]
    total = sum(norms)
    # keep_layout=False: every expert's curve is alive at once, and a layout each would be E more copies
    moved = [(n / total, energy_curve(e, seed=seed, device=device, keep_layout=False)) for n, e in zip(norms, M) if n > 0]

    def curve(r1: int, r2: int, r_max: int) -> list[float]:
        if not moved:
            return [0.0] * r_max
        curves = [(share, measure(r1, r2, r_max)) for share, measure in moved]
        return [min(1.0, sum(share * c[j] for share, c in curves)) for j in range(r_max)]

    return curve


def bounded(energies: Sequence[float], r_max: int) -> list[float]:
    """``energies`` (r = 1..len) extended to r_max by their upper bound: each further component adds
    at most the last one's share (sigma_j is non-increasing), and no energy exceeds 1."""
    if len(energies) >= r_max:
        return list(energies[:r_max])
    last = energies[-1]
    step = last - (energies[-2] if len(energies) > 1 else 0.0)
    return [*energies, *(min(1.0, last + step * j) for j in range(1, r_max - len(energies) + 1))]
