"""Local models and text for causal-LM probes and trials: files only, no hub, no pickle."""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cdka_search.documents import JsonLimits, brief, read_file_bytes, read_json, utf8_text
from cdka_search.errors import DataError, ModelSourceError, one_line
from cdka_search.time_limit import TimeLimitExceeded, time_limit

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024  # each of them; released tokenizer files are tens of MB at most


MAX_DATA_BYTES = 256 * 1024 * 1024  # a trial trains a few hundred batches (200 x 8 x 128 tokens: about 1 MB of text)
# Documents per file: 256 MiB of one-word records is 90 million of them, minutes and gigabytes of Python objects.
MAX_DATA_RECORDS = 1_000_000
# Per conversation rendered: a real template takes well under a millisecond; one that loops for hours is stopped.
CHAT_TEMPLATE_SECONDS = 10.0
CHAT_TEMPLATE_GROWTH, CHAT_TEMPLATE_EXTRA = 16, 1 << 20  # a rendered conversation: at most 16 x its text + 1 MiB
# Per .json document or .jsonl line: what a 256 MiB chat dataset holds, and no more Python objects than that.
DATA_JSON_LIMITS = JsonLimits(max_bytes=MAX_DATA_BYTES, max_objects=2_000_000, max_arrays=1_000_000, max_commas=8_000_000)
DATA_SUFFIXES = (".txt", ".jsonl", ".json")
FORMATS = ("a 'text' string, 'prompt' and 'completion' (strings or message lists), 'messages', ShareGPT's 'conversations', "
           "or Alpaca's 'instruction', 'input' and 'output'")
# ShareGPT's speakers in the roles chat templates know; any other ("tool", "function_call") is passed as given.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Stanford Alpaca's prompt, which instruction-tuned checkpoints of that data expect; an empty input drops its section.
_ALPACA_HEAD = "Below is an instruction that describes a task{paired}. Write a response that appropriately completes the request.\n\n"
_ALPACA_INPUT = ", paired with an input that provides further context"

Message = tuple[str, str]  # (role, content)
# The keys that say a record's format (any one of them), in the order FORMATS lists the formats.
_FORMAT_KEYS = (("text",), ("prompt", "completion"), ("messages",), ("conversations",), ("instruction", "output"))

#: A UTF-16 surrogate code point: a JSON escape such as "\ud800" without its pair parses to one, and no
#: tokenizer (nor UTF-8) can encode it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Example:
    """One training document: the model learns ``completion`` and only reads ``prompt`` (no loss on
    it). Each is text, or messages that the tokenizer's chat template renders."""

    completion: str | tuple[Message, ...]
    prompt: str | tuple[Message, ...] = ""


@dataclass(frozen=True)
class Tokens:
    """Token ids of a data file, and per id whether the loss counts it (0 on prompts, 1 elsewhere).

    Held as an int64 array and a bytearray, 9 bytes a token: as Python lists of ints and bools a
    60 MB line of text took 3.4 GB to encode."""

    ids: array
    trained: bytearray


def read_examples(path: str | Path) -> list[Example]:
    """The documents of a data file, in the dataset formats of Hugging Face's TRL:

    - ``.txt``: documents separated by blank lines, trained whole;
    - ``.jsonl``, or ``.json`` (an array of records, one record, or JSON Lines): per record a ``"text"``, a
      ``"prompt"`` and ``"completion"`` (strings, or message lists for a conversation's turns), or
      ``"messages"`` (a conversation, trained whole); messages are ``{"role", "content"}`` strings;
      ShareGPT's ``"conversations"`` of ``{"from", "value"}`` turns (``human`` and ``gpt`` become
      ``user`` and ``assistant``), read as ``"messages"``; or Alpaca's ``"instruction"``, ``"input"`` (optional) and ``"output"``: the output is learnt after
      Stanford Alpaca's prompt.
    """
    file = check_data_name(path)
    if not file.exists():
        raise DataError(f"{file}: no such data file")
    text = utf8_text(read_file_bytes(file, DataError, MAX_DATA_BYTES), str(file), DataError)
    nul = text.find("\0")
    if nul >= 0:  # valid UTF-8, but only a binary file holds one, and tokenizers would train on it
        line = text.count("\n", 0, nul) + 1
        raise DataError(f"{file}: line {line} holds a NUL byte; a data file is text")
    if file.suffix == ".txt":
        found = (Example(p) for p in map(str.strip, _parts(text, "\n\n")) if p)
    elif file.suffix == ".json" and (records := _json_document(text, file)) is not None:
        found = (_example(record, f"{file}: record {number}") for number, record in enumerate(records, start=1))
    else:
        found = (_example(read_json(line, where, DataError, DATA_JSON_LIMITS), where) for where, line in _numbered_lines(text, file))
    examples = list(islice(found, MAX_DATA_RECORDS + 1))
    if len(examples) > MAX_DATA_RECORDS:
        raise DataError(f"{file}: more than {MAX_DATA_RECORDS:,} documents; a trial reads about 1 MB of text, so give a sample")
    if not examples:
        raise DataError(f"{file}: no text in it")
    return examples


