"""A sweep's study that Optuna reads back fine but cdka did not write (edited, corrupt, another tool's).

Each study is a real one made by ``cdka sweep`` on a tiny config (with an instant task instead of
training), then edited with Optuna's own API, the journal's text or SQLite. ``cdka sweep`` (resume)
must refuse it in one line, exit 7, writing nothing; ``cdka report`` must list the other trials with one
warning line, or refuse a study it cannot show.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cdka_search.errors import SweepError

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
    "architectures": ["LlamaForCausalLM"],
}
EDITED = "the study was edited, corrupt or written by another tool: start a new one with another --study name"
Q = "model.layers.*.self_attn.q_proj"


def _instant_run(self: Any, plan: Any, lr: float, report: Callable[[int, float], None]) -> float:
    """A deterministic value for a plan without training (the proxy task takes seconds per trial)."""
    value = 1 + abs(math.log(lr / 1e-3)) / 10 + sum(g.design.r for g in plan.groups) / 1000
    report(1, value)
    return value


def _instant(monkeypatch: pytest.MonkeyPatch) -> None:
    from cdka_search.sweep.tasks.proxy import ProxyTask

    monkeypatch.setattr(ProxyTask, "prepare", lambda self, space: None)
    monkeypatch.setattr(ProxyTask, "run", _instant_run)


@pytest.fixture(autouse=True)
def instant_task(monkeypatch):
    _instant(monkeypatch)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A folder with the tiny config and one finished 3-trial study "s" in s.journal and in s.db."""
    from cdka_search.sweep.study import SweepConfig, run_sweep

    root = tmp_path_factory.mktemp("made")
    (root / "config.json").write_text(json.dumps(TINY))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _instant(monkeypatch)
        for storage in (f"journal:{root / 's.journal'}", f"sqlite:///{root / 's.db'}"):
            run_sweep(SweepConfig(model=str(root / "config.json"), budget="lora:4", trials=3, steps=5, storage=storage,
                                  study="s", output=None))
    return root


def _copy(made: Path, tmp_path: Path, name: str = "s.journal") -> Path:
    return Path(shutil.copy(made / name, tmp_path / name))


def _study(path: Path) -> Any:
    import optuna

    if path.suffix == ".db":
        return optuna.load_study(study_name="s", storage=f"sqlite:///{path}")
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))  # the lock cdka takes
    return optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(backend))


def _sweep(cli, made: Path, tmp_path: Path, storage: str, trials: int = 3):
    return cli("sweep", "-m", str(made / "config.json"), "-b", "lora:4", "--trials", str(trials), "--steps", "5",
               "--storage", storage, "--study", "s", "-o", str(tmp_path / "best.yaml"), "--json")


def _report(cli, storage: str):
    return cli("report", "--storage", storage, "--study", "s", "--no-plots", "--json")


def _unchanged(journal: Path, before: bytes) -> bool:
    """Not a byte written (create_study would add a "create study" line even for a study that exists)."""
    return journal.read_bytes() == before


def _refused(result: Any, message: str) -> None:
    assert result.exit_code == SweepError.exit_code, result.output
    assert result.stderr == f"error: {message}\n"
    assert "Traceback" not in result.output and result.stdout == ""


# hostile trials, added with Optuna's storage API (which, unlike study.add_trial, checks nothing) -----------
def _add(study: Any, state: str = "COMPLETE", value: float | None = 0.001, *, values: list[float] | None = None,
         params: dict[str, Any] | None = None, dists: dict[str, Any] | None = None, user: dict[str, Any] | None = None,
         system: dict[str, Any] | None = None, best: bool = True) -> int:
    """Add a trial; with ``best``, it starts from the parameters and distributions of the study's best trial."""
    from optuna.trial import FrozenTrial, TrialState

    template = study.best_trial if best else None
    now = datetime.datetime.now()
    trial = FrozenTrial(
        number=0, state=TrialState[state], value=value, values=values, datetime_start=now,
        datetime_complete=now if TrialState[state].is_finished() else None,
        params={**(template.params if template else {}), **(params or {})},
        distributions={**(template.distributions if template else {}), **(dists or {})},
        user_attrs=user or {}, system_attrs=system or {}, intermediate_values={}, trial_id=0,
    )
    return study._storage.create_new_trial(study._study_id, template_trial=trial)


