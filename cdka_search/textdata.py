"""Local models and text for causal-LM probes and trials: files only, no hub, no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdka_search.documents import read_file_bytes, read_json
from cdka_search.errors import DataError, ModelSourceError, one_line

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_texts(path: str | Path) -> list[str]:
    """Documents of a .txt file (blank-line separated paragraphs) or a .jsonl file ("text" field)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such data file")
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot read as UTF-8 text ({exc.__class__.__name__})") from None
    if file.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except RecursionError:
                raise DataError(f"{file}: line {number} is nested too deeply") from None
            except ValueError:  # not JSON, or an integer too long to convert
                raise DataError(f"{file}: line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{file}: line {number} has no string 'text' field")
            texts.append(record["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise DataError(f"{file}: no text in it")
    return texts


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


def load_tokenizer(model_dir: str | Path) -> Any:
    """The folder's tokenizer, or None when it has none (ModelSourceError for a broken one, or one
    that asks for remote code). Load it before the model, so a bad tokenizer fails fast."""
    folder = Path(model_dir)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    refuse_remote_code(folder, "tokenizer_config.json")
    check_fast_tokenizer(folder / "tokenizer.json")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizers raises bare Exceptions from Rust; any failure is the folder's
        raise ModelSourceError(f"{folder}: cannot load its tokenizer ({one_line(exc)})") from None


def encode(texts: list[str], tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of all texts joined by EOS: with ``tokenizer`` (load_tokenizer) if there is one, else
    UTF-8 bytes. The byte fallback (id = byte % vocab_size) lets tiny test models without a tokenizer train.
    """
    if tokenizer is not None:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
        return ids
    return [b % vocab_size for text in texts for b in (text + "\n").encode("utf-8")]


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


def check_grad_inputs(model_dir: str | Path, *, batches: int, batch_size: int, seq_len: int) -> None:
    """What a gradient probe can check before importing torch: its sizes, a model folder with a
    config.json that asks for no remote code, and a loadable tokenizer.json (so bad input is rejected at once)."""
    from cdka_search.errors import ArgumentError
    from cdka_search.limits import check_int

    check_int(batches, "--batches", ArgumentError, 1, 1 << 20)
    check_int(batch_size, "--batch-size", ArgumentError, 1, 1 << 16)
    check_int(seq_len, "--seq-len", ArgumentError, 2, 1 << 20)
    folder = Path(model_dir)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder}: not a Hugging Face model folder (no config.json)")
    refuse_remote_code(folder, "config.json")
    refuse_remote_code(folder, "tokenizer_config.json")
    check_fast_tokenizer(folder / "tokenizer.json")


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
    refuse_remote_code(folder, "config.json")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises many types for a broken folder; each is the folder's fault
        raise ModelSourceError(f"{folder}: cannot load a causal LM ({one_line(exc)})") from None


def token_batches(ids: list[int], *, seq_len: int, batch_size: int, limit: int | None = None) -> list[dict[str, Any]]:
    """Consecutive seq_len blocks grouped into batches with labels = input_ids (causal LM)."""
    import torch

    if seq_len < 2 or batch_size < 1:
        raise DataError("seq_len must be at least 2 and batch_size at least 1")
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not blocks:
        raise DataError(f"the data holds {len(ids)} tokens, fewer than one sequence of {seq_len}; lower --seq-len")
    batches = []
    for start in range(0, len(blocks), batch_size):
        chunk = torch.tensor(blocks[start : start + batch_size], dtype=torch.long)
        batches.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
        if limit is not None and len(batches) == limit:
            break
    return batches
