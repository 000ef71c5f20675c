"""Exports of plans over 3-D expert tensors: PEFT target_parameters for LoRA designs (checked by building
the real PEFT model and matching its outputs to cdka's), refusals by name for everything else."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiny_moe import HIDDEN, LAYERS, MOE_INTERMEDIATE, tiny_moe  # noqa: E402

from cdka_search.adapter import adapter_modules, apply_plan  # noqa: E402
from cdka_search.candidates import Design  # noqa: E402
from cdka_search.errors import ExportError  # noqa: E402
from cdka_search.export import export_plan, write_export  # noqa: E402
from cdka_search.plan import AdapterSettings, Plan, PlanGroup  # noqa: E402
from cdka_search.spec import spec_from_module  # noqa: E402

F64 = torch.float64


def moe_spec(model):
    """spec_from_module lists every 3-D expert parameter as a kind-experts target (checked here)."""
    spec = spec_from_module(model)
    experts = {(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() == 3}
    stored = {(t.name, (t.experts, t.d_in, t.d_out) if t.transposed else (t.experts, t.d_out, t.d_in))
              for t in spec.targets if t.kind == "experts"}
    assert stored == experts
    return spec


def lora(d_out, d_in, r):
    return Design(d_out, 1, 1, d_in, r)


def moe_plan(spec, *, gate_up=lora(2 * MOE_INTERMEDIATE, HIDDEN, 2), down=lora(HIDDEN, MOE_INTERMEDIATE, 3),
             adapter=AdapterSettings(), mlp="mlp"):
    groups = (
        PlanGroup(("model.layers.*.self_attn.q_proj",), (HIDDEN, HIDDEN), LAYERS, lora(HIDDEN, HIDDEN, 4)),
        PlanGroup((f"model.layers.*.{mlp}.experts.gate_up_proj",), (2 * MOE_INTERMEDIATE, HIDDEN), LAYERS, gate_up,
                  "experts", experts=4),
        PlanGroup((f"model.layers.*.{mlp}.experts.down_proj",), (HIDDEN, MOE_INTERMEDIATE), LAYERS, down,
                  "experts", experts=4),
    )
    return Plan("tiny-moe", spec.source, spec.total_params, "test", 10**6, groups, adapter)


def _copy_factors_into_peft(cdka_model, peft_model):
    """Set PEFT's LoRA weights to the cdka factors: for experts lora_A (E*r, d_in) rows e*r + i and
    lora_B (d_out, r*E) columns i*E + e, as PEFT's ParamWrapper reshapes them. PEFT takes an unmarked
    stack for (E, d_out, d_in); where cdka knows it is stored the other way round (Llama 4), PEFT's
    d_in is cdka's d_out, so cdka's B rows go into lora_A and its A rows into lora_B."""
    adapters = adapter_modules(cdka_model)
    seen = set()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            bare = name.removeprefix("base_model.model.").replace(".base_layer", "")
            key = f"{bare}.{module.parameter_name}" if hasattr(module, "parameter_name") else bare
            a, b = adapters[key].cdka_A, adapters[key].cdka_B
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if a.dim() == 4:  # experts: A (E, r, 1, d_in), B (E, r, d_out, 1)
                e, r = a.shape[:2]
                rows_a, rows_b = a[:, :, 0, :], b[:, :, :, 0]
                if adapters[key].transposed != getattr(module.get_base_layer(), "is_transposed", False):
                    rows_a, rows_b = rows_b, rows_a
                lora_a.copy_(rows_a.reshape(e * r, -1))
                lora_b.copy_(rows_b.permute(2, 1, 0).reshape(-1, r * e))
            else:
                lora_a.copy_(a[:, 0, :])
                lora_b.copy_(b[:, :, 0].T)
            seen.add(key)
    return seen


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize(("family", "adapter"), [("mixtral", AdapterSettings()), ("mixtral", AdapterSettings(alpha=8, scaling="alpha/r")),
                                               ("mixtral", AdapterSettings(scaling="fixed", scale=0.5)),
                                               ("gpt_oss", AdapterSettings()),  # experts stored (E, d_in, d_out)
                                               ("llama4", AdapterSettings())])  # the same, with no layout mark
def test_lora_on_experts_exports_to_target_parameters_and_computes_what_cdka_does(family, adapter, tmp_path):
    model = tiny_moe(family).to(F64)
    spec = moe_spec(model)
    mlp = "feed_forward" if family == "llama4" else "mlp"
    plan = moe_plan(spec, adapter=adapter, mlp=mlp)
    export = export_plan(plan, "peft", spec)
    (cfg,) = export.configs.values()
    assert cfg["target_parameters"] == [f"model.layers.{i}.{mlp}.experts.{p}" for p in ("gate_up_proj", "down_proj")
                                        for i in range(LAYERS)]
    assert cfg["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]
    assert cfg["lora_dropout"] == 0.0
    if cfg["rank_pattern"] and any(".experts." in k for k in cfg["rank_pattern"]):
        assert any("rank_pattern keys of target_parameters" in n for n in export.notes)
    assert export.trainable_params == plan.used_params == LAYERS * (4 * (16 + 16) + 4 * 2 * (24 + 16) + 4 * 3 * (16 + 12))
    write_export(export, out_dir=tmp_path)

    cdka_model = tiny_moe(family).to(F64)
    apply_plan(cdka_model, plan, dtype="float64")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_modules(cdka_model).values():
            layer.cdka_B.copy_(torch.randn(layer.cdka_B.shape, generator=gen, dtype=F64) * 0.1)
    wrapped = peft.get_peft_model(tiny_moe(family).to(F64), peft.PeftConfig.from_pretrained(str(tmp_path)))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == plan.used_params
    checked = 0
    for name, module in wrapped.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            bare = name.removeprefix("base_model.model.").replace(".base_layer", "")
            key = f"{bare}.{module.parameter_name}" if hasattr(module, "parameter_name") else bare
            ours = adapter_modules(cdka_model)[key]
            assert module.r["default"] == ours.r  # rank_pattern keys reach parameters despite PEFT's warning
            assert module.scaling["default"] == pytest.approx(ours.scaling, rel=1e-12)
            checked += 1
    assert checked == 3 * LAYERS
    assert len(_copy_factors_into_peft(cdka_model, wrapped)) == 3 * LAYERS
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, plain = cdka_model(ids).logits, wrapped(ids).logits, tiny_moe(family).to(F64)(ids).logits
    assert (ours - plain).abs().max() > 1e-3
    assert (ours - theirs).abs().max() < 1e-10


def test_kronecker_designs_and_dropout_on_experts_are_refused_by_name(tmp_path):
    model = tiny_moe("mixtral")
    spec = moe_spec(model)
    plan = moe_plan(spec, gate_up=Design(6, 4, 4, 4, 2))
    with pytest.raises(ExportError) as info:
        write_export(export_plan(plan, "peft", spec), out_dir=tmp_path / "out")
    assert "Kronecker designs on expert tensors (PEFT adapts 3-D expert parameters with LoRA only, so --family lora " \
           "for them): " \
           "model.layers.*.mlp.experts.gate_up_proj (r1 = 4, r2 = 4)" in str(info.value)
    assert "down_proj" not in str(info.value)
    plan = moe_plan(spec, adapter=AdapterSettings(dropout=0.1))
    with pytest.raises(ExportError, match=r"adapter.dropout on expert tensors \(PEFT's target_parameters LoRA takes "
                                          r"no dropout\): model.layers.\*.mlp.experts.gate_up_proj, "
                                          r"model.layers.\*.mlp.experts.down_proj"):
        export_plan(plan, "peft", spec)
    with pytest.raises(ExportError, match=r"LyCORIS cannot express 2 group\(s\) of this plan; 3-D expert tensors "
                                          r"\(LyCORIS adapts modules, not parameters.*\): "
                                          r"model.layers.\*.mlp.experts.gate_up_proj, model.layers.\*.mlp.experts.down_proj"):
        export_plan(moe_plan(spec), "lycoris", spec)
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_lora_moe_plan_and_refuses_a_kronecker_one_in_one_line(cli, tmp_path):
    import json

    folder = tmp_path / "mix"
    tiny_moe("mixtral").save_pretrained(folder)
    lora_plan, cdka_plan = tmp_path / "lora.yaml", tmp_path / "cdka.yaml"
    assert cli("plan", "-m", str(folder), "-b", "20%", "--family", "lora", "-o", str(lora_plan)).exit_code == 0
    assert cli("plan", "-m", str(folder), "-b", "20%", "-o", str(cdka_plan)).exit_code == 0
    out = tmp_path / "peft"
    result = cli("export", str(lora_plan), "--to", "peft", "--model", str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj"))
    refused = cli("export", str(cdka_plan), "--to", "peft", "--model", str(folder), "--out", str(tmp_path / "no"))
    assert refused.exit_code == 8
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: PEFT cannot express")
    assert "Kronecker designs on expert tensors" in refused.stderr and "Traceback" not in refused.output
    assert not (tmp_path / "no").exists()
    refused = cli("export", str(lora_plan), "--to", "lycoris", "--model", str(folder), "-o", str(tmp_path / "l.toml"))
    assert refused.exit_code == 8 and "3-D expert tensors (LyCORIS adapts modules" in refused.stderr
    assert refused.stderr.count("\n") == 1 and not (tmp_path / "l.toml").exists()


def _tiny_with_dense_layers(family):
    """MoE models whose layer 0 is a dense MLP (and, for DeepSeek-V3, with shared experts): PEFT 0.21
    rewrites target_modules ending in gate_proj/up_proj/down_proj for these model types."""
    common = {"vocab_size": 64, "hidden_size": HIDDEN, "num_hidden_layers": 3, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2}
    torch.manual_seed(0)
    if family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common, intermediate_size=32, moe_intermediate_size=MOE_INTERMEDIATE, n_routed_experts=4,
            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=MOE_INTERMEDIATE,
                                             num_experts=4, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[0])
        model = transformers.Qwen3MoeForCausalLM(config)
    model.set_experts_implementation("eager")
    return model


def _peft_adapters(wrapped):
    """{module or parameter name: (r, scaling)} of a PeftModel's "default" adapter."""
    out = {}
    for name, module in wrapped.named_modules():
        if isinstance(getattr(module, "r", None), dict) and "default" in module.r:
            bare = name.removeprefix("base_model.model.").replace(".base_layer", "")
            key = f"{bare}.{module.parameter_name}" if hasattr(module, "parameter_name") else bare
            out[key.removesuffix(".weight")] = (module.r["default"], module.scaling["default"])
    return out


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_moe_with_dense_layers_exports_what_peft_applies_exactly_or_nothing(family, tmp_path):
    from cdka_search.candidates import CandidateSpace
    from cdka_search.export.base import resolve_modules
    from cdka_search.planner import make_plan

    model = _tiny_with_dense_layers(family).to(F64)
    spec = moe_spec(model)
    plan = make_plan(spec, "lora:4", space=CandidateSpace(family="lora"))
    dense = {n for g, names in resolve_modules(plan, spec)[0] for n in names if ".mlp.gate_proj" in n or "shared_experts" in n}
    assert dense, "the plan adapts dense-layer MLPs (the case PEFT rewrites)"
    try:
        export = export_plan(plan, "peft", spec, model=model)
    except ExportError as exc:  # the other allowed outcome: refused by name, nothing written
        assert "PEFT would not apply" in str(exc) and "\n" not in str(exc)
        return
    write_export(export, out_dir=tmp_path)
    (cfg,) = export.configs.values()
    # peft 0.21 takes these modules for fused experts, so the export targets them as <module>.weight in
    # target_parameters; peft 0.22 applies them as listed. Either way PEFT must apply exactly the plan (below).
    for n in dense:
        assert (n in cfg["target_modules"]) != (f"{n}.weight" in cfg.get("target_parameters", [])), n
    wrapped = peft.get_peft_model(_tiny_with_dense_layers(family).to(F64), peft.PeftConfig.from_pretrained(str(tmp_path)))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == plan.used_params == export.trainable_params
    wanted = {n: (g.design.r, plan.adapter.scaling_value(g.design)) for g, names in resolve_modules(plan, spec)[0] for n in names}
    got = _peft_adapters(wrapped)
    assert got.keys() == wanted.keys()
    for name, (r, scaling) in wanted.items():
        assert got[name][0] == r and got[name][1] == pytest.approx(scaling, rel=1e-12), name
    # a module adapted through its weight computes W x + s B A x, as LoRA on the module would
    name = min(dense)
    (wrapper,) = [m for n, m in wrapped.named_modules() if n == f"base_model.model.{name}"]
    lin = wrapper.get_base_layer()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wrapper.lora_B["default"].weight.copy_(torch.randn(wrapper.lora_B["default"].weight.shape, generator=gen, dtype=F64))
        x = torch.randn(3, lin.in_features, generator=gen, dtype=F64)
        delta = wrapper.lora_B["default"].weight @ wrapper.lora_A["default"].weight * wrapper.scaling["default"]
        assert torch.allclose(wrapper(x), x @ (lin.weight + delta).T, atol=1e-10)