def _dead_running(study: Any, **attrs: Any) -> None:
    """A RUNNING trial stamped by a process of this host that no longer exists, with ``attrs`` over its stamp."""
    trial_id = _add(study, "RUNNING", None, best=False, user={"worker": f"{socket.gethostname()}:999999999"})
    study._storage.set_trial_user_attr(trial_id, "worker_trial", study._storage.get_trial(trial_id).number)
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)


def _categorical(*choices: Any) -> Any:
    from optuna.distributions import CategoricalDistribution

    return CategoricalDistribution(list(choices))


def _journal_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


LR_MARK = 0.0123456789  # a value written in the journal's text, to be replaced by what Optuna's API refuses

# (edit of the study or of its journal file, the problem named, and a report's: True for the same, False when
# the trial is listed; a report does not know the sweep's space, so a design the space lacks is listed)
TRIALS: dict[str, tuple[Callable[[Any, Path], Any], str, bool | str]] = {
    # ValueError: invalid literal for int() with base 10: 'x' (reap_dead)
    "requeued text": (lambda s, p: _dead_running(s, requeued="x"), "user attribute 'requeued' must be a count, got 'x'",
                      True),
    # OverflowError: cannot convert float infinity to integer
    "requeued inf": (lambda s, p: _dead_running(s, requeued=math.inf), "user attribute 'requeued' must be a count, got inf",
                     True),
    # counted as another host's live trial: a worker waited 10 minutes for it
    "worker list": (lambda s, p: _dead_running(s, worker=[1, 2]),
                    "user attribute 'worker' must be a host:pid text, got [1, 2]", True),
    "worker huge": (lambda s, p: _dead_running(s, worker="h" * 10**6 + ":1"),
                    f"user attribute 'worker' must be a host:pid text, got '{'h' * 27}...{'h' * 26}:1'", True),
    "stamp text": (lambda s, p: _dead_running(s, worker_trial="3"),
                   "user attribute 'worker_trial' must be a trial number, got '3'", True),
    # taken for trial 0: the plan recorded its value as the heuristic plan's
    "heuristic text": (lambda s, p: _add(s, user={"heuristic": "no"}),
                       "user attribute 'heuristic' must be true or false, got 'no'", True),
    # the report's plots: ValueError: could not convert string to float
    "params_used text": (lambda s, p: _add(s, value=5.0, user={"params_used": "lots"}),
                         "user attribute 'params_used' must be a parameter count, got 'lots'", True),
    # a one-megabyte line in the report's notes
    "pruned_reason huge": (lambda s, p: _add(s, "PRUNED", None, user={"pruned_reason": "r" * 10**6}),
                           f"user attribute 'pruned_reason' must be a text, got '{'r' * 27}...{'r' * 28}'", True),
    "skipped list": (lambda s, p: _add(s, "FAIL", None, best=False, user={"skipped": [1, 2, 3]}),
                     "user attribute 'skipped' must be a text, got [1, 2, 3]", True),
    # ValueError: could not convert string to float: 'fast' (sweep), Unknown format code 'e' (report)
    "lr text": (lambda s, p: _add(s, params={"lr": "fast"}, dists={"lr": _categorical("fast")}),
                "parameter 'lr': 'fast' is not a positive finite number", True),
    # exit 5: sweep.lr: must be a finite number, got nan
    "lr nan": (lambda s, p: (_add(s, params={"lr": LR_MARK}), _journal_text(p, str(LR_MARK), "NaN")),
               "parameter 'lr': nan is not a positive finite number", True),
    # the best plan was written with alpha -3
    "alpha negative": (lambda s, p: _add(s, params={"alpha": -3.0}, dists={"alpha": _categorical(-3.0)}),
                       "parameter 'alpha': -3.0 is not a positive finite number", True),
    # ignored by the sweep's min(), or picked as best: the order of a NaN is undefined
    "value nan": (lambda s, p: (_add(s, value=LR_MARK), _journal_text(p, str(LR_MARK), "NaN")),
                  "value: nan in a completed trial, not a finite number", True),
    # exit 5: sweep.best_value: must be a finite number, got -inf (and two more)
    "value -inf": (lambda s, p: _add(s, value=-math.inf), "value: -inf in a completed trial, not a finite number", True),
    # TypeError: '<' not supported between instances of 'NoneType' and 'float'
    "no value": (lambda s, p: _add(s, value=None), "value: missing from a completed trial", True),
    # RuntimeError: This attribute is not available during multi-objective optimization.
    "two values": (lambda s, p: _add(s, value=None, values=[0.1, 0.2]), "values: 2 objective values, not one", True),
    "queued list": (lambda s, p: _add(s, "WAITING", None, best=False, system={"fixed_params": [1, 2]}),
                    "system attribute 'fixed_params' must be a mapping, got [1, 2]", True),
    # ValueError: '9,9,9' not in (...) raised by Optuna's sampler once the queued trial started
    "queued design": (lambda s, p: _add(s, "WAITING", None, best=False, system={"fixed_params": {Q: "9,9,9"}}),
                      f"parameter '{Q}': '9,9,9' is not one of this sweep's choices for it", False),
    # the same line without the study or trial (raised by space.plan_for only when the trial was the best)
    "design": (lambda s, p: _add(s, params={Q: "9,9,9"}, dists={Q: _categorical("9,9,9")}),
               f"parameter '{Q}': '9,9,9' is not one of this sweep's choices for it", False),
    # KeyError: 'model.layers.*.self_attn.q_proj'
    "design missing": (lambda s, p: s._storage.create_new_trial(s._study_id, template_trial=_without_q(s)),
                       f"parameter '{Q}': missing from a completed trial", False),
    # accepted, and fed to the sampler
    "other distribution": (lambda s, p: _add(s, value=5.0, dists={"lr": _categorical(s.best_trial.params["lr"])}),
                           "parameter 'lr': drawn from another distribution than this sweep's",
                           "parameter 'lr': drawn from a CategoricalDistribution"),
    "other parameter": (lambda s, p: _add(s, value=5.0, params={"extra": "1,2,3"}, dists={"extra": _categorical("1,2,3")}),
                        "parameter 'extra': not a parameter of this sweep's search space", False),
}


