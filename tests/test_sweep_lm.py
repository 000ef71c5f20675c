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
    from cdka_search.textdata import read_texts

    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_texts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_texts(bad)
    with pytest.raises(DataError, match="no such data file"):
        read_texts(tmp_path / "missing.txt")
