"""Rearrangement properties, energy accuracy against exact SVD, and what the energies mean."""

from __future__ import annotations

import pytest
import torch

from cdka_search.alignment import (
    alignment_table,
    divisor_pairs,
    factor_sizes,
    rearrange,
    topr_energies,
)
from cdka_search.alignment.energy import _apply, _error_left, _gram
from cdka_search.alignment.rearrange import row_blocks_transposed
from cdka_search.errors import ReferenceFileError, TargetError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_energies(M: torch.Tensor, pair: tuple[int, int], r_max: int) -> torch.Tensor:
    """Reference: full float64 SVD of R(M)."""
    m1, n1, m2, n2 = factor_sizes(*M.shape, *pair)
    s2 = torch.linalg.svdvals(rearrange(M.double(), m1, n1, m2, n2)).square()
    e = s2.cumsum(0) / s2.sum()
    return torch.cat([e, e[-1:].expand(max(0, r_max - e.numel()))])[:r_max]


def spectra(d_out: int, d_in: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat (Gaussian), decaying (sigma_j = 1/j) and heavy-tailed (Student t, 3 dof) matrices."""
    g = gen(seed)
    k = min(d_out, d_in)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(d_in, k, generator=g)).Q
    chi2 = torch.randn(3, d_out, d_in, generator=g).square().sum(0)
    t = torch.randn(d_out, d_in, generator=g) / (chi2 / 3).sqrt()
    return {
        "flat": torch.randn(d_out, d_in, generator=g),
        "decaying": (U / torch.arange(1, k + 1)) @ V.T,
        "heavy": t,
    }


# --- rearrange ------------------------------------------------------------------------------


@pytest.mark.parametrize("m1,n1,m2,n2", [(3, 4, 5, 2), (1, 6, 4, 1), (8, 8, 6, 8)])
def test_rearrange_keeps_frobenius_norm(m1: int, n1: int, m2: int, n2: int) -> None:
    M = torch.randn(m1 * m2, n1 * n2, generator=gen())
    R = rearrange(M, m1, n1, m2, n2)
    assert R.shape == (m1 * n1, m2 * n2)
    assert torch.equal(R.flatten().sort().values, M.flatten().sort().values)  # a permutation


@pytest.mark.parametrize("m1,n1,m2,n2", [(3, 4, 5, 2), (2, 7, 3, 3), (6, 1, 1, 5)])
def test_rearrange_of_kron_is_outer_product(m1: int, n1: int, m2: int, n2: int) -> None:
    B = torch.randn(m1, n1, generator=gen(1), dtype=torch.float64)
    A = torch.randn(m2, n2, generator=gen(2), dtype=torch.float64)
    R = rearrange(torch.kron(B, A), m1, n1, m2, n2)
    assert torch.equal(R, torch.outer(B.flatten(), A.flatten()))


@pytest.mark.parametrize("r", [1, 2, 5])
def test_rearranged_sum_of_r_krons_has_rank_r(r: int) -> None:
    m1, n1, m2, n2 = 6, 8, 4, 5
    g = gen(r)
    M = sum(
        torch.kron(torch.randn(m1, n1, generator=g), torch.randn(m2, n2, generator=g))
        for _ in range(r)
    )
    assert torch.linalg.matrix_rank(rearrange(M, m1, n1, m2, n2)).item() == r


def test_one_block_layout_has_the_singular_values_of_every_rearrangement_sharing_m1() -> None:
    M = torch.randn(12, 30, generator=gen(), dtype=torch.float64)
    for m1 in (1, 2, 3, 4, 6, 12):
        layout = row_blocks_transposed(M, m1)
        assert layout.shape == (m1, 30, 12 // m1)
        for n1 in (1, 2, 3, 5, 6, 10, 15, 30):
            sizes = (m1, n1, 12 // m1, 30 // n1)
            view = layout.view(m1 * n1, -1)
            assert torch.allclose(torch.linalg.svdvals(view), torch.linalg.svdvals(rearrange(M, *sizes)))
    assert row_blocks_transposed(M, 4, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TargetError, match="m1=5 does not divide"):
        row_blocks_transposed(M, 5)


@pytest.mark.parametrize("m1", [1, 2, 3])
def test_block_layout_of_blocks_taller_than_a_slab_is_the_whole_transpose(m1: int) -> None:
    M = torch.randn(300 * m1, 7, generator=gen())
    expected = M.reshape(m1, 300, 7).transpose(1, 2)
    assert torch.equal(row_blocks_transposed(M, m1), expected)
    assert torch.equal(row_blocks_transposed(M, m1, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_apply_is_r_rt_times_the_block_in_either_memory_order(dtype: torch.dtype, transposed: bool) -> None:
    g = gen()
    R = torch.randn(40, 5000, generator=g, dtype=torch.float64)
    block = torch.randn(40, 6, generator=g, dtype=torch.float64)
    stored = (R.T.contiguous().T if transposed else R.contiguous()).to(dtype)
    assert (stored.stride(0) == 1) is transposed
    got = _apply(stored, block.float(), torch.float32, chunk=1024)
    expected = stored.double() @ (stored.double().T @ block)
    assert got.shape == (40, 6) and got.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((got.double() - expected).abs().max() / expected.abs().max()) < tolerance


def test_rearrange_rejects_a_shape_that_does_not_split() -> None:
    with pytest.raises(TargetError, match="does not split"):
        rearrange(torch.zeros(12, 10), 3, 2, 5, 5)


# --- topr_energies accuracy -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 64), (96, 128)])
@pytest.mark.parametrize("kind", ["flat", "decaying", "heavy"])
def test_small_matrices_match_exact_svd_for_every_pair(shape: tuple[int, int], kind: str) -> None:
    M = spectra(*shape)[kind]
    table = alignment_table(M, 16)
    assert set(table) == set(divisor_pairs(*shape))
    for pair, energies in table.items():
        err = (torch.tensor(energies, dtype=torch.float64) - exact_energies(M, pair, 16)).abs()
        assert err.max() < 1e-3, (pair, err.max())


@pytest.mark.parametrize("bf16_passes", [True, False])
@pytest.mark.parametrize("kind", ["flat", "decaying", "heavy"])
def test_randomized_path_matches_exact_svd_on_medium_matrices(kind: str, bf16_passes: bool) -> None:
    # min(R.shape) = 640 > GRAM_BLOCKS * 32 = 512, so these pairs take the Krylov path; bfloat16
    # passes run on any CPU (emulated where not native), so both are checked here.
    M = spectra(640, 912, seed=3)[kind]
    for pair in [(1, 1), (2, 2)]:
        got = topr_energies(M, *factor_sizes(640, 912, *pair), 16, bf16_passes=bf16_passes)
        err = (got - exact_energies(M, pair, 16)).abs().max()
        assert err < 1e-3, (pair, err)


def test_a_table_derives_gram_matrices_along_divisor_chains(monkeypatch) -> None:
    # In float64 every pair of a 96 x 128 matrix is exact (Gram path, D <= 384): derived from one root
    # Gram matrix per chain of divisors, it must match the pair measured alone, with fewer products.
    from cdka_search.alignment import energy

    calls: list[int] = []
    monkeypatch.setattr(energy, "_gram", lambda R: calls.append(R.shape[0]) or _gram(R))
    M = spectra(96, 128, seed=4)["decaying"]
    table = alignment_table(M, 16, dtype=torch.float64)
    table_grams = len(calls)
    for pair, energies in table.items():
        alone = topr_energies(M, *factor_sizes(96, 128, *pair), 16, dtype=torch.float64)
        assert torch.allclose(torch.tensor(energies, dtype=torch.float64), alone, atol=1e-10), pair
    assert len(calls) - table_grams == len(table)  # measured alone: one Gram matrix each
    assert table_grams < len(table) / 2, (table_grams, len(table))


def test_bfloat16_gram_matrices_of_long_rows_match_exact_svd() -> None:
    # 256 x 1024 has 2^18 entries: pairs with D <= 4 have dot products of 65536 and more, long enough
    # for bfloat16 Gram matrices (derived along chains); the rest run in float32 or Krylov.
    M = spectra(256, 1024, seed=6)["heavy"]
    table = alignment_table(M, 16, bf16_passes=True)
    for pair, energies in table.items():
        err = (torch.tensor(energies, dtype=torch.float64) - exact_energies(M, pair, 16)).abs().max()
        assert err < 1e-3, (pair, err)


def test_few_power_iterations_still_give_lower_bounds() -> None:
    # Ritz values on an orthonormal basis never exceed the true singular values (of R as multiplied,
    # hence float32 passes here).
    M = spectra(256, 320)["flat"]
    got = topr_energies(M, 256, 1, 1, 320, 8, oversample=2, max_steps=0, bf16_passes=False)
    assert (got <= exact_energies(M, (1, 1), 8) + 1e-6).all()


def test_the_accuracy_target_bounds_the_error_and_a_looser_one_costs_fewer_steps(monkeypatch) -> None:
    from cdka_search.alignment import energy

    checks: list[float] = []
    monkeypatch.setattr(energy, "_error_left", lambda c, last: checks.append(c) or _error_left(c, last))
    # the slowest spectrum to converge; every pair has R of 640 x 1376, past the Gram path's 16 * 32
    M = spectra(640, 1376, seed=5)["flat"]
    steps = []
    for target in (1e-2, 3e-3, 1e-3):
        checks.clear()
        table = alignment_table(M, 16, pairs=[(1, 1), (2, 2), (4, 4)], accuracy=target)
        for pair, energies in table.items():
            assert (torch.tensor(energies, dtype=torch.float64) - exact_energies(M, pair, 16)).abs().max() < target
        steps.append(len(checks))  # Krylov steps past the first, over the 3 pairs
    assert steps[0] < steps[1] < steps[2] <= 3 * energy.DEFAULT_MAX_STEPS, steps


@pytest.mark.parametrize("bf16_passes", [True, False])
def test_a_krylov_basis_never_outgrows_the_small_side(bf16_passes: bool) -> None:
    # R is 62 x 1200 (Krylov: 62 > GRAM_BLOCKS * 3) with 3 columns per block: the 21st block would
    # overfill it. An over-full basis is not orthonormal and once returned 2.6x the true energies.
    M = spectra(124, 600, seed=2)["flat"]  # 74,400 entries: enough for bfloat16 passes
    sizes = factor_sizes(124, 600, 2, 1)
    got = topr_energies(M, *sizes, 3, oversample=0, max_steps=40, accuracy=1e-300, bf16_passes=bf16_passes)
    exact = exact_energies(M, (2, 1), 3)
    assert (got <= exact + 1e-4).all() and (got - exact).abs().max() < 1e-4


@pytest.mark.parametrize("bf16_passes", [True, False])
def test_a_sparse_update_is_measured_whatever_the_start_misses(bf16_passes: bool) -> None:
    # Two nonzero entries: the sketched start's columns are all zero, and the Krylov space must still
    # find both (a zero block's QR once repeated the basis and returned energies above 1). Too few
    # entries for bfloat16 roundings to average out, so both modes run in float32 here.
    M = torch.zeros(640, 912)
    M[600, 5], M[10, 700] = 1.0, 0.5
    got = topr_energies(M, *factor_sizes(640, 912, 1, 1), 4, bf16_passes=bf16_passes)
    assert got.tolist() == pytest.approx([0.8, 1.0, 1.0, 1.0], abs=1e-6)


def test_error_estimate_of_a_geometric_sequence() -> None:
    # moves 0.01 then 0.006: rho = 0.6, so 0.6 / 0.4 of the last move is left.
    assert _error_left(0.006, 0.01) == pytest.approx(0.006 * 0.6 / 0.4)
    assert _error_left(0.0048, 0.06) == pytest.approx(0.0048)  # a sudden drop is not trusted: rho >= 0.5
    assert _error_left(0.01, None) == pytest.approx(0.09)  # one move alone: rho = 0.9
    assert _error_left(0.02, 0.01) == pytest.approx(0.02 * 9)  # a growing move: rho capped at 0.9
    assert _error_left(0.0, 0.01) == 0.0


def test_energies_are_deterministic_monotone_and_in_unit_interval() -> None:
    M = spectra(512, 912)["heavy"]
    a = topr_energies(M, 512, 1, 1, 912, 16, seed=7)
    b = topr_energies(M, 512, 1, 1, 912, 16, seed=7)
    assert torch.equal(a, b)
    assert a.dtype == torch.float64 and a.shape == (16,)
    assert (a.diff() >= 0).all() and a.min() >= 0 and a.max() <= 1


def test_half_precision_inputs_are_upcast() -> None:
    M = spectra(96, 128)["decaying"]
    half = topr_energies(M.to(torch.bfloat16), 12, 8, 8, 16, 16)
    assert half.dtype == torch.float64
    exact = exact_energies(M.to(torch.bfloat16).float(), (8, 8), 16)
    assert (half - exact).abs().max() < 1e-5
    double = topr_energies(M.to(torch.float16), 12, 8, 8, 16, 16, dtype=torch.float64)
    assert (double - exact_energies(M.to(torch.float16).float(), (8, 8), 16)).abs().max() < 1e-9


def test_r_max_above_the_rank_ceiling_pads_with_full_energy() -> None:
    M = torch.randn(4, 6, generator=gen())
    energies = topr_energies(M, 2, 3, 2, 2, 10)  # R is 6 x 4: at most 4 components
    assert energies[3:].tolist() == pytest.approx([1.0] * 7)


def test_zero_matrix_gives_zero_energy() -> None:
    assert topr_energies(torch.zeros(6, 8), 3, 2, 2, 4, 3).tolist() == [0.0, 0.0, 0.0]


def test_table_with_given_pairs_and_bad_pairs() -> None:
    M = torch.randn(48, 64, generator=gen())
    assert list(alignment_table(M, 4, pairs=[(2, 8), (1, 1)])) == [(2, 8), (1, 1)]
    with pytest.raises(TargetError, match="r1 must divide d_out=48"):
        alignment_table(M, 4, pairs=[(5, 1)])
    with pytest.raises(TargetError, match="r_max"):
        alignment_table(M, 0, pairs=[(1, 1)])
    with pytest.raises(ReferenceFileError, match="inf or nan"):
        alignment_table(M / 0, 4)


# --- what the energies mean -----------------------------------------------------------------


def test_a_sum_of_k_krons_is_found_by_its_own_shape() -> None:
    """(a) M = sum of 2 kron(B_i, A_i) for the pair (r1, r2) = (4, 8) of a 48 x 64 matrix, plus
    noise at 1e-3 of its norm. At r = 2 that shape keeps ~all energy and beats every divisor pair
    whose per-component parameter count m1*n1 + m2*n2 is at most its own 12*8 + 4*8 = 128. (Pairs
    with tiny R, e.g. (48, 2) with R of shape 2 x 1536, also reach 1.0 at r = 2, but only at
    1538 parameters per component, so 'best at equal r' is only meaningful at bounded cost.)"""
    g = gen(5)
    m1, n1, m2, n2 = factor_sizes(48, 64, 4, 8)
    M = sum(
        torch.kron(torch.randn(m1, n1, generator=g), torch.randn(m2, n2, generator=g))
        for _ in range(2)
    )
    M = M + 1e-3 * M.norm() / (48 * 64) ** 0.5 * torch.randn(48, 64, generator=g)
    table = alignment_table(M, 2)
    assert table[(4, 8)][1] > 0.9999
    own_cost = m1 * n1 + m2 * n2
    for pair, energies in table.items():
        a1, b1, a2, b2 = factor_sizes(48, 64, *pair)
        if pair != (4, 8) and a1 * b1 + a2 * b2 <= own_cost:
            assert energies[1] < 0.8, pair  # runner-up (8, 8) keeps 0.70 by exact SVD


def test_a_low_rank_target_is_kept_whole_by_lora() -> None:
    """(b) For M = U V^T of rank 3, the LoRA pair (r1, r2) = (1, 1) has R(M) = M, so it keeps all
    energy from r = 3 on and strictly less before."""
    g = gen(6)
    M = torch.randn(48, 3, generator=g) @ torch.randn(3, 64, generator=g)
    energies = alignment_table(M, 5, pairs=[(1, 1)])[(1, 1)]
    assert energies[2:] == pytest.approx([1.0] * 3, abs=1e-6)
    assert energies[1] < 0.999


def test_gaussian_energy_per_parameter_follows_the_aspect_ratio_of_r() -> None:
    """(c) For a full-rank Gaussian 48 x 64 M, R(M) is again Gaussian, of shape p x q =
    (48 r2/r1) x (64 r1/r2): its spectrum depends on (r1, r2) only through r2/r1, not r1*r2.
    Marchenko-Pastur gives sigma_1^2 ~ (sqrt(p) + sqrt(q))^2, so the energy per parameter at r = 1,
    sigma_1^2 / (||M||^2 (p + q)) ~ (1 + 2 sqrt(pq) / (p + q)) / pq, grows as R gets squarer.
    Tested: every design with R of shape 48 x 64 or 64 x 48 (p + q = 112) beats every design with
    p + q >= 200 (from 192 x 16 on); p + q = 128 or 152 (32 x 96, 24 x 128) is within sampling noise,
    so not compared. At equal parameter count P = r*(m1*n1 + m2*n2) = 448 (r = 4), exact SVD gives
    0.235..0.257 for all ten square-ish designs, LoRA 0.2467: on a Gaussian target a larger r1*r2
    alone does not keep more energy."""
    M = torch.randn(48, 64, generator=gen(0), dtype=torch.float64)
    table = alignment_table(M, 4, dtype=torch.float64)
    per_param = {p: e[0] / sum(_r_shape(p)) for p, e in table.items()}
    square = [p for p in table if _r_shape(p) in {(48, 64), (64, 48)}]
    assert len(square) == 10
    unbalanced = [p for p in table if sum(_r_shape(p)) >= 200]
    assert len(unbalanced) == 42  # of 70 divisor pairs; the other 18 have p + q = 112, 128 or 152
    assert max(per_param[p] for p in unbalanced) < min(per_param[p] for p in square)
    at_448 = [table[p][3] for p in square]
    assert min(at_448) > 0.23 and max(at_448) < 0.26
    assert table[(1, 1)][3] == pytest.approx(0.2467, abs=1e-4)  # exact SVD, seed 0


def _r_shape(pair: tuple[int, int]) -> tuple[int, int]:
    m1, n1, m2, n2 = factor_sizes(48, 64, *pair)
    return (m1 * n1, m2 * n2)


def test_norm_is_accumulated_in_double_precision() -> None:
    # R is 8M x 1 here, so e[0] = (Gram of R) / ||M||^2 must be 1; a float32 norm of 8M entries
    # is off by far more than 1e-5 (at 4096 x 11008 it was 0.8 % off).
    M = 0.1 + 0.01 * torch.randn(4096, 2048, generator=gen())
    assert topr_energies(M, 4096, 2048, 1, 1, 1).item() == pytest.approx(1.0, abs=1e-5)


def test_energy_curve_matches_topr_energies_on_any_device_name():
    from cdka_search.alignment.energy import energy_curve

    M = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    curve = energy_curve(M, device="auto")
    for pair in [(1, 1), (2, 8), (4, 4), (48, 64)]:
        sizes = factor_sizes(48, 64, *pair)
        assert curve(*pair, 6) == topr_energies(M, *sizes, 6).tolist() == topr_energies(M, *sizes, 6, device="cpu").tolist()


@pytest.mark.parametrize("keep_layout,copies", [(True, 1), (False, 2)])
def test_a_curve_keeps_its_block_layout_unless_told_not_to(monkeypatch, keep_layout: bool, copies: int) -> None:
    # Two pairs with the same m1 share one layout; the experts of a stacked update free theirs.
    from cdka_search.alignment import energy
    from cdka_search.alignment.energy import energy_curve

    made: list[int] = []
    monkeypatch.setattr(energy, "row_blocks_transposed", lambda M, m1: made.append(m1) or row_blocks_transposed(M, m1))
    M = spectra(640, 912, seed=7)["flat"]  # both pairs: m1 = 320, R of 640 x 912 and 960 x 608 (Krylov)
    curve = energy_curve(M, keep_layout=keep_layout)
    first, second = curve(2, 2, 4), curve(2, 3, 4)
    assert made == [320] * copies
    assert first == topr_energies(M, *factor_sizes(640, 912, 2, 2), 4).tolist()
    assert second == topr_energies(M, *factor_sizes(640, 912, 2, 3), 4).tolist()


def test_tables_of_any_small_shape_and_any_pairs_are_exact_in_float64() -> None:
    # The Gram derivation along divisor chains (roots picked among the pairs asked for) over random
    # shapes, spectra and subsets of pairs: every energy must equal the exact SVD's.
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=60, derandomize=True, deadline=None, database=None)
    @hypothesis.given(st.integers(1, 60), st.integers(1, 60), st.sampled_from(["gauss", "rank 2", "sparse"]), st.integers(1, 20), st.data())
    def check(d_out: int, d_in: int, kind: str, r_max: int, data) -> None:
        g = gen(d_out * 61 + d_in)
        M = {
            "gauss": lambda: torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
            "rank 2": lambda: torch.randn(d_out, 2, generator=g, dtype=torch.float64) @ torch.randn(2, d_in, generator=g, dtype=torch.float64),
            "sparse": lambda: torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * (torch.rand(d_out, d_in, generator=g) < 0.1),
        }[kind]()
        hypothesis.assume(bool(M.abs().sum() > 0))
        pairs = divisor_pairs(d_out, d_in)
        chosen = data.draw(st.lists(st.sampled_from(pairs), min_size=1, unique=True))
        table = alignment_table(M, r_max, pairs=chosen, dtype=torch.float64)
        assert list(table) == chosen
        for pair, energies in table.items():
            assert torch.allclose(torch.tensor(energies, dtype=torch.float64), exact_energies(M, pair, r_max), atol=1e-9), pair

    check()


def test_a_column_major_matrix_gives_the_energies_of_its_row_major_copy():
    """With m2 = 1 the layout was the raw view of M, which a transposed M cannot be viewed from."""
    M = torch.randn(48, 64, generator=gen()).T
    for sizes in ((64, 2, 1, 24), (64, 48, 1, 1), (8, 4, 8, 12)):
        assert torch.equal(topr_energies(M, *sizes, 3), topr_energies(M.contiguous(), *sizes, 3))
