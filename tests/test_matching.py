import pytest

from cdka_search.errors import PlanError
from cdka_search.matching import ModuleIndex, match_groups, summarise
from cdka_search.patterns import match_module

NAMES = [
    f"model.layers.{i}.{block}.{proj}"
    for i in range(12)
    for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
    for proj in projs
] + ["model", "model.layers", "lm_head"]


@pytest.mark.parametrize(
    "pattern",
    [
        "model.layers.*.mlp.up_proj",
        "model.layers.1?.self_attn.*",
        "model.layers.*.*.*_proj",
        "model.**.q_proj",
        "**proj",
        "model.layers.1**",
        "**.mlp.**_proj",
        "mod?l.**.?_proj",
        "model.**.layers",
        "l**d",
        "**",
        "model.layers.3.mlp.down_proj",
        "model.layers.*",
        "*",
        "model.layers.*.mlp",
        "nothing.*",
    ],
)
def test_index_finds_what_a_scan_finds(pattern):
    index = ModuleIndex(NAMES)
    assert index.find(pattern) == [n for n in NAMES if match_module(n, pattern)]


def test_groups_report_every_problem_in_one_pass():
    groups = [
        ("model.layers.*.mlp.up_proj",),          # right: 12
        ("model.layers.*.mlp.down_proj",),        # says 11
        ("model.layers.0.mlp.up_proj",),          # also claims layer 0's up_proj
        ("model.layers.*.attn.q_proj",),          # matches nothing
        ("*" * 600,),                             # too long
    ]
    found = match_groups(groups, NAMES, counts=[12, 11, 1, 1, 1], model="tiny")
    assert found.hits[0] == tuple(f"model.layers.{i}.mlp.up_proj" for i in range(12))
    assert found.problems == (
        "group 'model.layers.*.mlp.down_proj' matches 12 modules of tiny, but the plan says 11",
        "group 'model.layers.*.attn.q_proj' matches 0 modules of tiny, but the plan says 1",
        "group '" + "*" * 27 + "..." + "*" * 28 + "': module pattern of 600 characters: the limit is 512",  # shown bounded
        "module model.layers.0.mlp.up_proj: matched by 2 groups ('model.layers.*.mlp.up_proj', 'model.layers.0.mlp.up_proj')",
    )
    assert "model.layers.0.mlp.up_proj" not in found.owner
    assert found.owner["model.layers.5.mlp.up_proj"] == 0
    assert list(found.owner) == [n for n in NAMES if n in found.owner]  # model order


def test_plan_assign_lists_every_problem():
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    spec = load_spec("llama-2-7b")
    plan = make_plan(spec, "lora:8")
    names = [t.name for t in spec.targets if t.name != "model.layers.3.mlp.up_proj" and ".31.self_attn.q_proj" not in t.name]
    with pytest.raises(PlanError) as info:
        plan.assign(names)
    message = str(info.value)
    assert "'model.layers.*.mlp.up_proj' matches 31 modules of the model, but the plan says 32" in message
    assert "'model.layers.*.self_attn.q_proj' matches 31 modules" in message
    assert len(plan.assign(t.name for t in spec.targets)) == 224


def test_summary_is_bounded():
    problems = [f"p{i}" for i in range(25)]
    assert summarise(problems, shown=3) == "p0; p1; p2 (and 22 more)"
    with pytest.raises(PlanError, match="^x; y$"):
        from cdka_search.matching import raise_problems

        raise_problems(["x", "y"])


HOSTILE = "*a" * 16 + "b"  # 33 characters: 45 s as a backtracking regex


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (HOSTILE, f"target '{HOSTILE}' matches no module"),
        ("model.**" + HOSTILE, "matches no module"),
        ("*" * 513, "module pattern of 513 characters: the limit is 512"),
    ],
)
def test_hostile_targets_are_one_line(cli, tmp_path, targets, message):
    out = tmp_path / "plan.yaml"
    result = cli("plan", "-m", "llama-2-7b", "-t", targets, "-o", str(out))
    assert result.exit_code == 4
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_hostile_pattern_in_a_plan_file_is_a_validate_problem(cli, tmp_path):
    from cdka_search.plan import save_plan
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    from dataclasses import replace

    plan = make_plan(load_spec("llama-2-7b"), "lora:8")
    hostile = replace(plan, groups=(replace(plan.groups[0], modules=("model.layers.*." + HOSTILE,)), *plan.groups[1:]))
    path = save_plan(hostile, tmp_path / "plan.yaml")
    before = path.read_bytes()
    result = cli("validate", str(path), "--model", "llama-2-7b")
    assert result.exit_code == 5
    assert f"group 'model.layers.*.{HOSTILE}' matches 0 modules of llama-2-7b, but the plan says 32" in result.stderr
    assert result.stderr.count("\n") == 1
    assert path.read_bytes() == before


def test_a_repeated_double_star_pattern_is_matched_once_and_many_distinct_ones_are_refused(monkeypatch):
    """A plan repeating one '**' pattern 30,000 times took 28 s to validate; it is now matched once. Many
    distinct '**' patterns, each a scan of every name, are refused past MAX_SCANS name tests."""
    from cdka_search import matching

    index = ModuleIndex(NAMES)
    tests = []
    real = matching.compile_pattern
    monkeypatch.setattr(matching, "compile_pattern", lambda p: tests.append(p) or real(p))
    found = match_groups([["**.q_proj"] * 30_000 + ["lm_head"]], index, counts=[13])
    assert found.problems == () and len(found.hits[0]) == 13 and tests == ["**.q_proj"]
    monkeypatch.setattr(matching, "MAX_SCANS", 10 * len(NAMES))
    assert match_groups([[f"**.q_proj{'*' * k}" for k in range(10)]], index).hits[0] == tuple(n for n in NAMES if n.endswith("q_proj"))
    with pytest.raises(PlanError, match=r"^11 patterns with '\*\*' would each test all 87 modules of the model, more than 870 tests"):
        match_groups([[f"**.q_proj{'*' * k}" for k in range(11)]], index)
