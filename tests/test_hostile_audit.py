"""Hostile inputs found by an audit of the task-head changes (modules_to_save, heads in adapter files,
task configs) and of the readers around them: each is one error line or one library error, before work."""

from __future__ import annotations

import json

import pytest

from cdka_search.errors import ConfigError
from tests.test_hostile import TINY, rejects


@pytest.mark.parametrize(("extra", "message"), [
    ({"num_labels": 0}, "config field 'num_labels': 0 is outside [1, 1,048,576]"),
    ({"num_labels": -1}, "config field 'num_labels': -1 is outside [1, 1,048,576]"),
    ({"num_labels": 2**20 + 1}, "config field 'num_labels': 1048577 is outside [1, 1,048,576]"),
    ({"id2label": {}}, "config field 'id2label' must be a non-empty mapping of label ids to names"),
    ({"id2label": ["a", "b"]}, "config field 'id2label' must be a non-empty mapping of label ids to names"),
])
def test_a_task_configs_label_count_is_checked_where_it_is_read(cli, tmp_path, extra, message):
    """transformers expands num_labels into a dict (10**7 took minutes and gigabytes), and a count
    below one built a head of no parameters whose plan ('score: 0') load_plan refused."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "pad_token_id": 0, **extra,
                                                    "architectures": ["LlamaForSequenceClassification"]}))
    rejects(cli, tmp_path, ["inspect", str(folder)], "model", f"{folder / 'config.json'}: {message}")


def test_a_gradient_probe_checks_the_label_count_before_transformers_reads_it(tmp_path):
    from cdka_search.textdata import check_grad_inputs, load_causal_lm

    (tmp_path / "config.json").write_text(json.dumps({**TINY, "num_labels": 10**12}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"config field 'num_labels': 1000000000000 is outside \[1, 1,048,576\]"):
        check_grad_inputs(tmp_path, batches=1, batch_size=1, seq_len=8)
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=r"config field 'num_labels': 1000000000000 is outside"):
        load_causal_lm(tmp_path)


BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 50,
        "max_position_embeddings": 16}


def bert_classifier():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3)).eval()


@pytest.fixture
def adapter_file(tmp_path):
    """A cdka adapter of a tiny BERT classifier: its factors and its head (classifier.weight, .bias)."""
    from cdka_search import make_plan, spec_from_module
    from cdka_search.adapter import apply_plan, save_adapter

    model = bert_classifier()
    apply_plan(model, make_plan(spec_from_module(model), "lora:2"))
    return save_adapter(model, tmp_path / "a.safetensors")


def rewritten(file, tmp_path, change_tensors=None, change_plan=None):
    """A copy of the adapter ``file`` with its tensors and stored plan changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors, plan = load_file(str(file)), json.loads(metadata["cdka_plan"])
    if change_tensors:
        change_tensors(tensors)
    if change_plan:
        change_plan(plan)
    out = tmp_path / "x.safetensors"
    save_file(tensors, str(out), metadata={**metadata, "cdka_plan": json.dumps(plan)})
    return out


@pytest.mark.parametrize("key", ["classifier.weight", "bert.pooler.dense.cdka_A"])
def test_a_float8_tensor_in_an_adapter_file_is_named(adapter_file, tmp_path, key):
    """torch has no isfinite for float8: the NaN check raised NotImplementedError with a traceback."""
    import torch

    from cdka_search.adapter import load_adapter, read_adapter
    from cdka_search.errors import PlanError

    def to_float8(tensors):
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)

    file = rewritten(adapter_file, tmp_path, change_tensors=to_float8)
    message = rf"x.safetensors: {key} is F8_E4M3, expected a floating-point tensor \(F16, BF16, F32, F64\)"
    with pytest.raises(PlanError, match=message):
        read_adapter(file)
    with pytest.raises(PlanError, match=message):
        load_adapter(bert_classifier(), file)


