"""save_adapter / load_adapter: safetensors files holding only the factors, with the plan in the header."""

from __future__ import annotations

import json

import pytest
import torch

from cdka_search.adapter import (
    adapter_modules,
    apply_plan,
    load_adapter,
    merge_adapters,
    read_adapter,
    save_adapter,
)
from cdka_search.errors import PlanError

transformers = pytest.importorskip("transformers")

from test_adapter_model import plan_for, snapshot, tiny_gpt2, tiny_llama, tokens  # noqa: E402


def trained(model, steps: int = 3):
    """Apply the planner's plan and take a few AdamW steps so that every factor is non-trivial."""
    apply_plan(model, plan_for(model))
    ids = tokens()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_round_trip_onto_fresh_base_reproduces_outputs_exactly(build, tmp_path):
    model = trained(build(seed=5))
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    ids = tokens(9)
    expected = model(ids).logits

    fresh = build(seed=5)  # same base weights, no adapter
    summary = load_adapter(fresh, path)
    assert summary.trainable_params == model.cdka_plan.used_params
    assert torch.equal(fresh(ids).logits, expected)
    assert fresh.cdka_plan.to_dict() == model.cdka_plan.to_dict()


def test_file_holds_only_factors_and_the_plan(tmp_path):
    model = trained(tiny_llama())
    path = save_adapter(model, tmp_path / "a.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors layout, no pickle
    metadata = header.pop("__metadata__")
    assert metadata["format"] == "cdka-adapter" and metadata["cdka_adapter"] == "1"
    assert json.loads(metadata["cdka_plan"]) == model.cdka_plan.to_dict()
    layers = adapter_modules(model)
    assert set(header) == {f"{n}.{f}" for n in layers for f in ("cdka_A", "cdka_B")}
    first = next(iter(layers))
    assert header[f"{first}.cdka_A"]["shape"] == list(layers[first].cdka_A.shape)
    assert header[f"{first}.cdka_A"]["dtype"] == "F32"
    plan, tensors = read_adapter(path)
    assert plan.used_params == sum(t.numel() for t in tensors.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary file left


def test_overwrite_is_atomic_and_complete(tmp_path):
    model = trained(tiny_gpt2())
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old contents")
    save_adapter(model, path)
    assert read_adapter(path)[0].used_params == model.cdka_plan.used_params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_load_onto_model_with_matching_adapters_copies_values(tmp_path):
    source = trained(tiny_llama())
    path = save_adapter(source, tmp_path / "a.safetensors")
    target = tiny_llama()
    apply_plan(target, plan_for(target))
    load_adapter(target, path)
    ids = tokens(2)
    assert torch.equal(target(ids).logits, source(ids).logits)


@pytest.mark.parametrize("overrides", [
    {"alpha": 8.0},
    {"alpha": 8.0, "scaling": "alpha/r", "dropout": 0.3},
    {"scaling": "fixed", "scale": 0.5, "dtype": "float64"},
    {"dtype": "bfloat16", "alpha": 2.0},
])
def test_load_onto_adapted_model_takes_the_stored_settings(overrides, tmp_path):
    """Issue 11 class 13: the loaded model computes what the saved one did, whatever it was applied with."""
    source = trained(tiny_llama())
    path = save_adapter(source, tmp_path / "a.safetensors")
    stored = read_adapter(path)[0]
    target = tiny_llama()
    apply_plan(target, plan_for(target), **overrides)
    ids = tokens(2)
    with torch.no_grad():
        assert not torch.equal(target(ids).logits, source(ids).logits)
    load_adapter(target, path)
    target.eval()
    with torch.no_grad():
        assert torch.equal(target(ids).logits, source(ids).logits)
    assert target.cdka_plan == stored
    for name, layer in adapter_modules(target).items():
        reference = adapter_modules(source)[name]
        assert layer.scaling == reference.scaling and layer.alpha == reference.alpha
        assert layer.cdka_A.dtype == layer.cdka_B.dtype == torch.float32
        assert isinstance(layer.dropout, torch.nn.Identity)
    plan_again, tensors_again = read_adapter(save_adapter(target, tmp_path / "b.safetensors"))
    assert plan_again == stored
    tensors = read_adapter(path)[1]
    assert tensors.keys() == tensors_again.keys() and all(torch.equal(tensors[k], tensors_again[k]) for k in tensors)


def test_load_onto_adapted_model_with_other_designs_is_refused_and_changes_nothing(tmp_path):
    path = save_adapter(trained(tiny_llama()), tmp_path / "a.safetensors")
    target = tiny_llama()
    plan = plan_for(target, "lora:2")
    apply_plan(target, plan, alpha=8.0)
    before = {n: (m.scaling, m.cdka_A.detach().clone()) for n, m in adapter_modules(target).items()}
    with pytest.raises(PlanError, match=r"a.safetensors: .*cdka_[AB] has shape \(.*\), the model's adapter has"):
        load_adapter(target, path)
    assert target.cdka_plan.adapter.alpha == 8.0
    for name, layer in adapter_modules(target).items():
        assert layer.scaling == before[name][0] and torch.equal(layer.cdka_A, before[name][1])


def test_load_refuses_mismatched_model_and_leaves_it_untouched(tmp_path):
    path = save_adapter(trained(tiny_llama()), tmp_path / "a.safetensors")
    other = tiny_llama(intermediate=64)
    state = snapshot(other)
    with pytest.raises(PlanError, match=r"gate_proj.*48x32.*64x32"):
        load_adapter(other, path)
    assert not adapter_modules(other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


def test_load_refuses_other_architecture(tmp_path):
    path = save_adapter(trained(tiny_llama()), tmp_path / "a.safetensors")
    with pytest.raises(PlanError, match="matches 0 modules"):
        load_adapter(tiny_gpt2(), path)


def test_load_refuses_tensors_that_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    source = trained(tiny_llama())
    path = save_adapter(source, tmp_path / "a.safetensors")
    with open(path, "rb") as fh:
        raw = fh.read()
    metadata = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = load_file(path)
    key = next(iter(tensors))
    bad = dict(tensors, **{key: torch.zeros(1, 2, 3)})
    save_file(bad, tmp_path / "bad.safetensors", metadata=metadata)
    target = tiny_llama()
    with pytest.raises(PlanError, match=f"{key} has shape \\(1, 2, 3\\)"):
        load_adapter(target, tmp_path / "bad.safetensors")
    assert not adapter_modules(target)
    del tensors[key]
    save_file(tensors, tmp_path / "short.safetensors", metadata=metadata)
    with pytest.raises(PlanError, match=f"missing {key}"):
        load_adapter(tiny_llama(), tmp_path / "short.safetensors")


def test_load_refuses_diverged_or_oversized_files_before_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_adapter(trained(tiny_llama()), tmp_path / "a.safetensors")
    plan, tensors = read_adapter(path)
    metadata = {"format": "cdka-adapter", "cdka_adapter": "1", "cdka_plan": json.dumps(plan.to_dict())}
    key = next(iter(tensors))
    broken = dict(tensors, **{key: torch.full_like(tensors[key], float("nan"))})
    save_file(broken, tmp_path / "nan.safetensors", metadata=metadata)
    with pytest.raises(PlanError, match=f"{key} holds NaN or infinite values"):
        load_adapter(tiny_llama(), tmp_path / "nan.safetensors")
    extra = dict(load_file(path), padding=torch.zeros(plan.used_params))
    save_file(extra, tmp_path / "big.safetensors", metadata=metadata)
    total = 2 * plan.used_params
    with pytest.raises(PlanError, match=f"holds {total:,} values, more than the {plan.trained_params:,} its plan trains"):
        read_adapter(tmp_path / "big.safetensors")


def test_load_refuses_non_adapter_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(PlanError, match="no such adapter file"):
        load_adapter(tiny_llama(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PlanError, match="not a readable .safetensors file"):
        load_adapter(tiny_llama(), tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(PlanError, match="not a cdka adapter"):
        load_adapter(tiny_llama(), tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "badplan.safetensors",
              metadata={"format": "cdka-adapter", "cdka_adapter": "1", "cdka_plan": "{"})
    with pytest.raises(PlanError, match="stored plan: not valid JSON"):
        load_adapter(tiny_llama(), tmp_path / "badplan.safetensors")


def test_save_needs_an_applied_plan_and_load_refuses_merged(tmp_path):
    with pytest.raises(PlanError, match="no applied plan"):
        save_adapter(tiny_llama(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    model = trained(tiny_llama())
    path = save_adapter(model, tmp_path / "a.safetensors")
    merge_adapters(model)
    with pytest.raises(PlanError, match="unmerge_adapters"):
        load_adapter(model, path)


def test_load_onto_adapted_model_in_eval_mode_keeps_dropout_off(tmp_path):
    source = tiny_llama()
    apply_plan(source, plan_for(source), dropout=0.3)
    path = save_adapter(source, tmp_path / "a.safetensors")
    target = tiny_llama()
    apply_plan(target, plan_for(target))
    target.eval()
    load_adapter(target, path)
    layers = adapter_modules(target).values()
    assert all(isinstance(m.dropout, torch.nn.Dropout) and m.dropout.p == 0.3 and not m.dropout.training for m in layers)
    ids = tokens(2)
    with torch.no_grad():
        assert torch.equal(target(ids).logits, target(ids).logits)
    target.train()
    assert all(m.dropout.training for m in layers)


def _with_plan(path, target, edit):
    """A copy of the adapter file ``path`` at ``target`` whose stored plan is changed by ``edit(dict)``."""
    from safetensors.torch import load_file, save_file

    raw = path.read_bytes()
    metadata = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    plan = json.loads(metadata["cdka_plan"])
    edit(plan)
    save_file(load_file(path), target, metadata=dict(metadata, cdka_plan=json.dumps(plan)))
    return target


def test_a_stored_plan_that_does_not_describe_its_factors_is_refused_also_by_an_adapted_model(tmp_path):
    """A model already carrying the adapters took a plan edited to r = 2 over rank-1 factors: its
    plan and counts were then wrong, and save_adapter wrote a file no fresh model loads."""
    source = trained(tiny_llama())
    path = save_adapter(source, tmp_path / "a.safetensors")
    plan = read_adapter(path)[0]
    g, group = 0, plan.groups[0]
    design = group.design
    each = design.m1 * design.n1 + design.m2 * design.n2

    def more_components(d):  # consistent in every derived field, with a budget that allows it
        d["groups"][g].update(r=design.r + 1, params_each=(design.r + 1) * each,
                              rank_bound=min(*group.shape, (design.r + 1) * design.rank_bound // design.r))
        limit = d["budget"]["limit"] + group.count * each
        d["budget"].update(limit=limit, spec=str(limit))
        d["budget"].pop("used", None)

    lie = _with_plan(path, tmp_path / "lie.safetensors", more_components)
    layer = next(name for name, owner in plan.assign(adapter_modules(source)).items() if owner is group)
    message = (f"{lie}: {layer}.cdka_A has shape {(design.r, design.m2, design.n2)}, but its stored plan's design "
               f"gives {(design.r + 1, design.m2, design.n2)}")
    before = snapshot(source)
    for model in (source, tiny_llama()):
        with pytest.raises(PlanError) as raised:
            load_adapter(model, lie)
        assert str(raised.value) == message
    assert all(torch.equal(before[k], v) for k, v in snapshot(source).items())


def test_the_meta_device_is_refused_where_adapter_values_would_live(tmp_path):
    """load_adapter 'loaded' into meta tensors (the values were dropped) and reported success. Only the
    adapted weights, the factors and the trained-whole parameters count: accelerate's offload keeps other
    base weights on meta, and such a model saves and loads its adapter."""
    path = save_adapter(trained(tiny_llama()), tmp_path / "a.safetensors")
    with torch.device("meta"):
        empty = tiny_llama()
    first = next(iter(read_adapter(path)[0].assign(n for n, _ in empty.named_modules())))
    message = f"{first} is on the meta device and holds no values; build or load the model on a real device first"
    with pytest.raises(PlanError) as raised:
        load_adapter(empty, path)
    assert str(raised.value) == message and not adapter_modules(empty)
    apply_plan(empty, plan_for(tiny_llama()))  # a dry run on meta stays allowed
    with pytest.raises(PlanError) as raised:
        save_adapter(empty, tmp_path / "b.safetensors")
    assert str(raised.value) == f"{first}.cdka_A" + message[len(first):]
    assert not (tmp_path / "b.safetensors").exists()
    offloaded = trained(tiny_llama())
    embeddings = offloaded.get_input_embeddings()
    embeddings.weight = torch.nn.Parameter(torch.empty_like(embeddings.weight, device="meta"), requires_grad=False)
    again = load_adapter(tiny_llama(), save_adapter(offloaded, tmp_path / "c.safetensors"))
    assert again.trainable_params == offloaded.cdka_plan.trained_params


def test_an_adapter_path_is_checked_where_it_enters(tmp_path):
    model = tiny_llama()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = [
        (None, "an adapter file is a path (str or os.PathLike), got NoneType"),
        ("x" * 5000, "adapter file '" + "x" * 27 + "..." + "x" * 28 + "': longer than this system allows (255 bytes a name, 4,095 in all)"),
        (tmp_path, f"{tmp_path}: not a regular file"),
        (tmp_path / "gone.safetensors", f"{tmp_path / 'gone.safetensors'}: no such adapter file"),
    ]
    for path, message in cases:
        with pytest.raises(PlanError) as raised:
            load_adapter(model, path)
        assert str(raised.value) == message
    with pytest.raises(PlanError, match="cannot read"):
        load_adapter(model, tmp_path / "loop")


def test_a_diverged_adapter_is_not_saved(tmp_path):
    model = trained(tiny_llama())
    layer = next(iter(adapter_modules(model).values()))
    with torch.no_grad():
        layer.cdka_B[0, 0, 0] = float("nan")
    with pytest.raises(PlanError, match="holds NaN or infinite values \\(the training diverged\\); nothing was written"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
