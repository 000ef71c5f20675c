"""Conformance, family by family: cdka's tensor list for a tiny config is exactly what the real
transformers class builds on the meta device (names, shapes, order), and so are its targets and total."""

import json

import pytest

from cdka_search.errors import ConfigError
from cdka_search.planner import make_plan, plan_problems
from cdka_search.spec import load_spec, spec_from_module
from cdka_search.spec.families import FAMILIES, family_spec, family_tensors, unknown_fields
from cdka_search.spec.presets import PRESETS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# One tiny config per family, each setting the fields that change shapes to values unlike the
# defaults (head_dim != hidden / heads, GQA, biases, untied heads, MoE layer patterns, MLA ranks).
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, attention_bias=True, mlp_bias=True, vocab_size=128, tie_word_embeddings=False),
    "mistral": dict(hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=128, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=128, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=32, attention_bias=True, vocab_size=128, tie_word_embeddings=True),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                      mlp_only_layers=[3], vocab_size=128),
    "mixtral": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=24, num_local_experts=4, num_experts_per_tok=2, vocab_size=128),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, vocab_size=128),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=32, vocab_size=128, tie_word_embeddings=False),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, pad_token_id=0),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1,
                        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=12, vocab_size=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=100, n_positions=32, vocab_size=128),
    "bert": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 max_position_embeddings=40, type_vocab_size=3),
    "roberta": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    max_position_embeddings=40, type_vocab_size=1),
}
# Variants that take another code path of a family.
VARIANTS = {
    "deepseek_v3 q_lora_rank null": ("deepseek_v3", {**TINY["deepseek_v3"], "q_lora_rank": None, "attention_bias": True}),
    "gpt2 untied": ("gpt2", {**TINY["gpt2"], "tie_word_embeddings": False}),
    "gpt2 attribute_map names": ("gpt2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, n_inner=100,
                                              max_position_embeddings=32, vocab_size=128)),
    "mistral head_dim null": ("mistral", {**TINY["mistral"], "head_dim": None}),
    "llama head_dim null": ("llama", {**TINY["llama"], "head_dim": None}),
    "mixtral head_dim null": ("mixtral", {**TINY["mixtral"], "head_dim": None}),
    "llama kv null": ("llama", {**TINY["llama"], "num_key_value_heads": None}),
    "qwen2 kv null": ("qwen2", {**TINY["qwen2"], "num_key_value_heads": None}),
    "phi3 kv null": ("phi3", {**TINY["phi3"], "num_key_value_heads": None}),
    "deepseek_v3 kv null": ("deepseek_v3", {**TINY["deepseek_v3"], "num_key_value_heads": None}),
    "qwen3_moe no experts": ("qwen3_moe", {**TINY["qwen3_moe"], "num_experts": 0}),
    "deepseek_v3 all dense": ("deepseek_v3", {**TINY["deepseek_v3"], "first_k_dense_replace": 5}),
    # transformers builds the shared experts 0 wide: nothing to adapt there, and no error
    "deepseek_v3 no shared experts": ("deepseek_v3", {**TINY["deepseek_v3"], "n_shared_experts": 0}),
}
# A null where transformers fails on it is refused too, never read as "derive it".
NULL_FAILS = [(t, "head_dim") for t in ("qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3")] + [
    (t, "num_key_value_heads") for t in ("mistral", "mixtral", "qwen3_moe", "gemma2", "gemma3_text")
]
CASES = {**{k: (k, v) for k, v in TINY.items()}, **VARIANTS}
ENCODERS = ("bert", "roberta")


def meta_model(model_type: str, fields: dict):
    """The real transformers class of the config on the meta device (encoders: the base model with pooler)."""
    config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        if model_type in ENCODERS:
            return transformers.AutoModel.from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def meta_tensors(model_type: str, model) -> list[tuple[str, tuple[int, ...]]]:
    prefix = f"{model_type}." if model_type in ENCODERS else ""
    return [(prefix + n, tuple(p.shape)) for n, p in model.named_parameters()]


