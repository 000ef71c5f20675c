import json
import math
import struct
from pathlib import Path

import pytest

from cdka_search.errors import ModelSourceError
from cdka_search.spec import PRESETS, load_spec, spec_from_module
from cdka_search.spec.presets import ALIASES

DATA = Path(__file__).parent / "data"

# model-shapes.md, "total params" column
TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "tinyllama-1.1b": 1_100_048_384,
    "roberta-base": 124_645_632,
    "gpt2": 124_439_808,
    # transformers 5 on the meta device (tests/test_families.py rebuilds each preset that way)
    "llama-3.1-405b": 405_853_388_800,
    "mistral-nemo-12b": 12_247_782_400,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,
}


def write_header_only(path: Path, header: dict) -> Path:
    """A safetensors file whose data is a hole: the size the header claims, no disk used."""
    body = json.dumps(header).encode()
    end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        fh.truncate(8 + len(body) + end)
    return path


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_preset_totals_equal_model_shapes(name):
    assert load_spec(name).total_params == TOTALS[name]


def test_every_preset_is_tested():
    assert set(PRESETS) == set(TOTALS)


def test_llama_module_names_and_shapes():
    spec = load_spec("llama-2-70b")
    by_name = {t.name: t for t in spec.targets}
    assert len(spec.targets) == 80 * 7
    assert by_name["model.layers.0.self_attn.k_proj"].shape == (1024, 8192)  # 8 kv heads x 128
    assert by_name["model.layers.79.mlp.down_proj"].shape == (8192, 28672)
    assert not any("lm_head" in n or "embed" in n for n in by_name)


def test_gpt2_preset_is_conv1d_in_linear_orientation():
    spec = load_spec("gpt2")
    c_attn = next(t for t in spec.targets if t.name == "transformer.h.0.attn.c_attn")
    assert (c_attn.d_out, c_attn.d_in, c_attn.kind) == (2304, 768, "conv1d")


@pytest.mark.parametrize(("alias", "preset"), sorted(ALIASES.items()))
def test_aliases_resolve(alias, preset):
    assert load_spec(alias).name == preset


def test_product_owner_alias_is_the_paper_model():
    assert load_spec("llama").name == "llama-2-7b"


@pytest.mark.parametrize(
    ("model", "preset"),
    [("meta-llama/Llama-2-7b-hf", "llama-2-7b"), ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
     ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b"), ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"),
     ("google/gemma-2-9b", None), ("microsoft/phi-2", None)],
)
def test_a_hub_id_is_named_as_such_with_a_preset_of_its_name(model, preset):
    # cdka downloads nothing: the error says so, and offers a preset only where the repository's name,
    # less the parts that do not change shapes, is one.
    with pytest.raises(ModelSourceError) as raised:
        load_spec(model)
    hint = f"; the preset {preset!r} may have its shapes (see `cdka models`)" if preset else ""
    assert str(raised.value) == (
        f"{model}: no such file or folder, and cdka reads no Hugging Face Hub id (it downloads nothing): "
        f"put the model's config.json in a folder and pass the folder{hint}"
    )


def test_unknown_model_suggests_near_names():
    with pytest.raises(ModelSourceError, match="Did you mean: llama-2-7b"):
        load_spec("llama-2-7")


@pytest.mark.parametrize("name", ["llama-2-7b", "mistral-7b", "qwen2-7b", "gpt2"])
def test_config_json_gives_the_preset_spec(name):
    """Conformance: a local config.json and the preset describe the same model."""
    from_config = load_spec(str(DATA / name / "config.json"))
    preset = load_spec(name)
    assert from_config.targets == preset.targets
    assert from_config.total_params == preset.total_params
    assert load_spec(str(DATA / name)).targets == preset.targets  # the folder form


