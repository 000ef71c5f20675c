"""Data-free scores of a component design (formulas in README "Scores"; docs/validity.md says what each
predicts in real fine-tuning).

- capacity    log2(1 + r min(m1,n1) min(m2,n2)) / log2(1 + min(d_out, d_in)): the rank bound on a log
              scale, 1 at full rank and above 1 past it (components that overlap), so it keeps rising
              with r instead of stopping the budget at the cheapest full-rank design.
- alignment   expected share of ||M||_F^2 a design keeps of an update M whose singular values follow
              the power law sigma_k ~ k^-SPECTRUM_BETA with random directions (derived model of R(M):
              _spectral_curve; SPECTRUM_BETA measured on full fine-tuning deltas). The rank-1 share
              of R(u v^T) = U (x) V needs only the small factors' spectra, drawn by seeded Monte Carlo
              (Bartlett-sampled Wishart).
- first_step  cos(dW_1, -G) ~ sqrt(r * r2 / (r1 * d_in)) after one step from the standard init (derived).
- speed       first_step on a log scale: log(1 + r * r2 / r1) / log(1 + d_in) = log(1 + d_in cos^2) /
              log(1 + d_in), 1 when the first update can align fully.
- objective   one of OBJECTIVES, DEFAULT_OBJECTIVE unless told; benchmarks/validity_lm.py measures how
              each ranks real fine-tuning. Allocation maximises the sum over matrices of
              shape_weight * objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Sequence

from cdka_search.candidates import CandidateSpace, Design, spans
from cdka_search.errors import TargetError

DEFAULT_SAMPLES = 32
DEFAULT_SEED = 0
#: Exponent of the power-law spectrum sigma_k ~ k^-beta that alignment assumes for an update (measured:
#: docs/validity.md, benchmarks/validity_lm.py --spectra).
SPECTRUM_BETA = 0.9
#: Leading singular directions of the modelled update scored as spikes (_spectral_curve).
HEAD_TERMS = 64


@dataclass(frozen=True)
class Scores:
    """Every score of one design on one shape; ``objective`` is the one allocation maximises."""

    capacity: float
    alignment: float
    first_step: float
    speed: float
    objective: float

    def as_dict(self) -> dict[str, float]:
        return {
            "capacity": round(self.capacity, 6),
            "alignment": round(self.alignment, 6),
            "first_step": round(self.first_step, 6),
            "speed": round(self.speed, 6),
            "objective": round(self.objective, 6),
        }


@dataclass(frozen=True)
class ScoredDesign:
    design: Design
    scores: Scores


Objective = Callable[[Any, Any, Any, Any], Any]  # (capacity, alignment, speed, size) -> objective; floats or arrays
AlignmentCurve = Callable[[int, int, int], Sequence[float]]

#: What the planner maximises unless told otherwise: the one real fine-tuning supports (docs/validity.md).
DEFAULT_OBJECTIVE = "rank"


#: Capacity past which designs tie on rank bound (about half of full rank at widths 256 to 4096). Measured
#: on two model widths and three tasks: plans with this knee trained as well as those with 0.6 (within a
#: seed spread) where the task plateaus early, and better where it keeps gaining rank (docs/validity.md).
RANK_KNEE = 0.9


def rank_objective(capacity: Any, alignment: Any, speed: Any, size: Any, knee: float | None = None) -> Any:
    """sqrt(min(capacity, knee) * size): the rank bound up to the knee (RANK_KNEE unless given), then parameters.

    Past the knee designs tie on capacity, so the allocator spends parameters, and among designs of
    equal cost and value those with r1 >= 2 win, then the smallest r1, r2 (ScoreTable ordering: LoRA
    and half-LoRA designs won those ties and trained worst past the knee, docs/validity.md). ``knee`` is
    for measuring other knees (benchmarks/validity_lm.py --knees).
    """
    import numpy as np

    return np.sqrt(np.minimum(capacity, RANK_KNEE if knee is None else knee) * size)


# "capacity" (stopped the budget at the cheapest full-rank design) and "speed" (its plans trained worst
# of all in benchmarks/validity_lm.py) were removed; docs/validity.md has the measurements.
OBJECTIVES: dict[str, Objective] = {
    "rank": rank_objective,
    "balanced": lambda capacity, alignment, speed, size: (capacity * alignment) ** 0.5,
    "alignment": lambda capacity, alignment, speed, size: alignment,
}


def shape_weight(d_out: int, d_in: int) -> float:
    """What one matrix of this shape counts in a data-free allocation: d_out + d_in, LoRA's cost per rank.

    Objectives are on per-shape scales (capacity and size are 1 at full rank of the shape), so with
    equal weights a 128x256 k_proj counted as much as a 688x256 gate_proj and the allocator spent the
    budget on small shapes (measured: MLP share 0.39-0.45 of the plan against 0.61 for LoRA and the
    uniform designs, and those plans trained worse; docs/validity.md). Weighted by d_out + d_in the
    sum is in LoRA-rank units: a budget is spread as LoRA of one rank spreads it unless designs differ.
    """
    return float(d_out + d_in)


def check_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise TargetError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def _capacity(rank_bound: Any, d_min: int) -> Any:
    import numpy as np

    return np.log2(1 + rank_bound) / math.log2(1 + d_min)


def _first_step(r: Any, r1: Any, r2: Any, d_in: int) -> Any:
    import numpy as np

    return np.sqrt(np.minimum(1.0, r * r2 / (r1 * d_in)))


def _speed(r: Any, r1: Any, r2: Any, d_in: int) -> Any:
    import numpy as np

    return np.minimum(1.0, np.log1p(r * r2 / r1) / math.log1p(d_in))


def _rank_reach(design: Design) -> int:
    """r * min(m1, n1) * min(m2, n2): the rank bound before the cap at min(d_out, d_in)."""
    return design.r * min(design.m1, design.n1) * min(design.m2, design.n2)


def _size(params: Any, d_out: int, d_in: int) -> Any:
    """log2(1 + P / (d_out + d_in)) / log2(1 + min(d_out, d_in)): the LoRA rank P buys, on capacity's scale."""
    import numpy as np

    return np.log2(1 + params / (d_out + d_in)) / math.log2(1 + min(d_out, d_in))


