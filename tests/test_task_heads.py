"""A task model's new head (a classifier, a QA span scorer) is no adapter target: the plan trains it
whole, as PEFT's modules_to_save, and the adapter file carries it."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cdka_search import CandidateSpace, load_spec, make_plan, spec_from_module  # noqa: E402
from cdka_search.adapter import apply_plan, load_adapter, save_adapter  # noqa: E402
from cdka_search.errors import CdkaWarning, PlanError  # noqa: E402
from cdka_search.export import export_plan  # noqa: E402
from cdka_search.plan import dumps_plan, loads_plan  # noqa: E402
from cdka_search.targets import coverage  # noqa: E402

LABELS = 3
BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
            max_position_embeddings=16)
HEAD = ("classifier", 32 * LABELS + LABELS)


def bert_classifier(labels: int = LABELS, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=labels)).eval()


def test_the_new_head_is_trained_whole_not_adapted():
    model = bert_classifier()
    spec = spec_from_module(model)
    assert spec.modules_to_save == (HEAD,)
    assert all(t.name.startswith("bert.") for t in spec.targets)
    assert spec.unadaptable == ()
    summary = coverage(spec, spec, "all-linear").summary()
    assert "0.0% in weights no adapter targets" in summary and "trained whole (classifier)" in summary
    plan = make_plan(spec, "lora:2")
    assert plan.modules_to_save == (HEAD,)
    assert plan.trained_params == plan.used_params + HEAD[1]


@pytest.mark.parametrize(
    ("cls", "config", "head"),
    [
        ("LlamaForSequenceClassification", dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50, num_labels=2,
                                                pad_token_id=0), ("score", 32 * 2)),
        ("BertForQuestionAnswering", dict(model_type="bert", **BERT), ("qa_outputs", 32 * 2 + 2)),
        ("RobertaForTokenClassification", dict(model_type="roberta", **BERT, num_labels=5), ("classifier", 32 * 5 + 5)),
    ],
)
def test_a_task_config_of_a_built_in_family_is_read_with_its_head(tmp_path, cls, config, head):
    """The built-in llama and bert families describe the base model and an LM head: a config whose
    architectures name a task model is built by transformers instead, so the total and the head are right."""
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": [cls]}))
    spec = load_spec(str(tmp_path))
    live = getattr(transformers, cls)(transformers.AutoConfig.for_model(**config))
    assert spec.modules_to_save == (head,)
    assert spec.total_params == sum(p.numel() for p in live.parameters())
    assert spec.targets == spec_from_module(live).targets


def _batch(seed: int):
    """Sequences labelled by which of three marker tokens they start with."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABELS, (32,), generator=g)
    ids = torch.randint(10, 50, (32, 8), generator=g)
    ids[:, 0] = labels + 1
    return ids, labels


def test_apply_train_save_and_load_carry_the_head(tmp_path):
    model = bert_classifier()
    plan = make_plan(spec_from_module(model), "lora:2")
    frozen = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    head_before = model.classifier.weight.detach().clone()
    summary = apply_plan(model, plan)
    assert summary.trained_whole == ("classifier",)
    assert summary.trainable_params == plan.trained_params
    assert all(p.requires_grad for p in model.classifier.parameters())

    ids, labels = _batch(0)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.classifier.weight, head_before)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.base_layer.weight, frozen)

    path = save_adapter(model, tmp_path / "cls.safetensors")
    fresh = bert_classifier()  # the same base; a head drawn anew below, which only the file can restore
    with torch.no_grad():
        fresh.classifier.weight.normal_()
    loaded = load_adapter(fresh, path)
    assert loaded.trained_whole == ("classifier",) and loaded.trainable_params == plan.trained_params
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_head_for_another_number_of_labels_is_refused_and_the_model_left_untouched(tmp_path):
    plan = make_plan(spec_from_module(bert_classifier()), "lora:2")
    other = bert_classifier(labels=5)
    with pytest.raises(PlanError, match=r"modules_to_save: classifier has 165 parameters, the plan counts 99"):
        apply_plan(other, plan)
    assert not any(p.requires_grad is False for p in other.parameters())

    model = bert_classifier()
    apply_plan(model, plan)
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(PlanError, match=r"plan does not match the model: modules_to_save: classifier has 165 parameters"):
        load_adapter(bert_classifier(labels=5), tmp_path / "a.safetensors")
    adapted = bert_classifier(labels=5)
    apply_plan(adapted, make_plan(spec_from_module(adapted), "lora:2"))
    with pytest.raises(PlanError, match=r"stored plan does not fit the model: modules_to_save: classifier has 165 parameters"):
        load_adapter(adapted, tmp_path / "a.safetensors")