def live_targets(model_type: str, model) -> list:
    """spec_from_module's targets named as a task model names them; the base model's pooler is not
    an adapter target (task models such as RobertaForSequenceClassification have none)."""
    prefix = f"{model_type}." if model_type in ENCODERS else ""
    targets = spec_from_module(model).targets
    return [t.__class__(prefix + t.name, t.d_out, t.d_in, t.kind, t.experts) for t in targets if t.name != "pooler.dense"]


def config_dict(model_type: str, fields: dict) -> dict:
    return {"model_type": model_type, **fields}


def test_every_family_has_a_conformance_case():
    assert set(TINY) == set(FAMILIES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_lists_every_tensor_transformers_builds(case):
    model_type, fields = CASES[case]
    model = meta_model(model_type, fields)
    ours = [(t.name, t.shape) for t in family_tensors(config_dict(model_type, fields), FAMILIES[model_type], case)]
    assert ours == meta_tensors(model_type, model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_spec_equals_the_meta_module_spec(case, tmp_path):
    """Same target names, shapes, kinds, expert counts and total as spec_from_module of the real class,
    also when read from a config.json folder."""
    model_type, fields = CASES[case]
    model = meta_model(model_type, fields)
    config = config_dict(model_type, fields)
    assert unknown_fields(config, FAMILIES[model_type]) == []  # read by the family, not through transformers
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_spec(str(tmp_path))
    assert spec.source == "hf-config"
    assert list(spec.targets) == live_targets(model_type, model)
    assert spec.total_params == spec_from_module(model).total_params
    if model_type not in ENCODERS:  # (an encoder's pooler is a target of the base model, not of the family)
        assert spec.unadaptable == spec_from_module(model).unadaptable  # the routers of MoE families, else nothing


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_experts_are_targets_named_as_peft_target_parameters(model_type):
    spec = family_spec(config_dict(model_type, TINY[model_type]), FAMILIES[model_type], model_type, "test", model_type)
    experts = [t for t in spec.targets if t.kind == "experts"]
    assert experts, "MoE experts must be targets"
    first = experts[0]
    assert first.name.endswith(".mlp.experts.gate_up_proj") and first.experts == 4
    assert first.shape == (2 * (TINY[model_type].get("moe_intermediate_size") or TINY[model_type]["intermediate_size"]), 64)
    assert not any(t.name.endswith(".gate") for t in spec.targets)  # routers are counted, never targets


def test_phi3_fused_projections():
    spec = family_spec(config_dict("phi3", TINY["phi3"]), FAMILIES["phi3"], "phi3", "test", "phi3")
    by_name = {t.name: t.shape for t in spec.targets}
    assert by_name["model.layers.0.self_attn.qkv_proj"] == ((4 + 2 * 2) * 16, 64)
    assert by_name["model.layers.0.mlp.gate_up_proj"] == (2 * 96, 64)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_equals_meta_instantiation(preset):
    """Every preset's total and targets are the transformers meta instantiation of its config."""
    config = dict(PRESETS[preset])
    model_type = config.pop("model_type")
    model = meta_model(model_type, config)
    spec = load_spec(preset)
    assert spec.total_params == spec_from_module(model).total_params
    assert list(spec.targets) == live_targets(model_type, model)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": "4096"}, "'hidden_size': expected an integer, got '4096'"),
        ({"hidden_size": 4096.5}, "'hidden_size': expected an integer, got 4096.5"),
        ({"hidden_size": -8}, "'hidden_size': -8 is outside \\[1, 1,048,576\\]"),
        ({"hidden_size": 2**40}, "'hidden_size': 1099511627776 is outside \\[1, 1,048,576\\]"),
        ({"hidden_size": True}, "'hidden_size': expected an integer, got True"),
        ({"num_hidden_layers": 10**6}, "'num_hidden_layers': 1000000 is outside \\[1, 16,384\\]"),
        ({"num_attention_heads": 0}, "'num_attention_heads': 0 is outside"),
        ({"num_key_value_heads": 3}, "num_key_value_heads = 3 must divide num_attention_heads = 32"),
        ({"vocab_size": None}, "'vocab_size': expected an integer, got None"),
        ({"attention_bias": "yes"}, "'attention_bias' must be true or false"),
        ({"head_dim": 0}, "'head_dim': 0 is outside"),
    ],
)
def test_bad_config_values_are_one_error(tmp_path, fields, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **fields}, allow_nan=True))
    with pytest.raises(ConfigError, match=message):
        load_spec(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "gpt2", "n_embd": -8}, "config field 'n_embd': -8 is outside"),
        ({"model_type": "gpt2", "n_layer": "12"}, "config field 'n_layer': expected an integer, got '12'"),
        ({"model_type": "mixtral", "num_local_experts": None}, "config field 'num_local_experts': expected an integer, got None"),
        ({"model_type": "mixtral", "num_experts": 0}, "config field 'num_experts': 0 is outside"),
    ],
)
def test_errors_name_the_field_as_the_file_spells_it(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_spec(str(tmp_path))


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, 4096.0, "7", None, [4096]])
def test_bounded_int_refuses_non_integers(value):
    """Configs passed as dicts (the Python API, presets) get the same checks as config.json files,
    whose reader already refuses NaN and Infinity."""
    from cdka_search.spec.config_fields import bounded_int

    with pytest.raises(ConfigError, match="config field 'hidden_size': expected an integer, got"):
        bounded_int(value, "hidden_size", "cfg", 1, 2**20)