def _without_q(study: Any) -> Any:
    import copy

    trial = copy.deepcopy(study.best_trial)
    del trial.params[Q], trial.distributions[Q]
    trial.value = 0.001
    return trial


@pytest.mark.parametrize("case", list(TRIALS))
def test_a_trial_cdka_did_not_write_is_one_line_for_sweep_and_left_out_of_report(cli, made, tmp_path, case):
    edit, problem, in_report = TRIALS[case]
    journal = _copy(made, tmp_path)
    edit(_study(journal), journal)
    storage = f"journal:{journal}"
    before = journal.read_bytes()
    _refused(_sweep(cli, made, tmp_path, storage), f"study 's' trial 3: {problem}; {EDITED}")
    assert not (tmp_path / "best.yaml").exists() and _unchanged(journal, before)

    result = _report(cli, storage)
    assert result.exit_code == 0, result.output
    shown = [t["number"] for t in json.loads(result.stdout)["trials"]]
    if in_report:
        named = problem if in_report is True else in_report
        assert result.stderr == f"warning: study 's' trial 3: {named}; left out of the report\n"
        assert shown == [0, 1, 2]
    else:
        assert result.stderr == "" and shown == [0, 1, 2, 3]


def test_the_report_names_the_first_bad_trial_and_counts_the_others(cli, made, tmp_path):
    journal = _copy(made, tmp_path)
    study = _study(journal)
    _add(study, user={"heuristic": 1})
    _add(study, user={"params_used": -1})
    _add(study)
    result = _report(cli, f"journal:{journal}")
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: study 's' trial 3: user attribute 'heuristic' must be true or false, got 1; "
                             "left out of the report, as are 1 more that cdka cannot read\n")
    assert [t["number"] for t in json.loads(result.stdout)["trials"]] == [0, 1, 2, 5]