def test_an_encoder_config_is_read_as_the_class_its_architectures_name():
    """roberta-base's config names RobertaForMaskedLM: its MLM transform is a target and it has no pooler
    (the preset is the base model with its pooler, as a classifier starts from). The built-in family read
    every BERT config as that base: a BertModel config got 'bert.'-prefixed names its model lacks."""
    pytest.importorskip("transformers")
    masked, preset = load_spec(str(DATA / "roberta-base" / "config.json")), load_spec("roberta-base")
    assert [t for t in masked.targets if t.name != "lm_head.dense"] == list(preset.targets)
    assert [(t.name, t.shape) for t in masked.targets if t.name == "lm_head.dense"] == [("lm_head.dense", (768, 768))]
    assert masked.total_params == 124_697_433 == preset.total_params - (768 * 768 + 768) + (768 * 768 + 768) + 2 * 768 + 50265


def test_a_base_model_config_plans_the_names_its_model_has(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    config = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 100, "architectures": ["BertModel"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    live = transformers.BertModel(transformers.BertConfig(**config))
    spec = load_spec(str(tmp_path))
    assert [t.name for t in spec.targets] == [n for n, m in live.named_modules() if isinstance(m, torch.nn.Linear)]
    assert spec.total_params == sum(p.numel() for p in live.parameters())


def test_safetensors_header_gives_the_preset_spec(tmp_path):
    """Conformance: the published GPT-2 header (no weights) gives the preset's shapes and total."""
    header = json.loads((DATA / "gpt2" / "header.json").read_text())
    spec = load_spec(str(write_header_only(tmp_path / "model.safetensors", header)))
    preset = load_spec("gpt2")
    assert spec.total_params == preset.total_params
    assert [(t.name, t.shape, t.kind) for t in spec.targets] == [
        (t.name.removeprefix("transformer."), t.shape, t.kind) for t in preset.targets
    ]


def test_sharded_index(tmp_path):
    header = json.loads((DATA / "gpt2" / "header.json").read_text())
    names = [k for k in header if k != "__metadata__"]
    half = len(names) // 2
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        write_header_only(tmp_path / shard, {k: header[k] for k in part})
    index = {"metadata": {}, "weight_map": {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = load_spec(str(tmp_path))
    assert spec.total_params == TOTALS["gpt2"]
    assert len(spec.targets) == 48


@pytest.mark.parametrize(("place", "message"), [
    ({"h.0.attn.c_attn.weight": "b.safetensors"}, "1 tensor(s) are not in the shard the index names, e.g. 'h.0.attn.c_attn.weight' in b.safetensors (it is in a.safetensors)"),
    ({"h.99.mlp.c_fc.weight": "a.safetensors"}, "1 tensor(s) are not in the shard the index names, e.g. 'h.99.mlp.c_fc.weight' in a.safetensors"),
    (None, "tensor 'h.0.attn.c_attn.weight' is in two shards, a.safetensors and b.safetensors"),
])
def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path, place, message):
    """The index says where each tensor is; a tensor it lists that its shard lacks (loading would fail),
    or a tensor held by two shards (loading would keep one), is an error, not a silent merge."""
    header = json.loads((DATA / "gpt2" / "header.json").read_text())
    names = [k for k in header if k != "__metadata__"]
    half = len(names) // 2
    second = names[half:] if place is not None else ["h.0.attn.c_attn.weight", *names[half:]]
    write_header_only(tmp_path / "a.safetensors", {k: header[k] for k in names[:half]})
    write_header_only(tmp_path / "b.safetensors", {k: header[k] for k in second})
    weight_map = {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(names)}
    weight_map.update(place or {})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelSourceError) as refused:
        load_spec(str(tmp_path))
    assert str(refused.value) == f"{tmp_path / 'model.safetensors.index.json'}: {message}"


def test_live_and_meta_modules_match_the_config(tmp_path):
    """Conformance: a tiny real LlamaForCausalLM, its saved folder, its safetensors and its config agree."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    live = spec_from_module(model)
    from_config = load_spec(str(tmp_path))
    from_weights = load_spec(str(tmp_path / "model.safetensors"))
    assert live.targets == from_config.targets
    assert set(live.targets) == set(from_weights.targets)  # headers are stored alphabetically
    assert live.total_params == from_config.total_params == from_weights.total_params
    assert [t.shape for t in live.targets[:7]] == [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]


def test_unknown_model_type_goes_through_transformers_meta(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    config.save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    names = {t.name.split(".")[-1] for t in spec.targets}
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= names
    assert spec.source == "hf-config"


@pytest.mark.parametrize(
    ("config", "live"),
    [
        ({"model_type": "whisper", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
          "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 16, "pad_token_id": 1, "bos_token_id": 0,
          "eos_token_id": 2, "decoder_start_token_id": 0}, "WhisperForConditionalGeneration"),
        ({"model_type": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
          "max_position_embeddings": 32}, "BartForConditionalGeneration"),
    ],
)
def test_encoder_decoder_configs_plan_encoder_and_decoder(tmp_path, config, live):
    """AutoModelForCausalLM maps BART and Whisper to their decoder alone: the encoder was silently left out."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_spec(str(tmp_path))
    names = [t.name for t in spec.targets]
    assert "model.encoder.layers.0.self_attn.q_proj" in names and "model.decoder.layers.0.encoder_attn.q_proj" in names
    model = getattr(transformers, live)(transformers.AutoConfig.for_model(**config))
    assert spec.targets == spec_from_module(model).targets
    assert spec.total_params == sum(p.numel() for p in model.parameters())


def test_the_class_a_config_names_is_built_and_its_task_head_is_no_target(tmp_path):
    """A checkpoint of DebertaV2ForSequenceClassification names its modules deberta.encoder...: the base
    model's names would match none of them; the classifier is no target: it is trained whole (modules_to_save)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                          vocab_size=100, max_position_embeddings=32, num_labels=3,
                                          architectures=["DebertaV2ForSequenceClassification"])
    config.save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    assert spec.targets[0].name == "deberta.encoder.layer.0.attention.self.query_proj"
    assert all(t.name.startswith("deberta.") for t in spec.targets)
    assert spec.modules_to_save == (("pooler", 32 * 32 + 32), ("classifier", 3 * 32 + 3))
    assert spec.unadaptable == ()
    live = transformers.DebertaV2ForSequenceClassification(config)
    assert spec_from_module(live).targets == spec.targets
    assert spec.total_params == sum(p.numel() for p in live.parameters())
    # a pretrained head is a target, as PEFT's all-linear keeps it: only a new one (num_labels outputs) is not
    masked = spec_from_module(transformers.DebertaV2ForMaskedLM(config))
    assert [t.name for t in masked.targets if not t.name.startswith("deberta.")] == ["cls.predictions.transform.dense"]


@pytest.mark.parametrize("architectures", [["PreTrainedModel"], ["LlamaForCausalLM"], ["os.system"], [7], "DebertaV2Model"])
def test_an_architectures_entry_that_names_no_model_of_the_config_is_ignored(tmp_path, architectures):
    """A base class built an empty model ('no nn.Linear ... to adapt'); another model's class, a name
    transformers lacks, or a value that is not a list of names: the auto classes decide."""
    pytest.importorskip("transformers")
    config = {"model_type": "deberta-v2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 100, "architectures": architectures}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_spec(str(tmp_path)).targets[0].name == "encoder.layer.0.attention.self.query_proj"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not a readable JSON config"),
        (b'{"model_type": "llama", "hidden_size": 8}', "hidden_size 8 is not a multiple of num_attention_heads 32"),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
def test_corrupt_config(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelSourceError, match=message):
        load_spec(str(tmp_path / "config.json"))


LLAMA_7B = json.loads((Path(__file__).parent / "data" / "llama-2-7b" / "config.json").read_text())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # module counts and widths under names outside the known fields: refused before transformers builds them
        ({"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 10**6, "expansion_ratio": 2, "vocab_size": 1000},
         r"config field 'n_layers' is 1,000,000, more than 16,384$"),
        ({"model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 10**12, "num_layers": 2, "num_heads": 4, "vocab_size": 1000},
         r"config field 'd_ff' is 1,000,000,000,000, more than 1,048,576$"),
        ({"model_type": "qwen2_vl", "vision_config": {"depth": 10**6}, "text_config": {"hidden_size": 64}},
         r"\(vision_config\): config field 'depth' is 1,000,000, more than 16,384$"),
        # every field in range, their product not: the model as a whole is refused, naming its source
        ({**LLAMA_7B, "head_dim": 1 << 20, "num_attention_heads": 256, "num_key_value_heads": 256},
         r"describes a model of 140,742,079,287,296 parameters, outside \[1, 100,000,000,000,000\]$"),
        ({**LLAMA_7B, "head_dim": 1 << 19, "num_attention_heads": 8, "num_key_value_heads": 8},
         r"weight 'model.layers.0.self_attn.q_proj' is 4,194,304x4,096, a side outside \[1, 1,048,576\]$"),
    ],
)
def test_configs_describing_absurd_models_are_refused_at_load(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=message):
        load_spec(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "header length is impossible"),
        (struct.pack("<Q", 50) + b"{}", "header length is impossible"),
        (struct.pack("<Q", 5) + b"notjs", "not valid JSON"),
        (struct.pack("<Q", 24) + b'{"a.weight": {"x": 1}}  ', "needs exactly the keys data_offsets, dtype, shape"),
    ],
)
def test_corrupt_safetensors(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelSourceError, match=message):
        load_spec(str(path))


def test_missing_path():
    with pytest.raises(ModelSourceError, match="no such file"):
        load_spec("./does/not/exist.safetensors")


def _linear_subclasses():
    """Three nn.Linear subclasses that override forward: one still computes x W^T + b (as Falcon's
    FalconLinear does), one is block-diagonal over groups (DeepSeek-V4's o_a_proj), one returns scores."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class PlainAgain(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Grouped(nn.Linear):  # weight (groups * d_g, d_in / groups), applied group by group
        def forward(self, x):
            w = self.weight.view(2, -1, self.in_features).transpose(1, 2)
            return torch.bmm(x.reshape(-1, 2, self.in_features).transpose(0, 1), w).transpose(0, 1).flatten(1)

    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = PlainAgain(8, 6)
            self.grouped = Grouped(4, 6, bias=False)
            self.router = Router(8, 4, bias=False)
            self.proj = nn.Linear(6, 8)

    return Block


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_subclasses_with_their_own_forward_are_probed(device):
    torch = pytest.importorskip("torch")
    block_class = _linear_subclasses()
    with torch.device(device):
        block = block_class()
    state = torch.random.get_rng_state()
    spec = spec_from_module(block, "block")
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe draws nothing
    assert {t.name: t.shape for t in spec.targets} == {"plain": (6, 8), "proj": (8, 6)}
    assert dict(spec.unadaptable) == {"grouped.weight": 24, "router.weight": 32}
    assert spec.total_params == 6 * 8 + 6 + 24 + 32 + 8 * 6 + 8


def test_a_plan_naming_a_grouped_linear_is_refused_with_the_reason():
    from cdka_search.adapter import apply_plan
    from cdka_search.candidates import Design
    from cdka_search.errors import PlanError
    from cdka_search.plan import Plan, PlanGroup

    block = _linear_subclasses()()
    plan = Plan("block", "test", 10**4, "test", 10**3, (PlanGroup(("grouped",), (6, 4), 1, Design(3, 2, 2, 2, 1)),))
    with pytest.raises(PlanError, match="grouped: the plan has linear 6x4 .* but the model has a Grouped: its forward "
                                        "does not compute x W\\^T \\+ b"):
        apply_plan(block, plan)


def test_a_linear_subclass_with_a_packed_weight_is_probed_for_shape():
    """Quantized linears (bitsandbytes' Linear4bit) keep a packed integer weight and dequantize in
    forward: there is no x W^T to compare with, so the probe checks the output shape only."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Packed(nn.Linear):
        def __init__(self, d_in, d_out):
            super().__init__(d_in, d_out, bias=False)
            dense = self.weight.detach().clone()
            del self.weight
            self.register_parameter("weight", nn.Parameter(torch.zeros(d_out * d_in // 2, 1, dtype=torch.uint8), requires_grad=False))
            self.register_buffer("dense", dense)

        def forward(self, x):
            return x @ self.dense.T

    class Halved(Packed):
        def forward(self, x):
            return (x @ self.dense.T)[:, ::2]

    block = nn.Sequential(Packed(8, 6), Halved(8, 6))
    assert [t.name for t in spec_from_module(block).targets] == ["0"]
    from cdka_search.adapter import apply_plan, merge_adapters
    from cdka_search.errors import PlanError
    from cdka_search.planner import make_plan

    apply_plan(block, make_plan(spec_from_module(block), "lora:1"))
    assert block[0](torch.ones(2, 8)).shape == (2, 6)  # adapted: base output plus the update
    with pytest.raises(PlanError, match="cannot merge into a torch.uint8 weight of shape \\(24, 1\\)"):
        merge_adapters(block)


def test_multihead_attention_out_proj_is_no_target():
    """nn.MultiheadAttention multiplies by out_proj.weight itself: an adapter there would never run."""
    pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)
            self.proj = nn.Linear(16, 16)

    spec = spec_from_module(Block())
    assert [t.name for t in spec.targets] == ["proj"]
    assert dict(spec.unadaptable) == {"attn.in_proj_weight": 3 * 16 * 16, "attn.out_proj.weight": 16 * 16}


def test_weights_a_transformers_forward_reads_directly_are_no_targets():
    """Mamba's mixer multiplies by dt_proj.weight (transformers marks it with force_accelerate_hooks):
    an adapter there never ran, took budget, and merging it changed the output. It is no target, and
    its weight is reported uncovered; the decorator is found through the other wrappers of forward."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import functools

    from torch import nn

    from cdka_search.spec.torch_module import _hooked_children

    config = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2)
    spec = spec_from_module(transformers.MambaForCausalLM(config))
    names = {t.name for t in spec.targets}
    assert names == {f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in ("in_proj", "x_proj", "out_proj")}
    # uncovered, tallied by role: both layers' 32 x time_step_rank weights
    assert {name: n for name, n in spec.unadaptable if "dt_proj" in name} == {
        "backbone.layers.*.mixer.dt_proj.weight": 2 * 32 * config.time_step_rank}

    def hooked(child_module_names):  # the decorator's closure, as transformers writes it
        def decorator(forward_func):
            @functools.wraps(forward_func)
            def wrapped(self, *args, **kwargs):
                assert all(hasattr(self, name) for name in child_module_names[:1])
                return forward_func(self, *args, **kwargs)
            return wrapped
        return decorator

    def outer(forward):  # another decorator around it, holding the original in its closure only
        def new_forward(self, *args, **kwargs):
            return forward(self, *args, **kwargs)
        return new_forward

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.dt, self.up = nn.Linear(4, 8), nn.Linear(8, 8)

        @outer
        @hooked(["dt", "conv"])
        def forward(self, x):
            return self.up(x @ self.dt.weight.T)

    assert _hooked_children(Mixer.forward) == ("dt", "conv")
    assert [t.name for t in spec_from_module(Mixer()).targets] == ["up"]


@pytest.mark.parametrize(("tensors", "kind"), [
    ({"model.layers.0.mlp.down_proj.weight": ("U8", [4096, 1]), "model.layers.0.mlp.down_proj.weight.absmax": ("F32", [128]),
      "model.layers.0.mlp.down_proj.weight.quant_map": ("F32", [16])}, "bitsandbytes 4-bit"),
    ({"model.layers.0.mlp.down_proj.qweight": ("I32", [16, 64]), "model.layers.0.mlp.down_proj.qzeros": ("I32", [1, 8]),
      "model.layers.0.mlp.down_proj.scales": ("F16", [1, 64])}, "GPTQ or AWQ"),
])
def test_a_header_of_packed_quantized_weights_is_refused_by_name(tmp_path, tensors, kind):
    """A bitsandbytes 4-bit header was planned as 4096x1 layers (its packed bytes); GPTQ's said only
    "no 2-D weight tensors"."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * {"U8": 1, "F32": 4, "I32": 4, "F16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    path = write_header_only(tmp_path / "model.safetensors", header)
    first = min(n for n in tensors if n.endswith((".absmax", ".quant_map", ".qweight", ".qzeros")))
    with pytest.raises(ModelSourceError) as raised:
        load_spec(str(path))
    assert str(raised.value) == (
        f"safetensors: a {kind} checkpoint ('{first}'): its weights are stored packed, so the header does not give the "
        "layers' shapes; plan the model's folder (its config.json) or a float checkpoint"
    )


def test_a_quantized_config_is_planned_on_its_float_shapes_with_a_warning(tmp_path):
    from cdka_search.errors import CdkaWarning

    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    (tmp_path / "bnb").mkdir()
    (tmp_path / "bnb" / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.warns(CdkaWarning) as caught:
        quantized = load_spec(str(tmp_path / "bnb"))
    assert [str(w.message) for w in caught] == [(
        "bnb: its config loads the weights quantized (quant_method 'bitsandbytes'); the plan is made on their float shapes, "
        "and cdka's adapter applies to the model loaded without quantization; for quantized layers, export a --family lora "
        "plan with `cdka export --to peft` (PEFT's LoRA wraps them)"
    )]
    plain = load_spec(str(tmp_path / "plain"))
    assert quantized.targets == plain.targets and quantized.total_params == plain.total_params


def test_transformers_log_lines_become_cdka_warning_lines_and_its_logger_is_restored(tmp_path):
    """They reached stderr raw ("[transformers] Model config: ..."), ahead of cdka's output or its one error line."""
    pytest.importorskip("transformers")
    import logging

    from typer.testing import CliRunner

    from cdka_search.cli.app import app

    config = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 100, "bos_token_id": 5000, "eos_token_id": 5001}
    (tmp_path / "config.json").write_text(json.dumps(config))
    logger = logging.getLogger("transformers")
    before = (logger.handlers[:], logger.propagate)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"warning: {tmp_path}: transformers says: Model config: {key}_token_id must be `None` or an integer within the "
        f"vocabulary (between 0 and 99), got {value}. This may result in unexpected behavior."
        for key, value in (("bos", 5000), ("eos", 5001))
    ]
    assert (logger.handlers, logger.propagate) == before


