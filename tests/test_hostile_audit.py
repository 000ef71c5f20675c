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
