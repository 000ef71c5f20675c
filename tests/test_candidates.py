import pytest

from cdka_search.candidates import (
    CandidateSpace,
    Design,
    divisors,
    enumerate_candidates,
    factor_pairs,
    fit_max_r,
    largest_params,
    r_range,
    sane_r,
)
from cdka_search.errors import TargetError


@pytest.mark.parametrize(
    ("n", "count"),
    [(11008, 18), (13824, 40), (14336, 24), (18944, 20), (4096, 13), (768, 18), (5632, 20), (3584, 20), (2304, 27), (97, 2)],
)
def test_divisor_counts_of_awkward_sizes(n, count):
    # 11008 = 2^8*43 -> 9*2; 13824 = 2^9*3^3 -> 10*4; 14336 = 2^11*7 -> 12*2; 18944 = 2^9*37 -> 10*2
    ds = divisors(n)
    assert len(ds) == count
    assert all(n % d == 0 for d in ds) and list(ds) == sorted(ds)


def test_paper_mapping_and_counts():
    d = Design.from_paper(4096, 4096, 2, 8, 4)  # the paper's default (r1, r2, r) = (2, 8, 4)
    assert (d.m1, d.n1, d.m2, d.n2) == (2048, 8, 2, 512)
    assert (d.r1, d.r2, d.shape) == (2, 8, (4096, 4096))
    assert d.params == 69_632  # design.md example: params_each 69632
    assert d.rank_bound == 64


def test_llama_examples_from_notes():
    # cdka-notes.md section 1, all 7 linears of 32 blocks of LLaMA-2-7B
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    total = lambda r1, r2, r: 32 * sum(Design.from_paper(o, i, r1, r2, r).params for o, i in shapes)
    assert total(1, 1, 8) == 19_988_480
    assert total(2, 2, 8) == 19_988_480
    assert total(2, 8, 4) == 22_896_640
    assert Design.from_paper(4096, 4096, 2, 2, 8).rank_bound == 32
    assert Design.from_paper(4096, 4096, 1, 1, 8).rank_bound == 8


def test_rank_bound_checked_value():
    # cdka-notes.md: (r1, r2, r) = (2, 8, 3) on 48x64 reaches rank 48
    assert Design.from_paper(48, 64, 2, 8, 3).rank_bound == 48


def test_enumeration_is_complete_and_contains_lora():
    designs = enumerate_candidates(12, 18)
    pairs = {(d.r1, d.r2) for d in designs}
    # (1, 18) and (12, 1) put the whole 12x18 weight in one factor: 216 + 1 parameters, never a candidate
    assert pairs == {(a, b) for a in divisors(12) for b in divisors(18)} - {(1, 18), (12, 1)}
    assert Design.from_paper(12, 18, 1, 1, 1) in designs
    for d in designs:
        assert d.m1 * d.m2 == 12 and d.n1 * d.n2 == 18
        assert d.r <= r_range(12, 18, d.r1, d.r2).stop - 1


def test_r_stops_where_rank_saturates():
    # r1 = r2 = 2 on 8x8: r*2*2 >= 8 at r = 2, so r in 1..2
    assert list(r_range(8, 8, 2, 2)) == [1, 2]
    assert list(r_range(4096, 4096, 1, 1, CandidateSpace(max_r=16))) == list(range(1, 17))


@pytest.mark.parametrize(("d_out", "d_in"), [(12, 18), (64, 64), (576, 7168), (1, 64), (48, 64)])
def test_no_design_as_large_as_its_weight(d_out, d_in):
    """Issue 10: a design with params >= d_out*d_in is never a candidate, in any family."""
    for family in ("cdka", "lora", "lokr"):
        for d in enumerate_candidates(d_out, d_in, CandidateSpace(family=family, max_r=4096)):
            assert d.params < d_out * d_in


