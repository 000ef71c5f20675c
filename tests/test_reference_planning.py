"""Per-layer planning from reference updates (the data-aware path of make_plan)."""

import math

import pytest

torch = pytest.importorskip("torch")

from cdka_search.candidates import Design
from cdka_search.errors import ReferenceFileError
from cdka_search.planner import make_plan
from cdka_search.spec import ModelSpec, TargetModule


def spec_of(*names, shape=(48, 64)) -> ModelSpec:
    return ModelSpec("toy", "test", 10**6, tuple(TargetModule(n, *shape) for n in names))


def kron_sum(design: Design, k: int, gen) -> torch.Tensor:
    return sum(torch.kron(torch.randn(design.m1, design.n1, generator=gen), torch.randn(design.m2, design.n2, generator=gen)) for _ in range(k))


def test_sum_of_kronecker_products_recovers_its_shape():
    gen = torch.Generator().manual_seed(0)
    true = Design.from_paper(48, 64, 2, 8, 3)
    M = kron_sum(true, 3, gen) + 1e-3 * torch.randn(48, 64, generator=gen)
    plan = make_plan(spec_of("a"), true.params, objective="alignment", reference={"a": M})
    design = plan.groups[0].design
    assert (design.r1, design.r2) == (2, 8) and design.r >= 3
    assert plan.groups[0].scores["alignment"] > 0.999


def test_low_rank_update_prefers_lora_at_equal_parameters():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(48, 2, generator=gen) @ torch.randn(2, 64, generator=gen)
    budget = Design.from_paper(48, 64, 1, 1, 2).params  # LoRA rank 2 = 224 parameters
    plan = make_plan(spec_of("a"), budget, objective="alignment", reference={"a": M})
    assert plan.groups[0].design.is_lora
    assert plan.groups[0].scores["alignment"] == pytest.approx(1.0, abs=1e-4)


def test_more_energetic_modules_get_more_budget():
    gen = torch.Generator().manual_seed(2)
    ref = {"loud": 10 * torch.randn(48, 64, generator=gen), "quiet": 0.1 * torch.randn(48, 64, generator=gen)}
    plan = make_plan(spec_of("loud", "quiet"), 2000, objective="alignment", reference=ref)
    params = {g.modules[0]: g.design.params for g in plan.groups}
    assert params["loud"] > params["quiet"]
    assert plan.used_params <= 2000
    assert [g.count for g in plan.groups] == [1, 1]  # a per-layer plan lists every module


def test_missing_and_mismatched_reference_modules_are_named():
    ref = {"a": torch.zeros(48, 64)}
    with pytest.raises(ReferenceFileError, match="no update for 1 target module.*: b"):
        make_plan(spec_of("a", "b"), 5000, reference=ref)
    with pytest.raises(ReferenceFileError, match="reference a is \\(64, 48\\)"):
        make_plan(spec_of("a"), 5000, reference={"a": torch.zeros(64, 48)})
    with pytest.raises(ReferenceFileError, match="every reference update is zero"):
        make_plan(spec_of("a"), 5000, reference=ref)


def test_lazy_measurement_plans_what_measuring_everything_plans(monkeypatch):
    from cdka_search.alignment import planning

    gen = torch.Generator().manual_seed(4)
    ref = {n: torch.randn(48, 64, generator=gen) * (1 + i) for i, n in enumerate(("a", "b", "c"))}
    plans = {}
    for depth in (2, 1000):  # 2: nearly every choice rests on a bound first; 1000: all measured at once
        monkeypatch.setattr(planning, "FIRST_DEPTH", depth)
        plans[depth] = make_plan(spec_of("a", "b", "c"), 9000, objective="alignment", reference=ref)
    lazy, eager = plans[2], plans[1000]
    assert [g.design for g in lazy.groups] == [g.design for g in eager.groups]
    assert [g.scores for g in lazy.groups] == [g.scores for g in eager.groups]  # chosen scores are measured, not bounds
    assert max(g.design.r for g in lazy.groups) > 2  # the refinement path ran


