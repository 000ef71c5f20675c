"""Alignment energies: the share of ||M||_F^2 the best r-component Kronecker fit keeps.

For a shape (m1, n1, m2, n2) and r components the best fit of M is the rank-r truncated SVD of
R(M) (Eckart-Young), so the kept share is sum_{j<=r} sigma_j(R(M))^2 / ||M||_F^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from cdka_search.alignment.device import resolve_device
from cdka_search.alignment.rearrange import rearrange
from cdka_search.candidates import factor_pairs
from cdka_search.errors import ReferenceFileError, TargetError

Pair = tuple[int, int]

#: Early stop of the Krylov iteration: the energies moved by less than this between two steps.
#: Measured (docs/alignment.md): at 1e-4 every pair's error stays below 1e-5 on realistic updates,
#: well inside the 1e-3 planning needs, while 1e-5 costs up to twice the steps.
DEFAULT_TOL = 1e-4


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


def topr_energies(
    M: torch.Tensor,
    m1: int,
    n1: int,
    m2: int,
    n2: int,
    r_max: int,
    *,
    oversample: int = 8,
    power_iters: int = 6,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
) -> torch.Tensor:
    """Energies e[r-1] = sum_{j<=r} sigma_j(R(M))^2 / ||M||_F^2 for r = 1..r_max, in float64.

    Exact (eigenvalues of the small Gram matrix of R(M)) when min(R.shape) is at most what the
    randomized path would cost in matrix passes, 2 * (power_iters + 1) * (r_max + oversample);
    otherwise one randomized block Krylov run (see _krylov_sigma_sq). The result is clamped to
    [0, 1] and non-decreasing; a zero M gives zeros. bf16/fp16 inputs are upcast to `dtype`.
    The work runs on ``device`` (cdka_search.alignment.device); the result is on the CPU.
    """
    work, norm_sq = _checked_input(M, r_max, dtype, device)
    R = rearrange(work, m1, n1, m2, n2)
    return _energies(
        R, norm_sq, r_max, oversample=oversample, power_iters=power_iters, seed=seed, tol=tol
    )


def alignment_table(
    M: torch.Tensor,
    r_max: int,
    pairs: Iterable[Pair] | None = None,
    *,
    oversample: int = 8,
    power_iters: int = 6,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
) -> dict[Pair, list[float]]:
    """Energies for r = 1..r_max of every pair (r1, r2) (all divisor pairs when pairs is None).

    Paper mapping: m2 = r1, n1 = r2, m1 = d_out / r1, n2 = d_in / r2. M is upcast once and every
    pair draws its sketch from the same seed, so a pair's row does not depend on the others.
    """
    if M.dim() != 2:
        raise TargetError(f"expected a 2-D (d_out, d_in) matrix, got shape {tuple(M.shape)}")
    d_out, d_in = M.shape
    wanted = divisor_pairs(d_out, d_in) if pairs is None else [tuple(p) for p in pairs]
    sizes = {p: factor_sizes(d_out, d_in, *p) for p in wanted}  # validate all before any work
    work, norm_sq = _checked_input(M, r_max, dtype, device)
    return {
        pair: _energies(
            rearrange(work, *shape), norm_sq, r_max,
            oversample=oversample, power_iters=power_iters, seed=seed, tol=tol,
        ).tolist()
        for pair, shape in sizes.items()
    }


def energy_curve(
    M: torch.Tensor, *, seed: int = 0, tol: float = DEFAULT_TOL, device: str | torch.device | None = "cpu"
) -> Callable[[int, int, int], list[float]]:
    """``curve(r1, r2, r_max)``: the energies of pair (r1, r2) for r = 1..r_max, as topr_energies gives
    them. M is checked, upcast and moved to ``device`` once, however many pairs are asked for."""
    if M.dim() != 2:
        raise TargetError(f"expected a 2-D (d_out, d_in) matrix, got shape {tuple(M.shape)}")
    work, norm_sq = _checked_input(M, 1, torch.float32, device)
    d_out, d_in = M.shape

    def curve(r1: int, r2: int, r_max: int) -> list[float]:
        if r_max < 1:
            raise TargetError(f"r_max must be at least 1, got {r_max}")
        R = rearrange(work, *factor_sizes(d_out, d_in, r1, r2))
        return _energies(R, norm_sq, r_max, oversample=8, power_iters=6, seed=seed, tol=tol).tolist()

    return curve


def _checked_input(
    M: torch.Tensor, r_max: int, dtype: torch.dtype, device: str | torch.device | None = "cpu"
) -> tuple[torch.Tensor, float]:
    """M upcast to dtype on ``device`` and ||M||_F^2, after checking r_max, dtype and that the norm is finite.

    R(M) only permutes entries, so this one norm serves every pair.
    """
    if r_max < 1:
        raise TargetError(f"r_max must be at least 1, got {r_max}")
    if dtype not in (torch.float32, torch.float64):
        raise TargetError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    work = M.to(resolve_device(device), dtype)
    # Accumulate in float64: a float32 norm of a 4096 x 11008 matrix was 0.8 % off.
    norm_sq = torch.linalg.vector_norm(work, dtype=torch.float64).item() ** 2  # nan if inf/nan
    if not math.isfinite(norm_sq):
        raise ReferenceFileError(
            f"matrix of shape {tuple(M.shape)} has inf or nan entries (or overflows {dtype}); "
            "check the reference it came from"
        )
    return work, norm_sq


def _energies(
    R: torch.Tensor, norm_sq: float, r_max: int, *,
    oversample: int, power_iters: int, seed: int, tol: float,
) -> torch.Tensor:
    if R.shape[0] > R.shape[1]:
        R = R.T  # keep the Krylov basis on the small side; singular values are unchanged
    small = R.shape[0]
    k = min(r_max + oversample, small)
    if norm_sq == 0:
        return torch.zeros(r_max, dtype=torch.float64)
    if small <= 2 * (power_iters + 1) * k:
        sigma_sq = _small_eig(torch.linalg.eigvalsh, _gram(R)).flip(0)
    else:
        sigma_sq = _krylov_sigma_sq(R, r_max, k, power_iters, seed, tol, norm_sq)
    energies = sigma_sq.clamp(min=0)[:r_max].cumsum(0) / norm_sq
    if energies.numel() < r_max:  # fewer singular values than r_max: the fit is already exact
        energies = torch.cat([energies, energies[-1:].expand(r_max - energies.numel())])
    return energies.clamp(0.0, 1.0).cpu()


def _gram(R: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """R @ R.T in float64, summed over column chunks: one float32 dot product over millions of
    columns (R is 1 x 8M for some pairs) loses percents."""
    gram = torch.zeros(R.shape[0], R.shape[0], dtype=torch.float64, device=R.device)
    for part in R.split(chunk, dim=1):
        gram += (part @ part.T).double()
    return gram


def _krylov_sigma_sq(
    R: torch.Tensor, r_max: int, k: int, power_iters: int, seed: int, tol: float, norm_sq: float
) -> torch.Tensor:
    """Top squared singular values of R (rows <= cols) by randomized block Krylov iteration.

    Halko-Martinsson-Tropp range finder with power iterations, except that every block is kept
    (Musco and Musco 2015): the Ritz values of span{R W, (R R^T) R W, ...} converge much faster
    than those of the last block alone on flat spectra. The basis K is kept orthonormal, so the
    Ritz values, eigenvalues of H = (R^T K)^T (R^T K), are lower bounds of the true sigma_j^2.
    Stops early when the top-r_max energies move by less than tol between two steps.
    """
    gen = torch.Generator(device=R.device).manual_seed(seed)
    sketch = torch.randn(R.shape[1], k, generator=gen, dtype=R.dtype, device=R.device)
    block = _orthonormal(R @ sketch, None)
    basis = block
    images = R.T @ block  # R^T K, grown one block of columns per step
    H = (images.T @ images).double()
    previous = None
    for step in range(power_iters + 1):
        ritz = _small_eig(torch.linalg.eigvalsh, H).flip(0)[:r_max]
        energies = ritz.clamp(min=0).cumsum(0) / norm_sq
        if step == power_iters or (previous is not None and (energies - previous).abs().max() < tol):
            break
        previous = energies
        # Whiten the last image block from its diagonal block of H (cheaper than a QR of the
        # tall image) so that R @ image does not lose its small directions to rounding.
        weights, vectors = _small_eig(torch.linalg.eigh, H[-block.shape[1]:, -block.shape[1]:])
        keep = weights > weights[-1] * 1e-12
        whiten = (vectors[:, keep] / weights[keep].sqrt()).to(R.dtype)
        block = _orthonormal(R @ (images[:, -block.shape[1]:] @ whiten), basis)
        image = R.T @ block
        cross = (images.T @ image).double()
        H = torch.cat([torch.cat([H, cross], 1), torch.cat([cross.T, (image.T @ image).double()], 1)])
        basis = torch.cat([basis, block], 1)
        images = torch.cat([images, image], 1)
    return ritz


def _small_eig(solver: Callable, A: torch.Tensor) -> Any:
    """``solver(A)`` for a small symmetric matrix, on one CPU thread.

    Why: the threaded LAPACK eigensolver spins waiting for busy cores; on a shared 2-core machine a
    336 x 336 eigvalsh took 0.47 s with 2 threads and 8 ms with 1. The matrix products around it keep
    their threads; the thread count is restored at once.
    """
    threads = torch.get_num_threads()
    if A.device.type != "cpu" or threads == 1:
        return solver(A)
    torch.set_num_threads(1)
    try:
        return solver(A)
    finally:
        torch.set_num_threads(threads)


def _orthonormal(Y: torch.Tensor, against: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal columns spanning Y minus its part in span(against); projected twice for rounding."""
    for _ in range(2):
        if against is not None:
            Y = Y - against @ (against.T @ Y)
        Y = torch.linalg.qr(Y).Q
    return Y