def test_sane_r_bound():
    # 576x7168 (DeepSeek-V3 kv_a_proj): (r1, r2) = (1, 7168) is B = 576x7168 plus a 1x1 A: 4,128,769 > 4,128,768
    assert sane_r(576, 7168, 1, 7168) == 0
    assert list(r_range(576, 7168, 1, 7168)) == []
    # LoRA on 64x64 costs 128 per rank: r = 31 is the last below 4096
    assert sane_r(64, 64, 1, 1) == 31
    assert list(r_range(64, 64, 1, 1, CandidateSpace(r=40))) == []


def test_shape_with_no_sane_design_is_one_error():
    from cdka_search.scoring import score_shape

    with pytest.raises(TargetError, match="no design of the space fits 1x64 with fewer parameters than the weight"):
        score_shape(1, 64, CandidateSpace(family="lora"))  # LoRA on 1x64 costs 65 per rank


def test_pins_and_families():
    assert factor_pairs(4096, 11008, CandidateSpace(family="lora")) == [(1, 1)]
    assert factor_pairs(4096, 11008, CandidateSpace(r1=2, r2=8)) == [(2, 8)]
    assert {d.r for d in enumerate_candidates(64, 64, CandidateSpace(r=3))} == {3}


def test_prime_sizes_leave_only_trivial_factors():
    assert {r1 for r1, _ in factor_pairs(97, 64)} == {1, 97}


def test_the_default_family_keeps_the_guideline_unless_a_factor_is_pinned():
    """r1 <= r2, both powers of two: 688 x 256 keeps (1..16, r2 >= r1) of its 10 x 9 divisor pairs."""
    default = CandidateSpace()
    assert {d.label() for d in enumerate_candidates(12, 18, default) if d.r == 1} == {"(1,1,1)", "(1,2,1)", "(2,2,1)"}
    pairs = factor_pairs(688, 256, default)
    assert set(pairs) == {(a, b) for a in (1, 2, 4, 8, 16) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if a <= b}
    assert len(factor_pairs(688, 256)) == len(factor_pairs(688, 256, CandidateSpace(family="every"))) == 10 * 9  # the whole enumeration
    assert {r2 for _, r2 in factor_pairs(688, 256, CandidateSpace(r1=43))} == set(divisors(256))  # a pin is obeyed as given


@pytest.mark.parametrize("space", [dict(r1=3), dict(r2=5)])
def test_pins_that_do_not_divide(space):
    with pytest.raises(TargetError, match="must divide"):
        factor_pairs(4096, 4096, CandidateSpace(**space))


@pytest.mark.parametrize("bad", [dict(family="ia3"), dict(r=0), dict(max_r=0), dict(r1=-2)])
def test_bad_spaces(bad):
    with pytest.raises(TargetError):
        CandidateSpace(**bad)


@pytest.mark.parametrize(("pins", "message"), [
    (dict(family="lokr", r=2), "--family lokr is one Kronecker term (r = 1); --r 2 cannot be met"),
    (dict(family="lora", r1=2), "--family lora is r1 = r2 = 1; --r1 2 cannot be met"),
    (dict(family="lora", r2=4), "--family lora is r1 = r2 = 1; --r2 4 cannot be met"),
])
def test_a_pin_the_family_cannot_meet_is_refused_before_planning(pins, message):
    with pytest.raises(TargetError) as refused:
        CandidateSpace(**pins)
    assert str(refused.value) == message
    assert CandidateSpace(family="lokr", r=1).r == 1 and CandidateSpace(family="lora", r1=1, r2=1).r1 == 1