def test_a_report_plots_a_completed_trial_without_a_design_choice(cli, made, tmp_path):
    """KeyError in choices.png: the trial's choices were looked up without the '?' the other points use."""
    journal = _copy(made, tmp_path)
    study = _study(journal)
    study._storage.create_new_trial(study._study_id, template_trial=_without_q(study))
    result = cli("report", "--storage", f"journal:{journal}", "--study", "s", "--out", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["choices.png", "history.png", "params.png"]


# the study itself --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "shown"), [("hello", "'hello'"), ([1, 2], "[1, 2]"), (5, "5")])
def test_settings_that_are_not_a_mapping_are_one_line(cli, made, tmp_path, settings, shown):
    """AttributeError: 'str' object has no attribute 'get'."""
    journal = _copy(made, tmp_path)
    _study(journal).set_user_attr("cdka_sweep", settings)
    _refused(_sweep(cli, made, tmp_path, f"journal:{journal}"),
             f"study 's': user attribute 'cdka_sweep' (the sweep's settings) must be a mapping, got {shown}; {EDITED}")
    assert _report(cli, f"journal:{journal}").exit_code == 0  # a report does not read the settings


def test_a_huge_setting_is_quoted_briefly(cli, made, tmp_path):
    """The 100,000-character value was quoted whole in the error line."""
    journal = _copy(made, tmp_path)
    study = _study(journal)
    study.set_user_attr("cdka_sweep", {**study.user_attrs["cdka_sweep"], "model": "x" * 100_000})
    result = _sweep(cli, made, tmp_path, f"journal:{journal}")
    assert result.exit_code == SweepError.exit_code and "was started with other settings (model: study has 'xxx" in result.stderr
    assert len(result.stderr) < 400 and "Traceback" not in result.output


@pytest.mark.parametrize(("directions", "what"), [([2], "maximises its value"), ([1, 1], "has 2 objectives")])
def test_a_study_that_does_not_minimise_one_value_is_refused(cli, made, tmp_path, directions, what):
    """Maximising: resumed and reported as if it minimised. Two objectives: RuntimeError or NotImplementedError."""
    journal = _copy(made, tmp_path)
    lines = journal.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), "directions": directions}) + "\n"
    journal.write_text("".join(lines))
    message = f"study 's' {what}; cdka's sweeps minimise one value: give another --study"
    _refused(_sweep(cli, made, tmp_path, f"journal:{journal}"), message)
    _refused(_report(cli, f"journal:{journal}"), message)


@pytest.mark.parametrize(
    ("sql", "raised"),
    [
        (f"UPDATE trial_params SET param_value = 99 WHERE param_name = '{Q}' AND trial_id = 2", "IndexError"),
        ("UPDATE trials SET state = 'WHAT' WHERE trial_id = 2", "LookupError"),
        ("UPDATE trial_user_attributes SET value_json = '{bad' WHERE key = 'worker'", "JSONDecodeError"),
        ("UPDATE trial_params SET distribution_json = '{}' WHERE trial_id = 2", "KeyError"),
    ],
)
def test_a_database_row_optuna_cannot_decode_is_one_line(cli, made, tmp_path, sql, raised):
    """Each was Optuna's traceback, from the first read of the trials."""
    db = _copy(made, tmp_path, "s.db")
    with sqlite3.connect(db) as connection:
        connection.execute(sql)
    connection.close()
    message = (f"study 's': Optuna cannot read it back (it raised {raised}); "
               "it was edited, corrupt or written by another tool")
    _refused(_sweep(cli, made, tmp_path, f"sqlite:///{db}"), message)
    _refused(_report(cli, f"sqlite:///{db}"), message)