def test_the_plan_document_round_trips_and_validates_modules_to_save():
    plan = make_plan(spec_from_module(bert_classifier()), "lora:2")
    text = dumps_plan(plan)
    assert "modules_to_save:\n  classifier: 99\n" in text
    assert loads_plan(text) == plan
    assert loads_plan(dumps_plan(plan, "json")) == plan
    data = plan.to_dict()
    for bad, message in [
        (["classifier"], "modules_to_save: expected a mapping"),
        ({"classifier; rm": 99}, "is not a module name"),
        ({"classifier": 0}, "modules_to_save.classifier"),
        ({"classifier": True}, "modules_to_save.classifier"),
        ({f"head{i}": 1 for i in range(65)}, "at most 64"),
    ]:
        with pytest.raises(PlanError, match=message):
            loads_plan(json.dumps({**data, "modules_to_save": bad}))


def test_exports_train_the_head_too(tmp_path):
    model = bert_classifier()
    spec = spec_from_module(model)
    plan = make_plan(spec, "lora:2", space=CandidateSpace(family="lora"))
    peft = export_plan(plan, "peft", spec, model=model)
    assert peft.configs["cdka_lora"]["modules_to_save"] == ["classifier"]
    assert peft.trainable_params == plan.trained_params  # what PEFT itself trained on the model (the export's check)
    assert not any(n.startswith("not checked") for n in peft.notes)
    lycoris = export_plan(plan, "lycoris", spec, model=model)
    assert any("also train the new task head whole" in n and "classifier" in n for n in lycoris.notes)


def test_cli_plans_a_classifier_config_and_validate_catches_another_label_count(cli, tmp_path):
    for labels in (LABELS, 5):
        folder = tmp_path / f"bert{labels}"
        transformers.BertConfig(**BERT, num_labels=labels, architectures=["BertForSequenceClassification"]).save_pretrained(folder)
    plan_file = tmp_path / "plan.yaml"
    made = cli("plan", "-m", str(tmp_path / "bert3"), "-b", "lora:2", "-o", str(plan_file))
    assert made.exit_code == 0, made.output
    assert "the new task head classifier (99)" in made.stdout
    assert loads_plan(plan_file.read_text()).modules_to_save == (HEAD,)
    ok = cli("validate", str(plan_file), "--model", str(tmp_path / "bert3"))
    assert ok.exit_code == 0 and "; trained whole: classifier (99))" in ok.stdout
    wrong = cli("validate", str(plan_file), "--model", str(tmp_path / "bert5"))
    assert wrong.exit_code != 0
    assert "modules_to_save is classifier (99) but bert5's new task head is classifier (165)" in wrong.stderr
    assert "Traceback" not in wrong.output


def test_a_lone_header_plans_the_head_as_a_target_and_says_so(tmp_path):
    bert_classifier().save_pretrained(tmp_path)
    with pytest.warns(CdkaWarning, match=r"classifier looks like the new head of a task model"):
        header = load_spec(str(tmp_path / "model.safetensors"))
    assert "classifier" in {t.name for t in header.targets}
    assert load_spec(str(tmp_path)).modules_to_save == (HEAD,)  # the folder: config.json says which class


@pytest.mark.parametrize("command", [("sweep", "--task", "lm", "--steps", "2", "--trials", "1", "--budget", "lora:2"),
                                     ("probe", "--grad")])
def test_causal_lm_tasks_refuse_a_task_checkpoint_before_loading_it(cli, tmp_path, command):
    """transformers would load BertForSequenceClassification's base with a random LM head and the loss
    would train that: refused at once, naming the class."""
    folder = tmp_path / "cls"
    transformers.BertConfig(**BERT, num_labels=LABELS, architectures=["BertForSequenceClassification"]).save_pretrained(folder)
    data = tmp_path / "d.txt"
    data.write_text("some text\n\nmore text\n")
    if command[0] == "sweep":
        args = (*command, "-m", str(folder), "--data", str(data), "-o", str(tmp_path / "out"))
    else:
        args = (*command, str(folder), "--data", str(data), "-o", str(tmp_path / "g.safetensors"))
    result = cli(*args)
    assert result.exit_code == 3, result.output
    assert "names BertForSequenceClassification, a task model with a new head" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.safetensors").exists()