def _numbered_lines(text: str, file: Path) -> Iterator[tuple[str, str]]:
    """("FILE: line N", line) of every line that is not blank."""
    for number, line in enumerate(_parts(text, "\n"), start=1):
        if line.strip():
            yield f"{file}: line {number}", line


def _parts(text: str, sep: str) -> Iterator[str]:
    """``text.split(sep)``, one part at a time: a file of millions of tiny records is refused at its
    limit, not after all of them are objects in memory."""
    start = 0
    while (end := text.find(sep, start)) >= 0:
        yield text[start:end]
        start = end + len(sep)
    yield text[start:]


def check_data_name(path: str | Path) -> Path:
    """``path`` if its suffix names a format read_examples reads; checked before any work, since
    any other file (a .csv, a .parquet) would otherwise be trained on as plain text."""
    file = Path(path)
    if file.suffix not in DATA_SUFFIXES:
        raise DataError(f"{file}: not a data format cdka reads ({', '.join(DATA_SUFFIXES)}: plain text, JSON Lines, JSON)")
    return file


def _json_document(text: str, file: Path) -> list[Any] | None:
    """The records of a .json file that is one JSON document (an array of records, or one record);
    None for JSON Lines, which only an array's or an object's parse error tells apart."""
    start = text.lstrip()[:1]
    if start == "[":
        return read_json(text, str(file), DataError, DATA_JSON_LIMITS)
    if start == "{":
        try:
            return [read_json(text, str(file), DataError, DATA_JSON_LIMITS)]
        except DataError:
            return None  # more than one document: JSON Lines, read line by line with each line's own error
    return None


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object; expected {FORMATS}")
    found = [keys for keys in _FORMAT_KEYS if not record.keys().isdisjoint(keys)]
    if len(found) != 1:
        fields = ", ".join(map(repr, sorted(record))) or "none"
        what = "mixes two formats" if found else f"has no 'text' field (its fields: {fields})"
        raise DataError(f"{where} {what}; expected {FORMATS}")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where} has no string 'text' field")
        return Example(_unicode(record["text"], f"{where}, 'text'"))
    if "messages" in record:
        return Example(_messages(record["messages"], f"{where}, 'messages'"))
    if "conversations" in record:
        return Example(_messages(record["conversations"], f"{where}, 'conversations'", ("from", "value"), _SHAREGPT_ROLES))
    if "instruction" in record or "output" in record:
        return _alpaca(record, where)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example(_unicode(completion, f"{where}, 'completion'"), _unicode(prompt, f"{where}, 'prompt'"))
    if isinstance(prompt, list) and isinstance(completion, list):
        return Example(_messages(completion, f"{where}, 'completion'"), _messages(prompt, f"{where}, 'prompt'"))
    raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")


