"""PEFT export: configs built by the real peft package on a tiny LLaMA train exactly the plan's parameters."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiny import tiny_llama  # noqa: E402

from cdka_search.candidates import CandidateSpace, Design  # noqa: E402
from cdka_search.errors import ExportError, PlanError  # noqa: E402
from cdka_search.export import export_plan, write_export  # noqa: E402
from cdka_search.export.lokr_shapes import (  # noqa: E402
    lokr_factor_pairs,
    lycoris_factorization,
    peft_factorization,
    peft_factors,
)
from cdka_search.export.peft import choose_factors  # noqa: E402
from cdka_search.plan import AdapterSettings, Plan, PlanGroup  # noqa: E402
from cdka_search.planner import make_plan  # noqa: E402
from cdka_search.spec import spec_from_module  # noqa: E402


def group_of(plan, name):
    """The plan group adapting a module of the wrapped model (PEFT prefixes base_model.model.)."""
    bare = name.removeprefix("base_model.model.")
    (group,) = [g for g in plan.groups if g.matches(bare)]
    return group


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_model(model, folder, names):
    """Build the exported configs: one adapter as a PeftModel, several as one PeftMixedModel."""
    from peft import PeftConfig, get_peft_model

    if names == [None]:
        return get_peft_model(model, PeftConfig.from_pretrained(str(folder)))
    configs = {n: PeftConfig.from_pretrained(str(folder / n)) for n in names}
    first, *rest = names
    wrapped = get_peft_model(model, configs[first], adapter_name=first, mixed=True)
    for n in rest:
        wrapped.add_adapter(n, configs[n])
    wrapped.set_adapter(names)
    return wrapped


@pytest.mark.parametrize(
    ("family", "budget"),
    [("lora", "lora:4"), ("lora", "5000"), ("lokr", "1200"), ("lokr", "3000"), ("lokr", "9000")],
)
def test_exported_config_trains_exactly_the_plans_parameters(tmp_path, family, budget):
    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, budget, space=CandidateSpace(family=family))
    export = export_plan(plan, "peft", spec, model=model)  # checked on the model rebuilt on meta: no note
    assert not any("not checked against PEFT" in n for n in export.notes)
    written = write_export(export, out_dir=tmp_path)
    assert export.trainable_params == plan.used_params
    names = [None] if len(written) == 1 else [p.parent.name for p in written]
    wrapped = peft_model(model, tmp_path, names)
    assert trainable(wrapped) == plan.used_params
    out = wrapped(input_ids=torch.randint(0, 64, (2, 8))).logits
    assert torch.isfinite(out).all()
    # PeftMixedModel's warning about pattern keys is false (the counts above match): the export says so
    patterned = len(written) > 1 and any(json.loads(p.read_text())["rank_pattern"] for p in written)
    assert any("PeftMixedModel's add_adapter warns" in n for n in export.notes) == patterned


def test_lora_scaling_equals_the_plans_lambda(tmp_path):
    model = tiny_llama()
    spec = spec_from_module(model)
    for adapter in (AdapterSettings(alpha=16), AdapterSettings(alpha=16, scaling="alpha/r"),
                    AdapterSettings(scaling="fixed", scale=0.75)):
        plan = make_plan(spec, "5000", space=CandidateSpace(family="lora"), adapter=adapter)
        write_export(export_plan(plan, "peft", spec), out_dir=tmp_path / adapter.scaling.replace("/", "_"))
        wrapped = peft_model(tiny_llama(), tmp_path / adapter.scaling.replace("/", "_"), [None])
        layers = {n: m for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
        assert len(layers) == sum(g.count for g in plan.groups)
        for name, layer in layers.items():
            g = group_of(plan, name)
            assert layer.r["default"] == g.design.r
            assert layer.scaling["default"] == pytest.approx(adapter.scaling_value(g.design), rel=1e-12)


def test_lokr_scaling_shapes_and_init_follow_the_plan(tmp_path):
    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, "9000", space=CandidateSpace(family="lokr"))
    export = export_plan(plan, "peft", spec)
    written = write_export(export, out_dir=tmp_path)
    names = [None] if len(written) == 1 else [p.parent.name for p in written]
    wrapped = peft_model(model, tmp_path, names)
    seen = 0
    for name, layer in wrapped.named_modules():
        if not hasattr(layer, "lokr_w1"):
            continue
        for adapter, w1 in layer.lokr_w1.items():
            g = group_of(plan, name)
            d = g.design
            assert tuple(w1.shape) == (d.m1, d.n1)  # B_i
            assert tuple(layer.lokr_w2[adapter].shape) == (d.m2, d.n2)  # A_i, full (not w2_a @ w2_b)
            assert layer.scaling[adapter] == pytest.approx(plan.adapter.scaling_value(d), rel=1e-12)
            assert torch.count_nonzero(w1) == 0  # B = 0, A Kaiming: the plan's init
            seen += 1
    assert seen == sum(g.count for g in plan.groups)


def test_a_lokr_config_added_to_a_mixed_model_keeps_every_w2_whole(tmp_path):
    # One factor-2 config holds w2 of 16 x 16 (q, k, v, o) and 64 x 16 (gate): a per-module r (16 and 64)
    # left gate with r 16 < 64 / 2 once add_adapter ignored rank_pattern: a low-rank w2 and 256 extra
    # parameters; one r per config (the largest, 64) keeps all of them whole
    model = tiny_llama(intermediate=128, layers=1, kv_heads=4)
    spec = spec_from_module(model)

    def group(name, factor):
        (target,) = [t for t in spec.targets if t.name == f"model.layers.0.{name}"]
        (m1, m2), (n1, n2) = peft_factorization(target.d_out, factor), peft_factorization(target.d_in, factor)
        return PlanGroup((target.name,), (target.d_out, target.d_in), 1, Design(m1, n1, m2, n2, 1))

    groups = (*(group(f"self_attn.{p}_proj", 2) for p in "qkvo"), group("mlp.gate_proj", 2),
              group("mlp.up_proj", -1), group("mlp.down_proj", -1))
    plan = Plan("tiny", "module", spec.total_params, "custom", 10**5, groups)
    written = write_export(export_plan(plan, "peft", spec, model=model), out_dir=tmp_path)
    names = sorted(p.parent.name for p in written)
    assert names == ["cdka_lokr", "cdka_lokr_f2"]
    assert json.loads((tmp_path / "cdka_lokr_f2" / "adapter_config.json").read_text())["r"] == 64
    wrapped = peft_model(model, tmp_path, names)  # cdka_lokr_f2 is the one added by add_adapter
    assert trainable(wrapped) == plan.used_params
    for name, layer in wrapped.named_modules():
        for adapter, w2 in getattr(layer, "lokr_w2", {}).items():
            d = group_of(plan, name).design
            assert tuple(w2.shape) == (d.m2, d.n2)
            assert layer.scaling[adapter] == pytest.approx(plan.adapter.scaling_value(d), rel=1e-12)


def test_keys_are_anchored_full_names():
    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, "5000", space=CandidateSpace(family="lora"), adapter=AdapterSettings(scaling="fixed", scale=1.0))
    (cfg,) = export_plan(plan, "peft", spec).configs.values()
    names = {t.name for t in spec.targets}
    assert set(cfg["target_modules"]) <= names
    assert cfg["alpha_pattern"], "fixed scaling needs per-rank alphas when ranks differ"
    for key in [*cfg["rank_pattern"], *cfg["alpha_pattern"]]:
        assert key.startswith("^") and key.endswith("$")


def test_refuses_what_peft_cannot_express_and_writes_nothing(tmp_path):
    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, "5000", space=CandidateSpace(r1=2, r2=2, r=2))
    with pytest.raises(ExportError) as info:
        write_export(export_plan(plan, "peft", spec), out_dir=tmp_path / "out")
    message = str(info.value)
    assert "model.layers.*.self_attn.q_proj (r = 2)" in message and "r > 1 Kronecker components" in message
    assert not (tmp_path / "out").exists()


def test_refuses_factor_shapes_lokr_never_builds():
    # 32 x 32: B = 2 x 2, A = 16 x 16 is factor 2 (divides) or 3 (search stops at 2)
    assert peft_factors(2, 2, 16, 16) == (2, 3)
    # PEFT does not sort a dividing factor, so B = 16 x 16, A = 2 x 2 is factor 16 (LyCORIS would sort it)
    assert peft_factors(16, 16, 2, 2) == (16,)
    # B = 4 x 16, A = 8 x 2 needs factor 4 on d_out and 16 on d_in: one factor cannot do both
    assert peft_factors(4, 16, 8, 2) == ()
    group = PlanGroup(("model.layers.0.self_attn.q_proj",), (32, 32), 1, Design(4, 16, 8, 2, 1))
    plan = Plan("tiny", "module", 10**6, "1%", 10**5, (group,))
    with pytest.raises(ExportError, match="no decompose_factor builds"):
        export_plan(plan, "peft")


def test_glob_plan_of_a_non_preset_needs_the_model():
    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, "lora:2", space=CandidateSpace(family="lora"))
    with pytest.raises(ExportError, match="--model"):
        export_plan(plan, "peft")
    other = spec_from_module(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)))
    with pytest.raises(PlanError):
        export_plan(plan, "peft", other)


def test_preset_plan_exports_offline_with_anchored_keys():
    from cdka_search.spec import load_spec

    plan = make_plan(load_spec("llama-2-7b"), "0.5%", space=CandidateSpace(family="lora"))
    export = export_plan(plan, "peft")
    (cfg,) = export.configs.values()
    assert len(cfg["target_modules"]) == 7 * 32  # model-shapes.md: 7 linear layers in each of 32 blocks
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 64.0
    assert json.loads(export.files[0].text) == cfg


@pytest.mark.parametrize("dim", [1, 7, 16, 48, 64, 127, 128, 250, 360, 768, 2304, 3584, 4096, 11008, 14336])
def test_factorization_replicas_match_the_installed_packages(dim):
    from peft.tuners.lokr.layer import factorization as peft_fact

    lyco = pytest.importorskip("lycoris.functional.general")
    for f in [-1, *range(1, 130)]:
        assert peft_factorization(dim, f) == peft_fact(dim, f)
        assert lycoris_factorization(dim, f) == lyco.factorization(dim, f)


def test_lokr_family_is_what_both_tools_build():
    # 32 x 32 (model-shapes-free check): factor -1 -> (4, 8) both sides -> r1 = 8, r2 = 4
    assert (8, 4) in lokr_factor_pairs(32, 32)
    for r1, r2 in lokr_factor_pairs(64, 32):
        m1, n1, m2, n2 = 64 // r1, r2, r1, 32 // r2
        assert peft_factors(m1, n1, m2, n2)


def test_choose_factors_prefers_fewest_configs():
    assert choose_factors({0: (-1, 4), 1: (4,), 2: (-1,)}) in ({0: 4, 1: 4, 2: -1}, {0: -1, 1: 4, 2: -1})
    assert set(choose_factors({0: (2, 4), 1: (4, 8), 2: (4,)}).values()) == {4}


def test_cli_checks_the_export_on_the_model_given_not_a_path_the_plan_recorded(cli, tmp_path):
    """The PEFT check built the model from the plan's recorded path: once that folder moved, --model
    NEW_FOLDER checked the plan's modules but the export was written unchecked."""
    made = tmp_path / "made"
    tiny_llama().config.save_pretrained(made)
    assert cli("plan", "-m", str(made), "-b", "lora:2", "--family", "lora", "-o", str(tmp_path / "plan.yaml")).exit_code == 0
    moved = made.rename(tmp_path / "moved")
    result = cli("export", str(tmp_path / "plan.yaml"), "--to", "peft", "--model", str(moved), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "not checked against PEFT" not in result.output
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2


def test_the_peft_check_is_bounded_by_the_modules_it_would_apply(monkeypatch):
    """PEFT's matching is quadratic in the adapted modules: a 14,336-module per-layer export ran for
    minutes. Above the bound the export is written unchecked, and says so."""
    import cdka_search.export.peft as peft_export

    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, "lora:2", space=CandidateSpace(family="lora"))
    checked = export_plan(plan, "peft", spec, model=model)
    assert not any("not checked" in n for n in checked.notes)
    monkeypatch.setattr(peft_export, "PEFT_CHECK_MODULES", 13)
    unchecked = export_plan(plan, "peft", spec, model=model)
    assert any(n.startswith("not checked against PEFT: 14 adapted modules, more than the 13") for n in unchecked.notes)
    assert unchecked.configs == checked.configs
