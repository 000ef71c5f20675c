"""Conformance: every entry of every extension-point registry does what its registry promises.

One test per registry (docs/extending.md): EXPORTERS, TASKS, PRUNERS, SOURCES, OBJECTIVES here; FAMILIES
in tests/test_families.py (test_every_family_has_a_conformance_case and the meta-device comparisons).
An entry added without a case here fails the "every ... has a case" tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
from test_spec import TOTALS, write_header_only

from cdka_search.errors import SweepError
from cdka_search.export import EXPORTERS, get_exporter, write_export
from cdka_search.plan import dumps_plan, load_plan
from cdka_search.scoring import OBJECTIVES
from cdka_search.spec import SOURCES, load_spec
from cdka_search.spec.sources import existing_path
from cdka_search.sweep.pruners import PRUNERS, make_pruner
from cdka_search.sweep.tasks import TASKS, TaskOptions, make_task

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "export_golden"


# exporters ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["lora", "lokr"])
@pytest.mark.parametrize("target", sorted(EXPORTERS))
def test_every_exporter_exports_a_small_plan_and_its_files_read_back(target, family, tmp_path):
    if target == "lycoris":
        pytest.importorskip("tomli_w")
    plan = load_plan(GOLDEN / f"plan-{family}.yaml")
    before = dumps_plan(plan)
    exporter = get_exporter(target)
    assert callable(exporter)
    export = exporter(plan, load_spec(str(GOLDEN)))
    assert export.target == target and export.files
    assert export.trainable_params == plan.used_params  # 5,760 (lora), 2,816 (lokr)
    assert len(export.rows) == len(plan.groups)
    assert dumps_plan(plan) == before  # an exporter never changes the plan
    written = write_export(export, out_dir=tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(f.path for f in export.files)
    for f in export.files:
        assert (tmp_path / "out" / f.path).read_text(encoding="utf-8") == f.text


# sweep tasks ----------------------------------------------------------------------------------------------
TEXT = " ".join(f"the adapter number {i % 11} learns a kronecker update under a budget." for i in range(80))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer LlamaForCausalLM folder (hidden 32, vocab 260) made here, and a text file beside it."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=260, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("registries") / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder.parent / "train.txt").write_text(TEXT)
    return folder


#: task -> the TaskOptions its conformance run uses (4 steps, a value every 2), given the tiny model folder.
TASK_CASES: dict[str, Callable[[Path], TaskOptions]] = {
    "proxy": lambda folder: TaskOptions(steps=4, seed=1, report_every=2),
    "lm": lambda folder: TaskOptions(steps=4, seed=1, report_every=2, batch_size=2, model=folder,
                                     data=folder.parent / "train.txt"),
}


def test_every_task_has_a_conformance_case():
    assert sorted(TASK_CASES) == sorted(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_builds_prepares_and_runs_a_tiny_space(name, tiny_lm):
    from cdka_search.sweep.space import build_space
    from cdka_search.targets import select_targets

    options = TASK_CASES[name](tiny_lm)
    task = make_task(name, options)
    assert task.name == name
    assert task.needs <= {"data", "model"} and task.takes <= {"data", "reference"} and not task.needs & task.takes
    for need in task.needs:  # what run_sweep checks up front, the task refuses to be built without
        with pytest.raises(SweepError):
            make_task(name, replace(options, **{need: None}))
    low, high = task.lr_range
    assert 0 < low <= task.default_lr <= high
    space = build_space(select_targets(load_spec(str(tiny_lm)), "all-linear"), "lora:2")
    task.prepare(space)
    reports: list[tuple[int, float]] = []
    value = task.run(space.heuristic, task.default_lr, lambda step, v: reports.append((step, v)))
    assert [step for step, _ in reports] == [2, 4]
    assert math.isfinite(value) and value > 0 and value == reports[-1][1]
    assert task.run(space.heuristic, task.default_lr, lambda step, v: None) == value  # seeded: a trial repeats


# pruners --------------------------------------------------------------------------------------------------
#: pruner -> whether it stops some of 12 trials whose values get steadily worse (20 steps, a value every 2).
PRUNES_WORSE_TRIALS = {"median": True, "hyperband": True, "none": False}


def test_every_pruner_has_a_conformance_case():
    assert sorted(PRUNES_WORSE_TRIALS) == sorted(PRUNERS)


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_builds_an_optuna_pruner_for_steps_and_every(name):
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    steps, every = 20, 2
    pruner = make_pruner(name, steps, every)
    assert isinstance(pruner, optuna.pruners.BasePruner)

    def objective(trial):
        value = 0.0
        for step in range(every, steps + 1, every):
            value = trial.number + 1.0 / step  # later trials are worse at every step
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=12)
    states = [t.state for t in study.trials]
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert states[0] == TrialState.COMPLETE  # nothing to compare the first trial with
    assert (TrialState.PRUNED in states) == PRUNES_WORSE_TRIALS[name]


# model sources --------------------------------------------------------------------------------------------
def _safetensors_folder(tmp_path: Path) -> str:
    header = json.loads((DATA / "gpt2" / "header.json").read_text())
    write_header_only(tmp_path / "model.safetensors", header)
    return str(tmp_path)


def _sharded_index(tmp_path: Path) -> str:
    """GPT-2's header split over two shards and an index: a .json file the config-file kind must not take."""
    header = json.loads((DATA / "gpt2" / "header.json").read_text())
    names = [k for k in header if k != "__metadata__"]
    shard_of = {k: "a.safetensors" if i < len(names) // 2 else "b.safetensors" for i, k in enumerate(names)}
    for shard in ("a.safetensors", "b.safetensors"):
        write_header_only(tmp_path / shard, {k: header[k] for k in names if shard_of[k] == shard})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard_of}))
    return str(tmp_path / "model.safetensors.index.json")