def test_a_shape_with_too_many_designs_or_pairs_is_refused_before_any_is_built(cli):
    from cdka_search.candidates import spans
    from cdka_search.limits import MAX_DESIGNS, MAX_PAIRS

    # 16384x16384 up to r = 16384: 67,119 designs, scored (the most of any released shape, about).
    assert sum(len(rs) for _, _, rs in spans(16384, 16384, CandidateSpace(max_r=16384))) == 67_119 < MAX_DESIGNS
    with pytest.raises(TargetError, match=r"^262144x262144 has 1,074,603 candidate designs under --family cdka and --max-r 1048576"):
        spans(262144, 262144, CandidateSpace(max_r=1 << 20))
    # 720720 = 2^4 3^2 5 7 11 13 has 240 divisors: 57,600 pairs, 92 s to score before this bound.
    with pytest.raises(TargetError, match=r"^720720x720720 has 57,600 \(r1, r2\) pairs under --family every"):
        spans(720720, 720720, CandidateSpace(family="every", r=1))
    assert len(factor_pairs(720720, 720720, CandidateSpace(family="every", r1=16))) == 240 <= MAX_PAIRS  # a pin narrows it
    result = cli("explain", "--shape", "720720x720720", "--family", "every")
    assert result.exit_code == 4 and result.stderr.startswith("error: 720720x720720 has 57,600 (r1, r2) pairs")


def test_r_stops_at_the_rank_bound_of_each_design():
    # r1 = 1, r2 = 101 on 97x101: B is the whole 97x101 matrix, so r = 1 already reaches rank 97
    # (and costs more than the weight: no candidate at all); r1 = 97, r2 = 1 has A = 97x101 likewise
    assert list(r_range(97, 101, 1, 101, CandidateSpace(max_r=1000))) == []
    # r1 = 1, r2 = 1 (LoRA): rank r per component, saturating at 97; below the weight's 9,797 up to r = 49
    assert list(r_range(97, 101, 1, 1, CandidateSpace(max_r=1000))) == list(range(1, 50))
    for d in enumerate_candidates(48, 64):
        previous = Design(d.m1, d.n1, d.m2, d.n2, d.r - 1) if d.r > 1 else None
        assert previous is None or previous.rank_bound < min(48, 64)  # every r but the last adds rank


def test_largest_params_is_the_largest_enumerated_design():
    for d_out, d_in, space in [(48, 64, CandidateSpace()), (4096, 11008, CandidateSpace(family="lora")),
                               (97, 101, CandidateSpace(max_r=1000)), (64, 64, CandidateSpace(r1=2, max_r=3))]:
        assert largest_params(d_out, d_in, space) == max(d.params for d in enumerate_candidates(d_out, d_in, space))
    assert largest_params(4096, 4096, CandidateSpace(family="lora")) == 64 * 8192


def test_the_automatic_cap_doubles_until_the_budget_fits():
    """LoRA on 10 matrices of 4096 x 4096: rank 64 costs 5,242,880; a budget of rank 100 needs the cap at
    128, one of rank 1000 needs 1024, and a larger one stops at 2048, since rank 2047 is the last design
    smaller than the weight."""
    lora = CandidateSpace(family="lora")
    matrices = {(4096, 4096): 10}
    per_rank = 10 * 8192
    assert fit_max_r(lora, matrices, 64 * per_rank) is lora
    assert fit_max_r(lora, matrices, 100 * per_rank).max_r == 128
    assert fit_max_r(lora, matrices, 1000 * per_rank).max_r == 1024
    assert fit_max_r(lora, matrices, 10**12).max_r == 2048  # no larger cap adds a design
    assert fit_max_r(CandidateSpace(), {(48, 64): 1}, 10**9).cap == 64  # r never passes 48 there: nothing to raise
    for kept in (CandidateSpace(family="lora", max_r=64), CandidateSpace(r=4)):
        assert fit_max_r(kept, matrices, 10**12) is kept  # an explicit cap, or a pinned r, is the user's


def test_automatic_cap_is_the_default_and_explicit_caps_are_checked():
    assert CandidateSpace().max_r is None and CandidateSpace().cap == 64
    assert CandidateSpace(max_r=8).cap == 8
    with pytest.raises(TargetError, match="--max-r: 0 is outside"):
        CandidateSpace(max_r=0)