def test_a_study_direction_optuna_cannot_decode_is_one_line(cli, made, tmp_path):
    """LookupError: 'X' is not among the defined enum values, from listing the storage's studies."""
    db = _copy(made, tmp_path, "s.db")
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE study_directions SET direction = 'X'")
    connection.close()
    edited = "Optuna cannot read it back (it raised LookupError); it was edited, corrupt or written by another tool"
    _refused(_sweep(cli, made, tmp_path, f"sqlite:///{db}"), f"storage sqlite:///{db}: {edited}")
    _refused(_report(cli, f"sqlite:///{db}"), f"storage sqlite:///{db}: {edited}")


# valid studies ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s.journal", "s.db"])
def test_a_valid_study_resumes_and_reports(cli, made, tmp_path, name):
    path = _copy(made, tmp_path, name)
    storage = f"journal:{path}" if name.endswith("journal") else f"sqlite:///{path}"
    result = _sweep(cli, made, tmp_path, storage, trials=5)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert summary["ran_here"] == 2 and summary["complete"] + summary["pruned"] == 5
    assert (tmp_path / "best.yaml").exists() and "warning" not in result.stderr
    result = _report(cli, storage)
    assert result.exit_code == 0 and result.stderr == ""
    assert len(json.loads(result.stdout)["trials"]) == 5
    if name.endswith("journal"):  # the study was created once, by the first sweep, and only loaded since
        assert [json.loads(line)["op_code"] for line in path.read_text().splitlines()].count(0) == 1


def test_a_bad_trial_written_while_the_sweep_runs_stops_it_after_that_trial(cli, made, tmp_path, monkeypatch):
    from cdka_search.sweep.tasks.proxy import ProxyTask

    journal = _copy(made, tmp_path)
    spoiled: list[bool] = []

    def run_then_spoil(self, plan, lr, report):
        if not spoiled:  # another tool writes trial 4 while trial 3 trains
            spoiled.append(True)
            _add(_study(journal), "FAIL", None, best=False, user={"skipped": 7})
        return _instant_run(self, plan, lr, report)

    monkeypatch.setattr(ProxyTask, "run", run_then_spoil)
    result = _sweep(cli, made, tmp_path, f"journal:{journal}", trials=6)
    assert result.exit_code == SweepError.exit_code, result.output
    assert result.stderr.endswith(f"error: study 's' trial 4: user attribute 'skipped' must be a text, got 7; {EDITED}\n")
    assert "Traceback" not in result.output and not (tmp_path / "best.yaml").exists()


@pytest.mark.parametrize(("url", "hint"), [
    ("mysql://u@db/x", "e.g. pip install mysqlclient"),
    ("postgresql://u@db/x", "e.g. pip install psycopg2-binary"),
    ("mysql+pymysql://u@db/x", "install the package that provides SQLAlchemy's 'pymysql' driver"),
    ("cockroachdb://u@db/x", "install the database's SQLAlchemy driver"),
])
def test_a_missing_database_driver_names_that_database_s_driver(cli, monkeypatch, url, hint):
    """A MySQL URL used to be told to install PostgreSQL's driver."""
    import optuna

    def no_driver(*args, **kwargs):
        raise ImportError("Failed to import DB access module for the specified storage URL.")

    monkeypatch.setattr(optuna.storages, "RDBStorage", no_driver)
    result = cli("report", "--storage", url, "--no-plots")
    assert result.exit_code == 7 and result.stderr.strip().endswith(f"a database driver is missing (Failed to import DB access "
                                                                   f"module for the specified storage URL.); {hint}")
