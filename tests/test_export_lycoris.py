"""LyCORIS export: the TOML preset parses, validates, and (when lycoris-lora installs) builds exactly the plan."""

from __future__ import annotations

from dataclasses import replace

import pytest
import tomllib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny import tiny_llama  # noqa: E402

from cdka_search.candidates import CandidateSpace, Design  # noqa: E402
from cdka_search.errors import ExportError  # noqa: E402
from cdka_search.export import export_plan, write_export  # noqa: E402
from cdka_search.plan import AdapterSettings, Plan, PlanGroup  # noqa: E402
from cdka_search.planner import make_plan  # noqa: E402
from cdka_search.spec import load_spec, spec_from_module  # noqa: E402


def build(model, preset_path, multiplier):
    lycoris = pytest.importorskip("lycoris")
    model.requires_grad_(False)
    network = lycoris.create_lycoris(model, multiplier, linear_dim=1, linear_alpha=1, algo="lokr", preset=str(preset_path))
    network.apply_to()
    return network


def multiplier_of(text: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith("# Use: create_lycoris"))
    return float(line.split("multiplier=")[1].split(",")[0])


# lokr 1200: every group has r2 = 4, one lambda (exact); lokr 9000: r2 in {1, 2, 4} (lambda not carried)
# mixed: the 1200 plan with its MLP groups turned into LoRA r = 2 (LoRA alpha divided by the multiplier)
@pytest.mark.parametrize(("family", "budget"), [("lokr", "1200"), ("lokr", "9000"), ("lora", "5000"), ("mixed", "1200")])
def test_preset_builds_exactly_the_plan(tmp_path, family, budget):
    model = tiny_llama()
    spec = spec_from_module(model)
    plan = make_plan(spec, budget, space=CandidateSpace(family="lokr" if family == "mixed" else family))
    if family == "mixed":
        groups = tuple(
            replace(g, design=Design.from_paper(*g.shape, 1, 1, 2)) if "mlp" in g.modules[0] else g for g in plan.groups
        )
        plan = replace(plan, groups=groups, budget_limit=10**6)
    export = export_plan(plan, "lycoris", spec)
    (path,) = write_export(export, out_dir=tmp_path)
    data = tomllib.loads(path.read_text())
    assert data == export.configs["preset"]
    assert len(data["name_algo_map"]) == sum(g.count for g in plan.groups)
    assert set(data["name_algo_map"]) <= {t.name for t in spec.targets}

    config_sdk = pytest.importorskip("lycoris.config_sdk")
    config_sdk.PresetConfig.from_dict(data, strict=True)  # every option is one lokr / lora understands
    multiplier = multiplier_of(path.read_text())
    exact = any("exactly" in n for n in export.notes)
    network = build(model, path, multiplier)
    assert sum(p.numel() for p in network.parameters() if p.requires_grad) == plan.used_params
    assert len(network.loras) == sum(g.count for g in plan.groups)
    for module in network.loras:
        name = module.lora_name.removeprefix("lycoris_")
        (g,) = [g for g in plan.groups if g.matches(next(n for n in data["name_algo_map"] if n.replace(".", "_") == name))]
        lam = plan.adapter.scaling_value(g.design)
        if g.design.is_lora:
            assert module.lora_down.weight.shape[0] == g.design.r
        else:
            assert tuple(module.lokr_w1.shape) == (g.design.m1, g.design.n1)
            assert tuple(module.lokr_w2.shape) == (g.design.m2, g.design.n2)
        if exact or g.design.is_lora:
            assert float(module.scale) * module.multiplier == pytest.approx(lam, rel=1e-9)
        else:  # documented limit: full-matrix LoKr runs at scale 1 x multiplier
            assert float(module.scale) == 1.0 and module.multiplier == multiplier
    out = model(input_ids=torch.randint(0, 64, (2, 8))).logits
    assert torch.isfinite(out).all()


def test_different_lambdas_are_noted_not_hidden():
    plan = make_plan(load_spec("llama-2-7b"), "0.2%", space=CandidateSpace(family="lokr"))
    lambdas = {plan.adapter.scaling_value(g.design) for g in plan.groups}
    export = export_plan(plan, "lycoris")
    text = export.files[0].text
    for g in plan.groups:
        assert g.modules[0] in text
    if len(lambdas) > 1:
        assert any("not carried" in n for n in export.notes) and "NOT exact" in text
    else:
        assert any("exactly" in n for n in export.notes)


def test_refuses_components_and_conv1d_and_writes_nothing(tmp_path):
    group = PlanGroup(("model.layers.0.self_attn.q_proj",), (32, 32), 1, Design.from_paper(32, 32, 2, 8, 3))
    conv = PlanGroup(("transformer.h.0.attn.c_attn",), (96, 32), 1, Design.from_paper(96, 32, 1, 1, 2), kind="conv1d")
    plan = Plan("tiny", "module", 10**6, "1%", 10**5, (group, conv))
    with pytest.raises(ExportError) as info:
        write_export(export_plan(plan, "lycoris"), out_dir=tmp_path / "out")
    assert "q_proj (r = 3)" in str(info.value) and "Conv1D (LyCORIS does not adapt it): transformer.h.0.attn.c_attn" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_dropout_goes_to_lora_entries_only():
    spec = spec_from_module(tiny_llama())
    plan = make_plan(spec, "5000", space=CandidateSpace(family="lora"), adapter=AdapterSettings(dropout=0.1))
    entries = export_plan(plan, "lycoris", spec).configs["preset"]["name_algo_map"]
    assert {e["dropout"] for e in entries.values()} == {0.1}


def test_unknown_target_names_the_choices():
    plan = make_plan(load_spec("gpt2"), "lora:2", space=CandidateSpace(family="lora"))
    with pytest.raises(ExportError, match="peft, lycoris"):
        export_plan(plan, "diffusers")
