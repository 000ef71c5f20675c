"""Which single Kronecker terms PEFT LoKr and LyCORIS LoKr can build: their factorisation, replicated.

Both tools build one term per module, dW = scale * kron(w1, w2), from one integer ``factor``:

    (out_l, out_k) = factorization(d_out, factor)      w1: out_l x in_m   (= B_i, m1 x n1)
    (in_m,  in_n)  = factorization(d_in,  factor)      w2: out_k x in_n   (= A_i, m2 x n2)

so in the paper's symbols r1 = out_k (= m2) and r2 = in_m (= n1). The two copies of ``factorization``
differ in one place: when ``factor`` divides the size, PEFT returns ``(factor, size // factor)`` as is
(peft/tuners/lokr/layer.py) while LyCORIS sorts the pair (lycoris/functional/general.py). The
functions here replicate both, line for line, and tests/test_export_peft.py checks them against the
installed packages. Pure standard library: candidates.py uses it on the planning path.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = [
    "peft_factorization",
    "lycoris_factorization",
    "factor_candidates",
    "peft_factors",
    "lycoris_factors",
    "lokr_factor_pairs",
]


def _search(dimension: int, factor: int) -> tuple[int, int]:
    """The shared search: the divisor pair nearest the square root with the small side <= factor."""
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


@lru_cache(maxsize=4096)
def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``peft.tuners.lokr.layer.factorization`` (checked against PEFT 0.21): unsorted when factor divides."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    return _search(dimension, factor)


@lru_cache(maxsize=4096)
def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``lycoris.functional.general.factorization`` (checked against lycoris-lora 4.1): always sorted."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    return _search(dimension, factor)


def _divisors(n: int) -> set[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return set(small) | {n // d for d in small}


@lru_cache(maxsize=512)
def factor_candidates(d_out: int, d_in: int) -> tuple[int, ...]:
    """Factors that between them give every outcome of either factorisation on both sizes.

    The outcome only changes at divisors of d_out or d_in (a divisor takes the early branch; between
    two divisors the search stops at the same place), so -1, every divisor d and d + 1 cover them all.
    """
    divs = _divisors(d_out) | _divisors(d_in)
    return (-1, *sorted(divs | {d + 1 for d in divs}))


def peft_factors(m1: int, n1: int, m2: int, n2: int) -> tuple[int, ...]:
    """Every decompose_factor for which PEFT LoKr builds w1 = m1 x n1 and w2 = m2 x n2 (may be empty)."""
    d_out, d_in = m1 * m2, n1 * n2
    return tuple(
        f for f in factor_candidates(d_out, d_in)
        if peft_factorization(d_out, f) == (m1, m2) and peft_factorization(d_in, f) == (n1, n2)
    )


def lycoris_factors(m1: int, n1: int, m2: int, n2: int) -> tuple[int, ...]:
    """Every LyCORIS ``factor`` that builds w1 = m1 x n1 and w2 = m2 x n2 (unbalanced_factorization off)."""
    d_out, d_in = m1 * m2, n1 * n2
    return tuple(
        f for f in factor_candidates(d_out, d_in)
        if lycoris_factorization(d_out, f) == (m1, m2) and lycoris_factorization(d_in, f) == (n1, n2)
    )


@lru_cache(maxsize=512)
def lokr_factor_pairs(d_out: int, d_in: int) -> tuple[tuple[int, int], ...]:
    """(r1, r2) of every single term that BOTH PEFT LoKr and LyCORIS can build on a d_out x d_in weight.

    r1 = m2 = out_k and r2 = n1 = in_m (see the module docstring); sorted ascending.
    """
    pairs = set()
    for f in factor_candidates(d_out, d_in):
        (m1, m2), (n1, n2) = peft_factorization(d_out, f), peft_factorization(d_in, f)
        if lycoris_factors(m1, n1, m2, n2):
            pairs.add((m2, n1))
    return tuple(sorted(pairs))
