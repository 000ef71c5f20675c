"""Speed and accuracy of alignment_table on a 4096 x 11008 matrix (a Llama-7B MLP shape).

Run: python benchmarks/alignment_speed.py [--power-iters Q] [--tol T] [--threads N] [--shape 4096x11008]
     python benchmarks/alignment_speed.py --accuracy [--accuracy-shapes 96x128 256x688 512x1376]

``--accuracy`` prints instead the accuracy table of docs/alignment.md: with the library's defaults,
the largest error against float64 SVD over every divisor pair (r <= 16) of flat, decaying, low rank
plus noise and heavy-tailed matrices of each shape.

Builds M = low rank (32 components, sigma_j ~ 1/j) + Gaussian noise, times alignment_table over
every divisor pair with r_max = 16 in one call, then times an exact float64 SVD (torch.linalg.
svdvals of R(M)) on a fixed subset of pairs small enough to finish in about a minute, reports the
largest energy error there, and extrapolates the exact time to all pairs with the O(L * D^2) cost
of an SVD of an L x D matrix (D = min(R.shape)), fitted to the measured subset.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from cdka_search.alignment import alignment_table, divisor_pairs, factor_sizes, rearrange

D_OUT, D_IN, R_MAX = 4096, 11008, 16
# Exact side: D = 64 and 172 (Gram path) and D = 344, 512, 688 (Krylov path; see energy.py).
EXACT_PAIRS = [(1, 172), (4, 256), (2, 64), (16, 344), (8, 1), (16, 256)]


def build_matrix(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Low rank plus noise, built from factors so it costs one GEMM."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d_out, 32, generator=g) / torch.arange(1, 33)
    noise = torch.randn(d_out, d_in, generator=g)
    return torch.addmm(noise, U, torch.randn(32, d_in, generator=g), beta=0.05)


def exact_energies(M: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
    s2 = torch.linalg.svdvals(rearrange(M.double(), *factor_sizes(*M.shape, *pair))).square()
    energies = (s2.cumsum(0) / s2.sum())[:R_MAX]
    return torch.cat([energies, energies[-1:].expand(R_MAX - len(energies))])  # flat past the rank


def small_side(shape: tuple[int, int], pair: tuple[int, int]) -> tuple[int, int]:
    m1, n1, m2, n2 = factor_sizes(*shape, *pair)
    return min(m1 * n1, m2 * n2), max(m1 * n1, m2 * n2)


def test_matrices(d_out: int, d_in: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat (Gaussian), decaying (sigma_j = 1/j), low rank + noise and heavy-tailed (Student t, 3 dof)."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(d_in, k, generator=g)).Q
    chi2 = torch.randn(3, d_out, d_in, generator=g).square().sum(0)
    return {
        "flat": torch.randn(d_out, d_in, generator=g),
        "decaying": (U / torch.arange(1, k + 1)) @ V.T,
        "low rank + noise": build_matrix(d_out, d_in, seed),
        "heavy (Student t)": torch.randn(d_out, d_in, generator=g) / (chi2 / 3).sqrt(),
    }


def accuracy_table(shapes: list[tuple[int, int]]) -> None:
    """Largest |error| of alignment_table (library defaults) against exact energies, every pair, r <= 16."""
    rows = []
    for shape in shapes:
        errors = {}
        for kind, M in test_matrices(*shape).items():
            table = alignment_table(M, R_MAX)
            errors[kind] = max(
                float((torch.tensor(e, dtype=torch.float64) - exact_energies(M, pair)).abs().max()) for pair, e in table.items()
            )
        rows.append((shape, errors))
        print(f"  {shape[0]}x{shape[1]} done", file=sys.stderr)
    kinds = list(rows[0][1])
    print("| matrix | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for (d_out, d_in), errors in rows:
        print(f"| {d_out} x {d_in} | " + " | ".join(f"{errors[k]:.1e}" for k in kinds) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="print the accuracy table instead")
    parser.add_argument("--accuracy-shapes", nargs="*", default=["96x128", "256x688", "512x1376"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    # Defaults trade accuracy for speed: the library defaults (6, 1e-5) take minutes here.
    parser.add_argument("--power-iters", type=int, default=2, help="Krylov steps after the first")
    parser.add_argument("--tol", type=float, default=1e-4, help="early-stop energy change")
    parser.add_argument("--shape", default=f"{D_OUT}x{D_IN}", help="d_outxd_in of the test matrix")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy_table([tuple(int(v) for v in text.split("x")) for text in args.accuracy_shapes])
        return
    shape = tuple(int(v) for v in args.shape.split("x"))
    M = build_matrix(*shape)
    pairs = divisor_pairs(*shape)
    exact_pairs = [p for p in EXACT_PAIRS if p in pairs] or pairs[:: max(1, len(pairs) // 6)]

    start = time.perf_counter()
    options = {"power_iters": args.power_iters, "tol": args.tol}
    print(f"alignment_table options: {options}")
    table = alignment_table(M, R_MAX, **options)
    fast_all = time.perf_counter() - start
    print(f"alignment_table, all {len(pairs)} pairs: {fast_all:.1f} s", file=sys.stderr)

    rows = []
    for pair in exact_pairs:
        start = time.perf_counter()
        fast = torch.tensor(alignment_table(M, R_MAX, pairs=[pair], **options)[pair], dtype=torch.float64)
        fast_t = time.perf_counter() - start
        start = time.perf_counter()
        exact = exact_energies(M, pair)
        exact_t = time.perf_counter() - start
        assert torch.equal(fast, torch.tensor(table[pair], dtype=torch.float64))
        rows.append((pair, *small_side(shape, pair), fast_t, exact_t, (fast - exact).abs().max().item()))
        print(f"  exact {pair}: {exact_t:.1f} s", file=sys.stderr)

    # SVD of an L x D matrix costs ~ c * L * D^2: fit c on the measured pairs, apply to all.
    rate = sum(r[4] for r in rows) / sum(r[2] * r[1] ** 2 for r in rows)
    exact_all = sum(rate * L * D**2 for D, L in (small_side(shape, p) for p in pairs))

    print(f"{'pair (r1,r2)':>14} {'R: D x L':>16} {'randomized s':>13} {'exact SVD s':>12} "
          f"{'max |err|':>10} {'speedup':>8}")
    for pair, D, L, fast_t, exact_t, err in rows:
        print(f"{str(pair):>14} {f'{D} x {L}':>16} {fast_t:13.3f} {exact_t:12.2f} {err:10.1e} "
              f"{exact_t / fast_t:8.1f}")
    subset_fast, subset_exact = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print(f"{'subset total':>31} {subset_fast:13.2f} {subset_exact:12.1f} "
          f"{max(r[5] for r in rows):10.1e} {subset_exact / subset_fast:8.1f}")
    print(f"{f'all {len(pairs)} pairs':>31} {fast_all:13.2f} {exact_all:11.0f}* {'':>10} "
          f"{exact_all / fast_all:8.1f}")
    print("* extrapolated: c * L * D^2 with c fitted on the subset (not run)")


if __name__ == "__main__":
    main()