def test_modules_to_save_one_inside_another_is_refused_and_the_model_left_untouched(adapter_file, tmp_path):
    """Both listed, the embeddings' parameters were counted twice: apply_plan swapped the adapters in,
    then raised 'applied 4259 trainable parameters but the plan counts 5859' on the changed model."""
    from dataclasses import replace

    from cdka_search import make_plan, spec_from_module
    from cdka_search.adapter import apply_plan, load_adapter
    from cdka_search.errors import PlanError

    model = bert_classifier()
    embeddings = {f"bert.embeddings.{k}": p.detach().clone() for k, p in model.bert.embeddings.named_parameters()}
    heads = {"bert.embeddings": sum(p.numel() for p in embeddings.values()), "bert.embeddings.word_embeddings": 50 * 32}
    message = ("modules_to_save: bert.embeddings.word_embeddings shares parameters with bert.embeddings, "
               "which the plan also lists")
    file = rewritten(adapter_file, tmp_path, change_tensors=lambda t: t.update(embeddings),
                     change_plan=lambda p: p["modules_to_save"].update(heads))
    with pytest.raises(PlanError, match=message):
        load_adapter(model, file)
    plan = make_plan(spec_from_module(model), "lora:2")
    with pytest.raises(PlanError, match=message):
        apply_plan(model, replace(plan, modules_to_save=plan.modules_to_save + tuple(heads.items())))
    assert type(model.bert.pooler.dense).__name__ == "Linear" and not hasattr(model, "cdka_plan")


@pytest.mark.parametrize("value", ["false", "0", '""', "[]"])
def test_modules_to_save_of_another_type_is_refused_not_read_as_none(cli, tmp_path, value):
    """Every falsy value was read as 'no head': a plan saying ``modules_to_save: false`` validated."""
    pytest.importorskip("transformers")
    from cdka_search import make_plan, spec_from_module
    from cdka_search.plan import dumps_plan

    text = dumps_plan(make_plan(spec_from_module(bert_classifier()), "lora:2"))
    assert "modules_to_save:\n  classifier: 99\n" in text
    (tmp_path / "plan.yaml").write_text(text.replace("modules_to_save:\n  classifier: 99\n", f"modules_to_save: {value}\n"))
    rejects(cli, tmp_path, ["validate", str(tmp_path / "plan.yaml")], "plan",
            "modules_to_save: expected a mapping of at most 64 module names to parameter counts")


def long_heads() -> dict[str, int]:
    """64 module names of 2,063 characters each: as many and as long as a plan may list."""
    return {".".join([f"n{i}".ljust(128, "x")] * 16): 5 for i in range(64)}


def test_a_hostile_modules_to_save_is_named_briefly(cli, tmp_path, adapter_file):
    """Every name was printed whole: validate's error line was 127 KB, load_adapter's listed 128 problems."""
    from cdka_search import make_plan, spec_from_module
    from cdka_search.adapter import apply_plan, load_adapter
    from cdka_search.errors import PlanError

    plan = make_plan(spec_from_module(bert_classifier()), "lora:2").to_dict()
    folder = tmp_path / "bert"
    pytest.importorskip("transformers").BertConfig(**BERT, num_labels=3,
                                                   architectures=["BertForSequenceClassification"]).save_pretrained(folder)
    plan["model"]["path"] = str(folder)
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "modules_to_save": long_heads()}))
    error = rejects(cli, tmp_path, ["validate", str(tmp_path / "plan.json")], "plan",
                    "(5) and 60 more but bert's new task head is classifier (99)")
    assert len(error) < 600
    file = rewritten(adapter_file, tmp_path, change_plan=lambda p: p.__setitem__("modules_to_save", long_heads()))
    adapted = bert_classifier()
    apply_plan(adapted, make_plan(spec_from_module(adapted), "lora:2"))
    for model, start in [(bert_classifier(), "plan does not match the model"), (adapted, "the stored plan does not fit the model")]:
        with pytest.raises(PlanError, match=rf"{start}: modules_to_save: the model has no module 'n0x+\.\.\.x+'; .*"
                                            r"\(and 61 more\)$") as caught:
            load_adapter(model, file)
        assert len(str(caught.value)) < 600
