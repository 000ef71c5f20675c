"""`cdka probe` and `cdka plan --reference` end to end on a tiny local Llama (nothing downloaded)."""

import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LlamaForCausalLM saved twice: base and a 'fine-tuned' copy with perturbed weights."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(torch.ones(32, 48))
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    model.save_pretrained(root / "tuned")
    (root / "train.txt").write_text("the cat sat on the mat.\n\n" * 40)
    return root


def test_delta_probe_then_per_layer_plan(cli, tiny, tmp_path):
    ref = tmp_path / "delta.safetensors"
    result = cli("probe", "--delta", str(tiny / "base"), str(tiny / "tuned"), "-o", str(ref))
    assert result.exit_code == 0, result.output
    assert "delta reference for 14 modules" in result.stdout
    plan_file = tmp_path / "plan.yaml"
    planned = cli("plan", "-m", str(tiny / "base"), "-b", "2000", "--reference", str(ref), "--objective", "alignment", "-o", str(plan_file))
    assert planned.exit_code == 0, planned.output
    groups = yaml.safe_load(plan_file.read_text())["groups"]
    assert len(groups) == 14 and all(g["count"] == 1 for g in groups)  # per layer
    by_name = {g["modules"]: g for g in groups}
    # the all-ones update of down_proj is rank 1 and carries almost all energy: it is kept whole
    down = by_name["model.layers.1.mlp.down_proj"]
    assert down["scores"]["alignment"] == pytest.approx(1.0, abs=1e-4)
    assert down["params_each"] >= max(g["params_each"] for g in groups if g["modules"].endswith("down_proj"))


def test_gradient_probe(cli, tiny, tmp_path):
    ref = tmp_path / "grad.safetensors"
    result = cli("probe", "--grad", str(tiny / "base"), "--data", str(tiny / "train.txt"), "--batches", "2", "--seq-len", "16", "-o", str(ref))
    assert result.exit_code == 0, result.output
    from cdka_search.alignment.reference import load_reference

    grads = load_reference(ref)
    assert grads["model.layers.0.mlp.gate_proj"].shape == (48, 32)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--grad", "{base}", "--data", "{root}/missing.txt"], 9, "no such data file"),
        (["--grad", "{root}", "--data", "{root}/train.txt"], 3, "not a Hugging Face model folder"),
        (["--grad", "{base}"], 6, "--grad needs --data"),
        ([], 6, "exactly one of"),
        (["--delta", "{base}", "{root}/train.txt"], 6, "not a readable safetensors"),
    ],
)
def test_probe_bad_inputs(cli, tiny, tmp_path, args, code, message):
    out = tmp_path / "ref.safetensors"
    filled = [a.format(base=tiny / "base", root=tiny) for a in args]
    result = cli("probe", *filled, "-o", str(out))
    assert result.exit_code == code, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("mode", ["--delta", "--grad"])
def test_an_output_folder_is_refused_before_any_work(cli, tiny, tmp_path, mode):
    # inputs that would fail later (missing files): the output is judged first
    inputs = ["--delta", "missing-a", "missing-b"] if mode == "--delta" else ["--grad", "missing", "--data", "missing.txt"]
    result = cli("probe", *inputs, "-o", str(tmp_path))
    assert result.exit_code == 10, result.output
    assert result.stderr == f"error: {tmp_path} is a folder; give a file name\n"
    assert list(tmp_path.iterdir()) == []


def test_weightless_folder_and_corrupt_reference(cli, tiny, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny / "base" / "config.json").read_text())
    result = cli("probe", "--grad", str(folder), "--data", str(tiny / "train.txt"), "-o", str(tmp_path / "r.safetensors"))
    assert result.exit_code == 3 and "no safetensors weights" in result.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    planned = cli("plan", "-m", str(tiny / "base"), "-b", "2000", "--reference", str(bad), "-o", str(tmp_path / "p.yaml"))
    assert planned.exit_code == 6 and "not a readable safetensors" in planned.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_device_option_runs_the_same_code_on_the_cpu(cli, tiny, tmp_path):
    ref = tmp_path / "delta.safetensors"
    assert cli("probe", "--delta", str(tiny / "base"), str(tiny / "tuned"), "-o", str(ref)).exit_code == 0
    written = {}
    for device in ("cpu", "auto"):
        out = tmp_path / f"{device}.yaml"
        planned = cli("plan", "-m", str(tiny / "base"), "-b", "2000", "--reference", str(ref), "--device", device, "-o", str(out))
        assert planned.exit_code == 0, planned.output
        written[device] = yaml.safe_load(out.read_text())["groups"]
    if not torch.cuda.is_available():
        assert written["cpu"] == written["auto"]  # auto is the CPU here
    grads = tmp_path / "grad.safetensors"
    probed = cli("probe", "--grad", str(tiny / "base"), "--data", str(tiny / "train.txt"), "--batches", "1", "--seq-len", "8", "--device", "cpu", "-o", str(grads))
    assert probed.exit_code == 0, probed.output


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"), ("cuda:x", "expected auto, cpu, cuda or cuda:N")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device is available here")]),
)
def test_bad_devices_are_one_line(cli, tiny, tmp_path, device, message):
    ref = tmp_path / "delta.safetensors"
    assert cli("probe", "--delta", str(tiny / "base"), str(tiny / "tuned"), "-o", str(ref)).exit_code == 0
    out = tmp_path / "plan.yaml"
    planned = cli("plan", "-m", str(tiny / "base"), "-b", "2000", "--reference", str(ref), "--device", device, "-o", str(out))
    assert planned.exit_code == 6
    assert message in planned.stderr and planned.stderr.count("\n") == 1
    assert not out.exists()
    grads = tmp_path / "grad.safetensors"
    probed = cli("probe", "--grad", str(tiny / "base"), "--data", str(tiny / "train.txt"), "--device", device, "-o", str(grads))
    assert probed.exit_code == 6 and message in probed.stderr
    assert not grads.exists()


