"""Alignment energies: the share of ||M||_F^2 the best r-component Kronecker fit keeps.

For a shape (m1, n1, m2, n2) and r components the best fit of M is the rank-r truncated SVD of
R(M) (Eckart-Young), so the kept share is sum_{j<=r} sigma_j(R(M))^2 / ||M||_F^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from cdka_search.alignment.device import fast_bf16, resolve_device
from cdka_search.alignment.rearrange import check_shape, rearrange, row_blocks_transposed
from cdka_search.candidates import factor_pairs
from cdka_search.errors import ReferenceFileError, TargetError

Pair = tuple[int, int]

#: Target absolute error of every energy (planning needs 1e-3, issue 12). The Krylov iteration stops
#: once its own (conservative) error estimate is below it (see _krylov_energies); docs/alignment.md has the
#: measured errors, all below this target.
DEFAULT_ACCURACY = 1e-3
#: Most Krylov blocks after the first: a cap, reached only on spectra flatter than any update measured.
DEFAULT_MAX_STEPS = 10
#: The exact Gram path is taken up to min(R.shape) <= GRAM_BLOCKS * k: at 4096 x 11008 in bfloat16 a
#: 344-wide Gram matrix took about what a Krylov run does (4-5 steps of two passes), 47 ms against 50.
GRAM_BLOCKS = 16
#: Columns per block beyond r_max: k = 16 + 16 = 32 costs about what 24 does per pass (a pass is
#: memory bound at this width) and converges in fewer steps.
DEFAULT_OVERSAMPLE = 16
#: Shortest dot product a bfloat16 Gram matrix is used for, 32 chunks of 2048 (see _gram), and fewest
#: nonzero entries a matrix measured in bfloat16 has: below, its roundings do not average out.
_LOW_GRAM_LENGTH = 32 * 2048


def factor_sizes(d_out: int, d_in: int, r1: int, r2: int) -> tuple[int, int, int, int]:
    """(m1, n1, m2, n2) for the pair (r1, r2): m2 = r1, n1 = r2, m1 = d_out/r1, n2 = d_in/r2."""
    if r1 < 1 or r2 < 1 or d_out % r1 or d_in % r2:
        raise TargetError(
            f"pair (r1={r1}, r2={r2}) does not fit a {d_out} x {d_in} matrix: "
            f"r1 must divide d_out={d_out} and r2 must divide d_in={d_in}"
        )
    return d_out // r1, r2, r1, d_in // r2


def divisor_pairs(d_out: int, d_in: int) -> list[Pair]:
    """Every (r1, r2) with r1 | d_out and r2 | d_in, in increasing order."""
    return factor_pairs(d_out, d_in)


@dataclass(frozen=True)
class KrylovSettings:
    """How the randomized path runs (module docstring; docs/alignment.md has the measurements)."""

    oversample: int = DEFAULT_OVERSAMPLE
    max_steps: int = DEFAULT_MAX_STEPS
    accuracy: float = DEFAULT_ACCURACY
    seed: int = 0

    def __post_init__(self) -> None:
        if self.oversample < 0 or self.max_steps < 0:
            raise TargetError(f"oversample and max_steps must be >= 0, got {self.oversample} and {self.max_steps}")
        if not self.accuracy > 0:
            raise TargetError(f"accuracy must be positive, got {self.accuracy}")


def topr_energies(
    M: torch.Tensor,
    m1: int,
    n1: int,
    m2: int,
    n2: int,
    r_max: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    max_steps: int = DEFAULT_MAX_STEPS,
    seed: int = 0,
    accuracy: float = DEFAULT_ACCURACY,
    bf16_passes: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
) -> torch.Tensor:
    """Energies e[r-1] = sum_{j<=r} sigma_j(R(M))^2 / ||M||_F^2 for r = 1..r_max, in float64.

    Exact (eigenvalues of the small Gram matrix of R(M)) when min(R.shape) <= GRAM_BLOCKS *
    (r_max + oversample); otherwise one randomized block Krylov run (see _krylov_energies) that stops
    when its error estimate is below ``accuracy``, after at most ``max_steps`` blocks past the first.
    The result is clamped to [0, 1] and non-decreasing; a zero M gives zeros. bf16/fp16 inputs are
    upcast to `dtype`. The work runs on ``device`` (cdka_search.alignment.device); the result is on the CPU.
    """
    matrix = _Matrix.of(M, r_max, dtype, device, bf16_passes)
    settings = KrylovSettings(oversample, max_steps, accuracy, seed)
    return matrix.energies((m1, n1, m2, n2), r_max, settings)


def alignment_table(
    M: torch.Tensor,
    r_max: int,
    pairs: Iterable[Pair] | None = None,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    max_steps: int = DEFAULT_MAX_STEPS,
    seed: int = 0,
    accuracy: float = DEFAULT_ACCURACY,
    bf16_passes: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
) -> dict[Pair, list[float]]:
    """Energies for r = 1..r_max of every pair (r1, r2) (all divisor pairs when pairs is None).

    Paper mapping: m2 = r1, n1 = r2, m1 = d_out / r1, n2 = d_in / r2. M is upcast once; every Krylov
    pair draws its sketch from the same seed, and an exact pair may be derived from a larger pair's
    Gram matrix (``_Matrix.gram``), so a pair's row depends on the others only through rounding.
    """
    _check_2d(M)
    d_out, d_in = M.shape
    wanted = divisor_pairs(d_out, d_in) if pairs is None else [tuple(p) for p in pairs]
    sizes = {p: factor_sizes(d_out, d_in, *p) for p in wanted}  # validate all before any work
    settings = KrylovSettings(oversample, max_steps, accuracy, seed)
    matrix = _Matrix.of(M, r_max, dtype, device, bf16_passes)
    # in m1 order, so that each m1's block layout is copied once (_Matrix.rearranged)
    family: dict[int, set[int]] = {}
    for m1, n1, _, _ in sizes.values():
        family.setdefault(m1, set()).add(n1)
    done = {
        p: matrix.energies(sizes[p], r_max, settings, family[sizes[p][0]]).tolist()
        for p in sorted(sizes, key=lambda p: sizes[p][0])
    }
    return {pair: done[pair] for pair in wanted}


def energy_curve(
    M: torch.Tensor,
    *,
    seed: int = 0,
    accuracy: float = DEFAULT_ACCURACY,
    device: str | torch.device | None = "cpu",
    keep_layout: bool = True,
) -> Callable[[int, int, int], list[float]]:
    """``curve(r1, r2, r_max)``: the energies of pair (r1, r2) for r = 1..r_max, as topr_energies gives
    them. M is checked, upcast and moved to ``device`` once, however many pairs are asked for.

    ``keep_layout=False`` frees the block layout (a copy of M) after each pair, for callers holding
    many curves at once (the experts of a stacked update): then each pair makes its own copy.
    """
    _check_2d(M)
    matrix = _Matrix.of(M, 1, torch.float32, device, None)
    settings = KrylovSettings(seed=seed, accuracy=accuracy)
    d_out, d_in = M.shape

    def curve(r1: int, r2: int, r_max: int) -> list[float]:
        if r_max < 1:
            raise TargetError(f"r_max must be at least 1, got {r_max}")
        try:
            return matrix.energies(factor_sizes(d_out, d_in, r1, r2), r_max, settings).tolist()
        finally:
            if not keep_layout:
                matrix.forget_layout()

    return curve


def squared_norm(M: torch.Tensor, exponent: int = 0) -> float:
    """||M||_F^2 / 4^exponent in float64 without a float64 copy of M; nan or inf if M has such entries
    (inf, too, where the float64 result overflows: compare large float64 updates with ``scaled_squared_norm``).

    Norms of 2^14-entry slices in float32 (float64 for float64 M), summed in float64: one float32 norm
    of 45M entries was 0.8 % off, and a float64 one upcasts every entry (0.10 s against 4 ms at
    4096 x 11008; the slices agree with it to 5e-9). Finite entries of any size are measured right:
    see scaled_squared_norm.
    """
    total, power = scaled_squared_norm(M)
    return _ldexp(total, 2 * (power - exponent))


def scaled_squared_norm(M: torch.Tensor) -> tuple[float, int]:
    """(s, e) with ||M||_F^2 = s * 4^e, s a finite float64 (nan or inf, with e = 0, if M has such entries).

    e is 0 unless a slice's norm lies outside 2^-40..2^40 (_SAFE_NORM), where float32 squares overflow
    (entries of 3e38) or underflow (1e-30), or float64 ones do: then M is measured once more, scaled by
    a power of two (``_scaled``, exact) that brings its largest entry to [1/2, 1), and e is that power.
    """
    flat = M.reshape(-1)
    if not flat.numel():
        return 0.0, 0
    norms = _slice_norms(flat)
    largest = float(norms.max())
    if _SAFE_NORM[0] <= largest <= _SAFE_NORM[1]:
        total = float(norms.double().square().sum())
        if math.isfinite(total):
            return total, 0
    peak = float(torch.linalg.vector_norm(flat, ord=math.inf))  # a second pass, only here
    if not math.isfinite(peak) or peak == 0:
        return peak, 0
    power = math.frexp(peak)[1]
    return float(_slice_norms(_scaled(flat, -power)).double().square().sum()), power


def log2_energy(total: float, power: int) -> int:
    """The n with 2^(n-1) <= s * 4^e < 2^n for a scaled_squared_norm (s, e) with s > 0."""
    return math.frexp(total)[1] + 2 * power


#: Slice norms (scaled_squared_norm) that float32 and float64 take as they are: no slice's squares
#: overflowed, and the largest entry's square stays a normal float32. A matrix whose ||M||_F^2 lies
#: outside the same range is scaled by a power of two before its energies are measured (_Matrix.of).
_SAFE_LOG2 = 40
_SAFE_NORM = (2.0**-_SAFE_LOG2, 2.0**_SAFE_LOG2)


def _slice_norms(flat: torch.Tensor) -> torch.Tensor:
    width = 1 << 14
    cut = flat.numel() // width * width
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    parts = [torch.linalg.vector_norm(flat[:cut].view(-1, width), dim=1, dtype=dtype)] if cut else []
    if cut < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[cut:], dtype=dtype).reshape(1))
    return torch.cat(parts)


def _scaled(M: torch.Tensor, power: int) -> torch.Tensor:
    """M * 2^power, exact, as a new float32 tensor (float64 for float64 M): two factors of 2^(power/2),
    each a normal float32 for any power float32 entries need (|power| <= 170), since a float32 2^-128
    would be subnormal (and flushed to zero where denormals are)."""
    work = M if M.dtype in (torch.float32, torch.float64) else M.float()
    half = power // 2
    return work * 2.0**half * 2.0 ** (power - half)


def _ldexp(value: float, power: int) -> float:
    """value * 2^power, inf where that overflows float64 (math.ldexp raises instead)."""
    try:
        return math.ldexp(value, power)
    except OverflowError:
        return math.inf


def _check_2d(M: torch.Tensor) -> None:
    if M.dim() != 2:
        raise TargetError(f"expected a 2-D (d_out, d_in) matrix, got shape {tuple(M.shape)}")


@dataclass(frozen=True)
class _Matrix:
    """M upcast on its device, ||M||_F^2 (R(M) only permutes entries, so one norm serves every pair),
    the copy the passes read (bfloat16 where they run in it, else ``work`` itself) and the last block
    layout made from it (``row_blocks_transposed``): one copy serves every pair with the same m1, so
    pairs asked for in m1 order cost one copy per m1 instead of one per pair."""

    work: torch.Tensor
    passes: torch.Tensor
    norm_sq: float
    passes_norm_sq: float
    layouts: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    grams: dict[tuple[int, bool, int], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls, M: torch.Tensor, r_max: int, dtype: torch.dtype, device: str | torch.device | None, bf16_passes: bool | None
    ) -> _Matrix:
        if r_max < 1:
            raise TargetError(f"r_max must be at least 1, got {r_max}")
        if dtype not in (torch.float32, torch.float64):
            raise TargetError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        work = M.to(resolve_device(device))
        total, power = scaled_squared_norm(work)
        if math.isfinite(total) and total > 0 and not -_SAFE_LOG2 <= log2_energy(total, power) <= _SAFE_LOG2:
            # Energies are shares of ||M||^2: a power of two that brings it near 1 changes none of them, and
            # keeps float32 squares and products (every Gram entry is at most ||M||^2) of entries of 3e38
            # from overflowing, and of 1e-30 from underflowing.
            work = _scaled(work, -(log2_energy(total, power) // 2))
        work = work.to(dtype)
        norm_sq = squared_norm(work)
        if not math.isfinite(norm_sq):
            raise ReferenceFileError(
                f"matrix of shape {tuple(M.shape)} has inf or nan entries (or overflows {dtype}); "
                "check the reference it came from"
            )
        # bf16_passes: multiply R in bfloat16 (float32 results), None meaning where the device does so
        # natively (fast_bf16); the rounding errors are independent per entry and average out in the
        # Ritz values (measured: far below the accuracy). Never with float64 input.
        low = bool(bf16_passes if bf16_passes is not None else fast_bf16(work.device)) and dtype == torch.float32
        # bfloat16 roundings average out over many entries, not over a few: with two nonzero entries
        # the energies were 9.9e-4 off in bfloat16 and 2.4e-7 in float32.
        low = low and int(torch.count_nonzero(work)) >= _LOW_GRAM_LENGTH
        passes = work.to(torch.bfloat16) if low else work
        # Energies measured in bfloat16 are shares of its own norm: rounding that is not zero-mean
        # (entries clustered near one value) scales both alike.
        return cls(work, passes, norm_sq, squared_norm(passes) if low else norm_sq)

    @property
    def low(self) -> bool:
        return self.passes.dtype == torch.bfloat16

    def rearranged(self, sizes: tuple[int, int, int, int]) -> torch.Tensor:
        """R(M) up to a column permutation, from the cached layout of m1 (made on a miss; one kept)."""
        m1, n1, m2, n2 = sizes
        layout = self.layouts.get(m1)
        if layout is None:
            self.forget_layout()  # free the last copy before making the next
            layout = self.layouts[m1] = row_blocks_transposed(self.passes, m1)
        return layout.view(m1 * n1, n2 * m2)

    def forget_layout(self) -> None:
        """Free the cached layout and the Gram matrices made from it."""
        self.layouts.clear()
        self.grams.clear()

    def energies(
        self, sizes: tuple[int, int, int, int], r_max: int, settings: KrylovSettings, family: Iterable[int] = ()
    ) -> torch.Tensor:
        """The pair's energies; ``family``: the n1 of other pairs with the same m1 that will be asked
        for, whose Gram matrices this pair's may be derived from or serve (``gram``)."""
        check_shape(self.work, *sizes)
        rows, cols = sizes[0] * sizes[1], sizes[2] * sizes[3]
        small = min(rows, cols)
        k = min(r_max + settings.oversample, small)
        if self.norm_sq == 0:
            return torch.zeros(r_max, dtype=torch.float64)
        if small <= GRAM_BLOCKS * k:
            gram, total = self.gram(sizes, GRAM_BLOCKS * (r_max + settings.oversample), family)
            sigma_sq = _lapack(torch.linalg.eigvalsh, gram).flip(0)[:r_max]
            energies = sigma_sq.clamp(min=0).cumsum(0) / total
        else:
            R = self.rearranged(sizes)
            # the basis lives on the small side
            energies = _krylov_energies(R if rows <= cols else R.T, r_max, k, settings, self.passes_norm_sq, self.work.dtype)
        if energies.numel() < r_max:  # fewer singular values than r_max: the fit is already exact
            energies = torch.cat([energies, energies[-1:].expand(r_max - energies.numel())])
        return energies.clamp(0.0, 1.0).cpu()

    def gram(
        self, sizes: tuple[int, int, int, int], limit: int, family: Iterable[int] = ()
    ) -> tuple[torch.Tensor, float]:
        """The Gram matrix of R(M)'s small side (up to a permutation) and the total it is a share of.

        Derived, where it can be, from a larger Gram matrix of the same m1 (its "root", at most
        ``limit`` wide, computed once and cached), the n1' of a pair in ``family``: for n1 dividing
        n1', the row Gram matrix of the n1 split sums the n1' one over the s = n1'/n1 sub-blocks each
        row block splits into; for n1' dividing n1, the column Gram matrix of the n1 split sums the
        diagonal blocks of the n1' one. So a whole table costs one Gram matrix per chain of divisors,
        not one per pair, and a pair asked for alone costs its own.

        bfloat16 Gram matrices are shares of their own trace (a rounding common to the entries
        cancels) and only used where each dot product spans at least 32 chunks of 2048 (_gram); below
        that, and on a 4 x 6 matrix the rounding of M alone moved the energies by 2e-3, the pair is
        measured in ``work`` precision, as small matrices are cheap.
        """
        m1, n1, m2, n2 = sizes
        d_in, total = n1 * n2, m1 * m2 * n1 * n2
        low = self.low
        cap = min(limit, total // _LOW_GRAM_LENGTH) if low else limit
        rows = m1 * n1 <= m2 * n2
        if min(m1 * n1, m2 * n2) > cap:
            R = rearrange(self.work, *sizes)
            return _gram(R if rows else R.T), self.norm_sq
        if rows:
            root = max(r for r in {n1, *family} if r % n1 == 0 and m1 * r <= cap)
        else:
            root = min(r for r in {n1, *family} if n1 % r == 0 and m2 * (d_in // r) <= cap)
        gram = self.grams.get((m1, rows, root))
        if gram is None:
            R = self.rearranged((m1, root, m2, d_in // root))  # a new m1's layout drops the old Gram matrices
            gram = self.grams[(m1, rows, root)] = _gram(R if rows else R.T)
        s = root // n1 if rows else n1 // root
        if s > 1 and rows:
            gram = gram.view(m1 * n1, s, m1 * n1, s).diagonal(dim1=1, dim2=3).sum(-1)
        elif s > 1:
            gram = gram.view(s, m2 * n2, s, m2 * n2).diagonal(dim1=0, dim2=2).sum(-1)
        return gram, float(gram.trace()) if low else self.norm_sq


def _gram(R: torch.Tensor) -> torch.Tensor:
    """R @ R.T in float64, summed over column chunks: at most 64, of at least 2048 columns.

    One float32 dot product over millions of columns (R is 1 x 8M for some pairs) loses percents.
    bfloat16 products round each chunk's sums to 8 bits; with at least 32 chunks (``_Matrix.gram``
    sees to it) these independent roundings average out in the float64 sum. From 256 rows on, the
    rows are split in two and the lower-left block is the transpose of the upper-right one: 3/4 of
    the products (a 512-wide Gram matrix of 45M entries took 42 ms instead of 53).
    """
    size = max(2048, -(-R.shape[1] // 64))
    rows = R.shape[0]
    half = rows // 2 if rows >= 256 else rows
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=R.device)
    for part in R.split(size, dim=1):
        top, bottom = part[:half], part[half:]
        gram[:half, :half] += (top @ top.T).double()
        if half < rows:
            gram[:half, half:] += (top @ bottom.T).double()
            gram[half:, half:] += (bottom @ bottom.T).double()
    gram[half:, :half] = gram[:half, half:].T
    return gram


def _krylov_energies(
    R: torch.Tensor, r_max: int, k: int, settings: KrylovSettings, norm_sq: float, work: torch.dtype
) -> torch.Tensor:
    """Top-r_max energies of R (rows <= cols) by block Lanczos on A = R R^T.

    A sparse sketch G = R Omega (_start) starts the basis K; every step multiplies the newest block by
    A (one R^T and one R product) and orthonormalises the result against the whole basis, so K spans
    {G, A G, A^2 G, ...}: every block is kept (Musco and Musco 2015), which converges far faster on
    flat spectra than keeping the last block alone. Only the products Z = A K are stored, on the small
    side; nothing of the long side is kept. Energies come from Ritz values (_ritz_energies), lower
    bounds of the true ones (of R as multiplied). Products with R run in R's dtype; the rest in
    ``work``. Depth: the energies converge about geometrically, so after a step that moved them by c,
    with rho the ratio of the last two moves, about rho / (1 - rho) * c is left (_error_left); the
    iteration stops once that is below ``accuracy``. With rho kept at 0.5 or more the estimate is at
    least the last move, about twice the error left where rho is nearer 0.3, as on most pairs measured
    (docs/alignment.md).
    """
    gen = torch.Generator(device=R.device).manual_seed(settings.seed)
    block = _orthonormal(_start(R, k, gen, work), None, gen)
    basis, images = block, _apply(R, block, work)
    H, S = (basis.T @ images).double(), (images.T @ images).double()  # K^T A K and Z^T Z = K^T A^2 K
    cutoff = torch.finfo(R.dtype).eps / 8
    previous: torch.Tensor | None = None
    last_change: float | None = None
    for step in range(settings.max_steps + 1):
        energies = _ritz_energies(H, S, r_max, cutoff) / norm_sq
        if previous is not None:
            change = float((energies - previous).abs().max())
            if _error_left(change, last_change) <= settings.accuracy:
                break
            last_change = change
        room = R.shape[0] - basis.shape[1]
        if step == settings.max_steps or room <= 0:  # a full basis spans R's column space: exact
            break
        previous = energies
        # Never more columns than dimensions: an over-full basis is not orthonormal, and its "Ritz
        # values" then overshoot the true singular values.
        block = _orthonormal(images[:, -block.shape[1]:], basis, gen)[:, :room]
        image = _apply(R, block, work)
        H = _grow(H, basis.T @ image, block.T @ image)
        S = _grow(S, images.T @ image, image.T @ image)
        basis = torch.cat([basis, block], 1)
        images = torch.cat([images, image], 1)
    return energies


def _start(R: torch.Tensor, k: int, gen: torch.Generator, work: torch.dtype, mix: int = 4) -> torch.Tensor:
    """A starting block in R's range at no pass: each column a random signed sum of ``mix`` random
    columns of R (a sparse sketch R Omega), so the first step starts half a power ahead of a Gaussian.

    A Gaussian block 1 % its size is added: random columns can all miss where R's energy lies (a
    sparse update), and the Krylov space grows only from what the start holds.
    """
    picks = torch.randint(R.shape[1], (k * mix,), generator=gen, device=R.device)
    signs = torch.randint(2, (k * mix,), generator=gen, device=R.device).to(work) * 2 - 1
    sketch = (R[:, picks].to(work) * signs).view(R.shape[0], k, mix).sum(2)
    noise = torch.randn(R.shape[0], k, generator=gen, dtype=work, device=R.device)
    return sketch + noise * (0.01 * float(torch.linalg.vector_norm(sketch)) / math.sqrt(sketch.numel()))


def _grow(G: torch.Tensor, cross: torch.Tensor, corner: torch.Tensor) -> torch.Tensor:
    """The symmetric [[G, cross], [cross^T, corner]] in float64."""
    cross = cross.double()
    return torch.cat([torch.cat([G, cross], 1), torch.cat([cross.T, corner.double()], 1)])


def _ritz_energies(H: torch.Tensor, S: torch.Tensor, r_max: int, cutoff: float) -> torch.Tensor:
    """Cumulative top-r_max Ritz values of A = R R^T from H = K^T A K and S = K^T A^2 K alone.

    Two lower bounds, the larger kept: the Ritz values on span(K), eigenvalues of H, and those of
    R^T R on span(R^T K), half a power of A ahead at no extra pass. With X = R^T K, X^T X = H and
    X^T (R^T R) X = S, so the latter are the eigenvalues of the pencil (S, H). Solving it whitens by
    H^(-1/2), which amplifies each product's rounding (2^-8 in bfloat16) by the inverse of a
    direction's weight; directions below ``cutoff`` of the largest weight are left out (on a steep
    spectrum keeping them in bfloat16 overshot the true energies by 2e-3), which only shrinks the space.
    """
    weights, vectors = _lapack(torch.linalg.eigh, (H + H.T) / 2)
    keep = weights > weights[-1] * cutoff
    whiten = vectors[:, keep] / weights[keep].sqrt()
    pencil = whiten.T @ ((S + S.T) / 2) @ whiten
    right = _lapack(torch.linalg.eigvalsh, pencil).flip(0)[:r_max].clamp(min=0).cumsum(0)
    left = weights.flip(0)[:r_max].clamp(min=0).cumsum(0)
    if right.numel() < left.numel():
        right = torch.cat([right, right[-1:].expand(left.numel() - right.numel())])
    return torch.maximum(left, right[: left.numel()]).cummax(0).values


def _apply(R: torch.Tensor, block: torch.Tensor, work: torch.dtype, chunk: int = 2048) -> torch.Tensor:
    """(R R^T) @ block, the products in R's dtype, summed in ``work``.

    The short product block^T R runs whole; the long one, over R's columns, chunk by chunk, so that
    low-precision products are rounded per chunk of 2048 and their roundings average out in the sum.
    Each product takes the operand order that reads R along its rows (R is a transposed view where
    its long side is the rows): at 4096 x 11008 in bfloat16 a step took 11-19 ms instead of 17-25.
    """
    low = block.to(R.dtype)
    if R.stride(0) == 1 and R.shape[0] > 1:
        rows = R.T
        image = (rows @ low).T
        out = torch.zeros(block.shape[::-1], dtype=work, device=block.device)
        for part, cols in zip(rows.split(chunk, dim=0), image.split(chunk, dim=1)):
            out += cols @ part
        return out.T
    image = low.T @ R
    out = torch.zeros(block.shape, dtype=work, device=block.device)
    for part, cols in zip(R.split(chunk, dim=1), image.split(chunk, dim=1)):
        out += part @ cols.T
    return out


def _error_left(change: float, last_change: float | None) -> float:
    """The error left after a step that moved the energies by ``change``, if they converge
    geometrically at rho, the ratio of the last two moves, kept in [0.5, 0.9] (0.9 after one move).

    The floor matters: a large first move followed by a small one (0.060 then 0.0048 on a 7B MLP
    update) reads as rho = 0.08, yet the next moves were 0.0031 and 0.0016.
    """
    if change == 0:
        return 0.0
    rho = 0.9 if not last_change else min(max(change / last_change, 0.5), 0.9)
    return change * rho / (1 - rho)


def _lapack(solver: Callable, A: torch.Tensor) -> Any:
    """``solver(A)`` (an eigensolver or a QR) for a small or thin matrix, on one CPU thread.

    Why: threaded LAPACK spins waiting for busy cores; on a shared 2-core machine a 336 x 336
    eigvalsh took 0.47 s with 2 threads and 8 ms with 1, and a 512 x 32 QR 17 ms against 0.09 ms.
    The matrix products around it keep their threads; the thread count is restored at once.
    """
    threads = torch.get_num_threads()
    if A.device.type != "cpu" or threads == 1:
        return solver(A)
    torch.set_num_threads(1)
    try:
        return solver(A)
    finally:
        torch.set_num_threads(threads)


def _orthonormal(Y: torch.Tensor, against: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning Y minus its part in span(against); projected twice for rounding.

    Columns the projection annihilates (an invariant subspace of A, or a zero start) are replaced by
    Gaussian ones: QR of a zero column returns a unit vector that need not be orthogonal to
    ``against``, and a basis repeating its own columns once returned energies above 1.
    """
    before = Y.norm(dim=0)
    if against is not None:
        Y = Y - against @ (against.T @ Y)
    dead = Y.norm(dim=0) <= 1e-6 * before.max().clamp(min=torch.finfo(Y.dtype).tiny)
    if bool(dead.any()):
        Y = Y.clone()
        Y[:, dead] = torch.randn(Y.shape[0], int(dead.sum()), generator=gen, dtype=Y.dtype, device=Y.device)
        if against is not None:
            Y = Y - against @ (against.T @ Y)
    Y = _lapack(torch.linalg.qr, Y).Q
    if against is not None:
        Y = _lapack(torch.linalg.qr, Y - against @ (against.T @ Y)).Q
    return Y
