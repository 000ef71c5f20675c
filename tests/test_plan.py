import json

import pytest
import yaml

from cdka_search.errors import PlanError
from cdka_search.plan import (
    AdapterSettings,
    Plan,
    dumps_plan,
    load_plan,
    loads_plan,
    save_plan,
)
from cdka_search.planner import make_plan
from cdka_search.spec import load_spec


@pytest.fixture(scope="module")
def gpt2_plan() -> Plan:
    return make_plan(load_spec("gpt2"), "lora:8")


def test_yaml_and_json_round_trip(tmp_path, gpt2_plan):
    for name in ("p.yaml", "p.json"):
        path = save_plan(gpt2_plan, tmp_path / name)
        assert load_plan(path) == gpt2_plan
    assert json.loads((tmp_path / "p.json").read_text())["cdka_plan"] == 1


@pytest.mark.parametrize("name", ["p.yaml", "p.json"])
def test_a_plan_saved_by_a_windows_editor_reads_as_written(tmp_path, gpt2_plan, name):
    """A byte-order mark and CRLF line breaks: YAML took them, JSON refused the mark ("Unexpected UTF-8 BOM")."""
    path = save_plan(gpt2_plan, tmp_path / name)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert load_plan(path) == gpt2_plan


def test_exponent_numbers_read_as_yaml_1_2_does_and_text_like_them_is_written_quoted(tmp_path):
    """PyYAML (YAML 1.1) reads 2e-4 and 1.0e5 as text; cdka reads them as the numbers a user means, and
    writes a budget spec such as "2e5" quoted, so that the plan reads back with its spec as text."""
    from cdka_search.documents import read_yaml

    parsed = read_yaml("a: 2e-4\nb: 1.0e5\nc: -1E+3\nd: '2e-4'\ne: 3e\nf: !!str 1e5\ng: 1.5\n", "x", PlanError)
    assert parsed == {"a": 0.0002, "b": 100000.0, "c": -1000.0, "d": "2e-4", "e": "3e", "f": "1e5", "g": 1.5}
    plan = make_plan(load_spec("gpt2"), "2e5")
    text = dumps_plan(plan)
    assert "  spec: '2e5'\n" in text
    assert loads_plan(text, "p.yaml") == plan
    assert load_plan(save_plan(plan, tmp_path / "p.yaml")) == plan
    # By hand, unquoted, the spec is a number: read as the count it means.
    for written in ("2e5", "200000", "2.0e+5"):
        edited = loads_plan(text.replace("  spec: '2e5'\n", f"  spec: {written}\n"), "p.yaml")
        assert edited.budget_spec == "200000" and edited.groups == plan.groups


def test_document_fields(gpt2_plan):
    doc = yaml.safe_load(dumps_plan(gpt2_plan))
    assert doc["budget"] == {"spec": "lora:8", "limit": 1_179_648, "used": gpt2_plan.used_params}
    group = doc["groups"][0]
    assert group["modules"] == "transformer.h.*.attn.c_attn"
    assert group["kind"] == "conv1d" and group["shape"] == [2304, 768] and group["count"] == 12
    m1, n1 = group["left"]
    m2, n2 = group["right"]
    assert (m1 * m2, n1 * n2) == (2304, 768)
    assert (group["r1"], group["r2"]) == (m2, n1)
    assert group["params_each"] == group["r"] * (m1 * n1 + m2 * n2)
    assert set(group["scores"]) == {"capacity", "alignment", "first_step", "speed", "objective"}


def test_yaml_is_deterministic(gpt2_plan):
    assert dumps_plan(gpt2_plan) == dumps_plan(make_plan(load_spec("gpt2"), "lora:8"))


