"""The lm sweep task on a tiny LlamaForCausalLM made here (nothing downloaded) and a tiny text file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cdka_search.errors import DataError

TEXT = " ".join(
    f"the adapter {w} learns a kronecker update number {i % 7} under a budget." for i, w in
    enumerate(["small", "quick", "stable", "cheap", "exact", "tiny"] * 12)
)


@pytest.fixture
def tiny_lm(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=260, max_position_embeddings=256)
    folder = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder  # no tokenizer files: the task falls back to UTF-8 byte ids


def test_lm_sweep_trains_the_real_model_and_writes_a_plan(tmp_path, tiny_lm):
    from cdka_search.plan import load_plan
    from cdka_search.sweep.study import SweepConfig, run_sweep

    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    result = run_sweep(SweepConfig(model=str(tiny_lm), budget="lora:2", trials=3, steps=4, task="lm", data=data,
                                   storage=f"sqlite:///{tmp_path / 'lm.db'}", study="lm", output=tmp_path / "best.yaml"))
    assert result.complete + result.pruned == 3 and result.complete >= 1
    assert math.isfinite(result.best_value) and result.best_value <= result.trial0_value
    assert 0 < result.best_value < 2 * math.log(260)  # a causal-LM loss in nats over a 260-token vocabulary
    plan = load_plan(tmp_path / "best.yaml")
    assert plan.model_name and len(plan.groups) == 7


def test_lm_task_reads_jsonl_and_reports_bad_lines(tmp_path):
    from cdka_search.textdata import Example, read_examples

    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 7}) + "\n")
    assert read_examples(good) == [Example("one"), Example("two")]  # other fields are ignored
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"line 2: not valid JSON \(line 1, column 2: "):
        read_examples(bad)
    with pytest.raises(DataError, match="missing.txt: no such data file"):
        read_examples(tmp_path / "missing.txt")


CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_every_trl_dataset_format_is_read(tmp_path):
    from cdka_search.textdata import Example, read_examples

    records = [
        {"text": "plain"},
        {"prompt": "Q: 2+2? A:", "completion": " 4"},
        {"messages": CHAT},
        {"prompt": CHAT[:1], "completion": CHAT[1:]},
    ]
    expected = [
        Example("plain"),
        Example(" 4", "Q: 2+2? A:"),
        Example((("user", "2+2?"), ("assistant", "4"))),
        Example((("assistant", "4"),), (("user", "2+2?"),)),
    ]
    lines = tmp_path / "d.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records, indent=1))  # one JSON array, as `json.dump(dataset)` writes it
    assert read_examples(lines) == read_examples(array) == expected
    one = tmp_path / "one.json"
    one.write_text(json.dumps(records[1], indent=2))  # one record, pretty-printed over several lines
    assert read_examples(one) == expected[1:2]
    lines_named_json = tmp_path / "lines.json"
    lines_named_json.write_text(lines.read_text())
    assert read_examples(lines_named_json) == expected
    text = tmp_path / "d.txt"
    text.write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert read_examples(text) == [Example("first paragraph\nstill first"), Example("second")]


def test_alpaca_records_learn_the_output_after_stanford_alpacas_prompt(tmp_path):
    from cdka_search.textdata import Example, read_examples

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Add.", "input": "2+2", "output": "4"},
                                {"instruction": "Greet.", "input": "", "output": "Hello."}]))
    intro = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
    assert read_examples(data) == [
        Example("4", intro.format(", paired with an input that provides further context")
                + "### Instruction:\nAdd.\n\n### Input:\n2+2\n\n### Response:\n"),
        Example("Hello.", intro.format("") + "### Instruction:\nGreet.\n\n### Response:\n"),
    ]


def test_sharegpt_conversations_are_read_as_messages_with_chat_roles(tmp_path):
    from cdka_search.textdata import Example, read_examples

    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                                   {"from": "gpt", "value": "4"}, {"from": "tool", "value": "ok"}]}]))
    assert read_examples(data) == [Example((("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("tool", "ok")))]


@pytest.mark.parametrize(("record", "message"), [
    ({"conversations": [{"from": "human"}]}, "'conversations': every message needs a string 'from' and a string 'value'"),
    ({"conversations": [], "text": "x"}, "line 1 mixes two formats"),
    ({"question": "x", "answer": "y"}, r"line 1 has no 'text' field \(its fields: 'answer', 'question'\); expected a 'text'"),
    ({"instruction": "x"}, "an Alpaca record needs a non-empty 'instruction' and 'output'"),
    ({"instruction": "x", "input": 3, "output": "y"}, "Alpaca's 'input' must be a string, got 3"),
    ({"instruction": "x", "output": "y", "text": "z"}, "line 1 mixes two formats"),
    ({"text": "a", "prompt": "b", "completion": "c"}, "line 1 mixes two formats"),
    ({"prompt": "only a prompt"}, "'prompt' and 'completion' must both be strings or both message lists"),
    ({"prompt": "q", "completion": CHAT}, "must both be strings or both message lists"),
    ({"messages": []}, "'messages' must be a non-empty list of messages"),
    ({"messages": [{"role": "user", "content": ["an", "image"]}]}, "every message needs a string 'role' and a string 'content'"),
    (["text"], "line 1 is not a JSON object"),
])
def test_bad_records_name_their_line_and_the_formats(tmp_path, record, message):
    from cdka_search.textdata import read_examples

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        read_examples(data)


def test_the_loss_skips_prompt_tokens():
    from cdka_search.textdata import Example, encode, token_blocks

    tokens = encode([Example("yes", "Is it?"), Example("plain")], None, 260)
    assert tokens.ids.itemsize == 8 and isinstance(tokens.trained, bytearray)  # 9 bytes a token, not two lists
    assert tokens.ids.tolist() == list(b"Is it?yes\nplain\n")
    assert list(tokens.trained) == [0] * 6 + [1] * 4 + [1] * 6
    inputs, labels = token_blocks(tokens, 4)
    # Blocks "Is i", "t?ye", "s\npl", "ain\n": the first has no trained token and is left out.
    assert inputs.tolist() == [list(b"t?ye"), list(b"s\npl"), list(b"ain\n")]
    assert labels.tolist() == [[-100, -100, *b"ye"], list(b"s\npl"), list(b"ain\n")]


def byte_tokenizer(folder: Path, *, chat: bool, template: str | None = None):
    """A byte-level BPE tokenizer with no merges (ids: the 256 bytes, then EOS), saved in ``folder``,
    with a chat template (``template``, else a plain one) if ``chat``."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<eos>": 256}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    if chat:
        tokenizer.chat_template = template or (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    tokenizer.save_pretrained(folder)


def test_conversations_are_rendered_by_the_chat_template(tmp_path):
    from cdka_search.textdata import encode, load_tokenizer, read_examples

    byte_tokenizer(tmp_path, chat=True)
    tokenizer = load_tokenizer(tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": CHAT[:1], "completion": CHAT[1:]}) + "\n")
    tokens = encode(read_examples(data), tokenizer, 257)
    whole, prompt, answer = "<user>2+2?\n<assistant>4\n", "<user>2+2?\n<assistant>", "4\n"
    ids = [tokenizer.convert_tokens_to_ids(c) for c in tokenizer.tokenize(whole)]
    assert len(ids) == len(whole)  # one id per character: no merges
    assert tokens.ids.tolist() == ids + [256] + ids + [256]
    # The conversation is trained whole; of the prompt-completion record only the answer and EOS.
    assert list(tokens.trained) == [1] * (len(whole) + 1) + [0] * len(prompt) + [1] * (len(answer) + 1)


def test_a_chat_template_that_runs_for_hours_is_stopped_in_one_line(tmp_path, tiny_lm, monkeypatch):
    # Jinja's sandbox bounds each range to 100,000 items, not their product: 10^10 iterations.
    import time

    from typer.testing import CliRunner

    from cdka_search import textdata
    from cdka_search.cli.app import app

    monkeypatch.setattr(textdata, "CHAT_TEMPLATE_SECONDS", 0.5)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    byte_tokenizer(tiny_lm, chat=True, template=loops + "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["probe", "--grad", str(tiny_lm), "--data", str(data), "-o", str(tmp_path / "g.safetensors")])
    assert time.monotonic() - started < 30
    assert result.exit_code == 9
    # One line and nothing before it: the data is rendered before the model loads (no "Loading weights").
    assert result.stderr == ("error: document 1: the chat template was still rendering it after 0.5 s "
                             "(a template that loops without end, or a hostile one), and was stopped\n")
    assert not (tmp_path / "g.safetensors").exists()


def test_a_chat_template_that_pads_without_end_is_refused_before_tokenising(tmp_path):
    from cdka_search.textdata import encode, load_tokenizer, read_examples

    byte_tokenizer(tmp_path, chat=True, template="{{ 'x' * 2000000 }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError) as raised:
        encode(read_examples(data), load_tokenizer(tmp_path), 257)
    assert str(raised.value) == ("document 1: the chat template rendered it as 2,000,005 characters, more than the "
                                 "1,048,656 its messages allow (16 x their text + 1,048,576)")


def test_an_oversized_tokenizer_file_is_refused_before_any_library_reads_it(tmp_path, monkeypatch):
    from cdka_search import textdata
    from cdka_search.errors import ModelSourceError

    byte_tokenizer(tmp_path, chat=False)
    size = (tmp_path / "tokenizer.json").stat().st_size
    monkeypatch.setattr(textdata, "MAX_TOKENIZER_BYTES", size - 1)
    with pytest.raises(ModelSourceError) as raised:
        textdata.load_tokenizer(tmp_path)
    assert str(raised.value) == (f"{tmp_path / 'tokenizer.json'}: {size:,} bytes, more than a tokenizer file may hold "
                                 f"({size - 1:,})")
    monkeypatch.setattr(textdata, "MAX_TOKENIZER_BYTES", size)
    assert textdata.load_tokenizer(tmp_path) is not None


def test_a_conversation_without_a_chat_template_is_one_clear_error(tmp_path, tiny_lm):
    from typer.testing import CliRunner

    from cdka_search.cli.app import app

    byte_tokenizer(tiny_lm, chat=False)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    result = CliRunner().invoke(app, ["probe", "--grad", str(tiny_lm), "--data", str(data), "-o", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 9
    assert "document 1 is a conversation, and only a tokenizer with a chat template can render it" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "g.safetensors").exists()


def test_lm_sweep_trains_on_completions_only(tmp_path, tiny_lm):
    from cdka_search.sweep.tasks import TaskOptions
    from cdka_search.sweep.tasks.lm import LMTask
    from cdka_search.textdata import Example, encode, read_examples

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: what is {i} plus one? ", "completion": f"{i + 1}."}) + "\n"
                            for i in range(120)))
    task = LMTask(TaskOptions(model=str(tiny_lm), data=data, steps=4, seed=0), seq_len=32)
    task.prepare(None)
    inputs, labels = task.held
    trained = encode(read_examples(data), None, 260).trained
    assert (labels != -100).sum() < 0.25 * labels.numel()  # answers are a few bytes of each 40-byte record
    assert sum(trained) / len(trained) < 0.25 and read_examples(data)[0] == Example("1.", "question 0: what is 0 plus one? ")
    assert ((labels == -100) | (labels == inputs)).all()
    # The held-out value is the mean loss over the answer tokens alone, whatever the batching.
    import torch

    with torch.no_grad():
        logits = task.base(input_ids=inputs).logits[:, :-1]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    task.batch = 3  # batches holding different numbers of answer tokens: a mean of batch means would differ
    assert task._held_out_loss(task.base) == pytest.approx(float(manual), rel=1e-5)

    from cdka_search.sweep.study import SweepConfig, run_sweep

    result = run_sweep(SweepConfig(model=str(tiny_lm), budget="lora:2", trials=1, steps=3, task="lm", data=data,
                                   storage=f"sqlite:///{tmp_path / 'qa.db'}", study="qa", output=tmp_path / "best.yaml"))
    assert result.complete == 1 and 0 < result.best_value < 2 * math.log(260)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: p.write_text("[" * 5000 + "]" * 5000), "nested deeper than"),
    (lambda p: p.write_text('[{"text": "a"}, 3]'), "record 2 is not a JSON object"),
    (lambda p: p.write_bytes(b'{"text": "\xff"}\n'), "not UTF-8 text"),
    (lambda p: p.write_text("[]"), "no text in it"),
    (lambda p: p.write_text('{"text": "a"}\n[' + "{}," * 2_000_001 + "{}]\n"), "line 2: more objects than such a document can hold"),
])
def test_bad_data_files_are_one_data_error(tmp_path, make, message):
    from cdka_search.textdata import read_examples

    data = tmp_path / "d.json"
    make(data)
    with pytest.raises(DataError, match=message):
        read_examples(data)


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "abc\\ud800def"}', "line 1, 'text' is not valid Unicode: it holds a lone surrogate (U+D800, character 4"),
    ('{"prompt": "\\udfff", "completion": "ok"}', "line 1, 'prompt' is not valid Unicode: it holds a lone surrogate (U+DFFF"),
    ('{"prompt": "ok", "completion": "x\\udc00"}', "line 1, 'completion' is not valid Unicode"),
    ('{"messages": [{"role": "user", "content": "a\\ud83d"}]}', "line 1, 'messages', message 1 'content' is not valid Unicode"),
    ('{"messages": [{"role": "u\\udfffser", "content": "a"}]}', "line 1, 'messages', message 1 'role' is not valid Unicode"),
    ('{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "\\ud800"}]}',
     "line 1, 'completion', message 1 'content' is not valid Unicode"),
])
def test_a_lone_surrogate_in_any_string_of_a_record_is_a_data_error(tmp_path, line, message):
    from cdka_search.textdata import Example, read_examples

    data = tmp_path / "s.jsonl"
    data.write_text(line + "\n")
    with pytest.raises(DataError) as raised:
        read_examples(data)
    assert str(raised.value).startswith(f"{data}: {message}")
    paired = tmp_path / "pair.jsonl"  # an escaped surrogate pair is one valid character
    paired.write_text('{"text": "\\ud83d\\ude00"}\n')
    assert read_examples(paired) == [Example("\U0001F600")]