#: (source kind, GPT-2 (124,439,808 parameters) given in a form that kind reads).
SOURCE_CASES: list[tuple[str, Callable[[Path], str]]] = [
    ("hf-folder", lambda tmp_path: str(DATA / "gpt2")),
    ("safetensors-folder", _safetensors_folder),
    ("safetensors-file", lambda tmp_path: _safetensors_folder(tmp_path) + "/model.safetensors"),
    ("safetensors-file", _sharded_index),
    ("config-file", lambda tmp_path: str(DATA / "gpt2" / "config.json")),
    ("preset", lambda tmp_path: "gpt2"),
]


def test_every_source_has_a_conformance_case():
    assert {kind for kind, _ in SOURCE_CASES} == set(SOURCES)


@pytest.mark.parametrize("kind, example", SOURCE_CASES)
def test_every_source_reads_its_example_into_a_model_spec(kind, example, tmp_path):
    model = example(tmp_path)
    first = next(k for k, s in SOURCES.items() if s.matches(model, existing_path(model)))
    assert first == kind  # the example is read by this kind, not by one tried earlier
    spec = load_spec(model)
    assert spec.total_params == TOTALS["gpt2"]
    assert len(spec.targets) == 48  # c_attn, c_proj, c_fc, mlp.c_proj of 12 blocks


def test_a_path_no_source_reads_keeps_its_errors(tmp_path):
    from cdka_search.errors import ModelSourceError

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelSourceError, match="notes.txt: expected a folder, config.json, .safetensors or .index.json"):
        load_spec(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelSourceError, match="^missing/config.json: no such file or folder$"):
        load_spec("missing/config.json")
    for name in ("~no-such-user-cdka", "x" * 300):  # expanduser and stat fail on these; read as names
        with pytest.raises(ModelSourceError, match="unknown model"):
            load_spec(name)


# objectives -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_is_finite_non_negative_and_grows_with_capacity_alignment_and_size(name):
    np = pytest.importorskip("numpy")

    objective = OBJECTIVES[name]
    single = objective(0.3, 0.5, 0.2, 0.4)
    assert np.ndim(single) == 0 and math.isfinite(float(single)) and float(single) >= 0
    rng = np.random.default_rng(0)
    cap, align, speed, size = (rng.uniform(0, 1, (3, 5)) for _ in range(4))
    values = np.asarray(objective(cap, align, speed, size))
    assert values.shape == (3, 5) and np.isfinite(values).all() and (values >= 0).all()
    assert np.allclose(values.ravel()[0], objective(*(float(a.ravel()[0]) for a in (cap, align, speed, size))))
    grid = np.linspace(0.0, 1.0, 21)[:, None] * np.ones((1, 5))  # rows: the varied input from 0 to 1
    others = rng.uniform(0, 1, (4, 5)) * np.ones((21, 1, 1))
    for axis in (0, 1, 3):  # capacity, alignment, size (speed may trade off either way)
        args = [others[:, i] for i in range(4)]
        args[axis] = grid
        out = np.asarray(objective(*args))
        assert (np.diff(out, axis=0) >= -1e-12).all(), f"{name} falls as input {axis} grows"


def test_extending_md_has_a_section_per_registry():
    text = (Path(__file__).parent.parent / "docs" / "extending.md").read_text()
    for registry, section in (("FAMILIES", "## A model family"), ("SOURCES", "## A model source"),
                              ("EXPORTERS", "## An exporter"), ("TASKS", "## A sweep task"),
                              ("PRUNERS", "## A pruner"), ("OBJECTIVES", "## An objective")):
        assert f"| `{registry}` |" in text and section in text, registry


@pytest.mark.parametrize(
    "command, option, names",
    [("sweep", "--task", TASKS), ("sweep", "--pruner", PRUNERS), ("export", "--to", EXPORTERS),
     ("plan", "--objective", OBJECTIVES)],
)
def test_every_registry_name_is_in_its_options_help(cli, command, option, names):
    res = cli(command, "--help")
    assert res.exit_code == 0 and option in res.output
    words = set(res.output.replace(",", " ").replace(".", " ").replace("(", " ").replace(")", " ").split())
    assert set(names) <= words, sorted(set(names) - words)
