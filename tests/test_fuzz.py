"""Seeded fuzzing of the document loaders: random mutations of valid plans, config.json files,
safetensors headers, adapter files and reference files (values swapped for hostile ones, keys dropped or added or duplicated, deep
nesting, anchors, truncation, stray bytes). Whatever the input, a loader returns a valid object or
raises a CdkaError; nothing else may come out. Hypothesis runs derandomized (a fixed seed), so CI
sees the same 3,350 inputs every time (700 per test: plans, the config reader, config values read by
the model families, safetensors headers; 150 adapter files, 100 reference files, 300 data files); about
40 s on 2 cores."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cdka_search.errors import CdkaError  # noqa: E402

EXAMPLES = 700
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

HOSTILE = [None, True, False, -1, 0, 1, 2**31, 2**62, 10**30, 10**400, 1.5, -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf,
           "", "x" * 5000, "abc", "../../etc/passwd", "F32", [], {}, [1, 2], [8, "8"], {"a": 1}, [[[[[[[[1]]]]]]]]]


DEEP = "__deep_%d__"  # a placeholder, replaced in the text by that many nested brackets


def undeep(text: str) -> str:
    """Expand the placeholders (serializers themselves recurse, so the nesting is written as text)."""
    for levels in (5, 31, 33, 100, 5000):
        for quoted in (f'"{DEEP % levels}"', DEEP % levels):
            text = text.replace(quoted, "[" * levels + "1" + "]" * levels)
    return text


def paths(doc, prefix=()):
    """Every (container, key) location in a JSON-like document."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            out.extend(paths(v))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            out.extend(paths(v))
    return out


def mutate_tree(data, doc):
    """One structural mutation of ``doc`` (a fresh copy) chosen by hypothesis."""
    places = paths(doc)
    if not places:
        return doc
    container, key = places[data.draw(st.integers(0, len(places) - 1))]
    op = data.draw(st.sampled_from(["value", "value", "value", "delete", "add", "wrap", "deep"]))
    if op == "value":
        container[key] = data.draw(st.sampled_from(HOSTILE))
    elif op == "delete":
        del container[key]
    elif op == "add" and isinstance(container, dict):
        container[data.draw(st.sampled_from(["extra", "aplha", "", "__metadata__", "x" * 300]))] = 1
    elif op == "wrap":
        container[key] = [container[key]]
    elif op == "deep":
        container[key] = DEEP % data.draw(st.sampled_from([5, 31, 33, 100, 5000]))
    return doc


def mutate_text(data, text: str) -> str:
    """One textual mutation: a duplicated line, an anchor/alias, truncation, stray characters."""
    op = data.draw(st.sampled_from(["none", "none", "dup", "alias", "truncate", "insert", "replace"]))
    lines = text.splitlines(keepends=True)
    i = data.draw(st.integers(0, max(0, len(lines) - 1)))
    if op == "dup" and lines:
        lines.insert(i, lines[i])
        return "".join(lines)
    if op == "alias" and lines:
        return "".join(lines[:i]) + "x: &a [1, 2]\ny: *a\n" + "".join(lines[i:])
    at = data.draw(st.integers(0, len(text)))
    if op == "truncate":
        return text[:at]
    if op == "insert":
        return text[:at] + data.draw(st.sampled_from(["{", "[", "]", ":", "\x00", "- ", "\t", "&x ", "*x", "!!python/object ", "\ufffd"])) + text[at:]
    if op == "replace":
        return text[:at] + data.draw(st.text(max_size=8)) + text[at + 1:]
    return text


def dump(doc, as_json: bool) -> str:
    import yaml

    if as_json:
        return undeep(json.dumps(doc, allow_nan=True))
    return undeep(yaml.safe_dump(doc, sort_keys=False, width=10**6))


# Plans -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_doc():
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec

    plan = make_plan(load_spec("gpt2"), "lora:4", per_layer=False)
    return plan.to_dict()


def test_plan_loader_fuzz(plan_doc):
    from cdka_search.plan import Plan, dumps_plan, loads_plan

    seen = {"ok": 0, "refused": 0}

    @SETTINGS
    @given(st.data())
    def run(data):
        doc = mutate_tree(data, json.loads(json.dumps(plan_doc)))
        as_json = data.draw(st.booleans())
        try:
            text = mutate_text(data, dump(doc, as_json))
        except (ValueError, OverflowError):
            return  # a value no serializer writes (a 400-digit int in JSON is fine; YAML may refuse)
        try:
            plan = loads_plan(text)
        except CdkaError:
            seen["refused"] += 1
            return
        seen["ok"] += 1
        assert isinstance(plan, Plan)
        assert loads_plan(dumps_plan(plan)) == plan  # what loads also saves and loads back
        json.loads(dumps_plan(plan, "json"), parse_constant=lambda c: pytest.fail(f"{c} written"))

    run()
    assert seen["ok"] + seen["refused"] >= EXAMPLES * 0.9 and seen["ok"] > 0 and seen["refused"] > EXAMPLES / 2


