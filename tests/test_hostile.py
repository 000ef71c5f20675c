"""Hostile and broken inputs, class by class (issue 11): each is one `error:` line on stderr, the
documented exit code, no traceback, and no file written or changed. How fast and in how little
memory each class is rejected is measured by benchmarks/hostile_inputs.py (smoke-run at the end)."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cdka_search.errors import (
    ArgumentError,
    BudgetError,
    DataError,
    ExportError,
    ModelSourceError,
    OutputError,
    PlanError,
    ReferenceFileError,
    SweepError,
    TargetError,
)

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
}
CODES = {"budget": BudgetError.exit_code, "model": ModelSourceError.exit_code, "target": TargetError.exit_code,
         "plan": PlanError.exit_code, "reference": ReferenceFileError.exit_code, "sweep": SweepError.exit_code,
         "export": ExportError.exit_code, "data": DataError.exit_code, "output": OutputError.exit_code,
         "argument": ArgumentError.exit_code}


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``folder`` with its type, size and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def rejects(cli, folder: Path, args: list[str], kind: str, message: str):
    """Run ``cdka ARGS``: exit code of ``kind``, one error line holding ``message``, ``folder`` unchanged."""
    before = snapshot(folder)
    result = cli(*args)
    assert result.exit_code == CODES[kind], (result.exit_code, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert snapshot(folder) == before
    return result.stderr


def header_file(path: Path, header, data_bytes: int | None = None, raw: bytes | None = None) -> Path:
    """A safetensors file with this header (a JSON-able object, or raw bytes) and a hole of data."""
    body = raw if raw is not None else json.dumps(header).encode()
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        if data_bytes:
            fh.truncate(8 + len(body) + data_bytes)
    return path


def weight(shape=(8, 8), dtype="F32", begin=0):
    size = 4 if dtype == "F32" else 2
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + shape[0] * shape[1] * size]}


@pytest.fixture
def plan_text(tmp_path) -> str:
    """A valid plan (YAML) of the tiny LLaMA config."""
    from cdka_search.plan import dumps_plan
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return dumps_plan(make_plan(load_spec(str(tmp_path / "config.json")), "lora:4"))


def edited(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# 1. Deep nesting: no RecursionError from any reader -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "command", "kind", "message"),
    [
        ("model.safetensors", None, "inspect", "model", "nested deeper than 32 levels"),
        ("config.json", "[" * 100_000 + "]" * 100_000, "inspect", "model", "nested deeper than 32 levels"),
        ("config.json", '{"a":' * 50_000 + "1" + "}" * 50_000, "inspect", "model", "nested deeper than 32 levels"),
        ("config.json", '{"a":' * 40 + "1" + "}" * 40, "inspect", "model", "nested deeper than 32 levels"),
        # libyaml refuses a flow nesting this deep itself; a pure-Python parser reaches cdka's own limit
        ("plan.yaml", "[" * 100_000 + "]" * 100_000, "validate", "plan", "plan.yaml: "),
        ("plan.yaml", "a: " + "[" * 40 + "]" * 40, "validate", "plan", "nested deeper than 32 levels"),
        ("plan.yaml", "".join(" " * i + "- \n" for i in range(400)), "validate", "plan", "nested deeper than 32 levels"),
        ("plan.json", '{"a":' * 50_000 + "1" + "}" * 50_000, "validate", "plan", "plan.json: "),
        ("recipe.yaml", "a: " + "{b: " * 200 + "1" + "}" * 200, "recipes", "plan", "nested deeper than 32 levels"),
    ],
)
def test_deep_nesting_is_refused(cli, tmp_path, name, content, command, kind, message):
    path = tmp_path / name
    if content is None:
        header_file(path, None, raw=b"[" * 100_000 + b"]" * 100_000)
    else:
        path.write_text(content)
    args = {"inspect": ["inspect", str(path)], "validate": ["validate", str(path)], "recipes": ["recipes", "show", str(path)]}
    rejects(cli, tmp_path, args[command], kind, message)


def test_deep_adapter_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file
    import torch

    from cdka_search.adapter.io import read_adapter

    path = tmp_path / "adapter.safetensors"
    from cdka_search.adapter.io import FORMAT, FORMAT_VERSION

    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"format": FORMAT, "cdka_adapter": FORMAT_VERSION, "cdka_plan": "[" * 50_000 + "]" * 50_000})
    with pytest.raises(PlanError, match="stored plan: nested deeper than 32 levels"):
        read_adapter(path)


# 2, 4, 19. Safetensors headers: value types and ranges, bounded dimensions, the file's real size ----


@pytest.mark.parametrize(
    ("header", "data_bytes", "message"),
    [
        ({"a.weight": {**weight(), "shape": "8x8"}}, 256, "shape must be a list"),
        ({"a.weight": {**weight(), "shape": None}}, 256, "shape must be a list"),
        ({"a.weight": {**weight(), "shape": [8, "8"]}}, 256, "expected an integer, got '8'"),
        ({"a.weight": {**weight(), "shape": [8, 8.0]}}, 256, "expected an integer, got 8.0"),
        ({"a.weight": {**weight(), "shape": [8, True]}}, 256, "expected an integer, got True"),
        ({"a.weight": {**weight(), "shape": [8, -8]}}, 256, "-8 is outside"),
        ({"a.weight": {**weight(), "shape": [2**40, 2**40]}}, 256, "is outside [0, 4,294,967,296]"),
        ({"a.weight": {**weight(), "dtype": "F33"}}, 256, "unknown dtype 'F33'"),
        ({"a.weight": {**weight(), "data_offsets": [0]}}, 256, "data_offsets must be [begin, end]"),
        ({"a.weight": {**weight(), "data_offsets": [0, 10**30]}}, 256, "is outside [0, 256]"),
        ({"a.weight": {**weight(), "extra": 1}}, 256, "needs exactly the keys"),
        ({"a.weight": weight((4096, 4096))}, 16, "is outside [0, 16]"),  # class 19: 64 MB claimed over 16 bytes
        ({"a.weight": {**weight(), "data_offsets": [0, 8]}}, 256, "needs 256 bytes but its data_offsets span 8"),
        ({"a.weight": weight((2**21, 2), "F16")}, 2**23, "has a side outside [1, 1,048,576]"),
        ({"__metadata__": {"a": 1}, "a.weight": weight()}, 256, "__metadata__ must map texts to texts"),
    ],
)
def test_bad_header_values(cli, tmp_path, header, data_bytes, message):
    path = header_file(tmp_path / "model.safetensors", header, data_bytes)
    err = rejects(cli, tmp_path, ["inspect", str(path)], "model", message)
    assert len(err) < 400


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"a.weight": {"dtype": "F32", "shape": [NaN, 8], "data_offsets": [0, 256]}}', "NaN is not a JSON value"),
        (b'{"a.weight": {"dtype": "F32", "shape": [1e400, 8], "data_offsets": [0, 256]}}', "number '1e400' is out of range"),
        (b'{"a.weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]}, "a.weight": {}}', "duplicate key 'a.weight'"),
        (b'{"a.weight": {"dtype": "F32", "shape": [' + b"9" * 5000 + b', 8], "data_offsets": [0, 256]}}', "a number is too long"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_malformed_header_json(cli, tmp_path, raw, message):
    path = header_file(tmp_path / "model.safetensors", None, 256, raw=raw)
    rejects(cli, tmp_path, ["inspect", str(path)], "model", message)


def test_header_length_beyond_the_file_never_quotes_it(cli, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")  # a text file read as a safetensors file
    err = rejects(cli, tmp_path, ["inspect", str(path)], "model", "header length is impossible")
    assert "root" not in err.replace(str(tmp_path), "")


# 3. Sharded index: types, and shards confined to the index's folder ----------------------------------


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        (["a.safetensors"], "needs a non-empty 'weight_map' object"),
        ({}, "needs a non-empty 'weight_map' object"),
        ({"a.weight": 7}, "must name a shard file"),
        ({"a.weight": "../../etc/passwd"}, "is outside the index's folder"),
        ({"a.weight": "/etc/passwd"}, "is outside the index's folder"),
        ({"a.weight": "sub/../../passwd"}, "is outside the index's folder"),
        ({"a.weight": "C:\\Windows\\win.ini"}, "is outside the index's folder"),
        ({"a.weight": "missing.safetensors"}, "shard missing.safetensors is missing"),
    ],
)
def test_bad_index(cli, tmp_path, weight_map, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    err = rejects(cli, tmp_path, ["inspect", str(model)], "model", message)
    assert "root:" not in err


def _fifo_shard(root: Path) -> list[str]:
    (root / "m").mkdir()
    os.mkfifo(root / "m" / "s.safetensors")
    (root / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"layer.q.weight": "s.safetensors"}}))
    return ["inspect", str(root / "m")]


def _fifo_in_folder(root: Path, name: str) -> list[str]:
    (root / "m").mkdir()
    os.mkfifo(root / "m" / name)
    return ["inspect", str(root / "m" / name) if name == "config.json" else str(root / "m")]


def _fifo_config_in_folder(root: Path) -> list[str]:
    _fifo_in_folder(root, "config.json")
    return ["inspect", str(root / "m")]


def _fifo_reference(root: Path) -> list[str]:
    os.mkfifo(root / "m")
    return ["plan", "-m", "gpt2", "-b", "0.5%", "--reference", str(root / "m"), "-o", str(root / "p.yaml")]


def _fifo_delta_shard(root: Path) -> list[str]:
    header_file(root / "base.safetensors", {"layer.q.weight": weight()}, 256)
    _fifo_shard(root)
    return ["probe", "--delta", str(root / "base.safetensors"), str(root / "m"), "-o", str(root / "r.safetensors")]


@pytest.mark.parametrize(("make", "kind", "file"), [
    (_fifo_shard, "model", "m/s.safetensors"),
    (lambda root: _fifo_in_folder(root, "model.safetensors"), "model", "m/model.safetensors"),
    (lambda root: _fifo_in_folder(root, "config.json"), "model", "m/config.json"),
    (_fifo_config_in_folder, "model", "m/config.json"),
    (_fifo_reference, "reference", "m"),
    (_fifo_delta_shard, "reference", "m/s.safetensors"),
], ids=["index shard", "folder's model.safetensors", "config.json", "folder's config.json", "--reference", "probe --delta shard"])
def test_a_fifo_is_not_a_regular_file_rather_than_missing(cli, tmp_path, make, kind, file):
    err = rejects(cli, tmp_path, make(tmp_path), kind, f"{tmp_path / file}: not a regular file")
    assert "missing" not in err and "does not exist" not in err


def test_index_through_a_link_inside_the_folder_is_read(tmp_path):
    """The Hugging Face cache links shards to blobs elsewhere: links named inside the folder are fine."""
    from cdka_search.spec import load_spec

    blobs, model = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir(), model.mkdir()
    header_file(blobs / "abc", {"layer.q.weight": weight()}, 256)
    (model / "model-1.safetensors").symlink_to(blobs / "abc")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"layer.q.weight": "model-1.safetensors"}}))
    assert [t.name for t in load_spec(str(model)).targets] == ["layer.q"]


# 2, 4. Options and shapes out of range ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "message"),
    [
        (["explain", "--shape", "99999999999999999999x2"], "target", "each size must be in [1, 1,048,576]"),
        (["explain", "--shape", "9" * 40 + "x2"], "target", "expected two positive sizes"),
        (["explain", "--shape", "2097152x2"], "target", "each size must be in [1, 1,048,576]"),
        (["explain", "--shape", "64x64", "--top", "0"], "argument", "--top: 0 is outside [1, 100,000]"),
        (["explain", "--shape", "64x64", "--r", "1000000000000"], "target", "--r: 1000000000000 is outside"),
        (["explain", "--shape", "64x64", "--r", "65"], "target", "--r 65 is more components than a 64x64 update can use"),
        (["explain", "--shape", "64x64", "--max-r", "0"], "target", "--max-r: 0 is outside"),
        (["plan", "-m", "gpt2", "--seed", "-1"], "argument", "seed: -1 is outside [0, 4,294,967,295]"),
        (["plan", "-m", "gpt2", "--seed", "99999999999"], "argument", "seed: 99999999999 is outside"),
        (["plan", "-m", "gpt2", "--r", "1000000000000"], "target", "--r: 1000000000000 is outside"),
    ],
)
def test_option_ranges(cli, tmp_path, monkeypatch, args, kind, message):
    monkeypatch.chdir(tmp_path)
    rejects(cli, tmp_path, args, kind, message)


def test_probe_option_ranges(cli, tmp_path):
    from tests.tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("some text\n\nmore text\n")
    for flag, value in (("--batches", "-1"), ("--batch-size", "0"), ("--seq-len", "1")):
        rejects(cli, tmp_path, ["probe", "--grad", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), flag, value,
                                "-o", str(tmp_path / "r.safetensors")], "argument", f"{flag}: {value} is outside")


# 6, 9. YAML aliases and duplicate keys -------------------------------------------------------------


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LAUGHS, "YAML anchors and aliases (& and *) are not allowed (line 1)"),
        ("cdka_plan: 1\nmodel: &m {name: x, total_params: 10}\nbudget: *m\ngroups: []\n", "anchors and aliases"),
        ("cdka_plan: 1\ncdka_plan: 1\n", "duplicate key 'cdka_plan' (line 2)"),
        ("cdka_plan: 1\nmodel: {name: a, name: b}\n", "duplicate key 'name'"),
        ('{"cdka_plan": 1, "cdka_plan": 1}', "duplicate key 'cdka_plan'"),
    ],
)
def test_aliases_and_duplicate_keys_in_plans(cli, tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    rejects(cli, tmp_path, ["validate", str(path)], "plan", message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cdka_recipe: 1\nmodel: gpt2\nmodel: llama\n", "duplicate key 'model'"),
        ("cdka_recipe: 1\nmodel: &m gpt2\ndescription: *m\n", "anchors and aliases"),
        (LAUGHS, "anchors and aliases"),
    ],
)
def test_aliases_and_duplicate_keys_in_recipes(cli, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    rejects(cli, tmp_path, ["plan", "--recipe", str(tmp_path / "r.yaml")], "plan", message)


def test_duplicate_keys_in_config_json(cli, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "hidden_size": 128}')
    rejects(cli, tmp_path, ["inspect", str(tmp_path / "config.json")], "model", "duplicate key 'hidden_size'")


# 7, 8. Plan fields: types, ranges, allowed sets; every problem in one report ------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("alpha: 64.0", "alpha: .nan", "adapter.alpha: must be a finite number, got nan"),
        ("alpha: 64.0", "alpha: .inf", "adapter.alpha: must be a finite number, got inf"),
        ("alpha: 64.0", "alpha: -.inf", "adapter.alpha: must be a finite number"),
        ("alpha: 64.0", "alpha: 1e400", "adapter.alpha: must be a finite number, got inf"),  # a number, as YAML 1.2 reads it
        ("alpha: 64.0", "alpha: 1e+300", "adapter.alpha: 1e+300 is outside"),
        ("alpha: 64.0", "alpha: '2e-4'", "adapter.alpha: expected a number, got '2e-4'"),  # quoted: text
        ("alpha: 64.0", "alpha: abc", "adapter.alpha: expected a number, got 'abc'"),
        ("alpha: 64.0", "alpha: 1.0e+300", "adapter.alpha: 1e+300 is outside"),
        ("dropout: 0.0", "dropout: .nan", "adapter.dropout: must be a finite number"),
        ("dtype: float32", "dtype: [1]", "adapter.dtype: [1] is not one of"),
        ("objective: rank", "objective: foo", "objective: 'foo' is not one of rank, balanced, alignment"),
        ("cdka_plan: 1", "cdka_plan: true", "plan schema version True is not supported"),
        ("cdka_plan: 1", "cdka_plan: 1.0", "plan schema version 1.0 is not supported (this cdka reads the integer 1)"),
        ("  r: 4\n", "  r: 4.0\n", "groups[0].r: expected an integer, got 4.0"),
        ("  r1: ", "  r1: !!float ", "groups[0].r1 is "),
        ("  r: 4\n", "  r: !!int 11.7\n", "plan.yaml: '11.7' is not a valid int (line "),
        ("  r: 4\n", "  r: !!int " + "9" * 5000 + "\n", "plan.yaml: a number is too long (line "),
        ("  r: 4\n", "  r: !!bool maybe\n", "plan.yaml: 'maybe' is not a valid bool (line "),
        ("  r: 4\n", "  r: !!binary AAAA\n", "YAML tag 'tag:yaml.org,2002:binary' is not allowed (line "),
        ("  r: 4\n", "  r: 2024-01-01\n", "groups[0].r: expected an integer, got '2024-01-01'"),
        ("  r: 4\n", "  r: 2001-12-14 21:59:43.10 -5\n", "groups[0].r: expected an integer, got '2001-12-14 21:59:43.10 -5'"),
        ("exact: true", "exact: maybe", "allocation.exact: expected true or false, got 'maybe'"),
        ("gap: 0.0", "gap: abc", "allocation.gap: expected a number, got 'abc'"),
        ("gap: 0.0", "gap: -1", "allocation.gap: -1 is outside"),
        ("  r: 4\n", "  r: 1000000000000000000000000000000\n", "groups[0].r: 1000000000000000000000000000000 is outside"),
        ("  count: 2\n", "  count: 1.5\n", "groups[0].count: expected an integer, got 1.5"),
        ("total_params:", "total_params: 1e400\n  x:", "unknown key 'x'"),
    ],
)
def test_plan_field_values(cli, tmp_path, plan_text, old, new, message):
    path = tmp_path / "plan.yaml"
    path.write_text(edited(plan_text, old, new))
    rejects(cli, tmp_path, ["validate", str(path)], "plan", message)


def test_every_plan_problem_is_in_one_report(cli, tmp_path, plan_text):
    text = edited(edited(edited(plan_text, "alpha: 64.0", "alpha: .nan"), "objective: rank", "objective: foo"), "gap: 0.0", "gap: abc")
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    err = rejects(cli, tmp_path, ["validate", str(path)], "plan", "3 problems: ")
    assert "adapter.alpha" in err and "objective" in err and "allocation.gap" in err


def test_a_huge_plan_report_stays_short(cli, tmp_path, plan_text):
    groups = "groups:\n" + "".join(f"- {{modules: m{i}, shape: [x, 1], count: 1, left: [1, 1], right: [1, 1], r: 1}}\n" for i in range(5000))
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text.split("groups:")[0] + groups)
    err = rejects(cli, tmp_path, ["validate", str(path)], "plan", "and ")
    assert len(err) < 4000


def test_absurd_r_is_a_plan_error_however_the_plan_is_made():
    from cdka_search.candidates import Design
    from cdka_search.plan import PlanGroup

    with pytest.raises(PlanError, match="1 <= r <= 64"):
        PlanGroup(("m",), (64, 64), 1, Design(64, 1, 1, 64, 10**9))


def test_apply_plan_override_of_alpha_nan_is_a_plan_error(plan_text):
    import torch  # noqa: F401

    from cdka_search.adapter import apply_plan
    from cdka_search.plan import loads_plan
    from tests.tiny import tiny_llama

    plan = loads_plan(plan_text)
    with pytest.raises(PlanError, match="adapter.alpha: must be a finite number"):
        apply_plan(tiny_llama(hidden=64, intermediate=128, vocab=300), plan, alpha=float("nan"))


def test_recipe_with_nan_alpha_writes_no_plan(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("cdka_recipe: 1\nmodel: gpt2\nadapter: {alpha: .nan}\n")
    rejects(cli, tmp_path, ["plan", "--recipe", str(tmp_path / "r.yaml")], "plan", "adapter.alpha: must be a finite number")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cdka_recipe: 1\nmodel: gpt2\nsweep: {trials: 1000000000000}\n", "sweep.trials: must be at most 100,000"),
        ("cdka_recipe: 1\nmodel: gpt2\nsweep: {seed: -1}\n", "sweep.seed: must be at least 0"),
        ("cdka_recipe: 1\nmodel: gpt2\nmax_r: 100000000000000000000\n", "max_r: must be at most"),
        ("cdka_recipe: 1\nmodel: gpt2\ntrain: {lr: .inf}\n", "train.lr: expected a finite number, got inf"),
        ("cdka_recipe: true\nmodel: gpt2\n", "'cdka_recipe' is True"),
    ],
)
def test_recipe_values(cli, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    rejects(cli, tmp_path, ["plan", "--recipe", str(tmp_path / "r.yaml")], "plan", message)


# 10, 18. Output files: special files written through, temporary files of killed writers removed ----


def test_output_to_dev_null_keeps_the_device(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("plan", "-m", "gpt2", "-b", "lora:2", "-o", os.devnull)
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert not [p for p in Path("/dev").glob(".null.*")]


def test_output_to_a_fifo_writes_through_it(tmp_path):
    from cdka_search.fileio import atomic_write_text

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic_write_text(fifo, "cdka_plan: 1\n")
    reader.join(timeout=10)
    assert got == [b"cdka_plan: 1\n"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_fifo_that_nothing_reads_fails_instead_of_hanging(tmp_path, monkeypatch):
    from cdka_search import fileio

    monkeypatch.setattr(fileio, "FIFO_WAIT", 0.2)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OutputError, match=r"^cannot write .*pipe: a FIFO that nothing read for 0.2 s$"):
        fileio.atomic_write_text(tmp_path / "pipe", "cdka_plan: 1\n")


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_link_that_leads_nowhere_is_refused_and_kept(cli, tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    if kind == "loop":
        Path("a.yaml").symlink_to("b.yaml")
        Path("b.yaml").symlink_to("a.yaml")
        message = "cannot write a.yaml: Too many levels of symbolic links"
    else:
        Path("a.yaml").symlink_to(tmp_path / "missing" / "plan.yaml")
        message = f"cannot write a.yaml: a link to {tmp_path / 'missing' / 'plan.yaml'}, whose folder does not exist"
    before = {p.name: os.readlink(p) for p in tmp_path.iterdir()}
    result = cli("plan", "-m", "gpt2", "-b", "lora:2", "-o", "a.yaml")
    assert result.exit_code == 10 and result.output.strip().splitlines()[-1] == f"error: {message}"
    assert {p.name: os.readlink(p) for p in tmp_path.iterdir()} == before  # no folder made through the link


@pytest.mark.parametrize("args", [
    ["plan", "-m", "gpt2", "-b", "lora:2", "-o", "y" * 300 + ".yaml"],
    ["validate", "y" * 300 + ".yaml"],
    ["plan", "-m", "gpt2", "-b", "lora:2", "--reference", "/".join(["d"] * 2100)],
])
def test_a_path_longer_than_the_system_takes_is_one_line(cli, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert result.exit_code == 11, result.output
    assert result.output.count("\n") == 1 and "longer than this system allows (255 bytes a name, 4,095 in all)" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["z" * 5000, "d/" + "z" * 5000 + "/config.json"])
def test_an_unknown_model_is_named_briefly(cli, model):
    result = cli("plan", "-m", model, "-b", "1%")
    assert result.exit_code == 3 and result.output.count("\n") == 1 and len(result.output) < 200, result.output
    assert "zzz...zzz" in result.output


def test_an_operating_system_error_no_check_caught_is_one_line(monkeypatch, capsys):
    import errno

    import typer

    from cdka_search.cli.common import guarded

    @guarded
    def command() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/plan.yaml")

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 1 and capsys.readouterr().err == "error: '/srv/plan.yaml': Permission denied\n"


def test_a_link_keeps_pointing_at_the_rewritten_file(tmp_path):
    from cdka_search.fileio import atomic_write_text

    (tmp_path / "real.yaml").write_text("old")
    (tmp_path / "link.yaml").symlink_to("real.yaml")
    atomic_write_text(tmp_path / "link.yaml", "new")
    assert (tmp_path / "link.yaml").is_symlink() and (tmp_path / "real.yaml").read_text() == "new"


def test_a_killed_writer_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "plan.yaml"
    child = (
        "import os, signal, sys, tempfile;"
        f"fd, _ = tempfile.mkstemp(prefix='.plan.yaml.' + str(os.getpid()) + '.', suffix='.tmp', dir={str(tmp_path)!r});"
        "os.write(fd, b'half'); os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", child], check=False)
    assert done.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".plan.yaml.*.tmp")
    live = tmp_path / f".plan.yaml.{os.getpid()}.x.tmp"  # this process's own: not touched
    live.write_text("mine")
    from cdka_search.fileio import atomic_write_text

    atomic_write_text(target, "cdka_plan: 1\n")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plan.yaml", live.name])


# 11. Multi-file exports: all or nothing ----------------------------------------------------------


def _export(*paths: str, text: str = "{}\n"):
    from cdka_search.export.base import Export, ExportFile

    return Export("peft", tuple(ExportFile(p, text) for p in paths), (), (), "peft_adapter", 0, {})


def test_a_new_export_replaces_the_old_one_whole(tmp_path):
    from cdka_search.export import write_export

    out = tmp_path / "adapter"
    write_export(_export("a/adapter_config.json", "b/adapter_config.json", "c/adapter_config.json"), out_dir=out)
    write_export(_export("a/adapter_config.json", "d/adapter_config.json", text='{"new": 1}\n'), out_dir=out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")) == ["a/adapter_config.json", "d/adapter_config.json"]
    assert json.loads((out / "a" / "adapter_config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left


def test_a_failing_export_changes_nothing(tmp_path, monkeypatch):
    from cdka_search.export import write_export

    out = tmp_path / "adapter"
    write_export(_export("a/adapter_config.json", "b/adapter_config.json"), out_dir=out)
    before = snapshot(tmp_path)
    real_open, calls = Path.open, []

    def full_disk(self, mode="r", *args, **kwargs):
        if "w" in mode:
            calls.append(self)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(OutputError, match="No space left on device; nothing was changed"):
        write_export(_export("a/adapter_config.json", "b/adapter_config.json", "c/adapter_config.json", text="new"), out_dir=out)
    assert snapshot(tmp_path) == before


def test_export_refuses_to_replace_a_folder_of_other_files(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert cli("plan", "-m", str(tmp_path / "config.json"), "-b", "3000", "--family", "lokr", "-o", "plan.yaml").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_text("precious")
    result = cli("export", "plan.yaml", "--to", "peft", "--out", str(mine))
    if result.exit_code == 0:  # a single config is written beside the other files, never replacing them
        assert (mine / "weights.bin").read_text() == "precious"
    else:
        rejects(cli, tmp_path, ["export", "plan.yaml", "--to", "peft", "--out", str(mine)], "export", "not an earlier cdka export")


def test_export_and_validate_of_a_local_plan_need_no_model(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert cli("plan", "-m", str(tmp_path / "config.json"), "-b", "lora:2", "--family", "lora", "-o", "plan.yaml").exit_code == 0
    assert f"path: {tmp_path / 'config.json'}" in (tmp_path / "plan.yaml").read_text()
    result = cli("export", "plan.yaml", "--to", "peft", "--out", "adapter")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]) == 14
    valid = cli("validate", "plan.yaml")
    assert valid.exit_code == 0 and f"matches {tmp_path / 'config.json'}" in valid.stdout
    (tmp_path / "config.json").unlink()
    rejects(cli, tmp_path, ["validate", "plan.yaml"], "model", "which no longer exists; give the model with --model")


# 12. cdka report --out ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    from cdka_search.sweep.study import SweepConfig, run_sweep

    root = tmp_path_factory.mktemp("study")
    (root / "config.json").write_text(json.dumps(TINY))
    storage = f"sqlite:///{root / 's.db'}"
    run_sweep(SweepConfig(model=str(root / "config.json"), budget="lora:4", trials=2, steps=5, storage=storage,
                          study="s", output=None))
    return storage


@pytest.mark.parametrize(("make", "message"), [("file", "is a file; give a folder"), ("under-file", "cannot be created: ")])
def test_report_out_errors(cli, tmp_path, finished_study, make, message):
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" if make == "file" else tmp_path / "taken" / "plots"
    rejects(cli, tmp_path, ["report", "--storage", finished_study, "--study", "s", "--out", str(out)], "output", message)


# 14. probe --grad: a corrupt tokenizer, a model asking for remote code -------------------------------


@pytest.mark.parametrize(("file", "content", "message"), [
    ("tokenizer.json", "{not json", "cannot load its tokenizer"),
    ("tokenizer_config.json", '{"auto_map": {"AutoTokenizer": ["x.Tok", null]}}', "cdka refuses remote code"),
    ("config.json", None, "cdka refuses remote code"),
])
def test_probe_grad_bad_model_folder(cli, tmp_path, file, content, message):
    from tests.tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / file
    if content is None:
        config = json.loads(path.read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        path.write_text(json.dumps(config))
    else:
        path.write_text(content)
    (tmp_path / "t.txt").write_text("some text\n\nmore text\n")
    rejects(cli, tmp_path, ["probe", "--grad", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "-o",
                            str(tmp_path / "r.safetensors")], "model", message)


@pytest.mark.parametrize(("extra", "refused"), [
    ({}, False),  # a built-in family reads the shapes and loads no code (docs/models.md, DeepSeek-V3)
    ({"some_new_field": 1}, True),  # this config would go through transformers
])
def test_auto_map_is_refused_where_transformers_would_read_the_config(cli, tmp_path, extra, refused):
    config = tmp_path / "m" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({**TINY, **extra, "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
    if refused:
        rejects(cli, tmp_path, ["inspect", str(config.parent)], "model",
                f"{config.parent}: config.json asks to run custom code shipped with the model (auto_map); cdka refuses remote code")
    else:
        assert cli("inspect", str(config.parent)).exit_code == 0


# 20. Small things -------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("sqlite:///~/s.db", "sqlite:///{home}/s.db"),
    ("sqlite:///~/s.db?timeout=3", "sqlite:///{home}/s.db?timeout=3"),
    ("~/s.db", "sqlite:///{home}/s.db"),  # as bare paths and journal: files already were
    ("journal:~/s.journal", "journal:{home}/s.journal"),
    ("sqlite:///s.db", "sqlite:///s.db"),
])
def test_home_in_a_storage_path_is_expanded(monkeypatch, tmp_path, given, expected):
    from cdka_search.sweep.storage import normalise

    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalise(given) == expected.format(home=tmp_path)


def test_a_storage_home_that_cannot_be_expanded_is_one_line():
    from cdka_search.sweep.storage import normalise

    with pytest.raises(SweepError, match=r"^--storage '~no-such-user-x/s.db': cannot expand '~' \(no such user or no home directory\)$"):
        normalise("sqlite:///~no-such-user-x/s.db")


@pytest.mark.parametrize(("selection", "same_as"), [
    ("attn,mlp,attn", "all-linear"),  # presets combine as a union; a repeat is dropped
    ("attn,mlp", "all-linear"),
    ("q_proj,v_proj,q_proj", "q_proj,v_proj"),
    ("attn,q_proj", "attn"),
    (" attn ,,", "attn"),
])
def test_a_target_selection_is_the_union_of_its_items(selection, same_as):
    from cdka_search.spec import load_spec
    from cdka_search.targets import select_targets

    spec = load_spec("llama-2-7b")
    assert select_targets(spec, selection).targets == select_targets(spec, same_as).targets


@pytest.mark.parametrize(("selection", "message"), [
    ("attn,experts,attn", "selection 'experts' matches no module of llama-2-7b"),
    ("attn,q_porj", "target 'q_porj' matches no module of llama-2-7b; modules end in: down_proj"),
    (",,", "empty target list; use one of all-linear, attn, mlp, experts or module names"),
    ("attn," + "x" * 600, "module pattern of 600 characters: the limit is 512"),
])
def test_bad_target_selections(cli, tmp_path, selection, message):
    rejects(cli, tmp_path, ["inspect", "llama-2-7b", "--targets", selection], "target", message)


def test_a_selection_of_thousands_of_items_gives_bounded_lines(cli, tmp_path):
    """Every item of a selection missing, or one item repeated 10,000 times, is named in a line of bounded
    length (the repeated one made a 70,000-character warning)."""
    missing = cli("plan", "-m", "llama-2-7b", "-t", ",".join(["q_proj", *(f"nope{i}" for i in range(2000))]), "-o", str(tmp_path / "a.yaml"))
    assert missing.exit_code == 4 and not (tmp_path / "a.yaml").exists()
    assert missing.stderr.endswith("error: target 'nope0', 'nope1', 'nope2', 'nope3', 'nope4' (and 1995 more) matches no module of "
                                   "llama-2-7b; modules end in: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\n")
    repeated = cli("plan", "-m", "llama-2-7b", "-t", ",".join(["q_proj"] * 10_000), "-o", str(tmp_path / "b.yaml"))
    warning = [line for line in repeated.stderr.splitlines() if line.startswith("warning:")]
    assert repeated.exit_code == 0 and len(warning) == 1 and len(warning[0]) < 400 and "--targets 'q_proj,q_proj" in warning[0]


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("lora:99999999999999999999", "the LoRA rank must be an integer from 1 to 1,048,576"),
        ("lora:100000", "more than the model's"),
        ("1e400", "exceeds the model's"),
        ("inf", "is not understood"),
        ("0.0000001%", "less than one parameter"),
        ("x" * 10_000, "is not understood"),
    ],
)
def test_budget_messages(cli, tmp_path, monkeypatch, budget, message):
    monkeypatch.chdir(tmp_path)
    rejects(cli, tmp_path, ["plan", "-m", "gpt2", "-b", budget], "budget", message)


def test_unknown_model_type_is_one_line(cli, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model", "hidden_size": 8}')
    rejects(cli, tmp_path, ["inspect", str(tmp_path / "config.json")], "model",
            "model_type 'no-such-model' is neither built into cdka (see docs/models.md) nor known to the installed transformers")


def test_unknown_model_type_is_refused_without_importing_torch(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model", "hidden_size": 8}')
    child = (
        "import sys\nfrom cdka_search.errors import ModelSourceError\nfrom cdka_search.spec import load_spec\n"
        f"try:\n    load_spec({str(tmp_path)!r})\nexcept ModelSourceError:\n    print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_transformers_knows_its_own_model_types():
    from cdka_search.spec.torch_module import transformers_knows

    assert transformers_knows("qwen2_moe") and transformers_knows("llama")
    assert not transformers_knows("no-such-model")


def test_explain_params_lora_counts_the_shape(cli):
    result = cli("explain", "--shape", "64x32", "--params", "lora:8", "--json")
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert f"within {8 * (64 + 32)} parameters" in table["title"]
    assert max(row["params"] for row in table["rows"]) <= 8 * (64 + 32)


def test_pinned_r_budget_message_names_the_pins(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = rejects(cli, tmp_path, ["plan", "-m", "gpt2", "-b", "20000", "--r", "8"], "budget", "under any pins such as --r")
    assert "r = 1 everywhere" not in err


def test_nan_reference_is_named(cli, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    bad = torch.full((64, 64), float("nan"))
    save_file({"model.layers.0.self_attn.q_proj": bad}, str(tmp_path / "ref.safetensors"), metadata={"cdka_reference": "1", "kind": "delta"})
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rejects(cli, tmp_path, ["plan", "-m", str(tmp_path / "config.json"), "-b", "lora:2", "--reference", str(tmp_path / "ref.safetensors")],
            "reference", "has NaN or infinite entries")


# 15, 16, 17. Sweep bookkeeping (the SIGKILL stress test is in test_sweep_workers.py) ----------------


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def _study():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(direction="minimize")


def test_trial0_lost_any_number_of_times_is_queued_again():
    import socket

    from optuna.trial import TrialState

    from cdka_search.sweep.bookkeeping import HEURISTIC, STAMPED, WORKER, ensure_heuristic, heuristic_done, reap_dead

    study, params = _study(), {"g": "1,1,4", "alpha": 64.0, "lr": 0.005}
    for _ in range(5):  # five kills while trial 0 trains: more than any retry budget
        ensure_heuristic(study, params)
        trial = study.ask()
        assert trial.user_attrs.get(HEURISTIC)
        trial.suggest_categorical("g", ["1,1,4", "2,2,4"])
        trial.set_user_attr(WORKER, f"{socket.gethostname()}:{_dead_pid()}")
        trial.set_user_attr(STAMPED, trial.number)
        assert reap_dead(study) == 1  # the dead worker's trial is failed and queued again at once
        assert study.get_trials(deepcopy=False)[-1].state == TrialState.WAITING
        copy = study.ask()  # the queued copy starts: not stamped yet, so no other worker reaps it
        assert reap_dead(study) == 0
        study.tell(copy, state=TrialState.FAIL)  # then its worker dies before stamping it (heartbeat's case)
    assert not heuristic_done(study)
    assert ensure_heuristic(study, params)  # still missing: queued again
    trial = study.ask()
    trial.suggest_categorical("g", ["1,1,4", "2,2,4"])
    study.tell(trial, 0.5)
    assert heuristic_done(study) and not ensure_heuristic(study, params)


def test_resumed_seed_draws_differently_and_duplicates_are_replaced():
    from cdka_search.sweep.bookkeeping import trial_seed, untried_design

    assert trial_seed(0, 5) == trial_seed(0, 5) and trial_seed(0, 5) != trial_seed(0, 6) != trial_seed(1, 6)
    labels = [["a", "b"], ["x", "y", "z"]]
    tried = {("a", "x"), ("a", "y"), ("b", "z")}
    fresh = untried_design(labels, tried, seed=3)
    assert fresh not in tried and fresh == untried_design(labels, tried, seed=3)
    everything = {(a, b) for a in labels[0] for b in labels[1]}
    assert untried_design(labels, everything, seed=3) is None  # exhausted: duplicates allowed


def test_same_seed_resume_trains_no_design_twice(tmp_path):
    from cdka_search.sweep.bookkeeping import counted
    from cdka_search.sweep.study import SweepConfig, open_study, run_sweep

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    for trials in (3, 6, 9):  # the README's recipe: rerun the same command, same --seed, more trials
        run_sweep(SweepConfig(model=str(tmp_path / "config.json"), budget="lora:4", trials=trials, steps=5,
                              storage=storage, study="s", seed=0, output=None))
    trials_ = [t for t in open_study(storage, "s", heartbeat=False).get_trials(deepcopy=False) if counted(t)]
    groups = sorted(n for n in trials_[0].params if n not in ("alpha", "lr"))
    designs = [tuple(t.params[n] for n in groups) for t in trials_]
    assert len(trials_) == 9 and len(set(designs)) == 9


def test_may_start_stops_at_the_total_and_lets_the_lowest_running_trial_finish():
    from optuna.trial import TrialState

    from cdka_search.sweep.bookkeeping import may_start, stamp

    study = _study()
    for value in (1.0, 2.0):
        t = study.ask()
        study.tell(t, value)
    a, b = study.ask(), study.ask()  # two workers' trials in flight, the study wants 3
    stamp(a)
    stamp(b)
    assert may_start(study, a.number, 3) and not may_start(study, b.number, 3)
    study.tell(a, 0.5)
    assert not may_start(study, b.number, 3)
    assert [t.state for t in study.get_trials()].count(TrialState.COMPLETE) == 3


def test_a_json_plan_is_read_within_its_limits(cli, tmp_path, plan_text):
    import yaml

    from cdka_search.plan import PLAN_JSON_LIMITS

    wide = tmp_path / "wide.json"
    wide.write_text('{"cdka_plan": 1, "x": [' + ",".join(["[]"] * (PLAN_JSON_LIMITS.max_arrays + 1)) + "]}")
    rejects(cli, tmp_path, ["validate", str(wide)], "plan", "more arrays than such a document can hold (600,000)")
    good = tmp_path / "plan.json"
    good.write_text(json.dumps(yaml.safe_load(plan_text)))
    result = cli("validate", str(good))
    assert result.exit_code == 0 and "valid plan" in result.stdout


def test_the_rejection_benchmark_runs():
    """Smoke run of benchmarks/hostile_inputs.py on its quick classes (its time and memory targets are
    the benchmark's to show, not this test's)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "hostile_inputs.py"
    done = subprocess.run([sys.executable, str(script), "--only", "1", "3", "6", "9", "19", "--ignore-targets"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(script.parent.parent)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "billion laughs plan (1 KB)" in done.stdout and "every case rejected with one error line: yes" in done.stdout


def test_a_killed_export_leaves_a_temp_folder_that_the_next_export_removes(tmp_path):
    from cdka_search.export import write_export

    stale = tmp_path / f".adapter.{_dead_pid()}.abc.tmp"
    (stale / "a").mkdir(parents=True)
    (stale / "a" / "adapter_config.json").write_text("{}")
    write_export(_export("a/adapter_config.json", "b/adapter_config.json"), out_dir=tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(("line", "message"), [
    ("[" * 100_000 + "]" * 100_000, "line 2: nested deeper than"),
    ('{"text": ' + "9" * 5000 + "}", "line 2: a number is too long"),
    ('{"text": 1}', "line 2 has no string 'text' field"),
    ('{"text": "a", "text": "b"}', "train.jsonl: line 2: duplicate key 'text'"),
    ('{"text": "a", "score": NaN}', "train.jsonl: line 2: NaN is not a JSON value"),
    ('{"text": "a", "score": -Infinity}', "train.jsonl: line 2: -Infinity is not a JSON value"),
    ('{"text": "a", "score": 1e400}', "train.jsonl: line 2: number '1e400' is out of range"),
])
def test_bad_jsonl_data_lines(tmp_path, line, message):
    from cdka_search.textdata import read_examples

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_examples(data)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.json", b'{"text": "a", "text": "b"}\n', "d.json: line 1: duplicate key 'text'"),
    ("d.json", b'[{"text": "a", "n": NaN}]', "d.json: NaN is not a JSON value"),
    ("d.txt", b"\0" * 64, "d.txt: line 1 holds a NUL byte; a data file is text"),
    ("d.jsonl", b'{"text": "a"}\n\n{"text": "b"}\0\n', "d.jsonl: line 3 holds a NUL byte; a data file is text"),
    ("d.csv", b"text\nhello\n", "d.csv: not a data format cdka reads (.txt, .jsonl, .json: plain text, JSON Lines, JSON)"),
    ("data", b"hello\n", "data: not a data format cdka reads (.txt, .jsonl, .json: plain text, JSON Lines, JSON)"),
])
def test_bad_data_files(tmp_path, name, content, message):
    from cdka_search.textdata import read_examples

    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as raised:
        read_examples(tmp_path / name)
    assert str(raised.value) == f"{tmp_path}/{message}"


@pytest.mark.parametrize(("name", "content"), [
    ("d.txt", b"first doc\nline two\n\nsecond doc\n"),
    ("d.jsonl", b'{"text": "first doc\\nline two"}\n{"text": "second doc"}\n'),
    ("d.json", b'[{"text": "first doc\\nline two"}, {"text": "second doc"}]'),
])
@pytest.mark.parametrize("windows", ["bom", "crlf", "bom+crlf", "cr"])
def test_a_data_file_from_a_windows_editor_reads_as_its_plain_twin(tmp_path, name, content, windows):
    """A BOM was trained as text in .txt and refused in JSON; CRLF kept a CR and hid .txt's blank lines."""
    from cdka_search.textdata import read_examples

    plain = tmp_path / name
    plain.write_bytes(content)
    twin = tmp_path / "twin" / name
    twin.parent.mkdir()
    edited = content.replace(b"\n", b"\r" if windows == "cr" else b"\r\n") if "cr" in windows else content
    twin.write_bytes((b"\xef\xbb\xbf" if "bom" in windows else b"") + edited)
    expected = read_examples(plain)
    assert [e.completion for e in expected] == ["first doc\nline two", "second doc"]
    assert read_examples(twin) == expected


def test_a_nul_character_spelled_as_a_json_escape_is_refused_as_a_raw_one_is(tmp_path):
    from cdka_search.textdata import read_examples

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "a", "completion": "b\\u0000c"}\n')
    with pytest.raises(DataError) as raised:
        read_examples(data)
    assert str(raised.value) == f"{data}: line 2, 'completion' holds a NUL character (\\u0000); a data file is text"


