"""Speed and accuracy of alignment_table on a 4096 x 11008 matrix (a Llama-7B MLP shape).

Run: python benchmarks/alignment_speed.py [--max-steps Q] [--target E] [--threads N] [--shape 4096x11008] [--device cuda]
     python benchmarks/alignment_speed.py --accuracy [--accuracy-shapes 96x128 256x688 512x1376]
     python benchmarks/alignment_speed.py --rounding [--rounding-shape 1024x2752]

``--accuracy`` prints instead the accuracy table of docs/alignment.md: with the library's defaults,
the largest error against float64 SVD over every divisor pair (r <= 16) of flat, decaying, low rank
plus noise and heavy-tailed matrices of each shape. ``--rounding`` prints the same for (by default)
1024 x 2752 matrices where bfloat16 rounding does not average out as well: one value plus small noise, rank 1
plus noise, and 1 % of the rows 30 times larger.

Builds M = low rank (32 components, sigma_j ~ 1/j) + Gaussian noise, times alignment_table over
every divisor pair with r_max = 16 in one call, with the Krylov passes in bfloat16 and in float32
side by side (the library picks bfloat16 where the CPU multiplies it natively), then times an exact float64 SVD (torch.linalg.
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
from cdka_search.alignment.device import fast_bf16, resolve_device
from cdka_search.alignment.energy import DEFAULT_ACCURACY, DEFAULT_MAX_STEPS

D_OUT, D_IN, R_MAX = 4096, 11008, 16
# Exact side: D = 64, 172 and 344 (Gram path) and D = 512 and 688 (Krylov path; see energy.py).
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


def rounding_table(shape: tuple[int, int]) -> None:
    """Largest |error| over every pair, r <= 16, library defaults, against float64 Gram eigenvalues."""
    g = torch.Generator().manual_seed(0)
    matrices = {
        "one value + noise": 0.1 + 0.01 * torch.randn(*shape, generator=g),
        "rank 1 + noise": torch.outer(torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g))
        + 0.05 * torch.randn(*shape, generator=g),
        "1 % rows x 30": torch.randn(*shape, generator=g) * torch.where(torch.rand(shape[0], 1, generator=g) < 0.01, 30.0, 1.0),
    }
    print(f"| matrix ({shape[0]} x {shape[1]}) | largest error | at pair |")
    print("|---|---|---|")
    for name, M in matrices.items():
        exact_M = M.double()
        norm_sq = exact_M.square().sum()
        worst = (0.0, None)
        for pair, energies in alignment_table(M, R_MAX).items():
            R = rearrange(exact_M, *factor_sizes(*shape, *pair))
            R = R if R.shape[0] <= R.shape[1] else R.T
            kept = (torch.linalg.eigvalsh(R @ R.T).flip(0)[:R_MAX].clamp(min=0).cumsum(0) / norm_sq)
            kept = torch.cat([kept, kept[-1:].expand(R_MAX - kept.numel())])
            worst = max(worst, (float((torch.tensor(energies, dtype=torch.float64) - kept).abs().max()), pair), key=lambda w: w[0])
        print(f"| {name} | {worst[0]:.1e} | {worst[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="print the accuracy table instead")
    parser.add_argument("--rounding", action="store_true", help="print the table of matrices hard on bfloat16 instead")
    parser.add_argument("--rounding-shape", default="1024x2752", help="d_outxd_in of --rounding's matrices")
    parser.add_argument("--accuracy-shapes", nargs="*", default=["96x128", "256x688", "512x1376"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="most Krylov blocks after the first")
    parser.add_argument("--target", type=float, default=DEFAULT_ACCURACY, help="target energy error (early stop)")
    parser.add_argument("--shape", default=f"{D_OUT}x{D_IN}", help="d_outxd_in of the test matrix")
    parser.add_argument("--device", default="cpu", help="where alignment_table runs (cpu, cuda); the exact side stays on the CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounding:
        rounding_table(tuple(int(v) for v in args.rounding_shape.split("x")))
        return
    if args.accuracy:
        accuracy_table([tuple(int(v) for v in text.split("x")) for text in args.accuracy_shapes])
        return
    shape = tuple(int(v) for v in args.shape.split("x"))
    M = build_matrix(*shape)
    pairs = divisor_pairs(*shape)
    exact_pairs = [p for p in EXACT_PAIRS if p in pairs] or pairs[:: max(1, len(pairs) // 6)]
    modes = {"bf16 passes": True, "float32": False}
    device = resolve_device(args.device)
    print(f"torch threads {torch.get_num_threads()}; max_steps {args.max_steps}, accuracy {args.target}; device {device}; "
          f"the library's default there: {'bf16 passes' if fast_bf16(device) else 'float32'}")

    if device.type != "cpu":  # the device's start-up (context, BLAS handles) is no part of the energies' cost
        alignment_table(M[:256, :688], R_MAX, device=device)
    totals = {}
    for mode, low in modes.items():
        start = time.perf_counter()
        alignment_table(M, R_MAX, max_steps=args.max_steps, accuracy=args.target, bf16_passes=low, device=device)
        totals[mode] = time.perf_counter() - start
        print(f"alignment_table, all {len(pairs)} pairs, {mode}: {totals[mode]:.1f} s", file=sys.stderr)

    rows = []
    for pair in exact_pairs:
        times, errors = {}, {}
        start = time.perf_counter()
        exact = exact_energies(M, pair)
        exact_t = time.perf_counter() - start
        for mode, low in modes.items():
            start = time.perf_counter()
            got = alignment_table(M, R_MAX, pairs=[pair], max_steps=args.max_steps, accuracy=args.target, bf16_passes=low,
                                  device=device)[pair]
            times[mode] = time.perf_counter() - start
            errors[mode] = (torch.tensor(got, dtype=torch.float64) - exact).abs().max().item()
        rows.append((pair, *small_side(shape, pair), times, errors, exact_t))
        print(f"  exact {pair}: {exact_t:.1f} s", file=sys.stderr)

    # SVD of an L x D matrix costs ~ c * L * D^2: fit c on the measured pairs, apply to all.
    rate = sum(r[5] for r in rows) / sum(r[2] * r[1] ** 2 for r in rows)
    exact_all = sum(rate * L * D**2 for D, L in (small_side(shape, p) for p in pairs))

    head = "".join(f" {m + ' s':>15} {'|err|':>8}" for m in modes)
    print(f"{'pair (r1,r2)':>14} {'R: D x L':>16}{head} {'exact SVD s':>12}")
    for pair, D, L, times, errors, exact_t in rows:
        cells = "".join(f" {times[m]:15.3f} {errors[m]:8.1e}" for m in modes)
        print(f"{pair!s:>14} {f'{D} x {L}':>16}{cells} {exact_t:12.2f}")
    cells = "".join(f" {sum(r[3][m] for r in rows):15.2f} {max(r[4][m] for r in rows):8.1e}" for m in modes)
    print(f"{'subset total':>31}{cells} {sum(r[5] for r in rows):12.1f}")
    cells = "".join(f" {totals[m]:15.2f} {'':>8}" for m in modes)
    print(f"{f'all {len(pairs)} pairs':>31}{cells} {exact_all:11.0f}*")
    print("* extrapolated: c * L * D^2 with c fitted on the subset (not run)")


if __name__ == "__main__":
    main()
