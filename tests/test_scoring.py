import math

import numpy as np
import pytest

from cdka_search.candidates import CandidateSpace, Design
from cdka_search.scoring import (
    capacity,
    first_step_alignment,
    rank1_energy,
    score_designs,
    score_shape,
)


def rearrange(M, m1, n1, m2, n2):
    """R(M) of cdka-notes.md section 4, in numpy."""
    return M.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def exact_rank1_energy(d_out, d_in, r1, r2, r, draws, seed=1):
    """Mean top-r energy share of R(u v^T) over Gaussian draws, by full SVD of the rearrangement."""
    rng = np.random.default_rng(seed)
    m1, m2, n1, n2 = d_out // r1, r1, r2, d_in // r2
    kept = []
    for _ in range(draws):
        M = np.outer(rng.standard_normal(d_out), rng.standard_normal(d_in))
        s2 = np.linalg.svd(rearrange(M, m1, n1, m2, n2), compute_uv=False) ** 2
        kept.append(s2[:r].sum() / s2.sum())
    return float(np.mean(kept))


@pytest.mark.parametrize(("r1", "r2", "r", "notes"), [(2, 2, 4, 1.00), (2, 8, 4, 0.69), (2, 8, 8, 0.92), (2, 8, 16, 1.00), (4, 8, 4, 0.52)])
def test_rank1_energy_matches_notes_and_exact_svd(r1, r2, r, notes):
    estimate = rank1_energy(48, 64, r1, r2, r)[-1]
    # The notes quote one random 48x64 draw; the expectation sits within a few points of it.
    assert abs(estimate - notes) < 0.05
    # Against the full SVD of the rearranged matrix, averaged over draws (Monte Carlo error ~0.01).
    assert abs(estimate - exact_rank1_energy(48, 64, r1, r2, r, draws=400)) < 0.03


def test_rank1_energy_is_monotone_and_lora_keeps_everything():
    curve = rank1_energy(96, 128, 4, 8, 40)
    assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))
    assert rank1_energy(96, 128, 1, 1, 3) == [1.0, 1.0, 1.0]  # LoRA: R(M) = M is rank 1


def test_seeded_and_deterministic():
    assert rank1_energy(4096, 11008, 4, 8, 16, seed=3) == rank1_energy(4096, 11008, 4, 8, 16, seed=3)


def test_capacity_and_first_step_formulas():
    lora8 = Design.from_paper(4096, 4096, 1, 1, 8)
    cdka = Design.from_paper(4096, 4096, 2, 8, 4)
    assert capacity(lora8) == pytest.approx(math.log2(9) / math.log2(4097))
    assert capacity(cdka) == pytest.approx(math.log2(65) / math.log2(4097))
    assert first_step_alignment(lora8) == pytest.approx(math.sqrt(8 / 4096))
    assert first_step_alignment(cdka) == pytest.approx(math.sqrt(4 * 8 / (2 * 4096)))
    assert capacity(Design.from_paper(64, 64, 1, 1, 64)) == 1.0


def test_score_table_agrees_with_per_design_scores():
    table = score_shape(48, 64, CandidateSpace(max_r=8))
    for i in range(0, len(table), 7):
        single = score_designs([table.design(i)])[0].scores
        assert table.objective[i] == pytest.approx(single.objective)
        assert table.params[i] == table.design(i).params
        assert table.rank_bound[i] == table.design(i).rank_bound


def test_pareto_front_is_nondominated():
    table = score_shape(64, 96)
    front = table.pareto()
    params = [int(table.params[i]) for i in front]
    scores = [float(table.objective[i]) for i in front]
    assert params == sorted(params) and scores == sorted(scores)
    for i in range(len(table)):
        # every design is matched or beaten by a front member that costs no more
        assert any(table.params[j] <= table.params[i] and table.objective[j] >= table.objective[i] - 1e-12 for j in front)


def test_speed_score_and_the_rank_objective():
    from cdka_search.scoring import size, speed

    d = Design.from_paper(4096, 4096, 2, 8, 4)
    assert speed(d) == pytest.approx(math.log1p(4 * 8 / 2) / math.log1p(4096))
    assert speed(Design.from_paper(64, 64, 1, 64, 1)) == 1.0  # A is 1x1: B is the whole update
    from cdka_search.scoring import RANK_KNEE

    scored = score_designs([d], "rank")[0].scores
    assert size(d) == pytest.approx(math.log2(1 + d.params / 8192) / math.log2(4097))
    assert scored.capacity < RANK_KNEE
    assert scored.objective == pytest.approx(math.sqrt(scored.capacity * size(d)))
    # past the knee, capacity keeps rising but the objective only follows the parameters
    full = Design.from_paper(256, 256, 16, 16, 2)
    assert capacity(full) > 1.0
    assert score_designs([full], "rank")[0].scores.objective == pytest.approx(math.sqrt(RANK_KNEE * size(full)))


def test_the_rank_objective_spends_a_lora8_budget_on_higher_rank_than_lora():
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    for name in ("llama-2-7b",):
        plan = make_plan(load_spec(name), "lora:8", objective="rank")
        assert sum(g.params for g in plan.groups) >= 0.95 * plan.budget_limit
        assert all(g.design.rank_bound > 8 for g in plan.groups)


def test_factor_spectra_run_on_one_blas_thread(monkeypatch):
    # Threaded OpenBLAS on these small SVDs was 20x slower on a busy 2-core machine.
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    from cdka_search.scoring import _squared_singular_values

    threads = []
    real_svd = np.linalg.svd

    def spying_svd(*args, **kwargs):
        threads.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", spying_svd)
    with threadpool_limits(limits=2, user_api="blas"):  # as a caller without conftest's one-thread env has it
        got = _squared_singular_values(12, 96, samples=4, seed=0)
        outside = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert got.shape == (4, 12) and threads and set(threads) == {1}
    assert set(outside) == {2}  # the caller's setting is restored
