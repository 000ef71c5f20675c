"""Per-module score tables from reference updates: the data-aware half of planning.

Rule for spreading the budget: a module's value is w_m * objective_m with
w_m = ||M_m||_F^2 / mean_k ||M_k||_F^2, so with ``--objective alignment`` the allocation maximises
the total reference energy kept, and modules whose update carries more energy earn more budget.

Which (r1, r2) are measured: every divisor pair of updates of at most 2^16 entries (under a second
for all of them) or with ``all_pairs``; otherwise the shape's data-free Pareto front plus LoRA
(``shortlist_pairs``: 7 pairs on LLaMA sizes), so that a 1376 x 512 module no longer measures its
120 pairs and costs more than a 4096 x 11008 one. Each pair costs a few passes over the update
(docs/alignment.md); one shape's shortlist is computed once for all its modules, and each update is
checked, upcast and moved to the device once for all its pairs.
"""

from __future__ import annotations

from typing import Mapping

import torch

from cdka_search.alignment.energy import energy_curve
from cdka_search.candidates import CandidateSpace
from cdka_search.errors import ReferenceFileError
from cdka_search.scoring import ScoreTable, SpectrumCache, score_shape
from cdka_search.spec.model_spec import ModelSpec

SMALL_UPDATE = 1 << 16


def shortlist_pairs(
    shape: tuple[int, int], space: CandidateSpace, objective: str, cache: SpectrumCache | None = None
) -> set[tuple[int, int]]:
    """The (r1, r2) worth measuring on a reference update: the data-free front's pairs, and LoRA."""
    free = score_shape(*shape, space, objective, spectra=cache or SpectrumCache())
    return {(int(free.r1[i]), int(free.r2[i])) for i in free.pareto()} | {(1, 1)}


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
    device: str | torch.device | None = "auto",
) -> tuple[dict[str, ScoreTable], dict[str, float]]:
    """Score table and budget weight of every target, from its own reference update (energies on ``device``)."""
    check_reference(spec, reference)
    cache = SpectrumCache(seed=seed)
    shortlist = {
        shape: None if all_pairs or shape[0] * shape[1] <= SMALL_UPDATE else shortlist_pairs(shape, space, objective, cache)
        for shape in spec.shapes
    }
    energy = {t.name: float(reference[t.name].double().pow(2).sum()) for t in spec.targets}
    mean = sum(energy.values()) / len(energy)
    if not mean > 0:
        raise ReferenceFileError("every reference update is zero: nothing to align with")
    tables: dict[str, ScoreTable] = {}
    for t in spec.targets:
        curve = energy_curve(reference[t.name], seed=seed, device=device)
        tables[t.name] = score_shape(t.d_out, t.d_in, space, objective, alignment=curve, pairs=shortlist[t.shape])
    return tables, {name: e / mean for name, e in energy.items()}