# config.json -------------------------------------------------------------------------------------

CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
    "rope_scaling": {"type": "linear", "factor": 2.0}, "architectures": ["LlamaForCausalLM"],
}


def test_config_reader_fuzz(tmp_path):
    """The strict reader of config.json (what the model families then validate is their own test)."""
    from cdka_search.spec.hf_config import read_config

    file = tmp_path / "config.json"
    refused = 0

    @SETTINGS
    @given(st.data())
    def run(data):
        nonlocal refused
        doc = mutate_tree(data, json.loads(json.dumps(CONFIG)))
        text = mutate_text(data, undeep(json.dumps(doc, allow_nan=True)))
        file.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            config = read_config(file)
        except CdkaError:
            refused += 1
            return
        assert isinstance(config, dict)

    run()
    assert refused > 0


# safetensors headers -----------------------------------------------------------------------------


def header_doc():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.input_layernorm.weight", "lm_head.weight"]
    shapes = [[300, 64], [64, 64], [128, 64], [64], [300, 64]]
    doc, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in zip(names, shapes):
        size = math.prod(shape) * 2
        doc[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return doc, offset


def _load_and_tally(file, seen: dict[str, int]) -> None:
    """Load a spec from ``file``: a CdkaError counts as refused, a spec must hold bounded dimensions."""
    from cdka_search.limits import MAX_DIM
    from cdka_search.spec import load_spec

    try:
        spec = load_spec(str(file))
    except CdkaError:
        seen["refused"] += 1
        return
    seen["ok"] += 1
    assert all(1 <= t.d_out <= MAX_DIM and 1 <= t.d_in <= MAX_DIM for t in spec.targets)


def test_safetensors_header_fuzz(tmp_path):

    valid, data_bytes = header_doc()
    file = tmp_path / "model.safetensors"
    seen = {"ok": 0, "refused": 0}

    @SETTINGS
    @given(st.data())
    def run(data):
        doc = mutate_tree(data, json.loads(json.dumps(valid)))
        body = mutate_text(data, undeep(json.dumps(doc, allow_nan=True))).encode("utf-8", "surrogatepass")
        length = len(body)
        if data.draw(st.integers(0, 9)) == 0:  # a lying length field
            length = data.draw(st.sampled_from([0, 1, max(0, length - 1), length + 1, 2**40, 2**64 - 1]))
        with file.open("wb") as fh:
            fh.write(struct.pack("<Q", length) + body)
            fh.truncate(8 + len(body) + data.draw(st.sampled_from([0, data_bytes - 1, data_bytes, 10**9])))
        _load_and_tally(file, seen)

    run()
    assert seen["ok"] > 0 and seen["refused"] > EXAMPLES / 3


def test_the_fuzz_corpus_starts_from_valid_documents(tmp_path, plan_doc):
    """Unmutated, each seed document loads: the fuzz tests measure refusals of mutations only."""
    from cdka_search.plan import Plan
    from cdka_search.spec import load_spec

    assert isinstance(Plan.from_dict(plan_doc), Plan)
    doc, data_bytes = header_doc()
    body = json.dumps(doc).encode()
    file = tmp_path / "model.safetensors"
    with file.open("wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        fh.truncate(8 + len(body) + data_bytes)
    assert sorted(t.name for t in load_spec(str(file)).targets) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert load_spec(str(tmp_path / "config.json")).total_params > 0
    assert Path(tmp_path / "config.json").is_file()


def test_config_values_fuzz(tmp_path):
    """Hostile values in every field a built-in family reads (model_type kept, so nothing reaches
    transformers): the family's checks refuse them with a CdkaError, or the spec is within limits."""

    base = {k: v for k, v in CONFIG.items() if k not in ("rope_scaling", "architectures")}
    file = tmp_path / "config.json"
    seen = {"ok": 0, "refused": 0}

    @SETTINGS
    @given(st.data())
    def run(data):
        doc = dict(base)
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(sorted(k for k in base if k != "model_type")))
            doc[key] = data.draw(st.one_of(st.sampled_from(HOSTILE), st.integers(-2**70, 2**70), st.integers(0, 300)))
        file.write_text(json.dumps(doc, allow_nan=True))
        _load_and_tally(file, seen)

    run()
    assert seen["ok"] > 0 and seen["refused"] > EXAMPLES / 2


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and the tensor bytes after it."""
    raw = Path(path).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(data, file: Path, body: bytes, payload: bytes) -> None:
    """``body`` as the header of ``file``, its length field lying one time in ten."""
    size = len(body) if data.draw(st.integers(0, 9)) else data.draw(st.sampled_from([0, 7, len(body) + 1, 2**40]))
    file.write_bytes(struct.pack("<Q", size) + body + payload)


def test_adapter_file_fuzz(tmp_path):
    """Adapter files (save_adapter's safetensors, the plan as JSON in the metadata) with the header or
    the stored plan mutated, or a lying length field: read_adapter returns a plan and its tensors, or
    raises a CdkaError; a file it accepts loads onto the model or is refused the same way."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from cdka_search.adapter import apply_plan, load_adapter, read_adapter, save_adapter
    from cdka_search.planner import make_plan
    from cdka_search.spec import spec_from_module

    def tiny():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=32)
        return transformers.LlamaForCausalLM(config)

    model = tiny()
    apply_plan(model, make_plan(spec_from_module(model), "lora:2"))
    valid, payload = split_safetensors(save_adapter(model, tmp_path / "seed.safetensors"))
    plan_doc = json.loads(valid["__metadata__"]["cdka_plan"])
    file = tmp_path / "adapter.safetensors"
    seen = {"ok": 0, "refused": 0}

    @settings(SETTINGS, max_examples=150)
    @given(st.data())
    def run(data):
        doc = json.loads(json.dumps(valid))
        if data.draw(st.booleans()):
            doc["__metadata__"]["cdka_plan"] = mutate_text(data, json.dumps(mutate_tree(data, json.loads(json.dumps(plan_doc)))))
        else:
            doc = mutate_tree(data, doc)
        write_safetensors(data, file, json.dumps(doc, allow_nan=True).encode(), payload)
        try:
            plan, tensors = read_adapter(file)
            load_adapter(tiny(), file)
        except CdkaError:
            seen["refused"] += 1
            return
        seen["ok"] += 1
        assert sum(t.numel() for t in tensors.values()) == plan.used_params

    run()
    assert seen["ok"] > 0 and seen["refused"] > 50, seen


def test_reference_file_fuzz(tmp_path):
    """Reference files (`cdka probe` output) with the header mutated or a lying length field: load_reference
    returns matrices or raises a CdkaError."""
    torch = pytest.importorskip("torch")
    from cdka_search.alignment.reference import load_reference, save_reference

    seed = save_reference({"model.layers.0.mlp.up_proj": torch.randn(12, 8),
                           "model.layers.0.mlp.experts.down_proj": torch.randn(3, 8, 6)}, tmp_path / "seed.safetensors", "gradient")
    valid, payload = split_safetensors(seed)
    file = tmp_path / "ref.safetensors"
    seen = {"ok": 0, "refused": 0}

    @settings(SETTINGS, max_examples=100)
    @given(st.data())
    def run(data):
        body = mutate_text(data, undeep(json.dumps(mutate_tree(data, json.loads(json.dumps(valid))), allow_nan=True)))
        write_safetensors(data, file, body.encode(), payload)
        try:
            tensors = load_reference(file)
        except CdkaError:
            seen["refused"] += 1
            return
        seen["ok"] += 1
        assert all(t.dim() in (2, 3) and bool(torch.isfinite(t).all()) for t in tensors.values())

    run()
    assert seen["ok"] > 0 and seen["refused"] > 30, seen


# Data files for the lm task and gradient probes ------------------------------------------------------

DATA_RECORDS = [
    {"text": "plain text"},
    {"prompt": "Q: 2+2? A:", "completion": " 4"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
]


def test_data_file_fuzz(tmp_path):
    """read_examples and encode (byte ids, no tokenizer, so conversations are refused): a list of
    examples whose ids and mask line up, or a DataError, for mutated records in .jsonl, .json arrays
    and JSON Lines named .json."""
    from cdka_search.errors import DataError
    from cdka_search.textdata import encode, read_examples

    seen = {"ok": 0, "refused": 0}

    @settings(SETTINGS, max_examples=300)
    @given(st.data())
    def run(data):
        # Conversations need a chat template, so a file with one is refused here: they are drawn less often.
        chosen = data.draw(st.lists(st.sampled_from(DATA_RECORDS[:2] * 3 + DATA_RECORDS[2:]), min_size=1, max_size=4))
        records = [mutate_tree(data, json.loads(json.dumps(r))) if data.draw(st.booleans()) else r for r in chosen]
        suffix = data.draw(st.sampled_from([".jsonl", ".json"]))
        as_array = suffix == ".json" and data.draw(st.booleans())
        text = undeep(json.dumps(records, allow_nan=True) if as_array else "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))
        file = tmp_path / f"data{suffix}"
        file.write_text(mutate_text(data, text))
        try:
            examples = read_examples(file)
            tokens = encode(examples, None, 257)
        except DataError:
            seen["refused"] += 1
            return
        seen["ok"] += 1
        assert len(tokens.ids) == len(tokens.trained) and all(0 <= i < 257 for i in tokens.ids)

    run()
    assert seen["ok"] >= 30 and seen["refused"] >= 30  # 49 and 251 with this seed
