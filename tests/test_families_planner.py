"""Expert tensors in target selection, budgets and plan checks; no design as large as its weight."""

import dataclasses

import pytest

from cdka_search.budget import parse_budget
from cdka_search.candidates import Design
from cdka_search.errors import TargetError
from cdka_search.planner import make_plan, plan_problems
from cdka_search.spec import load_spec
from cdka_search.spec.model_spec import ModelSpec, TargetModule
from cdka_search.targets import coverage, select_targets

MIXTRAL = load_spec("mixtral-8x7b")
# A router that is an nn.Linear (as in models read through transformers): listed, not selected by default.
ROUTED = ModelSpec(
    "routed", "test", 10_000_000,
    (
        TargetModule("layers.0.attn.q_proj", 64, 64),
        TargetModule("layers.0.mlp.gate", 8, 64),
        TargetModule("layers.0.mlp.shared_expert_gate", 1, 64),
        TargetModule("layers.0.mlp.experts.gate_up_proj", 128, 64, "experts", 8),
        TargetModule("layers.0.mlp.shared_expert.up_proj", 64, 64),
        TargetModule("layers.0.moe.router.layer", 8, 64),  # JetMoE, GraniteMoE, DBRX: a router module's Linear
        TargetModule("layers.0.self_attention.experts.router.layer", 8, 64),  # JetMoE's attention experts' router
        TargetModule("layers.0.ffn.proj_up_gate", 176, 64),  # xLSTM: a projection named *_gate
        TargetModule("layers.0.attn.output_gate", 64, 64),  # MiniMax: an attention output gate
        TargetModule("layers.0.per_layer_input_gate", 16, 64),  # Gemma 4
    ),
)


def names(spec):
    return [t.name.rsplit(".", 1)[-1] for t in spec.targets]


def test_selections_include_experts_and_leave_routers_out():
    projections = ["proj_up_gate", "output_gate", "per_layer_input_gate"]
    assert names(select_targets(ROUTED, "all-linear")) == ["q_proj", "gate_up_proj", "up_proj", *projections]
    assert names(select_targets(ROUTED, "mlp")) == ["gate_up_proj", "up_proj", "proj_up_gate", "per_layer_input_gate"]
    assert names(select_targets(ROUTED, "experts")) == ["gate_up_proj"]
    assert names(select_targets(ROUTED, "attn")) == ["q_proj", "output_gate"]  # a router inside attention too is left out
    assert names(select_targets(ROUTED, "router.layer")) == ["layer", "layer"]  # named: a target
    assert names(select_targets(ROUTED, "mlp.gate,q_proj")) == ["q_proj", "gate"]  # named: a target


def test_experts_selection_on_a_dense_model_is_an_error():
    with pytest.raises(TargetError, match="selection 'experts' matches no module of llama-2-7b"):
        select_targets(load_spec("llama-2-7b"), "experts")


def test_matrices_count_every_expert():
    # Mixtral-8x7B: 32 layers x 8 experts of each expert shape; attention shapes once per layer
    assert MIXTRAL.matrices[(28672, 4096)] == 32 * 8
    assert MIXTRAL.matrices[(4096, 14336)] == 32 * 8
    assert MIXTRAL.shapes[(28672, 4096)] == 32


def test_lora_budget_counts_every_expert():
    experts = select_targets(MIXTRAL, "experts")
    budget = parse_budget("lora:8", total_params=MIXTRAL.total_params, targets=experts.targets)
    assert budget.limit == 32 * 8 * 8 * ((28672 + 4096) + (4096 + 14336))


def test_plan_pays_for_every_expert():
    plan = make_plan(MIXTRAL, "0.5%", targets="experts")
    assert plan.used_params == sum(g.count * g.experts * g.design.params for g in plan.groups)
    assert all(g.experts == 8 for g in plan.groups)
    assert 0.9 * plan.budget_limit <= plan.used_params <= plan.budget_limit


def test_plan_problems_name_an_oversized_design_and_a_wrong_expert_count():
    plan = make_plan(MIXTRAL, "0.5%", targets="experts")
    first = plan.groups[0]
    full = Design.from_paper(*first.shape, 1, first.shape[1], 1)  # B is the whole weight
    bad = dataclasses.replace(plan, groups=(dataclasses.replace(first, design=full, experts=4), *plan.groups[1:]))
    problems = plan_problems(bad, select_targets(MIXTRAL, "experts"))
    assert f"its design has {full.params:,} parameters per matrix, not fewer than the 28672x4096 weight's 117,440,512" in problems[0]
    assert any("the model has 8 experts, the plan says 4" in p for p in problems)


def test_coverage_figures():
    covered = coverage(MIXTRAL, select_targets(MIXTRAL, "attn"), "attn")
    experts = 32 * 8 * 3 * 14336 * 4096
    assert covered.left_out_params == experts
    assert covered.covered == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096)
    assert covered.unadaptable == (("model.layers.*.mlp.gate.weight", 32 * 8 * 4096),)  # the routers
    assert covered.covered + covered.left_out_params + covered.unadaptable_params + covered.other_params == MIXTRAL.total_params
    assert coverage(MIXTRAL, select_targets(MIXTRAL, "all-linear"), "all-linear").warnings() == []
