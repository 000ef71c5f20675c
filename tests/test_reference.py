"""Reference files: round trip, clear errors, checkpoint deltas and gradients on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cdka_search.alignment.reference import (
    delta_reference,
    gradient_reference,
    load_reference,
    save_reference,
)
from cdka_search.errors import ReferenceFileError, TargetError

transformers = pytest.importorskip("transformers")

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
]


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, vocab_size=64, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture()
def checkpoints(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    base = tiny_llama()
    tuned = tiny_llama()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for param in tuned.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=g))
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    tuned.save_pretrained(tmp_path / "tuned", safe_serialization=True, max_shard_size="20KB")
    return tmp_path / "base", tmp_path / "tuned", base, tuned


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    tensors = {"model.layers.0.mlp.up_proj": torch.randn(48, 32), "lm_head": torch.randn(64, 32)}
    path = save_reference(tensors, tmp_path / "ref.safetensors", "gradient")
    loaded = load_reference(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.safetensors"]  # no temporary left


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_reference_is_read_widened_to_bfloat16_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    values = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = save_reference({"model.layers.0.mlp.up_proj": values}, tmp_path / "ref.safetensors", "delta")
    loaded = load_reference(path)["model.layers.0.mlp.up_proj"]
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.float(), values.float())
    values[0, 0] = float("nan")
    with pytest.raises(ReferenceFileError, match="has NaN or infinite entries"):
        save_reference({"a": values}, tmp_path / "nan.safetensors", "delta")


def test_save_rejects_bad_kind_and_non_matrices(tmp_path: Path) -> None:
    with pytest.raises(ReferenceFileError, match="kind 'weights'"):
        save_reference({"a": torch.zeros(2, 2)}, tmp_path / "r.safetensors", "weights")
    with pytest.raises(ReferenceFileError, match="2-D float"):
        save_reference({"a": torch.zeros(2)}, tmp_path / "r.safetensors", "delta")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        (b"not a safetensors file at all", "not a readable safetensors"),
        ("no-metadata", "not a cdka reference"),
        ("truncated", "not a readable safetensors"),
    ],
)
def test_load_reports_bad_files(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "ref.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "no-metadata":
        save_file({"a": torch.zeros(2, 2)}, path)
    elif content == "truncated":
        save_reference({"a": torch.zeros(8, 8)}, path, "delta")
        path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ReferenceFileError, match=message):
        load_reference(path)


def test_delta_reference_is_exact_for_single_and_sharded_checkpoints(checkpoints) -> None:
    base_dir, tuned_dir, base, tuned = checkpoints
    assert (tuned_dir / "model.safetensors.index.json").is_file()  # the sharded layout is exercised
    deltas = delta_reference(base_dir, tuned_dir, MODULES)
    assert list(deltas) == MODULES
    for name in MODULES:
        expected = tuned.get_submodule(name).weight - base.get_submodule(name).weight
        assert torch.equal(deltas[name], expected.detach())
    # a single .safetensors file works as well as a folder
    same = delta_reference(base_dir / "model.safetensors", tuned_dir, MODULES[:1])
    assert torch.equal(same[MODULES[0]], deltas[MODULES[0]])


def test_delta_reference_names_the_module_on_errors(checkpoints, tmp_path: Path) -> None:
    base_dir, tuned_dir, _, _ = checkpoints
    with pytest.raises(ReferenceFileError, match="module model.layers.9.mlp.up_proj"):
        delta_reference(base_dir, tuned_dir, ["model.layers.9.mlp.up_proj"])
    other = tmp_path / "other.safetensors"
    save_file({f"{MODULES[0]}.weight": torch.zeros(16, 32)}, other)
    with pytest.raises(ReferenceFileError, match=f"module {MODULES[0]}: base weight has shape"):
        delta_reference(base_dir, other, MODULES[:1])
    with pytest.raises(ReferenceFileError, match="neither a .safetensors file nor a folder"):
        delta_reference(tmp_path / "missing", tuned_dir, MODULES[:1])


def test_delta_reference_transposes_conv1d(tmp_path: Path) -> None:
    # GPT-2 Conv1D stores weight as (d_in, d_out); the reference wants (d_out, d_in).
    before, after = torch.randn(8, 24), torch.randn(8, 24)
    save_file({"h.0.attn.c_attn.weight": before}, tmp_path / "a.safetensors")
    save_file({"h.0.attn.c_attn.weight": after}, tmp_path / "b.safetensors")
    deltas = delta_reference(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", ["h.0.attn.c_attn"],
        conv1d_names=["h.0.attn.c_attn"],
    )
    assert torch.equal(deltas["h.0.attn.c_attn"], (after - before).T)


def test_gradient_reference_accumulates_target_grads_only() -> None:
    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 2, 10), generator=g)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    seen: list[tuple[int, int | None]] = []
    grads = gradient_reference(model, batches, MODULES, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    for name in MODULES:
        weight = model.get_submodule(name).weight
        assert grads[name].shape == weight.shape and grads[name].abs().sum() > 0
        assert weight.grad is None and weight.requires_grad  # flags restored, grads released
    assert all(p.grad is None for p in model.parameters())
    # the sum over batches equals the gradient of the summed losses
    single = gradient_reference(model, batches[:1], MODULES[:1])[MODULES[0]]
    second = gradient_reference(model, iter(batches[1:]), MODULES[:1])[MODULES[0]]
    assert torch.allclose(single + second, grads[MODULES[0]], atol=1e-6)


def test_gradient_reference_errors() -> None:
    model = tiny_llama()
    with pytest.raises(TargetError, match="no module named"):
        gradient_reference(model, [], ["model.layers.7.mlp"])
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ReferenceFileError, match="gave no loss"):
        gradient_reference(model, [{"input_ids": x}], MODULES[:1])
    assert all(p.requires_grad for p in model.parameters())


def test_index_without_weight_map_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ReferenceFileError, match="weight_map"):
        delta_reference(tmp_path, tmp_path, MODULES[:1])


def test_gradient_reference_releases_each_gradient_as_it_is_summed() -> None:
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    held = []
    grads = gradient_reference(
        model, [batch, batch], MODULES,
        progress=lambda i, n: held.append([model.get_submodule(m).weight.grad is not None for m in MODULES]),
    )
    assert held == [[False] * 3, [False] * 3]  # nothing accumulates on the weights themselves
    plain = tiny_llama()
    plain(**batch).loss.backward()
    reference = plain.get_submodule(MODULES[2]).weight.grad
    assert torch.allclose(grads[MODULES[2]], 2 * reference, atol=1e-6)  # two identical batches


def retyped(source: Path, target: Path, key: str, dtype: str) -> Path:
    """A copy of the safetensors file ``source`` whose header gives ``key`` another dtype over the same bytes."""
    raw = source.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    return target


def test_delta_reference_refuses_weights_that_are_not_floats(checkpoints, tmp_path: Path) -> None:
    base_dir, tuned_dir, base, _ = checkpoints
    key = f"{MODULES[0]}.weight"
    ints = retyped(base_dir / "model.safetensors", tmp_path / "ints.safetensors", key, "I32")  # F32 bytes read as I32
    message = f"tensor '{key}' in {ints} is int32, not a floating-point weight; a delta needs float weights in both checkpoints"
    with pytest.raises(ReferenceFileError) as raised:
        delta_reference(base_dir / "model.safetensors", ints, MODULES)
    assert str(raised.value) == message
    with pytest.raises(ReferenceFileError) as raised:
        delta_reference(ints, base_dir / "model.safetensors", MODULES)
    assert str(raised.value) == message
    flags = tmp_path / "bool.safetensors"
    save_file({key: torch.ones(32, 32, dtype=torch.bool)}, flags)
    with pytest.raises(ReferenceFileError, match=f"^tensor '{key}' in {flags} is bool, not a floating-point weight"):
        delta_reference(base_dir / "model.safetensors", flags, MODULES[:1])
    # A float8 checkpoint's weights mean something only with its scales: refused, not subtracted raw.
    eight = tmp_path / "fp8.safetensors"
    save_file({key: base.get_submodule(MODULES[0]).weight.detach().to(torch.float8_e4m3fn)}, eight)
    with pytest.raises(ReferenceFileError) as raised:
        delta_reference(eight, tuned_dir, MODULES[:1])
    assert str(raised.value) == (
        f"tensor '{key}' in {eight} is float8_e4m3fn: a float8 weight means something only with its checkpoint's "
        "scales; dequantize both checkpoints (to bfloat16) first"
    )
    # Floats of different precision are compared in float32: a bf16 base and its fp32 fine-tune.
    half = tmp_path / "bf16.safetensors"
    save_file({key: base.get_submodule(MODULES[0]).weight.detach().bfloat16()}, half)
    deltas = delta_reference(half, tuned_dir, MODULES[:1])
    tuned = delta_reference(base_dir, tuned_dir, MODULES[:1])[MODULES[0]] + base.get_submodule(MODULES[0]).weight.detach()
    assert torch.equal(deltas[MODULES[0]], tuned - base.get_submodule(MODULES[0]).weight.detach().bfloat16().float())


def test_identical_checkpoints_are_refused(checkpoints) -> None:
    base_dir, tuned_dir, _, _ = checkpoints
    with pytest.raises(ReferenceFileError) as raised:
        delta_reference(base_dir, base_dir / "model.safetensors", MODULES)
    assert str(raised.value) == (f"the two checkpoints are identical on every target (3 modules of {base_dir} and "
                                 f"{base_dir / 'model.safetensors'}): nothing to measure")
    assert len(delta_reference(base_dir, tuned_dir, MODULES)) == 3  # checkpoints that differ somewhere are measured