def edited(plan: Plan, change) -> str:
    doc = plan.to_dict()
    change(doc)
    return yaml.safe_dump(doc)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["groups"][0].update(rnak=3), "unknown key 'rnak'.*allowed: modules, kind"),
        (lambda d: d.update(cdka_plan=2), "schema version 2"),
        (lambda d: d["groups"][0].update(left=[100, 8]), "give a"),
        (lambda d: d["groups"][0].update(params_each=1), "params_each is 1"),
        (lambda d: d["groups"][0].update(r=0), r"groups\[0\].r: 0 is outside \[1, 768\]"),
        (lambda d: d["budget"].update(used=5), "budget.used"),
        (lambda d: d["budget"].update(limit=10), "over the budget limit"),
        (lambda d: d["adapter"].update(scaling="alpha/r2"), "adapter.scaling"),
        (lambda d: d["adapter"].update(alpah=3), "did you mean 'alpha'"),
        (lambda d: d.pop("groups"), "missing key"),
        (lambda d: d["groups"][0].update(kind="conv2d"), "kind"),
    ],
)
def test_hand_edits_are_checked(gpt2_plan, change, message):
    with pytest.raises(PlanError, match=message):
        loads_plan(edited(gpt2_plan, change))


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"limit": 10**13}, "budget.limit is 10,000,000,000,000 but budget.spec 'lora:8' means 1,179,648 for model.total_params 124,439,808"),
        ({"spec": "0.5%"}, "budget.limit is 1,179,648 but budget.spec '0.5%' means 622,199 for model.total_params 124,439,808"),
        ({"spec": "1.2M"}, "budget.limit is 1,179,648 but budget.spec '1.2M' means 1,200,000"),
        ({"spec": "lora:9"}, "budget.limit is 1,179,648 but budget.spec 'lora:9' means 1,327,104"),
        ({"spec": "banana"}, "budget.spec: budget 'banana' is not understood"),
        ({"spec": "５%"}, "budget.spec: budget '５%': write it with ASCII digits"),
    ],
)
def test_budget_spec_must_mean_the_limit(gpt2_plan, budget, message):
    with pytest.raises(PlanError) as raised:
        loads_plan(edited(gpt2_plan, lambda d: d["budget"].update(budget)))
    assert message in str(raised.value)


def test_a_plan_without_budget_spec_reads_its_limit_as_a_count(gpt2_plan):
    assert loads_plan(edited(gpt2_plan, lambda d: d["budget"].pop("spec"))).budget_spec == "1179648"
    with pytest.raises(PlanError, match="budget.spec: budget '200000000' exceeds the model's 124,439,808 parameters"):
        loads_plan(edited(gpt2_plan, lambda d: (d["budget"].pop("spec"), d["budget"].update(limit=200_000_000))))


@pytest.mark.parametrize("value", [8.0, True, "8"])
def test_a_derived_field_written_as_another_type_is_named_with_the_integer_it_must_be(gpt2_plan, value):
    with pytest.raises(PlanError) as raised:
        loads_plan(edited(gpt2_plan, lambda d: d["groups"][0].update(r1=value)))
    r1 = gpt2_plan.groups[0].design.r1
    assert f"groups[0].r1 is {value!r}, but left/right/r give the integer {r1}" in str(raised.value)


def test_consistent_hand_edit_is_accepted(gpt2_plan):
    def to_lora(d):
        g = d["groups"][0]
        g.update(left=[2304, 1], right=[1, 768], r=2, r1=1, r2=1, params_each=2 * (2304 + 768), rank_bound=2)
        d["budget"]["used"] = None
        del d["budget"]["used"]

    plan = loads_plan(edited(gpt2_plan, to_lora))
    assert plan.groups[0].design.is_lora


def test_unsafe_yaml_is_refused():
    with pytest.raises(PlanError, match="YAML tag .*python/object/apply:os.system.* is not allowed"):
        loads_plan("!!python/object/apply:os.system ['echo hi']")


def test_a_yaml_plan_too_large_to_read_back_is_refused_and_json_is_not(tmp_path, gpt2_plan, monkeypatch):
    import cdka_search.plan as plan_module

    bound = len(dumps_plan(gpt2_plan).encode()) - 1  # the bound load_plan applies, just under this plan
    monkeypatch.setattr(plan_module, "MAX_YAML_BYTES", bound)
    with pytest.raises(PlanError, match=rf"is {bound + 1:,} bytes as YAML, more than cdka reads back \({bound:,}\); write it as JSON"):
        save_plan(gpt2_plan, tmp_path / "plan.yaml")
    assert list(tmp_path.iterdir()) == []
    assert load_plan(save_plan(gpt2_plan, tmp_path / "plan.json")) == gpt2_plan


