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