def test_a_safetensors_header_with_a_byte_order_mark_is_refused_as_safetensors_refuses_it(tmp_path):
    """read_json drops a leading BOM (editors write one into config.json); safetensors refuses such a header."""
    body = b"\xef\xbb\xbf" + json.dumps({"layer.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(64))
    with pytest.raises(ModelSourceError) as raised:
        load_spec(str(path))
    assert str(raised.value) == f"{path}: corrupt safetensors header (it starts with a byte-order mark)"


def test_transformers_log_capture_overlapping_in_threads_leaves_the_logger_as_it_was():
    """Swapping the handler list back restored another call's collector: later warnings were swallowed."""
    pytest.importorskip("transformers")
    import logging
    import threading
    import warnings

    from cdka_search.spec.torch_module import _transformers_log_as_warnings

    logger = logging.getLogger("transformers")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with warnings.catch_warnings(record=True), _transformers_log_as_warnings(Path("a")):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with warnings.catch_warnings(record=True), _transformers_log_as_warnings(Path("b")):
            second_in.set()
            first_out.wait(10)

    with _transformers_log_as_warnings(Path("warm")):
        pass  # transformers' handler exists from here on
    before = [(h, list(h.filters)) for h in logger.handlers], logger.propagate
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert ([(h, list(h.filters)) for h in logger.handlers], logger.propagate) == before
