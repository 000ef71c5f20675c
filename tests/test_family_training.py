"""Family by family, a tiny real transformers model (weights on CPU, config made in test_families) gets a
plan made from its config-based spec applied and trains one step: the live spec equals the family's,
every target (experts included) is adapted, the loss is finite, only adapter factors get gradients,
every adapted module's output moves, and merge then unmerge gives the same outputs back."""

from __future__ import annotations

import pytest

from cdka_search.adapter import adapter_modules, apply_plan, merge_adapters, unmerge_adapters
from cdka_search.adapter.experts import ExpertAdapter
from cdka_search.planner import make_plan
from cdka_search.spec import spec_from_module
from cdka_search.spec.families import FAMILIES, family_spec
from test_families import ENCODERS, TINY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BUDGET = "5%"  # enough for a design on every target of every tiny config (asserted below)


def build(model_type: str):
    """The real class with random weights: a CausalLM, or for encoders a sequence classifier (the task
    model names its base ``bert.`` / ``roberta.``, as the family does)."""
    config = transformers.AutoConfig.for_model(model_type, **TINY[model_type])
    torch.manual_seed(0)
    if model_type in ENCODERS:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        return transformers.AutoModelForSequenceClassification.from_config(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def family_of_config(model_type: str):
    config = {"model_type": model_type, **TINY[model_type]}
    return family_spec(config, FAMILIES[model_type], model_type, "test", model_type)


def loss_of(model, model_type: str, ids: torch.Tensor) -> torch.Tensor:
    if model_type in ENCODERS:
        labels = torch.randint(0, 2, (ids.shape[0],), generator=torch.Generator().manual_seed(2))
        return model(ids, labels=labels).loss
    return model(ids, labels=ids).loss


def owner_of(model, name: str) -> str:
    """The module whose output an adapter changes: the CdkaLinear itself, or an expert parameter's experts module."""
    return name if name in dict(model.named_modules()) else name.rpartition(".")[0]


def record_calls(model, names: list[str], ids: torch.Tensor) -> tuple[dict[str, tuple], torch.Tensor]:
    """One forward of ``ids``: every adapted module's (module, args, kwargs, output), and the logits."""
    calls: dict[str, tuple] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(owner_of(model, name))

        def keep(module, args, kwargs, out, name=name):
            calls[name] = (module, args, kwargs, first(out).detach().clone())

        hooks.append(module.register_forward_hook(keep, with_kwargs=True))
    with torch.no_grad():
        logits = model(ids).logits.detach().clone()
    for hook in hooks:
        hook.remove()
    return calls, logits


def first(out):
    return out[0] if isinstance(out, tuple) else out


def rerun(call: tuple) -> torch.Tensor:
    """The module's output now, on the very input it had when recorded."""
    module, args, kwargs, _ = call
    with torch.no_grad():
        return first(module(*args, **kwargs))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def encoder_base_total(model, model_type: str) -> int:
    """The family counts the base model with its pooler (the number model cards quote);
    RobertaForSequenceClassification builds its base without one."""
    base = getattr(model, model_type)
    pooler = 0 if base.pooler is not None else TINY[model_type]["hidden_size"] * (TINY[model_type]["hidden_size"] + 1)
    return spec_from_module(base).total_params + pooler


def test_every_family_is_trained_here():
    assert set(TINY) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_family_plan_applies_and_trains_one_step(model_type):
    model = build(model_type)
    spec = family_of_config(model_type)

    live = spec_from_module(model)
    if model_type in ENCODERS:
        prefix = f"{model_type}."
        targets = [t for t in live.targets if t.name.startswith(prefix) and t.name != f"{prefix}pooler.dense"]
        assert targets == list(spec.targets)
        assert encoder_base_total(model, model_type) == spec.total_params
    else:
        assert list(live.targets) == list(spec.targets)
        assert live.total_params == spec.total_params

    plan = make_plan(spec, BUDGET)
    summary = apply_plan(model, plan)
    adapters = adapter_modules(model)
    names = sorted(adapters)
    assert names == sorted(t.name for t in spec.targets)  # every target, experts included, got a design
    assert summary.trainable_params == plan.used_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    expert_targets = [t for t in spec.targets if t.kind == "experts"]
    assert sum(isinstance(a, ExpertAdapter) for a in adapters.values()) == len(expert_targets)
    assert all(g.design.params < g.shape[0] * g.shape[1] for g in plan.groups)

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    before, logits_before = record_calls(model, names, ids)
    factors = {id(p) for a in adapters.values() for p in (a.cdka_A, a.cdka_B)}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = loss_of(model, model_type, ids)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) in factors:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name
    for name, adapter in adapters.items():
        grad_b = adapter.cdka_B.grad
        per_expert = grad_b.flatten(1).abs().amax(1) if isinstance(adapter, ExpertAdapter) else grad_b.abs().amax().reshape(1)
        assert (per_expert > 0).all(), f"{name}: a factor of B got no gradient"  # zero-B init: B moves first
    optimizer.step()

    after = {name: rerun(call) for name, call in before.items()}
    for name, (_, _, _, old) in before.items():
        assert (after[name] - old).abs().max() > 1e-6 * max(1.0, float(old.abs().max())), f"{name}: output unchanged by the step"
    trained = logits_of(model, ids)
    assert (trained - logits_before).abs().max() > 1e-6

    assert merge_adapters(model) == len(names)
    merged_logits, merged = logits_of(model, ids), {name: rerun(call) for name, call in before.items()}
    assert unmerge_adapters(model) == len(names)
    restored_logits, restored = logits_of(model, ids), {name: rerun(call) for name, call in before.items()}
    tol = 1e-5 * max(1.0, float(trained.abs().max()))
    assert (merged_logits - trained).abs().max() <= tol and (restored_logits - trained).abs().max() <= tol
    for name, out in after.items():
        tol = 1e-5 * max(1.0, float(out.abs().max()))
        assert (merged[name] - out).abs().max() <= tol and (restored[name] - out).abs().max() <= tol, name