@pytest.mark.parametrize(("model_type", "key"), NULL_FAILS)
def test_null_is_refused_where_transformers_refuses_it(model_type, key, tmp_path):
    fields = {**TINY[model_type], key: None}
    with pytest.raises(Exception):  # noqa: B017 - transformers raises TypeError or its own validation error
        meta_model(model_type, fields)
    (tmp_path / "config.json").write_text(json.dumps(config_dict(model_type, fields)))
    with pytest.raises(ConfigError, match=f"config field '{key}' is null; set it or leave it out"):
        load_spec(str(tmp_path))


def test_unknown_field_goes_through_transformers_not_a_guess(tmp_path, monkeypatch):
    """A field the family does not know is read by transformers (exact); without transformers it is an error."""
    fields = {**TINY["llama"], "some_new_shape_field": 3}
    (tmp_path / "config.json").write_text(json.dumps(config_dict("llama", fields)))
    live = spec_from_module(meta_model("llama", TINY["llama"]))
    assert load_spec(str(tmp_path)).total_params == live.total_params
    import cdka_search.spec.torch_module as torch_module

    def no_transformers(*args, **kwargs):
        raise ImportError("transformers")

    monkeypatch.setattr(torch_module, "meta_spec_from_config", no_transformers)
    with pytest.raises(ConfigError, match="'some_new_shape_field' are unknown to the built-in llama family"):
        load_spec(str(tmp_path))


def test_a_zero_width_shared_expert_is_no_target_and_no_error(cli, tmp_path):
    """Qwen2-MoE at shared_expert_intermediate_size 0 (read through transformers, which builds and runs
    it): the 0-wide shared expert was refused as a weight with a side outside [1, 2^20], after a torch
    warning; it holds nothing to adapt, so it is no target, and the one output stays clean."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, vocab_size=128,
                                         shared_expert_intermediate_size=0)
    config.save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    assert spec.targets and not [t.name for t in spec.targets if "shared_expert." in t.name]
    assert {t.name.split(".")[-1] for t in spec.targets} >= {"q_proj", "gate_up_proj", "down_proj"}
    shown = cli("inspect", str(tmp_path))
    assert shown.exit_code == 0 and shown.stderr == ""


def test_tiny_mixtral_module_plans_its_experts():
    """A live tiny Mixtral (real weights, CPU): spec_from_module lists the expert tensors, a plan
    covers them with one design per tensor and every expert paid for, and the plan checks clean."""
    config = transformers.MixtralConfig(**TINY["mixtral"])
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    spec = spec_from_module(model, "tiny-mixtral")
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    plan = make_plan(spec, "10%")
    experts = [g for g in plan.groups if g.kind == "experts"]
    assert {g.modules[0] for g in experts} == {"model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj"}
    assert all(g.experts == 4 and g.count == 2 and g.params == 2 * 4 * g.design.params for g in experts)
    assert plan.used_params <= plan.budget_limit
    assert plan_problems(plan, spec) == []


MOE = ("mixtral", "qwen3_moe", "deepseek_v3")


def real_model(model_type: str, fields: dict):
    """A tiny real instance (CPU weights): a causal LM, or a sequence classifier for the encoders."""
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    if model_type in ENCODERS:
        return transformers.AutoModelForSequenceClassification.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_family_plan_applies_and_trains_one_step(model_type, tmp_path):
    """The family's spec (from config.json) plans a tiny real instance, expert tensors included, which
    trains one step."""
    from cdka_search.adapter import apply_plan

    (tmp_path / "config.json").write_text(json.dumps(config_dict(model_type, TINY[model_type])))
    spec = load_spec(str(tmp_path))
    plan = make_plan(spec, "20%")
    assert ("experts" in {g.kind for g in plan.groups}) == (model_type in MOE)
    model = real_model(model_type, TINY[model_type])
    summary = apply_plan(model, plan)
    model.eval()  # no dropout: the step is compared on the same function
    assert summary.trainable_params == plan.used_params
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids if model_type not in ENCODERS else torch.tensor([0, 1])

    def loss():
        return model(input_ids=ids, labels=labels).loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.005)
    before = loss()
    before.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_config_for_transformers_is_bounded_before_it_is_built(tmp_path):
    """A config of another model_type asking for absurd sizes is refused, not built (10^9 layers would hang)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "num_hidden_layers": 10**9}))
    with pytest.raises(ConfigError, match="'num_hidden_layers': 1000000000 is outside \\[0, 16,384\\]"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {"hidden_size": "wide"}}))
    with pytest.raises(ConfigError, match="\\(text_config\\): config field 'hidden_size': expected an integer, got 'wide'"):
        load_spec(str(tmp_path))


