"""The README's Python API walk-through, on a tiny LLaMA, through the top-level names only."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import cdka_search as cdka  # noqa: E402
from tiny import tiny_llama  # noqa: E402


def test_readme_api_flow(tmp_path):
    model = tiny_llama()
    spec = cdka.spec_from_module(model)
    plan = cdka.make_plan(spec, "lora:4")
    cdka.save_plan(plan, tmp_path / "plan.yaml")

    plan = cdka.load_plan(tmp_path / "plan.yaml")
    summary = cdka.apply_plan(model, plan)
    assert summary.trainable_params == plan.used_params
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.used_params

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    cdka.save_adapter(model, tmp_path / "adapter.safetensors")

    fresh = tiny_llama()  # same seed: the same base weights
    cdka.load_adapter(fresh, tmp_path / "adapter.safetensors")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained)
        assert cdka.merge_adapters(fresh) == len(plan.assign([t.name for t in spec.targets]))
        assert torch.allclose(fresh(input_ids=ids).logits, trained, atol=1e-5)
        cdka.unmerge_adapters(fresh)
        assert torch.allclose(fresh(input_ids=ids).logits, trained, atol=1e-5)
    assert isinstance(next(m for m in fresh.modules() if isinstance(m, cdka.CdkaLinear)), torch.nn.Module)


def test_gradient_aligned_init_from_a_probed_reference(tmp_path):
    """cdka probe --grad's file feeds apply_plan's gradient-aligned init; the first dW opposes G."""
    from cdka_search.alignment.reference import gradient_reference, load_reference, save_reference

    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    names = [t.name for t in cdka.spec_from_module(model).targets]
    grads = gradient_reference(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], names)
    save_reference(grads, tmp_path / "grad.safetensors", "gradient")

    plan = cdka.make_plan(cdka.spec_from_module(model), "lora:4").with_adapter(init="gradient-aligned")
    cdka.apply_plan(model, plan, gradients=load_reference(tmp_path / "grad.safetensors"))
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    dW, G = layer.delta_weight().detach().double(), grads["model.layers.0.mlp.down_proj"].double()
    assert float((dW * G).sum()) < 0  # a descent direction from step 0
    with pytest.raises(cdka.PlanError, match="no gradient was given"):
        cdka.apply_plan(tiny_llama(), plan, gradients={})
