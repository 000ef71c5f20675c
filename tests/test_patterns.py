import re

import pytest

from cdka_search.patterns import match_module


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("roberta.encoder.layer.3.output.dense", "roberta.encoder.layer.*.output.dense", True),
        ("roberta.encoder.layer.3.attention.output.dense", "roberta.encoder.layer.*.output.dense", False),  # fnmatch: True
        ("roberta.encoder.layer.3.attention.output.dense", "roberta.encoder.layer.**.output.dense", True),
        ("model.layers.12.mlp.down_proj", "model.layers.1?.mlp.*", True),
        ("model.layers.1.mlp.down_proj", "model.layers.1?.mlp.*", False),
        ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj", True),
        ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down", False),
        ("a+b.c", "a+b.*", True),  # regex characters are literal
    ],
)
def test_module_patterns(name, pattern, expected):
    assert match_module(name, pattern) is expected


def test_roberta_groups_are_globs_again():
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    plan = make_plan(load_spec("roberta-base"), "lora:8")
    assert [g.modules for g in plan.groups][-1] == ("roberta.encoder.layer.*.output.dense",)
    assert all(g.count == 12 for g in plan.groups)


def _reference_regex(pattern: str) -> "re.Pattern[str]":
    """The documented meaning written as a (backtracking) regex, for conformance on small inputs."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            while i < len(pattern) and pattern[i] == "*":
                i += 1
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def test_automaton_agrees_with_the_regex_meaning_on_random_cases():
    import random

    rng = random.Random(7)
    checked = matched = 0
    for _ in range(4000):
        pattern = "".join(rng.choice("ab.*?") for _ in range(rng.randint(1, 8)))
        name = "".join(rng.choice("ab.") for _ in range(rng.randint(0, 9)))
        expected = _reference_regex(pattern).fullmatch(name) is not None
        assert match_module(name, pattern) is expected, (name, pattern)
        checked += 1
        matched += expected
    assert checked == 4000 and 100 < matched < 3900  # both outcomes well represented


def test_hostile_pattern_is_linear():
    # As a regex ([^.]*a){16}b this backtracks for hours on a long run of 'a'; the automaton reads
    # each character once.
    hostile = "*a" * 16 + "b"
    assert len(hostile) == 33
    name = "a" * 20_000
    assert match_module(name, hostile) is False
    assert match_module(name + "b", hostile) is True
    assert match_module("x." + name + "b", "**" + hostile) is True


def test_pattern_length_is_bounded():
    from cdka_search.patterns import MAX_PATTERN_CHARS, PatternError, compile_pattern

    assert compile_pattern("a*" * (MAX_PATTERN_CHARS // 2)).fullmatch("a" * 600)
    with pytest.raises(PatternError, match=f"limit is {MAX_PATTERN_CHARS}"):
        match_module("a", "*" + "a" * MAX_PATTERN_CHARS)