def test_probe_refuses_a_csv_data_file_before_any_work(cli, tmp_path):
    (tmp_path / "m").mkdir()  # no config.json: the data file is judged first
    (tmp_path / "t.csv").write_text("text\nhello\n")
    rejects(cli, tmp_path, ["probe", "--grad", str(tmp_path / "m"), "--data", str(tmp_path / "t.csv"), "-o",
                            str(tmp_path / "r.safetensors")], "data", "t.csv: not a data format cdka reads")


def test_a_second_copy_of_the_heuristic_plan_is_skipped_untrained():
    """Two workers opening a new study at once may both queue trial 0: only the first copy trains."""
    from cdka_search.sweep import objective
    from cdka_search.sweep.bookkeeping import HEURISTIC, SKIPPED, counted

    study = _study()
    for _ in range(2):
        study.enqueue_trial({}, user_attrs={HEURISTIC: True}, skip_if_exists=False)
    first, second = study.ask(), study.ask()
    objective.stamp(first)  # trial 0 is training in this process
    value = objective.Objective(None, None, trials=3)(second)  # type: ignore[arg-type]  # never reaches the task
    assert math.isnan(value) and second.user_attrs[SKIPPED] == f"a copy of the heuristic plan, trial {first.number}"
    study.tell(second, value)
    assert not counted(study.trials[second.number])