def test_bounded_energies_extend_by_the_last_share():
    from cdka_search.alignment.planning import bounded

    assert bounded([0.5, 0.7], 5) == pytest.approx([0.5, 0.7, 0.9, 1.0, 1.0])
    assert bounded([0.4], 3) == pytest.approx([0.4, 0.8, 1.0])
    assert bounded([0.1, 0.2, 0.3], 2) == [0.1, 0.2]


def test_uses_alignment_tells_objectives_apart(monkeypatch):
    import numpy as np

    from cdka_search import scoring
    from cdka_search.alignment.planning import uses_alignment

    monkeypatch.setitem(scoring.OBJECTIVES, "no_alignment", lambda c, a, s, z: np.sqrt(np.minimum(c, 0.6) * z))
    monkeypatch.setitem(scoring.OBJECTIVES, "some_alignment", lambda c, a, s, z: np.sqrt(np.minimum(c, 0.6) * z) + 1e-3 * a)
    assert uses_alignment("alignment") and uses_alignment("some_alignment")
    assert not uses_alignment("no_alignment")


def test_an_objective_without_alignment_measures_only_the_chosen_pairs(monkeypatch):
    import numpy as np

    from cdka_search import scoring
    from cdka_search.alignment import planning

    monkeypatch.setitem(scoring.OBJECTIVES, "no_alignment", lambda c, a, s, z: np.sqrt(np.minimum(c, 0.6) * z))
    gen = torch.Generator().manual_seed(6)
    names = ("a", "b", "c", "d")
    ref = {n: torch.randn(96, 128, generator=gen) * (1 + i) for i, n in enumerate(names)}
    spec = spec_of(*names, shape=(96, 128))
    measured = []
    real_curve = planning.stacked_curve

    def counting(M, **kwargs):
        curve = real_curve(M, **kwargs)
        return lambda r1, r2, r_max: measured.append((r1, r2, r_max)) or curve(r1, r2, r_max)

    monkeypatch.setattr(planning, "stacked_curve", counting)
    lazy = make_plan(spec, 12000, objective="no_alignment", reference=ref)
    assert sorted(measured) == sorted((g.design.r1, g.design.r2, g.design.r) for g in lazy.groups)  # one each, to its r
    monkeypatch.setattr(planning, "uses_alignment", lambda objective: True)  # measure every shortlisted pair first
    measured.clear()
    eager = make_plan(spec, 12000, objective="no_alignment", reference=ref)
    assert len(measured) > 2 * len(names)
    assert [g.design for g in lazy.groups] == [g.design for g in eager.groups]
    for a, b in zip(lazy.groups, eager.groups):  # reported alignments are measured (to another depth: within 1e-3)
        assert a.scores["alignment"] == pytest.approx(b.scores["alignment"], abs=1e-3)
        assert {k: v for k, v in a.scores.items() if k != "alignment"} == {k: v for k, v in b.scores.items() if k != "alignment"}
    assert len({g.design.params for g in lazy.groups}) > 1  # the energies weighted the modules differently


def test_module_weights_spread_across_shapes_as_data_free_and_by_energy_within_one():
    from cdka_search.alignment.planning import module_weights

    spec = ModelSpec("toy", "test", 10**6, (TargetModule("q", 48, 64), TargetModule("k", 48, 64),
                                            TargetModule("up", 96, 64), TargetModule("zero", 32, 32)))
    weights = module_weights(spec, {"q": 3.0, "k": 1.0, "up": 1000.0, "zero": 0.0})
    # q and k share a shape: mean energy 2, shape weight 48 + 64; up is alone in its shape; zero has no update.
    assert weights == pytest.approx({"q": 112 * 1.5, "k": 112 * 0.5, "up": 160.0, "zero": 0.0})