def _alpaca(record: dict[str, Any], where: str) -> Example:
    """An Alpaca record: the model learns ``output`` after Stanford Alpaca's prompt of ``instruction`` and ``input``."""
    fields = {key: record.get(key, "") for key in ("instruction", "input", "output")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: Alpaca's '{key}' must be a string, got {brief(value)}")
        _unicode(value, f"{where}, '{key}'")
    if not fields["instruction"] or not fields["output"]:
        raise DataError(f"{where}: an Alpaca record needs a non-empty 'instruction' and 'output'")
    head = _ALPACA_HEAD.format(paired=_ALPACA_INPUT if fields["input"] else "")
    given = f"### Input:\n{fields['input']}\n\n" if fields["input"] else ""
    return Example(fields["output"], f"{head}### Instruction:\n{fields['instruction']}\n\n{given}### Response:\n")


def _messages(value: Any, where: str, keys: tuple[str, str] = ("role", "content"),
              roles: Mapping[str, str] = MappingProxyType({})) -> tuple[Message, ...]:
    """(role, content) of each message; ``keys`` name the two fields (ShareGPT's are "from" and "value"),
    and ``roles`` maps speakers to chat roles (others pass as given)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of messages")
    speaker, said = keys
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get(speaker), str) and isinstance(message.get(said), str)):
            raise DataError(f"{where}: every message needs a string '{speaker}' and a string '{said}', got {brief(message)}")
    return tuple(
        (roles.get(m[speaker], _unicode(m[speaker], f"{where}, message {i} '{speaker}'")),
         _unicode(m[said], f"{where}, message {i} '{said}'"))
        for i, m in enumerate(value, start=1)
    )


def _unicode(text: str, where: str) -> str:
    """``text``, checked to be valid Unicode: JSON's escapes can spell a lone surrogate (``"\\ud800"``),
    which json.loads accepts and no encoding can write, so every string a record gives is checked here
    once rather than failing in whatever encodes it later (UTF-8 bytes, a tokenizer, a chat template)."""
    if "\0" in text:  # a JSON \u0000 escape: as a raw NUL byte, no text a tokenizer should train on
        raise DataError(f"{where} holds a NUL character (\\u0000); a data file is text")
    found = _SURROGATE.search(text)
    if found is not None:
        raise DataError(
            f"{where} is not valid Unicode: it holds a lone surrogate (U+{ord(found.group()):04X}, "
            f"character {found.start() + 1}; a JSON \\u escape without its pair)"
        )
    return text


def check_fast_tokenizer(file: Path) -> None:
    """A ModelSourceError for a tokenizer.json that the ``tokenizers`` library cannot load: checked
    with that library alone (milliseconds) before transformers, whose import costs seconds (torch)."""
    if not file.is_file():
        return
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return  # transformers reports it in its own words
    try:
        Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises bare Exceptions from Rust
        raise ModelSourceError(f"{file.parent}: cannot load its tokenizer ({one_line(exc)})") from None


def check_tokenizer(folder: Path) -> None:
    """What a folder's tokenizer files must pass before transformers reads them: each at most
    MAX_TOKENIZER_BYTES (libraries read them whole, in code no limit stops), no remote code, and a
    tokenizer.json that the tokenizers library loads."""
    for name in _TOKENIZER_FILES:
        file = folder / name
        size = file.stat().st_size if file.is_file() else 0
        if size > MAX_TOKENIZER_BYTES:
            raise ModelSourceError(f"{file}: {size:,} bytes, more than a tokenizer file may hold ({MAX_TOKENIZER_BYTES:,})")
    refuse_remote_code(folder, "tokenizer_config.json")
    check_fast_tokenizer(folder / "tokenizer.json")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The folder's tokenizer, or None when it has none (ModelSourceError for a broken one, or one
    that asks for remote code). Load it before the model, so a bad tokenizer fails fast."""
    folder = Path(model_dir)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    check_tokenizer(folder)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizers raises bare Exceptions from Rust; any failure is the folder's
        raise ModelSourceError(f"{folder}: cannot load its tokenizer ({one_line(exc)})") from None


def encode(examples: list[Example], tokenizer: Any, vocab_size: int | None, *,
           enough: Callable[[Tokens], bool] | None = None) -> Tokens:
    """Token ids of every example, each prompt then completion then EOS: with ``tokenizer``
    (load_tokenizer) if there is one, else UTF-8 bytes (id = byte % vocab_size, so that tiny test models
    without a tokenizer train; ``vocab_size`` is read only then). Prompt and completion are tokenised
    apart, as generation sees them. ``enough``: asked as the tokens double (from 2^16), it stops the
    encoding once it holds what its user reads, a prefix of the whole (a probe of 8 batches needs
    4,096 tokens of a file that may hold 256 MB)."""
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("encode without a tokenizer needs the model's vocab_size")
        import numpy as np

        def pieces(text: str) -> array:
            values = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            if vocab_size <= 255:
                np.remainder(values, vocab_size, out=values)
            piece = array("q")
            piece.frombytes(memoryview(values).cast("B"))  # one copy, where tobytes() and a remainder made three more
            return piece
        eos = array("q", [b"\n"[0] % vocab_size])
    else:
        def pieces(text: str) -> array:
            return array("q", tokenizer(text, add_special_tokens=False)["input_ids"] if text else ())
        eos = array("q", [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    ids = array("q")
    trained = bytearray()
    ask_at = 1 << 16
    for number, example in enumerate(examples, start=1):
        prompt, completion = _rendered(example, tokenizer, number)
        head, tail = pieces(prompt), pieces(completion)
        ids.extend(head)
        ids.extend(tail)
        ids.extend(eos)
        trained.extend(bytes(len(head)))
        trained.extend(b"\x01" * (len(tail) + len(eos)))
        if enough is not None and len(ids) >= ask_at:
            if enough(Tokens(ids, trained)):
                break
            ask_at = 2 * len(ids)
    return Tokens(ids, trained)


def counted_blocks(tokens: Tokens, seq_len: int) -> int:
    """How many of the consecutive seq_len blocks token_blocks keeps (some token after the first trained)."""
    import numpy as np

    blocks = len(tokens.trained) // seq_len
    flags = np.frombuffer(tokens.trained, dtype=np.uint8, count=blocks * seq_len).reshape(blocks, seq_len)
    return int(flags[:, 1:].any(axis=1).sum())


def _rendered(example: Example, tokenizer: Any, number: int) -> tuple[str, str]:
    """(prompt, completion) as text; conversations through the tokenizer's chat template."""
    if isinstance(example.completion, str) and isinstance(example.prompt, str):
        return example.prompt, example.completion
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"document {number} is a conversation, and only a tokenizer with a chat template can render it: "
            "the model folder has none (give the documents as 'text' or 'prompt'/'completion' strings)"
        )

    def render(messages: tuple[Message, ...], **options: Any) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            with time_limit(CHAT_TEMPLATE_SECONDS):
                text = tokenizer.apply_chat_template(chat, tokenize=False, **options)
        except TimeLimitExceeded:
            raise DataError(
                f"document {number}: the chat template was still rendering it after {CHAT_TEMPLATE_SECONDS:g} s "
                "(a template that loops without end, or a hostile one), and was stopped"
            ) from None
        except Exception as exc:  # a template raises what it likes (jinja2's TemplateError for a bad role order)
            raise DataError(f"document {number}: the chat template refuses it ({one_line(exc)})") from None
        # Role markers and a system prompt add little; a template that pads (or repeats) adds without end.
        most = CHAT_TEMPLATE_GROWTH * sum(len(content) for _, content in messages) + CHAT_TEMPLATE_EXTRA
        if len(text) > most:
            raise DataError(f"document {number}: the chat template rendered it as {len(text):,} characters, more than the "
                            f"{most:,} its messages allow ({CHAT_TEMPLATE_GROWTH} x their text + {CHAT_TEMPLATE_EXTRA:,})")
        return text

    if not example.prompt:
        return "", render(example.completion)  # type: ignore[arg-type]
    head = render(example.prompt, add_generation_prompt=True)  # type: ignore[arg-type]
    whole = render(example.prompt + example.completion)  # type: ignore[operator]
    if not whole.startswith(head):
        raise DataError(f"document {number}: the chat template does not render its prompt as the start of the conversation")
    return head, whole[len(head):]


def refuse_remote_code(folder: Path, name: str) -> None:
    """A ModelSourceError when ``folder/name`` asks for code shipped with the model (auto_map):
    cdka never runs code from a model folder."""
    file = folder / name
    if not file.is_file():
        return
    try:
        data = read_json(read_file_bytes(file, ModelSourceError), str(file), ModelSourceError)
    except ModelSourceError:
        return  # not ours to judge here: the loader reports a corrupt file in its own words
    if isinstance(data, dict) and ("auto_map" in data or data.get("trust_remote_code")):
        raise ModelSourceError(
            f"{folder}: {name} asks to run custom code shipped with the model (auto_map); cdka refuses remote code"
        )


def refuse_task_model(folder: Path, config: dict[str, Any]) -> None:
    """A causal-LM loss needs the LM head a task checkpoint (``BertForSequenceClassification``) lacks:
    transformers would load the base with a random LM head and train that. Refused, naming the class.
    ``config``: the folder's config.json as ``read_config`` returns it."""
    from cdka_search.spec.hf_config import task_head_class

    head = task_head_class(config)
    if head is not None:
        raise ModelSourceError(
            f"{folder}: its config.json names {head}, a task model with a new head; a causal-LM loss needs the "
            "checkpoint's LM head, which it does not have (train a task model with your own loop: docs/adapter.md)"
        )


def _check_lm_config(folder: Path) -> None:
    """The config.json of a folder a causal-LM loss trains: read once (which also bounds its label count,
    that transformers would expand into a dict), asking for no remote code, naming no task model."""
    from cdka_search.spec.hf_config import read_config

    config = read_config(folder)
    refuse_remote_code(folder, "config.json")
    refuse_task_model(folder, config)


def check_grad_inputs(model_dir: str | Path, *, batches: int, batch_size: int, seq_len: int) -> None:
    """What a gradient probe can check before importing torch: its sizes, a model folder with a
    config.json that asks for no remote code, and tokenizer files check_tokenizer accepts (so bad input is
    rejected at once)."""
    from cdka_search.errors import ArgumentError
    from cdka_search.limits import check_int

    check_int(batches, "--batches", ArgumentError, 1, 1 << 20)
    check_int(batch_size, "--batch-size", ArgumentError, 1, 1 << 16)
    check_int(seq_len, "--seq-len", ArgumentError, 2, 1 << 20)
    folder = Path(model_dir)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder}: not a Hugging Face model folder (no config.json)")
    _check_lm_config(folder)
    check_tokenizer(folder)


def load_lm_and_tokens(model_dir: str | Path, data: str | Path, *,
                       enough: Callable[[Tokens], bool] | None = None) -> tuple[Any, Tokens]:
    """The folder's causal LM (load_causal_lm) and ``data`` as its tokens (encode, stopping where
    ``enough`` says). With a tokenizer the data is rendered and tokenised before the model loads
    (minutes for a 7B model), so its errors come first; without one the byte ids need the model's
    vocabulary size."""
    examples = read_examples(data)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is not None:
        tokens = encode(examples, tokenizer, None, enough=enough)
        model = load_causal_lm(model_dir)
        rows = model.get_input_embeddings().num_embeddings
        import numpy as np

        largest = int(np.frombuffer(tokens.ids, dtype=np.int64).max()) if len(tokens.ids) else -1
        if largest >= rows:  # torch would fail on it mid-training with an IndexError
            raise ModelSourceError(
                f"{model_dir}: its tokenizer gives {data} the token id {largest:,}, but the model embeds only ids "
                f"0..{rows - 1:,}; the tokenizer does not belong to this model (or the model was not resized to it)"
            )
        return model, tokens
    model = load_causal_lm(model_dir)
    return model, encode(examples, None, model.config.vocab_size, enough=enough)


def load_causal_lm(model_dir: str | Path) -> Any:
    """A local Hugging Face causal LM in float32 from safetensors weights (never pickle, never the hub)."""
    folder = Path(model_dir)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ModelSourceError(f"{folder}: no safetensors weights (model.safetensors or its index) to load")
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ModelSourceError("loading a local model needs transformers: pip install 'cdka[hf]'") from None
    _check_lm_config(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises many types for a broken folder; each is the folder's fault
        raise ModelSourceError(f"{folder}: cannot load a causal LM ({one_line(exc)})") from None


def token_batches(tokens: Tokens, *, seq_len: int, batch_size: int, limit: int | None = None) -> list[dict[str, Any]]:
    """Consecutive seq_len blocks grouped into batches, labels = input_ids where trained, -100 (ignored
    by the loss) elsewhere; blocks with no trained token after their first (which nothing predicts) are left out."""
    import torch

    if seq_len < 2 or batch_size < 1:
        raise DataError("seq_len must be at least 2 and batch_size at least 1")
    inputs, labels = token_blocks(tokens, seq_len)
    if not len(inputs):
        raise DataError(f"the data holds {len(tokens.ids)} tokens and no block of {seq_len} with a trained one; lower --seq-len")
    batches = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        batches.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": labels[start : start + batch_size]})
        if limit is not None and len(batches) == limit:
            break
    return batches


def token_blocks(tokens: Tokens, seq_len: int) -> tuple[Any, Any]:
    """(input_ids, labels) as (blocks, seq_len) tensors: consecutive blocks, labels -100 where not
    trained, only the blocks whose loss counts some token (any trained one after the first)."""
    import torch

    blocks = len(tokens.ids) // seq_len
    if not blocks:
        empty = torch.zeros(0, seq_len, dtype=torch.long)
        return empty, empty
    import numpy as np

    # numpy views hold the buffers exported, so the Tokens cannot be resized under the tensors (torch.frombuffer
    # alone keeps the object, not the export); the ids are copied where blocks are left out or labelled.
    ids = torch.from_numpy(np.frombuffer(tokens.ids, dtype=np.int64, count=blocks * seq_len)).view(blocks, seq_len)
    trained = torch.from_numpy(np.frombuffer(tokens.trained, dtype=np.bool_, count=blocks * seq_len)).view(blocks, seq_len)
    keep = trained[:, 1:].any(dim=1)
    labels = ids.masked_fill(~trained, -100)
    if bool(keep.all()):  # no copies of a large file's blocks where every block counts
        return ids, labels
    return ids[keep], labels[keep]
