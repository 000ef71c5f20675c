"""apply_plan, merge_adapters and unmerge_adapters on tiny real LLaMA and GPT-2 models built from configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cdka_search.adapter import (
    CdkaLinear,
    adapter_modules,
    applied_plan,
    apply_plan,
    merge_adapters,
    unmerge_adapters,
)
from cdka_search.errors import PlanError

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, intermediate: int = 48):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=intermediate, vocab_size=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def plan_for(model, budget="lora:4"):
    from cdka_search.planner import make_plan
    from cdka_search.spec import spec_from_module

    return make_plan(spec_from_module(model), budget=budget)


def tokens(seed: int = 0, batch: int = 4, length: int = 12):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_train_only_adapters(arch):
    model = BUILDERS[arch]()
    plan = plan_for(model)
    ids = tokens()
    before = model(ids).logits.detach()
    summary = apply_plan(model, plan)

    assert summary.trainable_params == plan.used_params
    assert len(summary.modules) == sum(g.count for g in plan.groups)
    assert set(summary.modules) == set(adapter_modules(model))
    expected_kind = "conv1d" if arch == "gpt2" else "linear"
    assert {m.kind for m in adapter_modules(model).values()} == {expected_kind}
    assert summary.total_params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".cdka_A", ".cdka_B")) for n in trainable)
    assert applied_plan(model) is plan
    # B = 0 at init: the adapted model computes exactly what the base model did
    assert torch.equal(model(ids).logits, before)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_exact_in_float64(arch):
    model = BUILDERS[arch]().double()
    apply_plan(model, plan_for(model), dtype="float64")
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            layer.cdka_B.normal_(std=0.05)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in adapter_modules(model).items()}
    ids = tokens(1)
    before = model(ids).logits
    assert merge_adapters(model) == len(weights)
    assert all(m.merged for m in adapter_modules(model).values())
    for name, layer in adapter_modules(model).items():
        dw = layer.delta_weight() if layer.kind == "linear" else layer.delta_weight().T
        assert torch.allclose(layer.base_layer.weight, weights[name] + dw, rtol=0, atol=1e-10)
    merged = model(ids).logits
    assert torch.allclose(merged, before, rtol=0, atol=1e-10)
    with torch.no_grad():  # merged: the forward no longer reads the factors
        for layer in adapter_modules(model).values():
            layer.cdka_B.add_(1.0)
    assert torch.equal(model(ids).logits, merged)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            layer.cdka_B.sub_(1.0)
    assert merge_adapters(model) == 0  # already merged: nothing to do
    assert unmerge_adapters(model) == len(weights)
    for name, layer in adapter_modules(model).items():
        assert torch.allclose(layer.base_layer.weight, weights[name], rtol=0, atol=1e-10)
    assert torch.allclose(model(ids).logits, before, rtol=0, atol=1e-10)


def test_mismatched_plan_leaves_model_untouched_and_names_module():
    plan = plan_for(tiny_llama(intermediate=48))
    model = tiny_llama(intermediate=64)
    state = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(PlanError) as info:
        apply_plan(model, plan)
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj" in message
    assert "48x32" in message and "64x32" in message
    assert not adapter_modules(model)
    assert applied_plan(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_kind_mismatch_is_reported():
    plan = plan_for(tiny_llama())
    groups = tuple(dataclasses.replace(g, kind="conv1d") if i == 0 else g for i, g in enumerate(plan.groups))
    with pytest.raises(PlanError, match=r"q_proj: the plan has conv1d 32x32 .* but the model has linear 32x32"):
        apply_plan(tiny_llama(), dataclasses.replace(plan, groups=groups))


def test_plan_for_more_layers_is_refused():
    model = tiny_llama()
    plan = plan_for(model)
    groups = tuple(dataclasses.replace(g, count=g.count + 1) for g in plan.groups)
    with pytest.raises(PlanError, match="matches 2 modules of the model, but the plan says 3"):
        apply_plan(model, dataclasses.replace(plan, groups=groups, budget_limit=10**9))
    assert not adapter_modules(model)


def test_applying_twice_is_refused():
    model = tiny_llama()
    plan = plan_for(model)
    apply_plan(model, plan)
    with pytest.raises(PlanError, match="already carries CDKA adapters"):
        apply_plan(model, plan)


def test_overrides_reach_layers_and_the_stored_plan():
    model = tiny_llama()
    plan = plan_for(model)
    summary = apply_plan(model, plan, alpha=8.0, scaling="alpha/r", dropout=0.1)
    layer = adapter_modules(model)[summary.modules[0]]
    assert layer.scaling == pytest.approx(8.0 / layer.r)
    assert isinstance(layer.dropout, torch.nn.Dropout) and layer.dropout.p == 0.1
    assert applied_plan(model).adapter.alpha == 8.0 and applied_plan(model).adapter.scaling == "alpha/r"
    with pytest.raises(PlanError, match="scaling"):
        apply_plan(tiny_llama(), plan, scaling="bogus")


def test_gradient_aligned_init_through_apply_plan():
    model = tiny_llama()
    plan = plan_for(model).with_adapter(init="gradient-aligned")
    with pytest.raises(PlanError, match="no gradient was given"):
        apply_plan(model, plan)
    assert not adapter_modules(model)
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    grads = {n: m.weight.grad.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model.zero_grad(set_to_none=True)
    apply_plan(model, plan, gradients=grads)
    for name, layer in adapter_modules(model).items():
        dw = layer.delta_weight()
        cos = (dw * -grads[name]).sum() / (dw.norm() * grads[name].norm())
        assert cos > 0.3, name  # points downhill (1.0 when R(G) has rank <= r)


def test_merge_without_adapters_is_an_error():
    with pytest.raises(PlanError, match="no CDKA adapters"):
        merge_adapters(tiny_gpt2())


def test_cdka_linear_is_the_replacement_and_keeps_base_names():
    model = tiny_gpt2()
    names_before = set(model.state_dict())
    apply_plan(model, plan_for(model))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, CdkaLinear) and layer.kind == "conv1d"
    names_after = set(model.state_dict())
    assert "transformer.h.0.attn.c_attn.base_layer.weight" in names_after
    assert "transformer.h.0.attn.c_attn.weight" in names_before
    assert {n for n in names_after - names_before if not n.endswith(("cdka_A", "cdka_B"))} == {
        n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        for n in names_before - names_after
    }


@pytest.mark.parametrize("enabled", [True, False])
def test_apply_pauses_the_cyclic_gc_while_building_and_restores_it_even_on_failure(monkeypatch, enabled):
    import gc

    model = tiny_llama()
    plan = plan_for(model)
    seen = []

    def failing_init(self, *args, **kwargs):
        seen.append(gc.isenabled())
        raise RuntimeError("out of memory")

    (gc.enable if enabled else gc.disable)()
    try:
        monkeypatch.setattr(CdkaLinear, "__init__", failing_init)
        with pytest.raises(RuntimeError, match="out of memory"):
            apply_plan(model, plan)
        assert seen == [False] and gc.isenabled() is enabled
        monkeypatch.undo()
        apply_plan(model, plan)
        assert gc.isenabled() is enabled and len(adapter_modules(model)) == 14
    finally:
        gc.enable()


def test_a_plan_dry_runs_on_a_meta_model_of_real_width():
    """A model too large to allocate can be built on the meta device, adapted and run for shapes: the
    adapter must not need autocast (the meta device has none) or real storage."""
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                      num_attention_heads=32, vocab_size=32000)  # LLaMA-2-7B widths
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = plan_for(model, "0.5%")
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.used_params
    logits = model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta")).logits
    assert (logits.device.type, tuple(logits.shape)) == ("meta", (1, 8, 32000))


def test_adapters_the_model_bypasses_are_named_after_a_backward_pass():
    """A forward that multiplies by a Linear's weight itself, unmarked, leaves that adapter without a
    gradient, and idle_adapters names exactly those (none in a LLaMA, none in a Mamba: transformers marks
    Mamba's dt_proj, so the spec no longer makes it a target)."""
    from torch import nn

    from cdka_search.adapter import idle_adapters
    from cdka_search.adapter.model import idle_warning

    class Bypassing(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.blocks = nn.ModuleList(nn.ModuleDict({"used": nn.Linear(32, 32), "read": nn.Linear(32, 32)}) for _ in range(2))

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block["used"](x) + x @ block["read"].weight.T
            return x.pow(2).mean()

    torch.manual_seed(0)
    model = Bypassing()
    apply_plan(model, plan_for(model, budget="lora:2"))
    ids = tokens()
    model(ids).backward()
    idle = idle_adapters(model)
    assert idle == ["blocks.0.read", "blocks.1.read"]
    assert idle_warning(idle, shown=1) == (
        "2 adapter(s) got no gradient and will not train: blocks.0.read and 1 more "
        "(the model reads their weight directly or does not use them; see docs/adapter.md)"
    )
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4)
    mamba = transformers.MambaForCausalLM(config)
    apply_plan(mamba, plan_for(mamba))
    mamba(input_ids=ids, labels=ids).loss.backward()
    assert idle_adapters(mamba) == []
    llama = tiny_llama()
    apply_plan(llama, plan_for(llama))
    llama(input_ids=ids, labels=ids).loss.backward()
    assert idle_adapters(llama) == []


def test_a_linear_built_from_tensor_sizes_is_planned_and_adapted_with_integer_sizes():
    """Some model code passes 0-d tensors as nn.Linear's sizes, and nn.Linear keeps them as they are
    (a vision tower in transformers 5.25 does): its spec and plan carry ints, and the adapter runs."""
    from cdka_search.spec import spec_from_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(torch.tensor(16), torch.tensor(24)), torch.nn.Linear(24, 16))
    spec = spec_from_module(model)
    assert [(t.name, t.shape) for t in spec.targets] == [("0", (24, 16)), ("1", (16, 24))]
    assert all(type(d) is int for t in spec.targets for d in t.shape)
    plan = plan_for(model, "lora:2")
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.used_params
    assert model(torch.randn(3, 16)).shape == (3, 16)