def _without_scores(plan):
    data = plan.to_dict()
    return data, [{k: v for k, v in g.items() if k != "scores"} for g in data["groups"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_but_finite_updates_plan_as_at_a_normal_scale(dtype):
    """Energies are shares of each update's norm and weights ratios within a shape: scaling every update
    by one number changes neither. Updates of 3e38 overflowed float32 squares (exit 2 from the allocator),
    of 1e-30 underflowed them (every update 'zero'); a power of two gives the very same plan."""
    gen = torch.Generator().manual_seed(5)
    spec = ModelSpec("toy", "test", 10**6, (TargetModule("a", 48, 64), TargetModule("b", 48, 64), TargetModule("c", 32, 64)))
    ref = {n: (torch.randn(*s, generator=gen) * (1 + 2 * i)).to(dtype)
           for i, (n, s) in enumerate((("a", (48, 64)), ("b", (48, 64)), ("c", (32, 64))))}
    top = max(float(t.abs().max()) for t in ref.values())
    normal = make_plan(spec, 3000, objective="alignment", reference=ref).to_dict()
    assert len({g["params_each"] for g in normal["groups"]}) > 1  # the energies weighted the modules differently
    limit = 1023 if dtype == torch.float64 else 127  # the largest entry just below the dtype's largest finite number
    for power in (limit - math.frexp(top)[1], -100, -(limit - 24)):
        scaled = {n: t * 2.0**power for n, t in ref.items()}
        assert all(bool(t.isfinite().all()) for t in scaled.values())
        assert make_plan(spec, 3000, objective="alignment", reference=scaled).to_dict() == normal, power
    for factor in (1e-30, 3e38 / top if dtype == torch.float32 else 1e300 / top):  # not powers of two: rounding apart
        plan, designs = _without_scores(make_plan(spec, 3000, objective="alignment", reference={n: t * factor for n, t in ref.items()}))
        assert designs == _without_scores(make_plan(spec, 3000, objective="alignment", reference=ref))[1]
        for got, want in zip(plan["groups"], normal["groups"]):
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)


def test_extreme_energies_are_measured_at_a_safe_scale():
    from cdka_search.alignment.energy import energy_curve, squared_norm
    from cdka_search.alignment.planning import update_energies

    gen = torch.Generator().manual_seed(6)
    M = torch.randn(640, 640, generator=gen)  # pair (1, 1) of a 640 x 640 matrix: the Krylov path
    normal = energy_curve(M)(1, 1, 3) + energy_curve(M)(4, 8, 3)  # (4, 8): the Gram path
    for power in (120, -110):
        scaled = M * 2.0**power
        assert energy_curve(scaled)(1, 1, 3) + energy_curve(scaled)(4, 8, 3) == normal
        assert squared_norm(scaled, power) == squared_norm(M)
    assert squared_norm(torch.full((4, 4), 3e38)) == pytest.approx(16 * 9e76)
    assert squared_norm(torch.full((4, 4), 1e-30)) == pytest.approx(16e-60)
    assert math.isnan(squared_norm(torch.tensor([1.0, float("nan")]))) and squared_norm(torch.zeros(3)) == 0.0
    spec = spec_of("a", "b")
    with pytest.raises(ReferenceFileError, match=r"^reference 'b' has NaN or infinite entries; a reference update must be finite$"):
        update_energies(spec, {"a": torch.ones(48, 64), "b": torch.full((48, 64), float("inf"))})
    huge = update_energies(spec, {"a": torch.full((48, 64), 1e300, dtype=torch.float64), "b": torch.full((48, 64), 1e299, dtype=torch.float64)})
    assert huge["a"] / huge["b"] == pytest.approx(100.0) and math.isfinite(huge["a"])
    from cdka_search.alignment.planning import stacked_curve

    stack = torch.randn(3, 48, 64, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64)[:, None, None]
    normal = stacked_curve(stack, seed=0, device="cpu")(2, 4, 3)
    assert stacked_curve(stack * 2.0**1000, seed=0, device="cpu")(2, 4, 3) == normal
    assert stacked_curve(stack * 2.0**-1000, seed=0, device="cpu")(2, 4, 3) == normal
