"""Factorisation enumeration: every component design (m1 x n1, m2 x n2, r) of a weight shape.

Paper mapping: r1 = m2 (rows of A_i), r2 = n1 (columns of B_i); d_out = m1*m2, d_in = n1*n2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

from cdka_search.errors import TargetError
from cdka_search.limits import MAX_DESIGNS, MAX_DIM, MAX_PAIRS, check_int

FAMILIES = ("cdka", "every", "lora", "lokr")
DEFAULT_MAX_R = 64  # the automatic cap on r: enough for budgets up to a few percent, and it keeps scoring cheap


class PaperSymbols:
    """The paper's (r1, r2) of anything holding m1, n1, m2, n2: r1 = m2 (rows of A_i), r2 = n1 (columns of B_i)."""

    m2: int
    n1: int

    @property
    def r1(self) -> int:
        return self.m2

    @property
    def r2(self) -> int:
        return self.n1


@dataclass(frozen=True, order=True)
class Design(PaperSymbols):
    """One component design: B_i is m1 x n1, A_i is m2 x n2, r components."""

    m1: int
    n1: int
    m2: int
    n2: int
    r: int

    @classmethod
    def from_paper(cls, d_out: int, d_in: int, r1: int, r2: int, r: int) -> "Design":
        """The design the paper writes as (r1, r2, r) on a d_out x d_in weight."""
        if r1 < 1 or r2 < 1 or r < 1 or d_out % r1 or d_in % r2:
            raise TargetError(f"(r1, r2, r) = ({r1}, {r2}, {r}) does not fit {d_out}x{d_in}: r1 must divide d_out and r2 d_in")
        return cls(d_out // r1, r2, r1, d_in // r2, r)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m1 * self.m2, self.n1 * self.n2)

    @property
    def params(self) -> int:
        """Trainable parameters: r * (m1*n1 + m2*n2)."""
        return self.r * (self.m1 * self.n1 + self.m2 * self.n2)

    @property
    def rank_bound(self) -> int:
        """rank(dW) <= min(d_out, d_in, r * min(m1, n1) * min(m2, n2))."""
        d_out, d_in = self.shape
        return min(d_out, d_in, self.r * min(self.m1, self.n1) * min(self.m2, self.n2))

    @property
    def is_lora(self) -> bool:
        return self.m2 == 1 and self.n1 == 1

    def label(self) -> str:
        return f"({self.r1},{self.r2},{self.r})"


@dataclass(frozen=True)
class CandidateSpace:
    """Which designs to consider: pins on r1, r2, r, a cap on r, and an adapter family.

    ``family``: "cdka" (:func:`guided`: r1 <= r2, both powers of two, unless r1 or r2 is pinned),
    "every" (every divisor pair), "lora" (r1 = r2 = 1), "lokr" (one Kronecker term, r = 1, with
    exactly the factor shapes both PEFT LoKr and LyCORIS build from some ``factor``; see
    cdka_search.export.lokr_shapes).

    ``max_r``: a hard cap on r, or None for the automatic one: DEFAULT_MAX_R, raised by
    :func:`fit_max_r` where a budget costs more than every target's largest design under it.
    """

    r1: int | None = None
    r2: int | None = None
    r: int | None = None
    max_r: int | None = None
    family: str = "cdka"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise TargetError(f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        for name in ("r1", "r2", "r"):
            value = getattr(self, name)
            if value is not None:
                check_int(value, f"--{name.replace('_', '-')}", TargetError, 1, MAX_DIM)
        if self.max_r is not None:
            check_int(self.max_r, "--max-r", TargetError, 1, MAX_DIM)
        # A pin the family can never meet is refused here, not found after planning (by export) or
        # reported as a divisor problem of the first shape.
        if self.family == "lokr" and self.r not in (None, 1):
            raise TargetError(f"--family lokr is one Kronecker term (r = 1); --r {self.r} cannot be met")
        for name in ("r1", "r2"):
            if self.family == "lora" and getattr(self, name) not in (None, 1):
                raise TargetError(f"--family lora is r1 = r2 = 1; --{name} {getattr(self, name)} cannot be met")

    @property
    def cap(self) -> int:
        """The largest r considered."""
        return DEFAULT_MAX_R if self.max_r is None else self.max_r


@lru_cache(maxsize=256)
def divisors(n: int) -> tuple[int, ...]:
    """All positive divisors of n, ascending. n is bounded by MAX_DIM, so trial division up to
    sqrt(n) takes at most about a thousand steps."""
    check_int(n, "a weight dimension", TargetError, 1, MAX_DIM)
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return tuple(small + large[::-1])


def guided(r1: int, r2: int) -> bool:
    """Whether (r1, r2) follows the design guideline the default family keeps: r1 <= r2 (measured: of 8
    mirrored pairs, r1 < r2 trained better every time) and both powers of two, as the paper's designs
    are. Past the rank knee the objective values designs by their parameters alone, and with every
    divisor pair the allocator filled budgets with whatever fitted exactly, such as (8,1,7) or
    (43,256,2) on a 688 x 256 weight, which trained worse (docs/validity.md)."""
    return r1 <= r2 and r1 & (r1 - 1) == 0 and r2 & (r2 - 1) == 0


#: The whole enumeration: what factor_pairs and enumerate_candidates list unless given a space (the
#: planner passes its own, whose default family keeps the guideline's designs).
EVERY_PAIR = CandidateSpace(family="every")


def factor_pairs(d_out: int, d_in: int, space: CandidateSpace = EVERY_PAIR) -> list[tuple[int, int]]:
    """Every (r1, r2) with r1 | d_out and r2 | d_in allowed by the space's pins and family."""
    if space.family == "lora":
        allowed = [(1, 1)]
    elif space.family == "lokr":
        from cdka_search.export.lokr_shapes import lokr_factor_pairs

        allowed = list(lokr_factor_pairs(d_out, d_in))
    else:
        allowed = [(r1, r2) for r1 in divisors(d_out) for r2 in divisors(d_in)]
        if space.family == "cdka" and space.r1 is None and space.r2 is None:
            allowed = [(r1, r2) for r1, r2 in allowed if guided(r1, r2)]
    pairs = [
        (r1, r2) for r1, r2 in allowed if (space.r1 is None or r1 == space.r1) and (space.r2 is None or r2 == space.r2)
    ]
    if not pairs:
        raise TargetError(
            f"no design fits {d_out}x{d_in} with r1={space.r1}, r2={space.r2}: r1 must divide {d_out} "
            f"(e.g. {', '.join(map(str, divisors(d_out)[:6]))}) and r2 must divide {d_in}"
        )
    return pairs


def sane_r(d_out: int, d_in: int, r1: int, r2: int) -> int:
    """The most components a design may have while costing fewer parameters than the frozen
    d_out x d_in weight (0: none may): at or above that size, fine-tuning the weight itself is
    cheaper and exact, so no such design is ever a candidate."""
    m1, n1, m2, n2 = d_out // r1, r2, r1, d_in // r2
    return (d_out * d_in - 1) // (m1 * n1 + m2 * n2)


def r_range(d_out: int, d_in: int, r1: int, r2: int, space: CandidateSpace = CandidateSpace()) -> range:
    """Component counts worth trying: up to the cap, no further than the rank saturates, and
    never as many parameters as the weight (the range may be empty)."""
    sane = sane_r(d_out, d_in, r1, r2)
    if space.r is not None:
        if space.r > min(d_out, d_in):
            raise TargetError(f"--r {space.r} is more components than a {d_out}x{d_in} update can use (at most {min(d_out, d_in)})")
        return range(space.r, min(space.r, sane) + 1)
    if space.family == "lokr":
        return range(1, min(1, sane) + 1)
    m1, n1, m2, n2 = d_out // r1, r2, r1, d_in // r2
    per_component = min(m1, n1) * min(m2, n2)  # rank(B (x) A) = rank(B) * rank(A)
    saturating = -(-min(d_out, d_in) // per_component)
    return range(1, min(space.cap, saturating, sane) + 1)


def spans(d_out: int, d_in: int, space: CandidateSpace = EVERY_PAIR) -> list[tuple[int, int, range]]:
    """(r1, r2, the r worth trying) of every pair of the space with a design; TargetError, before any
    design is built or scored, where they are more than MAX_PAIRS pairs or MAX_DESIGNS designs."""
    pairs = factor_pairs(d_out, d_in, space)
    if len(pairs) > MAX_PAIRS:
        raise TargetError(
            f"{d_out}x{d_in} has {len(pairs):,} (r1, r2) pairs under --family {space.family}, more than cdka scores for "
            f"one shape ({MAX_PAIRS:,}); choose a narrower --family or pin --r1 or --r2"
        )
    found = [(r1, r2, rs) for r1, r2 in pairs if (rs := r_range(d_out, d_in, r1, r2, space))]
    if (count := sum(len(rs) for _, _, rs in found)) > MAX_DESIGNS:
        raise TargetError(
            f"{d_out}x{d_in} has {count:,} candidate designs under --family {space.family} and --max-r {space.cap}, "
            f"more than cdka scores for one shape ({MAX_DESIGNS:,}); lower --max-r or choose a narrower --family"
        )
    return found


def enumerate_candidates(d_out: int, d_in: int, space: CandidateSpace = EVERY_PAIR) -> list[Design]:
    """Every design of a d_out x d_in weight in the space, LoRA (r1 = r2 = 1) included, each with
    fewer parameters than the weight."""
    return [Design.from_paper(d_out, d_in, r1, r2, r) for r1, r2, rs in spans(d_out, d_in, space) for r in rs]


def largest_params(d_out: int, d_in: int, space: CandidateSpace = EVERY_PAIR) -> int:
    """The parameters of the largest design of a d_out x d_in weight in the space (0: none fits)."""
    sizes = [Design.from_paper(d_out, d_in, r1, r2, rs[-1]).params
             for r1, r2 in factor_pairs(d_out, d_in, space) if (rs := r_range(d_out, d_in, r1, r2, space))]
    return max(sizes, default=0)


def fit_max_r(space: CandidateSpace, matrices: Mapping[tuple[int, int], int], limit: int) -> CandidateSpace:
    """``space`` with its automatic cap doubled until the largest designs of ``matrices`` (shape -> how
    many matrices) cost at least ``limit``, or until no larger cap adds a design; an explicit cap or a
    pinned r is kept as it is.

    Without this a budget above what r <= DEFAULT_MAX_R can hold (LoRA of rank 128 is common) would be
    left unspent for a default the user never chose.
    """
    if space.max_r is not None or space.r is not None:
        return space

    def capacity(candidate: CandidateSpace) -> int:
        return sum(count * largest_params(*shape, candidate) for shape, count in matrices.items())

    if capacity(space) >= limit:  # the common case, on every plan: the default cap holds the budget
        return space
    target = min(limit, capacity(replace(space, max_r=MAX_DIM)))
    cap = DEFAULT_MAX_R
    while capacity(replace(space, max_r=cap)) < target:
        cap *= 2
    return space if cap == DEFAULT_MAX_R else replace(space, max_r=min(cap, MAX_DIM))
