"""Local text data -> token batches for causal-LM probes and trials (offline, no data set hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdka_search.errors import DataError


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
            except json.JSONDecodeError:
                raise DataError(f"{file}:{number}: not a JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{file}:{number}: each JSONL line needs a string field 'text'")
            texts.append(record["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise DataError(f"{file}: no text in it")
    return texts


def encode(texts: list[str], model_dir: str | Path, vocab_size: int) -> list[int]:
    """Token ids of all texts, joined: the folder's tokenizer if it has one, else UTF-8 bytes.

    The byte fallback (id = byte % vocab_size) lets tiny test models without a tokenizer train.
    """
    folder = Path(model_dir)
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids
    return [b % vocab_size for text in texts for b in (text + "\n").encode("utf-8")]


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