def test_extreme_but_finite_references_plan_as_at_a_normal_scale(cli, tiny, tmp_path):
    """A reference of finite entries up to 3e38, or down to 1e-30, plans: float32 squares overflowed to inf
    (exit 2, 'every allocation unit needs ... a finite weight') or underflowed to 0 ('every reference update
    is zero'). Energies are shares and weights ratios, so scaling the whole reference changes no plan."""
    import math

    from cdka_search.alignment.reference import load_reference, save_reference

    probed = tmp_path / "delta.safetensors"
    assert cli("probe", "--delta", str(tiny / "base"), str(tiny / "tuned"), "-o", str(probed)).exit_code == 0
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(t.shape, generator=gen) * (1 + i % 3) for i, (n, t) in enumerate(load_reference(probed).items())}
    top = math.frexp(max(float(t.abs().max()) for t in tensors.values()))[1]

    def plan(name, scale):
        ref = save_reference({n: t * scale for n, t in tensors.items()}, tmp_path / f"{name}.safetensors", "delta")
        out = tmp_path / f"{name}.yaml"
        planned = cli("plan", "-m", str(tiny / "base"), "-b", "lora:2", "--reference", str(ref), "--objective", "alignment", "-o", str(out))
        assert planned.exit_code == 0 and planned.stderr == "", planned.output
        return yaml.safe_load(out.read_text())

    normal = plan("normal", 1.0)
    assert len({g["params_each"] for g in normal["groups"]}) > 1
    assert plan("huge", 2.0 ** (128 - top)) == normal  # the largest entry in [1.7e38, 3.4e38)
    assert plan("small", 2.0**-100) == normal
    tiny_plan = plan("tiny", 1e-30)  # not a power of two: equal up to rounding
    for got, want in zip(tiny_plan["groups"], normal["groups"]):
        assert {k: v for k, v in got.items() if k != "scores"} == {k: v for k, v in want.items() if k != "scores"}
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    # The tester's file: one update of the probe's set to 3e38 everywhere, a rank-1 update the plan keeps whole.
    hostile = load_reference(probed)
    hostile["model.layers.0.self_attn.q_proj"].fill_(3e38)
    ref = save_reference(hostile, tmp_path / "hostile.safetensors", "delta")
    out = tmp_path / "hostile.yaml"
    planned = cli("plan", "-m", str(tiny / "base"), "-b", "lora:2", "--reference", str(ref), "-o", str(out))
    assert planned.exit_code == 0 and planned.stderr == "", planned.output
    groups = {g["modules"]: g for g in yaml.safe_load(out.read_text())["groups"]}
    assert groups["model.layers.0.self_attn.q_proj"]["scores"]["alignment"] == pytest.approx(1.0, abs=1e-4)


def test_a_weight_retyped_to_integers_is_refused(cli, tiny, tmp_path):
    """The tuned file's header gives q_proj I32 over its F32 bytes: probe wrote a 'delta' of energy 4.8e21, rc 0."""
    import json
    import shutil

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny / "tuned", tuned)
    file = tuned / "model.safetensors"
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert header[key]["dtype"] == "F32"
    header[key]["dtype"] = "I32"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    out = tmp_path / "d.safetensors"
    result = cli("probe", "--delta", str(tiny / "base"), str(tuned), "-o", str(out))
    assert result.exit_code == 6, result.output
    assert result.stderr == (f"error: tensor '{key}' in {file} is int32, not a floating-point weight; "
                             "a delta needs float weights in both checkpoints\n")
    assert not out.exists()


def test_identical_checkpoints_are_refused_up_front(cli, tiny, tmp_path):
    """probe --delta of one checkpoint twice wrote a zero reference (energy 0, no warning) that plan --reference refused."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny / "base", copy)
    out = tmp_path / "d.safetensors"
    result = cli("probe", "--delta", str(tiny / "base"), str(copy), "-o", str(out))
    assert result.exit_code == 6, result.output
    assert result.stderr == (f"error: the two checkpoints are identical on every target (14 modules of {tiny / 'base'} "
                             f"and {copy}): nothing to measure\n")
    assert not out.exists()
    # differing on two targets of fourteen is a reference (the others' updates are zero)
    assert cli("probe", "--delta", str(tiny / "base"), str(tiny / "tuned"), "-o", str(out)).exit_code == 0