@pytest.mark.parametrize(("bad", "why"), [
    (lambda g: g.clone().fill_(float("nan")), "holds NaN or infinite values; its SVD would not converge"),
    (lambda g: g.tolist(), "is a list; expected a real floating-point tensor with values"),
    (lambda g: g.to(torch.complex64), "is a torch.complex64 tensor; expected a real floating-point tensor with values"),
    (lambda g: g.to(torch.int64), "is a torch.int64 tensor; expected a real floating-point tensor with values"),
    (lambda g: torch.empty_like(g, device="meta"), "is a torch.float32 tensor on the meta device; expected a real"),
])
def test_gradient_aligned_init_refuses_a_gradient_without_real_finite_values(bad, why):
    """NaN raised torch's LinAlgError, a list an AttributeError; complex and integer ones were taken."""
    model = tiny_llama()
    plan = plan_for(model).with_adapter(init="gradient-aligned")
    grads = {n: torch.randn(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    first = next(iter(plan.assign(grads)))
    grads[first] = bad(grads[first])
    before = snapshot(model)
    with pytest.raises(PlanError) as raised:
        apply_plan(model, plan, gradients=grads)
    assert str(raised.value).startswith(f"gradient for {first} {why}")
    assert not adapter_modules(model) and all(torch.equal(before[k], v) for k, v in snapshot(model).items())