def test_a_lone_surrogate_is_one_line_exit_9_for_probe_and_sweep(tmp_path, tiny_lm):
    from typer.testing import CliRunner

    from cdka_search.cli.app import app

    data = tmp_path / "s.jsonl"
    data.write_text('{"text": "abc\\ud800def"}\n' * 5)
    expected = (f"error: {data}: line 1, 'text' is not valid Unicode: it holds a lone surrogate "
                "(U+D800, character 4; a JSON \\u escape without its pair)\n")
    probe = CliRunner().invoke(app, ["probe", "--grad", str(tiny_lm), "--data", str(data), "--batches", "1",
                                     "--batch-size", "1", "--seq-len", "8", "-o", str(tmp_path / "g.safetensors")])
    assert probe.exit_code == 9 and probe.stderr == expected, probe.output
    assert not (tmp_path / "g.safetensors").exists()
    from cdka_search.sweep.study import SweepConfig, run_sweep

    with pytest.raises(DataError) as raised:
        run_sweep(SweepConfig(model=str(tiny_lm), budget="lora:2", trials=1, steps=2, task="lm", data=data,
                              storage=f"sqlite:///{tmp_path / 's.db'}", study="s", output=tmp_path / "best.yaml"))
    assert f"error: {raised.value}\n" == expected


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_a_data_file_of_more_documents_than_the_limit_is_refused(tmp_path, monkeypatch, suffix):
    from cdka_search import textdata

    monkeypatch.setattr(textdata, "MAX_DATA_RECORDS", 3)
    records = [{"text": f"doc {i}"} for i in range(4)]
    body = {".txt": "\n\n".join(r["text"] for r in records), ".jsonl": "".join(json.dumps(r) + "\n" for r in records),
            ".json": json.dumps(records)}[suffix]
    data = tmp_path / f"d{suffix}"
    data.write_text(body)
    with pytest.raises(DataError, match=r"more than 3 documents; a trial reads about 1 MB of text, so give a sample"):
        textdata.read_examples(data)
    data.write_text(body.replace("doc 3", "") if suffix == ".txt" else
                    {".jsonl": "".join(json.dumps(r) + "\n" for r in records[:3]), ".json": json.dumps(records[:3])}[suffix])
    assert [e.completion for e in textdata.read_examples(data)] == ["doc 0", "doc 1", "doc 2"]


