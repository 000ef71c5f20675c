"""`cdka plan` / `cdka inspect` on MoE models: --targets experts, coverage figures, the left-out warning,
bad config values as one error line, and the preset path free of numpy and torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdka_search.plan import load_plan

PUBLIC = Path(__file__).parent / "data" / "public"


def test_targets_experts_plans_only_expert_tensors(cli, tmp_path):
    out = tmp_path / "plan.yaml"
    result = cli("plan", "-m", "mixtral-8x7b", "--targets", "experts", "-o", str(out))
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert [g["modules"] for g in doc["groups"]] == ["model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj"]
    for g in doc["groups"]:
        assert g["kind"] == "experts" and g["experts"] == 8 and g["count"] == 32
        assert g["params_each"] == 8 * g["r"] * (g["left"][0] * g["left"][1] + g["right"][0] * g["right"][1])
    assert doc["budget"]["used"] == sum(g["count"] * g["params_each"] for g in doc["groups"])
    assert result.stderr == ""  # experts hold 96.6% of Mixtral: nothing large is left out


def test_attention_only_on_mixtral_warns_naming_the_experts(cli, tmp_path):
    result = cli("plan", "-m", "mixtral-8x7b", "--targets", "attn", "-o", str(tmp_path / "p.yaml"))
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 96.6% of mixtral-8x7b's parameters are in weights --targets attn leaves out")
    # gate_up_proj holds 2 x 14336 x 4096 per expert, down_proj half that
    assert "experts.gate_up_proj (64.4%), model.layers.*.mlp.experts.down_proj (32.2%)" in lines[0]
    assert lines[0].endswith("include them with --targets all-linear")
    assert "coverage: the targets hold 2.9% of mixtral-8x7b's 46,702,792,704 parameters" in result.stdout
    # 0.5% of Mixtral is 233.5M on 1.34B attention weights: spent, but every design stays below its weight's size
    plan = load_plan(tmp_path / "p.yaml")
    assert all(g.design.params < g.shape[0] * g.shape[1] for g in plan.groups)


def test_inspect_reports_coverage_in_json(cli):
    result = cli("inspect", str(PUBLIC / "qwen3-30b-a3b"), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    cov = payload["coverage"]
    assert cov["total_params"] == 30_532_122_624 and cov["left_out_params"] == 0 and cov["warnings"] == []
    # the routers: 48 layers x 128 experts x 2048
    assert cov["unadaptable"] == [{"tensor": "model.layers.*.mlp.gate.weight", "params": 48 * 128 * 2048}]
    # 48 layers x (128 experts x 3 x 768 x 2048 + attention 2048 x (4096 + 512 + 512) + 4096 x 2048)
    assert cov["covered_params"] == 48 * (128 * 3 * 768 * 2048 + 2048 * (4096 + 2 * 512) + 4096 * 2048)
    rows = {r["module"]: r for r in payload["rows"]}
    assert rows["model.layers.*.mlp.experts.gate_up_proj"]["kind"] == "experts x128"
    assert rows["model.layers.*.mlp.experts.gate_up_proj"]["weights"] == 48 * 128 * 1536 * 2048


def test_bad_config_value_is_one_error_line(cli, tmp_path):
    """The line names the field as the file spells it (transformers' alias num_local_experts)."""
    config = json.loads((PUBLIC / "mixtral-8x7b" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": -1}))
    result = cli("plan", "-m", str(tmp_path), "-o", str(tmp_path / "plan.yaml"))
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: config field 'num_local_experts': -1 is outside [1, 16,384]"
    ]
    assert not (tmp_path / "plan.yaml").exists()


def test_moe_preset_plan_imports_neither_numpy_nor_torch(tmp_path):
    code = (
        "import sys; from cdka_search.cli.app import main; sys.argv = ['cdka', 'plan', '-m', 'qwen3-30b-a3b', '-o', %r]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'numpy' not in sys.modules and 'torch' not in sys.modules, [m for m in ('numpy', 'torch') if m in sys.modules]"
    ) % str(tmp_path / "plan.yaml")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "plan.yaml").is_file()


def test_weights_no_target_covers_are_named(cli, tmp_path):
    """JetMoE's experts (attention and MLP) are 3-D weights of modules whose forward also takes the expert
    sizes, so their layout cannot be watched: they are not targets, and the warning says so and that no
    option includes them."""
    transformers = pytest.importorskip("transformers")
    transformers.AutoConfig.for_model(
        "jetmoe", hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=32,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
    ).save_pretrained(tmp_path)
    result = cli("inspect", str(tmp_path))
    assert result.exit_code == 0, result.output
    # mlp.input_linear: 2 layers x 4 experts x 64 x 64 = 32,768 of 99,904 parameters
    assert result.stderr.strip().splitlines() == [
        f"warning: 82.0% of {tmp_path.name}'s parameters are in weights no cdka target covers: "
        "model.layers.*.mlp.input_linear.weight (32.8%), model.layers.*.mlp.output_linear.weight (16.4%), "
        "model.layers.*.self_attention.experts.input_linear.weight (16.4%), "
        "model.layers.*.self_attention.experts.output_linear.weight (16.4%); no --targets option includes them "
        "(docs/models.md)"
    ]


def test_budget_beyond_every_sane_design_is_reported_unspent(cli, tmp_path):
    """GPT-2's attention holds 28.3M weights; 50% of GPT-2 is 62.2M: no design may reach its weight's size,
    so most of the budget is reported as unspendable rather than poured into full-size designs. The
    automatic cap on r rises as far as the weights allow (the same plan as --max-r 4096); an explicit
    --max-r 64 stops earlier and the note says to raise it."""
    out = tmp_path / "p.yaml"
    result = cli("plan", "-m", "gpt2", "-b", "50%", "--targets", "attn", "-o", str(out))
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert doc["budget"]["limit"] == 62_219_904
    assert doc["budget"]["used"] < 12 * (2304 * 768 + 768 * 768)  # below the weights themselves
    unspent = doc["budget"]["limit"] - doc["budget"]["used"]
    assert "the budget cannot be spent usefully on these targets" in result.stdout
    assert f"so {unspent:,} parameters are left unspent" in result.stdout
    assert "raise --max-r" not in " ".join(result.stdout.split())  # only the weights' own size stops it
    uncapped = tmp_path / "uncapped.yaml"
    assert cli("plan", "-m", "gpt2", "-b", "50%", "--targets", "attn", "--max-r", "4096", "-o", str(uncapped)).exit_code == 0
    assert yaml.safe_load(uncapped.read_text())["groups"] == doc["groups"]
    result = cli("plan", "-m", "gpt2", "-b", "50%", "--targets", "attn", "--max-r", "64", "-o", str(out))
    assert yaml.safe_load(out.read_text())["budget"]["used"] < doc["budget"]["used"]
    assert "raise --max-r (now 64), widen --targets or lower the budget" in " ".join(result.stdout.split())


def test_a_lora_budget_above_rank_64_is_spent(cli, tmp_path):
    """3% of LLaMA-2-7B is LoRA of rank 80 on every linear: under a fixed cap of 64 components, 21% of it
    was left unspent; the automatic cap doubles to 128 and spends it."""
    out = tmp_path / "p.yaml"
    result = cli("plan", "-m", "llama", "-b", "3%", "--family", "lora", "-o", str(out))
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert doc["budget"]["used"] >= 0.999 * doc["budget"]["limit"]
    assert max(g["r"] for g in doc["groups"]) > 64
    assert "left unspent" not in result.stdout
    result = cli("plan", "-m", "llama", "-b", "3%", "--family", "lora", "--max-r", "64", "-o", str(out))
    assert yaml.safe_load(out.read_text())["budget"]["used"] == 64 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert "raise --max-r (now 64)" in " ".join(result.stdout.split())


def test_a_remainder_too_small_for_any_group_is_explained_and_per_layer_spends_it(cli, tmp_path):
    """GPT-2's MLP at 0.1% with LoRA: rank 1 everywhere costs 92,160 of 124,439; one more rank on the 12
    c_fc matrices costs 46,080, more than is left. The note says so (not that the budget is unspendable),
    and --per-layer, with one unit per module, spends it."""
    out = tmp_path / "p.yaml"
    result = cli("plan", "-m", "gpt2", "-b", "0.1%", "--targets", "mlp", "--family", "lora", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert ("32,279 parameters are left unspent: the cheapest larger design, on transformer.h.*.mlp.c_fc, costs "
            "46,080 more than its group has now; --per-layer spends it module by module") in " ".join(result.stdout.split())
    assert "cannot be spent usefully" not in result.stdout
    result = cli("plan", "-m", "gpt2", "-b", "0.1%", "--targets", "mlp", "--family", "lora", "--per-layer", "-o", str(out))
    doc = yaml.safe_load(out.read_text())
    assert doc["budget"]["used"] == 122_880 and "left unspent" not in result.stdout


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_experts_stored_transposed_are_planned_and_exported(cli, tmp_path, family):
    """gpt-oss keeps its experts (E, d_in, d_out) and marks them so; Llama 4 stores them the same way
    without the mark, and its forward shows it (bmm(x, W) over all experts). `cdka plan` lists them in
    (d_out, d_in) orientation, nothing large is reported left out, and a LoRA plan exports to PEFT's
    target_parameters."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=4)
    extra = dict(layer_types=["full_attention"] * 2) if family == "gpt_oss" else dict(intermediate_size_mlp=48)
    transformers.AutoConfig.for_model(family, **common, **extra).save_pretrained(tmp_path / family)
    mlp = "mlp" if family == "gpt_oss" else "feed_forward"
    out = tmp_path / "plan.yaml"
    result = cli("plan", "-m", str(tmp_path / family), "-b", "lora:2", "--family", "lora", "--targets", "experts", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "no cdka target covers" not in result.stderr
    doc = yaml.safe_load(out.read_text())
    assert {(g["modules"], tuple(g["shape"]), g["experts"]) for g in doc["groups"]} == {
        (f"model.layers.*.{mlp}.experts.gate_up_proj", (48, 32), 4), (f"model.layers.*.{mlp}.experts.down_proj", (32, 24), 4)}
    result = cli("export", str(out), "--to", "peft", "--model", str(tmp_path / family), "--out", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.{mlp}.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))


def test_a_multimodal_config_built_without_its_vision_part_says_so(cli, tmp_path):
    """transformers builds Llama 4's text model alone from a Llama4Config (text and vision sub-configs):
    the plan covers that model, and a warning says the vision part is neither counted nor planned.
    Gemma 3's full config builds the whole model, vision tower included, and says nothing."""
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=4, vocab_size=128)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    transformers.Llama4Config(text_config=text, vision_config=vision).save_pretrained(tmp_path / "llama4")
    out = tmp_path / "plan.yaml"
    result = cli("plan", "-m", str(tmp_path / "llama4"), "-b", "5%", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"warning: {tmp_path / 'llama4'}: transformers builds Llama4ForCausalLM from this config, without its "
        "vision_config: those parts are neither counted in the total nor planned"]
    assert yaml.safe_load(out.read_text())["model"]["total_params"] == 103_232  # the text model (130,912 with vision)
    transformers.AutoConfig.for_model(
        "gemma3", text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, vocab_size=300),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), mm_tokens_per_image=4,
    ).save_pretrained(tmp_path / "gemma3")
    result = cli("plan", "-m", str(tmp_path / "gemma3"), "-b", "5%", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "without its" not in result.stderr
    assert any(".vision_tower." in str(g["modules"]) for g in yaml.safe_load(out.read_text())["groups"])
