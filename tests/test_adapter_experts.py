"""The expert adapter on tiny Mixtral, Qwen3-MoE and DeepSeek-V3 models: numerics against a materialised
per-expert torch.kron in float64, gradients, merge/unmerge, save/load, training, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cdka_search.adapter import adapter_modules, apply_plan, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from cdka_search.adapter.experts import CdkaExperts, ExpertAdapter
from cdka_search.candidates import Design
from cdka_search.errors import PlanError
from cdka_search.plan import Plan, PlanGroup
from cdka_search.spec import spec_from_module
from tiny_moe import EXPERTS, FAMILIES, HIDDEN, LAYERS, MOE_INTERMEDIATE, expert_plan, tiny_moe

F64 = torch.float64
IMPLEMENTATIONS = ("eager", "batched_mm")  # grouped_mm has no float64 kernel; see test_grouped_mm_in_float32


def _kron_delta(adapter: ExpertAdapter) -> torch.Tensor:
    """lambda * sum_i torch.kron(B[e, i], A[e, i]) for every expert, the slow obvious way."""
    per_expert = []
    for e in range(adapter.experts):
        dw = sum(torch.kron(adapter.cdka_B[e, i], adapter.cdka_A[e, i]) for i in range(adapter.r))
        per_expert.append(dw * adapter.scaling)
    return torch.stack(per_expert)


def _adapted(family: str, *, dtype=F64, implementation: str = "eager", seed: int = 0, **designs):
    """(base copy, adapted model) with random non-zero B so every expert's update is non-zero."""
    model = tiny_moe(family, experts_implementation=implementation).to(dtype)
    base = copy.deepcopy(model)
    apply_plan(model, expert_plan(**designs), dtype={F64: "float64", torch.float32: "float32"}[dtype])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.cdka_B.copy_(torch.randn(adapter.cdka_B.shape, generator=gen, dtype=F64) * 0.05)
    return base, model