def test_per_layer_size_lists_are_read_and_each_entry_bounded(tmp_path):
    """Gemma 3n gives intermediate_size per layer: a list of bounded ints is read through transformers,
    a list with a bad entry, or longer than a model may have layers, is one ConfigError."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.Gemma3nTextConfig(
        hidden_size=64, intermediate_size=[128, 96, 128, 96], num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=128, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=16, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=2,
        layer_types=["sliding_attention", "full_attention"] * 2, activation_sparsity_pattern=[0.0] * 4,
    )
    config.save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    with torch.device("meta"):
        live = spec_from_module(transformers.AutoModelForCausalLM.from_config(config))
    assert (spec.total_params, spec.targets) == (live.total_params, live.targets)
    shapes = {t.name: t.shape for t in spec.targets}
    assert shapes["model.layers.0.mlp.up_proj"] == (128, 64) and shapes["model.layers.1.mlp.up_proj"] == (96, 64)
    data = json.loads((tmp_path / "config.json").read_text())
    for sizes, message in (([128, -1], "'intermediate_size': -1 is outside"), ([128, "wide"], "expected an integer, got 'wide'"),
                           ([1] * 20_000, "'intermediate_size' lists 20,000 values, more than 16,384 layers")):
        (tmp_path / "config.json").write_text(json.dumps({**data, "intermediate_size": sizes}))
        with pytest.raises(ConfigError, match=message):
            load_spec(str(tmp_path))


def test_sizes_inside_per_layer_objects_are_bounded(tmp_path):
    """Sub-configs listed per layer (DeciLM's block_configs) are checked like any other sub-config."""
    config = {"model_type": "nemotron-nas", "block_configs": [{"hidden_size": 64}, {"attention": {"num_attention_heads": -4}}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"\(block_configs\[1\]\) \(attention\): config field 'num_attention_heads': -4 is outside"):
        load_spec(str(tmp_path))


@pytest.mark.parametrize("model_type", MOE)
def test_saved_checkpoint_folds_per_expert_weights_into_expert_targets(model_type, tmp_path):
    """transformers 5 saves experts one 2-D weight per expert; the header spec folds them back into the
    built model's expert tensors, so a checkpoint, its config and the live model give one spec."""
    model = real_model(model_type, TINY[model_type])
    model.save_pretrained(tmp_path)
    from_header = load_spec(str(tmp_path / "model.safetensors"))
    live = spec_from_module(model)
    # A checkpoint also stores persistent buffers (DeepSeek-V3's router score-correction bias).
    assert from_header.total_params == sum(t.numel() for t in model.state_dict().values())
    assert set(from_header.targets) == set(live.targets)
    assert any(t.kind == "experts" and t.experts == 4 for t in from_header.targets)


def test_incomplete_per_expert_block_is_left_as_it_is():
    from cdka_search.spec.checkpoint_experts import fold_checkpoint_experts
    from cdka_search.spec.model_spec import TargetModule

    p = "model.layers.0.mlp.experts"
    complete = [TargetModule(f"{p}.{e}.{proj}", *shape) for e in range(2) for proj, shape in
                (("gate_proj", (8, 4)), ("up_proj", (8, 4)), ("down_proj", (4, 8)))]
    assert [(t.name, t.shape, t.experts) for t in fold_checkpoint_experts(complete)] == [
        (f"{p}.gate_up_proj", (16, 4), 2), (f"{p}.down_proj", (4, 8), 2)
    ]
    assert fold_checkpoint_experts(complete[:-1]) == complete[:-1]  # expert 1 lacks down_proj
    skipped = [t for t in complete if not t.name.startswith(f"{p}.0.")]
    assert fold_checkpoint_experts(skipped) == skipped  # experts must be numbered 0..E-1


def test_other_moe_architectures_list_experts_through_transformers(tmp_path):
    """Qwen2-MoE has no built-in family: the meta path lists its expert tensors, and its nn.Linear
    shared_expert_gate (a router) is listed but left out of all-linear."""
    from cdka_search.targets import select_targets

    transformers.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128,
    ).save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    by_name = {t.name: t for t in spec.targets}
    assert (by_name["model.layers.0.mlp.experts.gate_up_proj"].experts, by_name["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, (48, 64))
    assert by_name["model.layers.0.mlp.shared_expert_gate"].shape == (1, 64)
    chosen = {t.name for t in select_targets(spec, "all-linear").targets}
    assert "model.layers.0.mlp.shared_expert_gate" not in chosen and "model.layers.0.mlp.experts.down_proj" in chosen
    assert "model.layers.0.mlp.shared_expert_gate" in {t.name for t in select_targets(spec, "shared_expert_gate").targets}


def test_routers_by_position_and_projections_named_gate(tmp_path):
    """JetMoE's router is the Linear ``router.layer``: left out of all-linear. xLSTM's ``proj_up_gate`` is
    its FFN's up projection (a fifth of the model), not a router: in all-linear."""
    from cdka_search.targets import select_targets

    (tmp_path / "jetmoe").mkdir()
    transformers.JetMoeConfig(
        hidden_size=64, num_hidden_layers=1, num_key_value_heads=2, kv_channels=16, intermediate_size=96,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
    ).save_pretrained(tmp_path / "jetmoe")
    jetmoe = load_spec(str(tmp_path / "jetmoe"))
    assert {t.name: t.shape for t in jetmoe.targets}["model.layers.0.mlp.router.layer"] == (4, 64)
    assert not any(".router." in t.name for t in select_targets(jetmoe, "all-linear").targets)

    (tmp_path / "xlstm").mkdir()
    transformers.xLSTMConfig(hidden_size=64, num_heads=2, num_blocks=1, vocab_size=128).save_pretrained(tmp_path / "xlstm")
    chosen = {t.name: t.shape for t in select_targets(load_spec(str(tmp_path / "xlstm")), "all-linear").targets}
    assert chosen["backbone.blocks.0.ffn.proj_up_gate"] == chosen["backbone.blocks.0.ffn.proj_up"]


def test_a_config_only_an_image_text_to_text_class_builds_is_read(tmp_path):
    """Pix2Struct maps to no causal-LM or bare auto class: it is built as transformers'
    image-text-to-text model, and its spec is that model's."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.Pix2StructConfig(
        text_config=dict(hidden_size=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=100),
        vision_config=dict(hidden_size=32, d_kv=8, d_ff=64, num_hidden_layers=1, num_attention_heads=4, patch_embed_hidden_size=48),
    )
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.Pix2StructForConditionalGeneration(config)
    spec = load_spec(str(tmp_path))
    assert (spec.source, spec.total_params) == ("hf-config", spec_from_module(model).total_params)
    assert [t.name for t in spec.targets] == [t.name for t in spec_from_module(model).targets]
    assert any(t.name.startswith("encoder.") for t in spec.targets) and any(t.name.startswith("decoder.") for t in spec.targets)