def test_a_head_without_parameters_is_not_listed():
    """num_labels = 0, built in code: an empty head trains nothing, and a plan listing `classifier: 0` would not load."""
    model = bert_classifier(labels=0)
    spec = spec_from_module(model)
    assert spec.modules_to_save == ()
    plan = make_plan(spec, "lora:2")
    assert loads_plan(dumps_plan(plan)) == plan


def test_a_task_config_without_transformers_says_what_to_install(tmp_path, monkeypatch):
    from cdka_search.errors import ModelSourceError
    from cdka_search.spec import torch_module

    def no_transformers(*_args):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(torch_module, "meta_spec_from_config", no_transformers)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **BERT, "architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(ModelSourceError, match=r"its architectures name BertForSequenceClassification, a task model whose new head only "
                                               r"transformers knows; install the 'hf' extra"):
        load_spec(str(tmp_path))


@pytest.mark.parametrize(("cls", "config", "heads"), [
    # T5's QA model holds its encoder and decoder itself: no base model sets its head apart
    ("T5ForQuestionAnswering", dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=50),
     (("qa_outputs", 32 * 2 + 2),)),
    ("XLNetForQuestionAnsweringSimple", dict(d_model=32, n_layer=1, n_head=4, d_inner=64, vocab_size=50),
     (("qa_outputs", 32 * 2 + 2),)),
    # Whisper's classifier holds its encoder itself, and its new projector is named like no head: WhisperModel lacks it
    ("WhisperForAudioClassification", dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                           num_mel_bins=8, max_source_positions=16, vocab_size=50,
                                           classifier_proj_size=16, num_labels=2, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2, decoder_start_token_id=1),
     (("projector", 32 * 16 + 16), ("classifier", 16 * 2 + 2))),
])
def test_heads_of_task_models_without_a_separate_base_are_found(cls, config, heads):
    model_class = getattr(transformers, cls)
    with torch.device("meta"):
        model = model_class(model_class.config_class(**config))
    spec = spec_from_module(model)
    assert spec.modules_to_save == heads
    assert not [t.name for t in spec.targets if t.name.split(".")[0] in dict(heads)]


def test_a_teacher_classifier_trains_both_its_heads_whole():
    """DeiT's ...WithTeacher class: a class token head and a distillation head, both outside the base."""
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     image_size=16, patch_size=8, num_labels=3)
    model = transformers.DeiTForImageClassificationWithTeacher(config)
    spec = spec_from_module(model)
    assert spec.modules_to_save == (("cls_classifier", 32 * 3 + 3), ("distillation_classifier", 32 * 3 + 3))
    plan = make_plan(spec, "lora:1")
    assert apply_plan(model, plan).trainable_params == plan.trained_params