def _reference(base: nn.Module, model: nn.Module) -> nn.Module:
    """``base`` with every adapted expert weight replaced by W + the materialised kron update."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, adapter in adapter_modules(model).items():
            owner, _, parameter = name.rpartition(".")
            delta = _kron_delta(adapter).to(ref.dtype)  # (E, d_out, d_in); gpt-oss stores (E, d_in, d_out)
            getattr(ref.get_submodule(owner), parameter).add_(delta.transpose(1, 2) if adapter.transposed else delta)
    return ref


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(seed))


def _train(model, ids: torch.Tensor, *, steps: int) -> list[float]:
    """The language-model loss before each of ``steps`` Adam steps (lr 1e-2) on the trainable parameters."""
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimiser.step()
    return losses


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_materialised_per_expert_kron_in_float64(family, implementation):
    base, model = _adapted(family, implementation=implementation)
    ref = _reference(base, model)
    ids = _ids()
    with torch.no_grad():
        got, want, plain = model(ids).logits, ref(ids).logits, base(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the update is not negligible
    assert (got - want).abs().max() < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_autograd_through_materialised_kron_in_float64(family):
    base, model = _adapted(family)
    adapters = adapter_modules(model)
    ref = copy.deepcopy(base)
    leaves = {}
    for name, adapter in adapters.items():
        a, b = adapter.cdka_A.detach().clone().requires_grad_(), adapter.cdka_B.detach().clone().requires_grad_()
        leaves[name] = (a, b)
        owner, _, parameter = name.rpartition(".")

        class Kron(nn.Module):
            def __init__(self, a, b, lam):
                super().__init__()
                self.a, self.b, self.lam = a, b, lam

            def forward(self, w):
                dw = torch.stack([sum(torch.kron(self.b[e, i], self.a[e, i]) for i in range(self.b.shape[1]))
                                  for e in range(self.b.shape[0])]) * self.lam
                return w + (dw.transpose(1, 2) if self.transposed else dw)

        kron = Kron(a, b, adapter.scaling)
        kron.transposed = adapter.transposed  # gpt-oss stores (E, d_in, d_out)
        nn.utils.parametrize.register_parametrization(ref.get_submodule(owner), parameter, kron)
    ids = _ids(2)
    model(ids).logits.square().mean().backward()
    ref(ids).logits.square().mean().backward()
    for name, adapter in adapters.items():
        a, b = leaves[name]
        assert b.grad.abs().max() > 0 and a.grad.abs().max() > 0
        assert (adapter.cdka_A.grad - a.grad).abs().max() < 1e-10
        assert (adapter.cdka_B.grad - b.grad).abs().max() < 1e-10
        assert adapter.cdka_A.grad.is_contiguous() and adapter.cdka_B.grad.is_contiguous()


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_mm_fallback_matches_materialised_kron_in_float64(family, monkeypatch):
    """grouped_mm where torch's kernel does not apply (float64): transformers' own fallback op."""
    import transformers.integrations.moe as moe

    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args, **kwargs: False)
    base, model = _adapted(family, implementation="grouped_mm")
    ref = _reference(base, model)
    ids = _ids()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert (got - want).abs().max() < 1e-10
    model(ids).logits.square().mean().backward()
    assert all(a.cdka_B.grad.abs().max() > 0 for a in adapter_modules(model).values())


def test_implementations_agree_and_grouped_mm_in_float32():
    outs = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        base, model = _adapted("mixtral", dtype=torch.float32, implementation=implementation)
        with torch.no_grad():
            outs[implementation] = model(_ids()).logits
    ref = _reference(base, model)
    with torch.no_grad():
        want = ref(_ids()).logits
    for implementation, got in outs.items():
        assert (got - want).abs().max() < 1e-5, implementation


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor a non-view op creates."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.shapes.append(tuple(t.shape))
        return out


def test_training_step_forms_no_per_expert_weight():
    """In the eager path no op creates a (d_out, d_in) tensor: dW is never formed, not even per expert.

    Five tokens, so that no activation (tokens of one expert x features) has a weight's shape.
    """
    _, model = _adapted("mixtral", dtype=torch.float32)
    weights = {(2 * MOE_INTERMEDIATE, HIDDEN), (HIDDEN, MOE_INTERMEDIATE)}
    with _Allocations() as seen:
        model(_ids()[:1, :5]).logits.square().mean().backward()
    assert seen.shapes
    assert not [s for s in seen.shapes if len(s) >= 2 and s[-2:] in weights]


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_folds_exactly_and_unmerge_restores(family):
    base, model = _adapted(family)
    ref = _reference(base, model)
    ids = _ids()
    before = {n: a.weight.detach().clone() for n, a in adapter_modules(model).items()}
    with torch.no_grad():
        unmerged = model(ids).logits
    assert merge_adapters(model) == 2 * LAYERS
    for name, adapter in adapter_modules(model).items():
        assert adapter.merged
        delta = _kron_delta(adapter).transpose(1, 2) if adapter.transposed else _kron_delta(adapter)
        assert (adapter.weight - (before[name] + delta)).abs().max() < 1e-14
    with torch.no_grad():
        merged = model(ids).logits
    assert (merged - ref(ids).logits).abs().max() < 1e-10
    assert (merged - unmerged).abs().max() < 1e-10
    assert unmerge_adapters(model) == 2 * LAYERS
    for name, adapter in adapter_modules(model).items():
        assert (adapter.weight - before[name]).abs().max() < 1e-14


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_onto_fresh_base_is_bit_exact(family, tmp_path):
    base, model = _adapted(family)
    path = save_adapter(model, tmp_path / "experts.safetensors")
    summary = load_adapter(base, path)
    assert summary.modules == tuple(adapter_modules(model))
    for name, adapter in adapter_modules(model).items():
        loaded = adapter_modules(base)[name]
        assert isinstance(loaded, ExpertAdapter)
        assert loaded.cdka_A.shape == (EXPERTS, *adapter.cdka_A.shape[1:])
        assert torch.equal(loaded.cdka_A, adapter.cdka_A) and torch.equal(loaded.cdka_B, adapter.cdka_B)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_only_adapters_get_gradients(family):
    model = tiny_moe(family, experts_implementation="grouped_mm")
    attention = PlanGroup(("model.layers.*.self_attn.o_proj",), (HIDDEN, HIDDEN), LAYERS, Design(4, 2, 4, 8, 2))
    summary = apply_plan(model, expert_plan(attention))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == summary.trainable_params == LAYERS * 2 * (4 * 2 + 4 * 8) + (
        LAYERS * EXPERTS * (2 * (24 + 16) + 3 * (12 + 16))
    )
    losses = _train(model, _ids(3), steps=15)
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.named_parameters():
        is_adapter = name.endswith(("cdka_A", "cdka_B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name


def test_plan_that_does_not_fit_the_experts_is_refused_and_model_untouched():
    model = tiny_moe("mixtral")
    wrong = PlanGroup(("model.layers.*.mlp.experts.gate_up_proj",), (2 * MOE_INTERMEDIATE, HIDDEN), LAYERS,
                      Design(6, 4, 4, 4, 2), "experts", experts=EXPERTS + 4)
    plan = expert_plan()
    plan = type(plan)(plan.model_name, plan.model_source, plan.total_params, plan.budget_spec, plan.budget_limit,
                      (wrong, plan.groups[1]))
    with pytest.raises(PlanError, match=r"model.layers.0.mlp.experts.gate_up_proj: the plan has experts 8x24x16 "
                                        r".* but the model has experts 4x24x16"):
        apply_plan(model, plan)
    assert not adapter_modules(model)
    assert all(p.requires_grad for p in model.parameters())
    as_linear = PlanGroup(("model.layers.*.mlp.experts.down_proj",), (HIDDEN, MOE_INTERMEDIATE), LAYERS,
                          Design(4, 3, 4, 4, 3))
    plan = type(plan)(plan.model_name, plan.model_source, plan.total_params, plan.budget_spec, plan.budget_limit,
                      (as_linear,))
    with pytest.raises(PlanError, match="the plan has linear 16x12 .* but the model has experts 4x16x12"):
        apply_plan(model, plan)


def test_gradient_aligned_init_sets_every_expert_as_a_linear_layer_of_that_gradient():
    from cdka_search.adapter import CdkaLinear

    model = tiny_moe("mixtral").to(F64)
    gen = torch.Generator().manual_seed(5)
    gradients = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in model.named_parameters() if p.dim() == 3}
    plan = expert_plan().with_adapter(init="gradient-aligned", dtype="float64")
    apply_plan(model, plan, gradients=gradients)
    for name, adapter in adapter_modules(model).items():
        assert torch.count_nonzero(adapter.cdka_B) > 0
        for e in range(EXPERTS):
            linear = CdkaLinear(nn.Linear(adapter.d_in, adapter.d_out), m1=adapter.m1, n1=adapter.n1, m2=adapter.m2,
                                n2=adapter.n2, r=adapter.r, dtype=F64, scaling=plan.adapter.scaling)
            linear.init_from_gradient(gradients[name][e])
            assert torch.equal(adapter.cdka_B[e], linear.cdka_B)
            assert torch.equal(adapter.cdka_A[e], linear.cdka_A)  # every component has s > 0: A set, not drawn


def test_gradient_aligned_init_needs_expert_shaped_gradients():
    model = tiny_moe("mixtral")
    gradients = {n: torch.zeros(p.shape[1:]) for n, p in model.named_parameters() if p.dim() == 3}
    with pytest.raises(PlanError, match=r"gradient for model.layers.0.mlp.experts.gate_up_proj has shape \(24, 16\), "
                                        r"expected \(4, 24, 16\) \(experts, d_out, d_in\)"):
        apply_plan(model, expert_plan().with_adapter(init="gradient-aligned"), gradients=gradients)
    assert not adapter_modules(model)


class _OddExperts(nn.Module):
    """Experts whose forward uses the stacked weight in a way the adapter does not follow (einsum)."""

    def __init__(self):
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(2, 6, 4))

    def forward(self, x):
        return torch.einsum("eoi,ni->neo", self.up_proj, x)


class _TransposedExperts(_OddExperts):
    is_transposed = True


def test_an_unfollowed_use_of_an_adapted_weight_is_an_error_not_a_dropped_update():
    model = nn.Sequential(_OddExperts())
    plan = expert_plan()
    group = PlanGroup(("0.up_proj",), (6, 4), 1, Design(3, 2, 2, 2, 1), "experts", experts=2)
    apply_plan(model, type(plan)("odd", "test", 48, "t", 1000, (group,)))
    assert isinstance(model[0], CdkaExperts)
    with pytest.raises(PlanError, match=r"_OddExperts.up_proj: the experts forward passes it to einsum"):
        model(torch.randn(3, 4))
    merge_adapters(model)
    assert model(torch.randn(3, 4)).shape == (3, 2, 6)  # merged: the base forward runs alone


def test_experts_stored_transposed_are_planned_in_d_out_d_in_orientation():
    """A stack marked is_transposed stores (E, d_in, d_out): the plan names its (d_out, d_in) shape, and a
    plan written in the stored orientation is a mismatch naming both shapes."""
    model = nn.Sequential(_TransposedExperts())  # up_proj stored (2, 6, 4): d_in 6, d_out 4
    assert [(t.name, t.shape, t.transposed) for t in spec_from_module(model).targets] == [("0.up_proj", (4, 6), True)]
    stored = PlanGroup(("0.up_proj",), (6, 4), 1, Design(3, 2, 2, 2, 1), "experts", experts=2)
    with pytest.raises(PlanError, match=r"0.up_proj: the plan has experts 2x6x4 .* but the model has experts 2x4x6"):
        apply_plan(model, Plan("odd", "test", 48, "t", 1000, (stored,)))
    assert not adapter_modules(model)
    logical = PlanGroup(("0.up_proj",), (4, 6), 1, Design(2, 3, 2, 2, 1), "experts", experts=2)
    apply_plan(model, Plan("odd", "test", 48, "t", 1000, (logical,)))
    assert adapter_modules(model)["0.up_proj"].transposed


def test_load_onto_adapted_moe_takes_the_stored_settings(tmp_path):
    base, model = _adapted("qwen3_moe")
    path = save_adapter(model, tmp_path / "experts.safetensors")
    apply_plan(base, expert_plan(), alpha=4.0, scaling="alpha/r", dtype="float32")
    load_adapter(base, path)
    for name, adapter in adapter_modules(base).items():
        assert adapter.cdka_A.dtype == F64 and adapter.scaling == adapter_modules(model)[name].scaling
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, model(ids).logits)


def test_experts_benchmark_runs_and_prints_its_table():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "benchmarks/experts_speed.py", "--experts", "4", "--hidden", "32", "--intermediate", "48",
         "--tokens", "16", "--repeats", "1"],
        cwd=root, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"base", "cdka", "peft-lora", "kron"}
    assert rows["base"][1] == "0"
    assert rows["cdka"][1] == rows["kron"][1] == f"{4 * 4 * (48 * 8 + 2 * 4 + 16 * 8 + 2 * 6):,}"  # E * r * (m1 n1 + m2 n2), both


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_base_with_float32_adapters(implementation):
    """The adapter keeps float32 factors and gradients on a bf16 base and adds what float32 adds (to bf16)."""
    base, model = _adapted("deepseek_v3", dtype=torch.float32, implementation=implementation)
    ref = _reference(base, model)
    model.to(torch.bfloat16)
    for adapter in adapter_modules(model).values():
        adapter.cdka_A.data, adapter.cdka_B.data = adapter.cdka_A.data.float(), adapter.cdka_B.data.float()
    ids = _ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    with torch.no_grad():
        want = ref(ids).logits
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - want).abs().max() < 0.05 * want.abs().max()
    for adapter in adapter_modules(model).values():
        assert adapter.cdka_B.grad.dtype == torch.float32 and torch.isfinite(adapter.cdka_B.grad).all()
        assert adapter.cdka_B.grad.abs().max() > 0


@pytest.mark.parametrize("family", ("mixtral", "qwen3_moe"))
def test_planned_moe_applies_trains_merges_saves_and_loads(family, tmp_path):
    """Issue 10's end-to-end check: the planner's own plan (spec_from_module lists the expert tensors)."""
    from cdka_search.planner import make_plan
    from cdka_search.spec import spec_from_module

    model = tiny_moe(family, experts_implementation="grouped_mm")
    plan = make_plan(spec_from_module(model), "20%")
    experts = [g for g in plan.groups if g.kind == "experts"]
    assert {g.modules[0].rsplit(".", 1)[-1] for g in experts} == {"gate_up_proj", "down_proj"}
    assert all(g.experts == EXPERTS for g in experts)
    summary = apply_plan(model, plan)
    assert summary.trainable_params == plan.used_params
    assert {n for n in summary.modules if ".experts." in n} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")}
    ids = _ids(4)
    losses = _train(model, ids, steps=10)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        path = save_adapter(model, tmp_path / "moe.safetensors")
        merge_adapters(model)
        assert (model(ids).logits - trained).abs().max() < 1e-4
        fresh = tiny_moe(family, experts_implementation="grouped_mm")
        load_adapter(fresh, path)
        assert torch.equal(fresh.eval()(ids).logits, trained)


def test_the_wrapped_experts_module_keeps_its_attributes():
    """MoE code reads num_experts, config, ... of its experts module; the wrapper answers with the base's."""
    model = tiny_moe("mixtral")
    apply_plan(model, expert_plan())
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, CdkaExperts)
    assert (experts.num_experts, experts.hidden_dim, experts.intermediate_dim) == (EXPERTS, HIDDEN, MOE_INTERMEDIATE)
    with pytest.raises(AttributeError, match="gate_up_proj is adapted by cdka"):  # its bare use would drop the update
        experts.gate_up_proj