def test_cli_refuses_a_rewritten_moe_plan_with_dropout_in_one_line_and_exports_it_without(cli, tmp_path):
    import json

    folder = tmp_path / "dsv3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "n_group": 2, "topk_group": 1}))
    plan_file = tmp_path / "p.yaml"
    assert cli("plan", "-m", str(folder), "-b", "lora:8", "--family", "lora", "-o", str(plan_file)).exit_code == 0
    out = tmp_path / "peft"
    result = cli("export", str(plan_file), "--to", "peft", "--model", str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    rewritten = "model.layers.0.mlp.gate_proj.weight" in config.get("target_parameters", [])  # peft 0.21; 0.22 does not
    if rewritten:
        assert not any(n.endswith(("gate_proj", "up_proj", "down_proj")) for n in config["target_modules"])
    else:
        assert "model.layers.0.mlp.gate_proj" in config["target_modules"]

    with torch.device("meta"):
        base = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(folder)))
        wrapped = peft.get_peft_model(base, peft.PeftConfig.from_pretrained(str(out)))
    from cdka_search.plan import load_plan

    planned = load_plan(plan_file).used_params
    assert planned > 30_000  # lora:8 of this model, the MoE experts included
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == planned
    text = plan_file.read_text().replace("dropout: 0.0", "dropout: 0.1")
    assert text != plan_file.read_text()
    plan_file.write_text(text)
    # target_parameters (the expert tensors, and the modules peft 0.21 rewrites) take no dropout: refused in one line
    refused = cli("export", str(plan_file), "--to", "peft", "--model", str(folder), "--out", str(tmp_path / "no"))
    assert refused.exit_code == 8 and refused.stderr.count("\n") == 1, refused.output
    assert refused.stderr.startswith("error: PEFT") and "dropout" in refused.stderr
    assert not (tmp_path / "no").exists()