def test_the_cli_refuses_a_yaml_plan_it_could_not_read_back(tmp_path, cli, monkeypatch):
    import cdka_search.plan as plan_module

    monkeypatch.setattr(plan_module, "MAX_YAML_BYTES", 1000)
    result = cli("plan", "-m", "gpt2", "-b", "lora:8", "--per-layer", "-o", str(tmp_path / "plan.yaml"))
    assert result.exit_code != 0
    assert "more than cdka reads back (1,000); write it as JSON" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
    second = cli("plan", "-m", "gpt2", "-b", "lora:8", "--per-layer", "-o", str(tmp_path / "plan.json"))
    assert second.exit_code == 0, second.stderr
    # the output's suffix chooses the format (it once wrote YAML into plan.json)
    assert len(json.loads((tmp_path / "plan.json").read_text())["groups"]) == 48


def test_atomic_save_leaves_no_temporary(tmp_path, gpt2_plan):
    save_plan(gpt2_plan, tmp_path / "plan.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_scaling_values():
    from cdka_search.candidates import Design

    d = Design.from_paper(64, 64, 2, 8, 4)
    assert AdapterSettings().scaling_value(d) == pytest.approx(64 / 4**0.5)  # matched: alpha / sqrt(r)
    assert AdapterSettings(scaling="alpha/sqrt(r*r2)").scaling_value(d) == pytest.approx(64 / (4 * 8) ** 0.5)
    assert AdapterSettings(scaling="alpha/r").scaling_value(d) == 16
    assert AdapterSettings(scaling="fixed", scale=0.5).scaling_value(d) == 0.5
    with pytest.raises(PlanError, match="needs adapter.scale"):
        AdapterSettings(scaling="fixed")


def test_assign_maps_modules_and_checks_counts(gpt2_plan):
    names = [t.name for t in load_spec("gpt2").targets]
    assigned = gpt2_plan.assign(names)
    assert len(assigned) == 48
    assert assigned["transformer.h.3.mlp.c_fc"].shape == (3072, 768)
    with pytest.raises(PlanError, match="matches 11 modules"):
        gpt2_plan.assign([n for n in names if n != "transformer.h.5.attn.c_attn"])


def test_sweep_block_round_trips_and_is_strict(gpt2_plan):
    from dataclasses import replace

    from cdka_search.plan import SweepRecord

    record = SweepRecord("s", "sqlite:///x.db", "proxy", 20, 3, 0.5, 0.7, 0.2, 28.57, 2e-4)
    swept = replace(gpt2_plan, sweep=record)
    assert loads_plan(dumps_plan(swept)) == swept
    doc = swept.to_dict()
    doc["sweep"]["best_vlaue"] = 1
    with pytest.raises(PlanError, match="did you mean 'best_value'"):
        loads_plan(yaml.safe_dump(doc))
    doc["sweep"] = {"study": "s", "storage": "sqlite:///x.db", "task": "proxy"}
    with pytest.raises(PlanError, match="^plan: sweep: missing key\\(s\\) steps, best_trial, best_value$"):
        loads_plan(yaml.safe_dump(doc))


@pytest.mark.parametrize(("exact", "gap"), [(True, None), (None, 0.25), (None, None), (False, 9.3e-09), (True, 1 / 3)])
def test_allocation_fields_round_trip_as_they_are(exact, gap):
    """Found by the plan fuzzer: a plan with exact but no gap read back with gap 0.0, and a gap was
    rounded to 9 places on the way out."""
    import dataclasses

    plan = dataclasses.replace(make_plan(load_spec("gpt2"), "lora:4"), exact=exact, gap=gap)
    for fmt in ("yaml", "json"):
        back = loads_plan(dumps_plan(plan, fmt))
        assert (back.exact, back.gap) == (exact, gap) and back == plan


@pytest.mark.parametrize(("spec", "limit", "said"), [
    ("custom", 2 * 10**6, "budget.spec: budget 'custom' is not understood"),
    ("0.5%", 2 * 10**6, "budget.limit is 2,000,000 but budget.spec '0.5%' means 622,199 for model.total_params 124,439,808"),
    ("1000000", 10**6, "the groups use 1,179,648 parameters, over the budget limit 1,000,000"),
])
def test_a_plan_load_plan_would_refuse_is_not_written(tmp_path, gpt2_plan, spec, limit, said):
    """A plan made in code with a free-form budget label saved, then never loaded again."""
    from dataclasses import replace

    odd = replace(gpt2_plan, budget_spec=spec, budget_limit=limit)
    with pytest.raises(PlanError, match=f"^{said}"):
        save_plan(odd, tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()
    fixed = replace(odd, budget_spec="2000000", budget_limit=2 * 10**6)
    assert load_plan(save_plan(fixed, tmp_path / "p.yaml")) == fixed