class TinyForImageClassification(torch.nn.Module):
    """A task model built in code, with no transformers config: it holds its body, its head and a bare
    parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)
        self.offset = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return self.head(self.body(x) + self.offset)


class TinyForSequenceClassification(TinyForImageClassification):
    """The same, with a base model (as transformers' task models name theirs), as Nemotron 3 diarization
    holds a bare parameter beside its base and head."""

    @property
    def base_model(self):
        return self.body


@pytest.mark.parametrize("task_model", [TinyForImageClassification, TinyForSequenceClassification])
def test_without_a_base_model_to_compare_the_head_is_found_by_name_and_bare_parameters_stay_frozen(task_model):
    model = task_model()
    spec = spec_from_module(model)
    assert spec.modules_to_save == (("head", 16 * 4 + 4),)
    assert [t.name for t in spec.targets] == ["body"]
    plan = make_plan(spec, "lora:1")
    summary = apply_plan(model, plan)
    assert summary.trained_whole == ("head",)
    assert not model.offset.requires_grad and model.head.weight.requires_grad
    assert summary.trainable_params == plan.trained_params


def test_task_heads_benchmark_smoke(capsys):
    """benchmarks/task_heads.py on two model types: BERT's QA head has a base model, T5's has none."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "task_heads.py"
    spec = importlib.util.spec_from_file_location("task_heads", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tasks", "question-answering", "--types", "bert", "t5"]) == 0
    assert "question-answering: 2 of 2 built classes train their head whole, 0 refused" in capsys.readouterr().out


def test_a_model_whose_only_linear_layer_is_its_new_head_is_refused_naming_the_head():
    """A convolutional classifier (ResNet, PP-LCNet): cdka adapts no convolution, and the head is trained whole."""
    from cdka_search.errors import ModelSourceError

    model = TinyForImageClassification()
    model.body = torch.nn.Conv2d(3, 16, 3)
    with pytest.raises(ModelSourceError, match=r"^TinyForImageClassification: no nn.Linear, Conv1D or expert weights to adapt "
                                               r"outside its new task head \(head\)$"):
        spec_from_module(model)


PERCEIVER = dict(d_model=32, d_latents=32, num_latents=4, num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=2,
                 num_cross_attention_heads=2, vocab_size=50, max_position_embeddings=16, num_labels=LABELS)


def test_a_head_built_inside_the_base_model_is_trained_whole_and_an_added_input_module_is_not():
    """PerceiverForSequenceClassification builds its classification decoder inside its base model, with
    its text preprocessor (pretrained embeddings): the bare PerceiverModel has neither, and only the
    decoder is sized by the labels."""
    torch.manual_seed(0)
    model = transformers.PerceiverForSequenceClassification(transformers.PerceiverConfig(**PERCEIVER))
    decoder = sum(p.numel() for p in model.perceiver.decoder.parameters())
    spec = spec_from_module(model)
    assert spec.modules_to_save == (("perceiver.decoder", decoder),)
    assert not [t.name for t in spec.targets if t.name.startswith("perceiver.decoder.")]
    assert any(t.name.startswith("perceiver.encoder.") for t in spec.targets)
    plan = make_plan(spec, "lora:1")
    summary = apply_plan(model, plan)
    assert summary.trained_whole == ("perceiver.decoder",) and summary.trainable_params == plan.trained_params
    assert all(p.requires_grad for p in model.perceiver.decoder.parameters())
    assert not any(p.requires_grad for p in model.perceiver.input_preprocessor.parameters())
    assert model(inputs=torch.randint(0, 50, (2, 16))).logits.shape == (2, LABELS)


def test_a_pooler_the_task_model_adds_to_its_base_stays_a_target():
    """Data2VecVisionForImageClassification builds its base with a pooler that AutoModel leaves out: a
    pretrained module, not sized by the labels, so not a head."""
    config = transformers.Data2VecVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                               image_size=16, patch_size=8, num_labels=LABELS, use_mean_pooling=False)
    with torch.device("meta"):
        model = transformers.Data2VecVisionForImageClassification(config)
    assert "pooler" in dict(model.data2vec_vision.named_children())
    assert spec_from_module(model).modules_to_save == (("classifier", 32 * LABELS + LABELS),)


@pytest.mark.parametrize(("name", "new"), [
    ("BertForSequenceClassification", True), ("DeiTForImageClassificationWithTeacher", True),
    ("PerceiverForImageClassificationLearned", True), ("LukeForEntityPairClassification", True),
    ("PatchTSTForClassification", True), ("XLNetForQuestionAnsweringSimple", True), ("RobertaForMultipleChoice", True),
    ("LlamaForCausalLM", False), ("BertForMaskedLM", False), ("T5ForConditionalGeneration", False), ("BertModel", False),
])
def test_which_transformers_classes_add_a_new_head(name, new):
    from cdka_search.spec.model_spec import has_new_head

    assert has_new_head(name) is new


def test_an_entity_classifier_trains_its_classifier_whole():
    """LUKE's entity classifiers were not read as task models: their classifier was adapted as a target."""
    config = transformers.LukeConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=50, entity_vocab_size=20, entity_emb_size=16, max_position_embeddings=16,
                                     num_labels=LABELS)
    with torch.device("meta"):
        model = transformers.LukeForEntityClassification(config)
    spec = spec_from_module(model)
    assert spec.modules_to_save == (("classifier", 32 * LABELS + LABELS),)
    assert "classifier" not in {t.name for t in spec.targets}