def test_a_json_line_whose_text_holds_a_unicode_line_separator_is_one_record(tmp_path):
    """JSON allows U+2028 raw inside a string; only newlines end a JSON Lines record."""
    from cdka_search.textdata import Example, read_examples

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")
    assert read_examples(data) == [Example("one\u2028two"), Example("three")]


def test_token_ids_past_the_model_embedding_are_refused_before_training(tmp_path):
    transformers = pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from cdka_search.cli.app import app

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=200, max_position_embeddings=64)
    folder = tmp_path / "small-vocab"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer(folder, chat=False)  # ids 0..256: a byte above 0xC7 gets an id the 200 rows do not hold
    data = tmp_path / "text.txt"
    data.write_text("caf\u00e9 " * 50)
    result = CliRunner().invoke(app, ["probe", "--grad", str(folder), "--data", str(data), "--batches", "1",
                                      "--seq-len", "8", "-o", str(tmp_path / "g.safetensors")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    largest = max(tokenizer("caf\u00e9 ")["input_ids"] + [tokenizer.eos_token_id])  # each document ends with EOS
    assert largest >= 200 and result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (
        f"error: {folder}: its tokenizer gives {data} the token id {largest}, but the model embeds only ids 0..199; "
        "the tokenizer does not belong to this model (or the model was not resized to it)"
    )
    assert not (tmp_path / "g.safetensors").exists()


def test_data_too_short_for_two_blocks_is_a_data_error_as_for_the_probe(tmp_path, tiny_lm):
    from typer.testing import CliRunner

    from cdka_search.cli.app import app

    data = tmp_path / "short.txt"
    data.write_text("a few words\n")
    work = tmp_path / "work"
    work.mkdir()
    result = CliRunner().invoke(app, ["sweep", "-m", str(tiny_lm), "--task", "lm", "--data", str(data), "-b", "lora:2",
                                      "--trials", "1", "--steps", "1", "-o", str(work / "best.yaml"),
                                      "--storage", f"sqlite:///{work / 's.db'}"])
    assert result.exit_code == 9  # DataError, where it was the sweep's 7
    assert result.stderr.splitlines()[-1] == (
        f"error: --data {data}: 12 tokens make 0 block(s) of 128 with a trained token; need at least 2"
    )
    assert list(work.iterdir()) == []


def test_encode_stops_where_enough_says_with_a_prefix_of_the_whole_encoding():
    """A probe reads batches x batch_size blocks; the whole file was rendered and tokenised for them
    (400,000 short documents: 34 s for 4,096 tokens)."""
    import itertools

    from cdka_search.textdata import Example, Tokens, counted_blocks, encode, token_blocks

    examples = [Example(f"answer {i}. " * 20, f"question {i}? ") for i in range(3000)]
    whole = encode(examples, None, 260)
    asked: list[int] = []
    part = encode(examples, None, 260, enough=lambda t: asked.append(len(t.ids)) or counted_blocks(t, 128) >= 1000)
    assert asked[0] >= 1 << 16 and all(b >= 2 * a for a, b in itertools.pairwise(asked))  # asked as the tokens double
    assert counted_blocks(part, 128) >= 1000 > counted_blocks(Tokens(part.ids[: asked[-2]], part.trained[: asked[-2]]), 128)
    assert len(part.ids) < len(whole.ids) and part.ids == whole.ids[: len(part.ids)]
    assert part.trained == whole.trained[: len(part.trained)]
    assert counted_blocks(whole, 128) == len(token_blocks(whole, 128)[0])


def test_blocks_hold_the_tokens_they_view_so_the_tokens_cannot_move_under_them():
    """torch.frombuffer kept the array object but not its buffer: extending the Tokens moved the data
    under the tensors, which then read freed memory."""
    from cdka_search.textdata import Example, encode, token_blocks

    tokens = encode([Example("plain text " * 20)], None, 260)
    inputs, _ = token_blocks(tokens, 8)
    with pytest.raises(BufferError):
        tokens.ids.extend(range(100_000))
    assert inputs[0].tolist() == list(b"plain te")
