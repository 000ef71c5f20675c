"""Per-module score tables from reference updates: the data-aware half of planning.

Rule for spreading the budget: a module's value is w_m * objective_m with
w_m = ||M_m||_F^2 / mean_k ||M_k||_F^2, so with ``--objective alignment`` the allocation maximises
the total reference energy kept, and modules whose update carries more energy earn more budget.

Which (r1, r2) are measured: every divisor pair for updates of at most 2^20 entries or with
``all_pairs``; for larger ones the shape's data-free Pareto front plus LoRA (a few dozen pairs on
LLaMA sizes), since each pair costs several passes over the update: a 4096x11008 module takes about
6 s on two cores this way (all 234 pairs would take minutes; docs/alignment.md).
"""

from __future__ import annotations

from typing import Mapping

import torch

from cdka_search.alignment.energy import factor_sizes, topr_energies
from cdka_search.candidates import CandidateSpace
from cdka_search.errors import ReferenceFileError
from cdka_search.scoring import ScoreTable, SpectrumCache, score_shape
from cdka_search.spec.model_spec import ModelSpec

SMALL_UPDATE = 1 << 20


def check_reference(spec: ModelSpec, reference: Mapping[str, torch.Tensor]) -> None:
    """Every selected target needs a finite (d_out, d_in) tensor; errors name the modules."""
    missing = [t.name for t in spec.targets if t.name not in reference]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ReferenceFileError(
            f"the reference has no update for {len(missing)} target module(s): {shown}; probe them or narrow --targets"
        )
    for t in spec.targets:
        shape = tuple(reference[t.name].shape)
        if shape != t.shape:
            raise ReferenceFileError(f"reference {t.name} is {shape}, but the model's weight is {t.d_out}x{t.d_in}")


def reference_tables(
    spec: ModelSpec,
    reference: Mapping[str, torch.Tensor],
    space: CandidateSpace,
    objective: str,
    *,
    seed: int = 0,
    all_pairs: bool = False,
) -> tuple[dict[str, ScoreTable], dict[str, float]]:
    """Score table and budget weight of every target, from its own reference update."""
    check_reference(spec, reference)
    cache = SpectrumCache(seed=seed)
    shortlist: dict[tuple[int, int], set[tuple[int, int]] | None] = {}
    for shape in spec.shapes:
        if all_pairs or shape[0] * shape[1] <= SMALL_UPDATE:
            shortlist[shape] = None
        else:
            free = score_shape(*shape, space, objective, spectra=cache)
            shortlist[shape] = {(int(free.r1[i]), int(free.r2[i])) for i in free.pareto()} | {(1, 1)}
    energy = {t.name: float(reference[t.name].double().pow(2).sum()) for t in spec.targets}
    mean = sum(energy.values()) / len(energy)
    if not mean > 0:
        raise ReferenceFileError("every reference update is zero: nothing to align with")
    tables: dict[str, ScoreTable] = {}
    for t in spec.targets:
        M = reference[t.name]

        def curve(r1: int, r2: int, r_max: int, M=M, t=t) -> list[float]:
            return topr_energies(M, *factor_sizes(t.d_out, t.d_in, r1, r2), r_max, seed=seed).tolist()

        tables[t.name] = score_shape(t.d_out, t.d_in, space, objective, alignment=curve, pairs=shortlist[t.shape])
    return tables, {name: e / mean for name, e in energy.items()}
