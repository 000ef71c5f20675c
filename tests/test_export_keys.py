"""Key checks of the exporters: the indexed lookups agree with each tool's own rule, and the exported
files of stored plans stay byte for byte what they were."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdka_search.export import export_plan
from cdka_search.export.base import (
    KeyIndex,
    anchored,
    fnmatch_matches,
    peft_key_matches,
    peft_target_matches,
    refusal,
)
from cdka_search.plan import load_plan
from cdka_search.spec import load_spec

GOLDEN = Path(__file__).parent / "data" / "export_golden"

NAMES = (
    "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    "q_proj", "xq_proj", "lm.q_proj.inner", "a[1].b", "a1.b", "a*b.c", "a.b$", "a.b", "weird\\.name", "end.",
)
KEYS = (
    *NAMES, *(anchored(n) for n in NAMES), *(re.escape(n) for n in NAMES), *(re.escape(n) + "$" for n in NAMES),
    "q_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj", "b", "c", "", "^q_proj$", "^self_attn.q_proj$",
    r"model\.layers\.\d+\.self_attn\.q_proj", r"^model\.layers\.1\..*", "q_proj|up_proj", r"a\$", "a.b\\$",
    "model.layers.*.self_attn.q_proj", "*.q_proj", "model.layers.1?.self_attn.q_proj", "a[1].b", "a[!x]*", "*",
)


def _is_regex(key: str) -> bool:
    try:
        re.compile(key)
    except re.error:
        return False
    return True


@pytest.mark.parametrize(
    ("method", "rule"),
    [("peft_target_hits", peft_target_matches), ("peft_pattern_hits", peft_key_matches), ("fnmatch_hits", fnmatch_matches)],
)
def test_indexed_hits_equal_the_tools_rule_over_every_name(method, rule):
    index = KeyIndex(NAMES)
    for key in KEYS:
        if method == "peft_pattern_hits" and not _is_regex(key):
            with pytest.raises(re.error):
                index.peft_pattern_hits(key)
            continue
        assert getattr(index, method)(key) == [n for n in NAMES if rule(key, n)], key


def test_a_name_ending_in_a_newline_takes_the_rules_own_path():
    names = ("a.b", "a.b\n")
    index = KeyIndex(names)
    assert index.peft_pattern_hits(anchored("a.b")) == [n for n in names if peft_key_matches(anchored("a.b"), n)] == ["a.b", "a.b\n"]


def test_anchored_keys_of_a_per_layer_model_each_hit_one_module():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(200)]
    index = KeyIndex(names)
    assert all(index.peft_pattern_hits(anchored(n)) == [n] for n in names)
    assert index.peft_target_hits("mlp.down_proj") == names
    assert index.peft_target_hits("layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("family", ["lora", "lokr"])
@pytest.mark.parametrize("target", ["peft", "lycoris"])
def test_exported_files_of_stored_plans_are_unchanged(family, target):
    if target == "lycoris":
        pytest.importorskip("tomli_w")
    export = export_plan(load_plan(GOLDEN / f"plan-{family}.yaml"), target, load_spec(str(GOLDEN)))
    folder = GOLDEN / f"{family}-{target}"
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(f.path for f in export.files) == expected
    for f in export.files:
        assert f.text.encode("utf-8") == (folder / f.path).read_bytes(), f.path


def test_refusal_of_a_per_layer_plan_stays_one_short_line():
    error = str(refusal("PEFT", {"r > 1 Kronecker components": [f"model.layers.{i}.mlp.up_proj (r = 6)" for i in range(3584)]}))
    assert error.startswith("PEFT cannot express 3584 group(s) of this plan; r > 1 Kronecker components: model.layers.0.")
    assert "model.layers.9.mlp.up_proj (r = 6) (and 3574 more)." in error and "model.layers.10." not in error
    assert "\n" not in error and len(error) < 1000
