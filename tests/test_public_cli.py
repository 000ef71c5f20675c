"""`cdka plan` from the command line on each public config.json folder of tests/data/public (no
weights): exit 0, the written plan's total is transformers' meta instantiation's (TOTALS, checked
against it in test_families_public), a 0.5% budget at least 90% spent, experts planned on MoE models."""

import pytest
import yaml

from test_families_public import MODELS, MOE, PUBLIC, TOTALS


@pytest.mark.parametrize("model", MODELS)
def test_cli_plan_on_public_config(cli, model, tmp_path):
    out = tmp_path / "plan.yaml"
    result = cli("plan", "-m", str(PUBLIC / model), "-b", "0.5%", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "coverage: the targets hold" in result.stdout and f"{TOTALS[model]:,}" in result.stdout
    plan = yaml.safe_load(out.read_text())
    assert plan["model"]["total_params"] == TOTALS[model] and plan["model"]["source"] == "hf-config"
    assert plan["budget"]["limit"] == TOTALS[model] // 200
    assert 0.9 * plan["budget"]["limit"] <= plan["budget"]["used"] <= plan["budget"]["limit"]
    experts = [g for g in plan["groups"] if g["kind"] == "experts"]
    assert bool(experts) == (model in MOE)
    for g in plan["groups"]:  # never a design as large as the weight it adapts
        assert g["params_each"] // g.get("experts", 1) < g["shape"][0] * g["shape"][1]
    assert sum(g["count"] * g["params_each"] for g in plan["groups"]) == plan["budget"]["used"]