def test_a_worker_waits_for_room_then_stops_or_gives_up(monkeypatch):
    from cdka_search.sweep import objective
    from cdka_search.sweep.bookkeeping import STAMPED, WORKER, longest_wait_s

    study = _study()
    for value in (1.0, 2.0):
        t = study.ask()
        study.tell(t, value)
    other = study.ask()  # another host's trial, in flight: this host cannot tell whether it lives
    other.set_user_attr(WORKER, "another-host:1")
    other.set_user_attr(STAMPED, other.number)
    mine = study.ask()
    assert longest_wait_s(study) == 600.0
    waiting = objective.Objective(None, None, trials=3)  # type: ignore[arg-type]
    monkeypatch.setattr(objective, "longest_wait_s", lambda st: 0.0)
    assert waiting._wait_for_room(mine)  # gave up waiting: trains (journal storages, dead remote worker)
    study.tell(other, 0.5)
    assert not waiting._wait_for_room(mine)  # the study is full: stop


@pytest.mark.parametrize(
    ("args", "code", "option"),
    [
        (["plan", "-m", "gpt2", "-b", "0.5%", "--recipe", "~nosuchuserx/r.yaml"], 5, "--recipe"),
        (["sweep", "-m", "gpt2", "-b", "0.5%", "--trials", "1", "--storage", "~nosuchuserx/s.db"], 7, "--storage"),
        (["sweep", "-m", "gpt2", "-b", "0.5%", "--trials", "1", "--storage", "journal:~nosuchuserx/s.journal"], 7, "--storage"),
    ],
)
def test_a_home_of_no_such_user_is_one_error_line(cli, args, code, option):
    result = cli(*args)
    assert result.exit_code == code, result.output
    assert f"error: {option} '~nosuchuserx/" in result.stderr and "cannot expand '~'" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