def size(design: Design) -> float:
    """The parameter count as the LoRA rank it would buy, on a log scale (1 = LoRA of full rank)."""
    return float(_size(design.params, *design.shape))


def capacity(design: Design) -> float:
    """log2(1 + r min(m1,n1) min(m2,n2)) / log2(1 + min(d_out, d_in)): 1.0 at full rank, more beyond."""
    return float(_capacity(_rank_reach(design), min(design.shape)))


def speed(design: Design) -> float:
    """log(1 + r * r2 / r1) / log(1 + d_in), capped at 1: the first-step alignment on a log scale."""
    return float(_speed(design.r, design.r1, design.r2, design.shape[1]))


def first_step_alignment(design: Design) -> float:
    """sqrt(r * r2 / (r1 * d_in)), capped at 1: LoRA gives sqrt(r / d_in)."""
    return float(_first_step(design.r, design.r1, design.r2, design.shape[1]))


def _squared_singular_values(rows: int, cols: int, samples: int, seed: int):
    """Sorted (descending) squared singular values of ``samples`` Gaussian rows x cols matrices.

    Bartlett: the Gram matrix of the short side is Wishart, L L^T with L lower triangular,
    chi-distributed diagonal and standard-normal below it, so p(p+1)/2 draws replace rows*cols.
    """
    import numpy as np

    p, dof = min(rows, cols), max(rows, cols)
    # Spectra of large Wishart matrices concentrate (Marchenko-Pastur), so fewer draws keep the
    # same accuracy; this keeps the cost of a p x p draw set near 16 * p^2 rather than samples * p^3.
    if p > 16:
        samples = max(2, samples * 16 // p)
    rng = np.random.default_rng((seed, rows, cols))
    lower = np.tril(rng.standard_normal((samples, p, p)), k=-1)
    diag = np.sqrt(rng.chisquare(dof - np.arange(p), size=(samples, p)))
    lower[:, np.arange(p), np.arange(p)] = diag
    if p == 1:
        return diag**2
    from threadpoolctl import threadpool_limits

    # One BLAS thread: OpenBLAS threads on these small SVDs spin for busy cores; on the shared 2-core
    # machine scoring 18944 x 3584 took 2.46 s with two threads and 0.12 s with one.
    with threadpool_limits(limits=1, user_api="blas"):
        return np.linalg.svd(lower, compute_uv=False) ** 2


class SpectrumCache:
    """Memo of Gaussian-factor spectra and energy curves for one planning run.

    A rows x cols and a cols x rows matrix have the same singular values, so a factor and its
    mirror share a draw set, and the designs (r1, r2), (d_out/r1, r2), (r1, d_in/r2) and
    (d_out/r1, d_in/r2) share one energy curve: about a quarter of the pairs need computing.
    """

    def __init__(self, samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED) -> None:
        self.samples, self.seed = samples, seed
        self._spectra: dict[tuple[int, int], object] = {}
        self._curves: dict[tuple[tuple[int, int], tuple[int, int], int], object] = {}

    def spectrum(self, rows: int, cols: int):
        key = (min(rows, cols), max(rows, cols))
        if key not in self._spectra:
            self._spectra[key] = _squared_singular_values(*key, self.samples, self.seed)
        return self._spectra[key]

    def curve(self, d_out: int, d_in: int, r1: int, r2: int, r_max: int, beta: float = SPECTRUM_BETA):
        """Mean top-r share (r = 1..r_max) of R(M) for an update M with the power-law spectrum ``beta``."""
        u = (min(d_out // r1, r1), max(d_out // r1, r1))
        v = (min(r2, d_in // r2), max(r2, d_in // r2))
        rows, cols = (d_out // r1) * r2, r1 * (d_in // r2)  # R(M) is (m1*n1) x (m2*n2)
        key = (u, v, r_max, min(d_out, d_in), beta, min(rows, cols), max(rows, cols))
        if key not in self._curves:
            pieces = _rank1_pieces(self.spectrum(*u), self.spectrum(*v), u == v, r_max)
            self._curves[key] = _spectral_curve(pieces, r_max, min(d_out, d_in), beta, rows, cols)
        return self._curves[key]


def _rank1_pieces(su, sv, same_draws: bool, r_max: int):
    """Per draw, the r_max largest shares sigma_i(U)^2 sigma_j(V)^2 / ||M||^2 of one rank-1 term, descending."""
    import numpy as np

    if same_draws:
        sv = np.roll(sv, 1, axis=0)  # one draw set for both factors: shift it to keep U, V independent
    # Large factors are drawn fewer times; cycle the smaller draw set to pair every draw.
    n = max(len(su), len(sv))
    if len(su) != n:
        su = su[np.arange(n) % len(su)]
    if len(sv) != n:
        sv = sv[np.arange(n) % len(sv)]
    total = su.sum(axis=1) * sv.sum(axis=1)
    # The r largest products only involve the r largest values of each factor.
    products = (su[:, :r_max, None] * sv[:, None, :r_max]).reshape(n, -1)
    k = min(r_max, products.shape[1])
    top = -np.sort(-products, axis=1)[:, :k]
    if k < r_max:
        top = np.concatenate([top, np.zeros((n, r_max - k))], axis=1)
    return top / total[:, None]


def _rank1_curve(su, sv, same_draws: bool, r_max: int):
    """Mean top-r share (r = 1..r_max) of a random rank-1 update over the draws."""
    import numpy as np

    pieces = _rank1_pieces(su, sv, same_draws, r_max)
    return np.minimum(np.cumsum(pieces, axis=1).mean(axis=0), 1.0)


def spectrum_weights(d_min: int, beta: float):
    """sigma_k^2 / sum_j sigma_j^2 for sigma_k = k^-beta, k = 1..d_min (the model of an update's spectrum)."""
    import numpy as np

    w = np.arange(1, d_min + 1, dtype=float) ** (-2.0 * beta)
    return w / w.sum()


def _spectral_curve(pieces, r_max: int, d_min: int, beta: float, rows: int, cols: int):
    """Mean top-r share of R(M), M = sum_k sigma_k u_k v_k^T with random directions (derived, approximate).

    A spiked-bulk model of R(M) (rows x cols). Spikes: each of the first HEAD_TERMS terms splits under R
    into the pieces of a random rank-1 update scaled by sigma_k^2 (term k takes the draws shifted by k,
    so the terms are independent). Bulk: summed over all terms, R(M) also behaves like a Gaussian matrix
    of the same energy, whose top singular values sit at the Marchenko-Pastur edge, a share
    (sqrt(rows) + sqrt(cols))^2 / (rows * cols) each. The top r of spikes and bulk together is the
    estimate. LoRA (R(M) = M) gets the spectrum itself; a design with a higher rank bound gathers a flat
    spectrum that LoRA cannot. Against exact SVDs of R(M) on 192x256 and 128x512 (beta 0.3, 0.5, 0.8;
    81 cases, tests/test_validity.py) the mean absolute error is 0.02 and the rank correlation 0.99.
    """
    import numpy as np

    weights = spectrum_weights(d_min, beta)
    terms = min(d_min, HEAD_TERMS)
    n = len(pieces)
    draws = (np.arange(n)[:, None] + np.arange(terms)[None, :]) % n
    union = (pieces[draws] * weights[:terms, None]).reshape(n, -1)
    edge = min(1.0, (math.sqrt(rows) + math.sqrt(cols)) ** 2 / (rows * cols))
    union = np.concatenate([union, np.full((n, min(r_max, rows, cols)), edge)], axis=1)
    top = -np.sort(-union, axis=1)[:, :r_max]
    return np.minimum(np.cumsum(top, axis=1).mean(axis=0), 1.0)


def spectral_energy(
    d_out: int,
    d_in: int,
    r1: int,
    r2: int,
    r_max: int,
    *,
    beta: float = SPECTRUM_BETA,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[float]:
    """Expected share of an update with power-law spectrum ``beta`` kept by r = 1..r_max components."""
    return SpectrumCache(samples, seed).curve(d_out, d_in, r1, r2, r_max, beta).tolist()


def rank1_energy(
    d_out: int,
    d_in: int,
    r1: int,
    r2: int,
    r_max: int,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[float]:
    """Expected share of a random rank-1 update kept by r = 1..r_max components of (r1, r2)."""
    cache = SpectrumCache(samples, seed)
    u = (min(d_out // r1, r1), max(d_out // r1, r1))
    v = (min(r2, d_in // r2), max(r2, d_in // r2))
    return _rank1_curve(cache.spectrum(*u), cache.spectrum(*v), u == v, r_max).tolist()


@dataclass(frozen=True)
class ScoreTable:
    """Every candidate of one shape, column-wise (numpy arrays): what allocation and explain read."""

    d_out: int
    d_in: int
    r1: object
    r2: object
    r: object
    params: object
    rank_bound: object
    capacity: object
    alignment: object
    first_step: object
    speed: object
    objective: object

    def __len__(self) -> int:
        return len(self.r)

    def design(self, i: int) -> Design:
        return Design.from_paper(self.d_out, self.d_in, int(self.r1[i]), int(self.r2[i]), int(self.r[i]))

    def scored(self, i: int) -> ScoredDesign:
        scores = Scores(
            float(self.capacity[i]), float(self.alignment[i]), float(self.first_step[i]), float(self.speed[i]), float(self.objective[i])
        )
        return ScoredDesign(self.design(i), scores)

    def pareto(self) -> list[int]:
        """Indices of the Pareto front (fewer parameters, higher objective), by parameters."""
        import numpy as np

        # equal cost and value: r1 >= 2 first (LoRA-like designs won these ties past the knee and trained worst)
        order = np.lexsort((self.r, self.r2, self.r1, self.r1 == 1, -self.objective, self.params))
        front, best = [], -math.inf
        for i in order.tolist():
            if self.objective[i] > best + 1e-12:
                front.append(i)
                best = float(self.objective[i])
        return front

    def ranked(self, max_params: int | None = None) -> list[int]:
        """Indices by objective (highest first), fewest parameters breaking ties."""
        import numpy as np

        order = np.lexsort((self.r, self.r2, self.r1, self.r1 == 1, self.params, -self.objective)).tolist()
        return [i for i in order if max_params is None or self.params[i] <= max_params]


def score_shape(
    d_out: int,
    d_in: int,
    space: CandidateSpace = CandidateSpace(),
    objective: str = DEFAULT_OBJECTIVE,
    *,
    spectra: SpectrumCache | None = None,
    alignment: AlignmentCurve | None = None,
    pairs: Collection[tuple[int, int]] | None = None,
) -> ScoreTable:
    """Score every candidate of a d_out x d_in shape, vectorised per (r1, r2).

    ``alignment(r1, r2, r_max)`` replaces the data-free rank-1 estimate, e.g. with the energy a
    design keeps of a real reference update (cdka_search.alignment); ``pairs`` restricts (r1, r2).
    """
    import numpy as np

    check_objective(objective)
    spectra = spectra or SpectrumCache()
    curve_of = alignment or (lambda r1, r2, r_max: spectra.curve(d_out, d_in, r1, r2, r_max))
    r1s, r2s, starts, stops, curves = [], [], [], [], []
    for p1, p2, span in spans(d_out, d_in, space):
        if pairs is not None and (p1, p2) not in pairs:
            continue
        r1s.append(p1)
        r2s.append(p2)
        starts.append(span.start)
        stops.append(span.stop)
        curves.append(np.asarray(curve_of(p1, p2, span.stop - 1), dtype=float)[span.start - 1 :])
    if not r1s:
        raise TargetError(
            f"no design of the space fits {d_out}x{d_in} with fewer parameters than the weight itself "
            f"({d_out * d_in:,}); fine-tune it directly or leave it out of --targets"
        )
    counts = np.subtract(stops, starts)
    r1, r2 = np.repeat(r1s, counts).astype(np.int64), np.repeat(r2s, counts).astype(np.int64)
    # r runs from each pair's start: position in the whole column minus the pair's offset.
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    r = (np.arange(int(counts.sum())) - offsets + np.repeat(starts, counts)).astype(np.int64)
    align = np.concatenate(curves)
    m1, n2 = d_out // r1, d_in // r2
    params = r * (m1 * r2 + r1 * n2)
    reach = r * np.minimum(m1, r2) * np.minimum(r1, n2)
    rank_bound = np.minimum(min(d_out, d_in), reach)
    cap = _capacity(reach, min(d_out, d_in))
    first = _first_step(r, r1, r2, d_in)
    fast = _speed(r, r1, r2, d_in)
    obj = OBJECTIVES[objective](cap, align, fast, _size(params, d_out, d_in))
    return ScoreTable(d_out, d_in, r1, r2, r, params, rank_bound, cap, align, first, fast, obj)


def score_designs(
    designs: Iterable[Design],
    objective: str = DEFAULT_OBJECTIVE,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[ScoredDesign]:
    """Scores of designs (any shapes); alignment curves are computed once per (shape, r1, r2)."""
    combine = check_objective(objective)
    pending = list(designs)
    r_max: dict[tuple[int, int, int, int], int] = {}
    for d in pending:
        key = (*d.shape, d.r1, d.r2)
        r_max[key] = max(r_max.get(key, 0), d.r)
    spectra = SpectrumCache(samples, seed)
    curves = {key: spectra.curve(*key, top).tolist() for key, top in r_max.items()}
    out = []
    for d in pending:
        cap = capacity(d)
        align = curves[(*d.shape, d.r1, d.r2)][d.r - 1]
        fast = speed(d)
        value = float(combine(cap, align, fast, size(d)))
        out.append(ScoredDesign(d, Scores(cap, align, first_step_alignment(d), fast, value)))
    return out
