"""Sweep processes: SIGKILL then resume, two workers on one SQLite / journal / PostgreSQL study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
}
CDKA = [sys.executable, "-c", "from cdka_search.cli.app import main; main()"]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def _sweep_args(config: Path, storage: str, study: str, trials: int, seed: int, out: Path) -> list[str]:
    return [*CDKA, "sweep", "-m", str(config), "-b", "lora:4", "--steps", "20", "--trials", str(trials),
            "--storage", storage, "--study", study, "--seed", str(seed), "-o", str(out), "--json"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _trials(storage: str, study: str):
    import optuna

    from cdka_search.sweep.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat=False)).get_trials(deepcopy=False)


def _finished(storage: str, study: str) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in done for t in _trials(storage, study))


def _complete(storage: str, study: str) -> dict[int, float]:
    import optuna

    try:
        trials = _trials(storage, study)
    except KeyError:  # not created yet
        return {}
    return {t.number: t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE}


def test_sigkill_then_resume_keeps_every_finished_trial(tmp_path, tiny_config):
    storage, study = f"sqlite:///{tmp_path / 'kill.db'}", "kill"
    proc = subprocess.Popen(_sweep_args(tiny_config, storage, study, 200, 0, tmp_path / "b.yaml"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_complete(storage, study)) < 3:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished within 120 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _complete(storage, study)
    # --trials counts finished trials, pruned ones included: ask for three more than the study holds.
    target = _finished(storage, study) + 3
    done = subprocess.run(_sweep_args(tiny_config, storage, study, target, 0, tmp_path / "b.yaml"), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = _complete(storage, study)
    assert all(after[n] == v for n, v in before.items())  # nothing finished was lost or changed
    assert _finished(storage, study) >= target
    summary = json.loads(done.stdout)["summary"]
    assert summary["best_value"] <= min(before.values())
    assert summary["trial0_value"] == before[0]  # trial 0 (the heuristic plan) finished before the kill


def _two_workers(tmp_path: Path, config: Path, storage: str, study: str, trials: int = 8) -> None:
    procs = [
        subprocess.Popen(_sweep_args(config, storage, study, trials, seed, tmp_path / f"w{seed}.yaml"), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    import optuna

    trials_ = _trials(storage, study)
    from cdka_search.sweep.bookkeeping import counted

    counted_ = [t for t in trials_ if counted(t)]
    # both stop at the study's total: neither starts a trial past it
    assert len(counted_) == trials, [(t.number, t.state.name, dict(t.user_attrs)) for t in trials_]
    groups = sorted(n for n in counted_[0].params if n not in ("alpha", "lr"))
    designs = [tuple(t.params[n] for n in groups) for t in counted_]
    assert len(set(designs)) == len(designs)  # no design trained twice
    assert len({t.user_attrs["worker"] for t in counted_}) == 2  # both processes did work
    assert any(t.user_attrs.get("heuristic") and t.state == optuna.trial.TrialState.COMPLETE for t in trials_)
    best = min(t.value for t in trials_ if t.state == optuna.trial.TrialState.COMPLETE)
    for out, _ in outputs:
        assert json.loads(out)["summary"]["best_value"] >= best


def test_two_processes_share_one_sqlite_study(tmp_path, tiny_config):
    _two_workers(tmp_path, tiny_config, f"sqlite:///{tmp_path / 'shared.db'}", "shared")


def test_two_processes_share_one_journal_study(tmp_path, tiny_config):
    _two_workers(tmp_path, tiny_config, f"journal:{tmp_path / 'shared.journal'}", "shared")


@pytest.mark.postgres
def test_two_processes_share_one_postgresql_study(tmp_path, tiny_config):
    url = os.environ.get("CDKA_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but CDKA_TEST_POSTGRES_URL is not set: .ci/start_postgres.sh must run first")
        pytest.skip("set CDKA_TEST_POSTGRES_URL (bash .ci/start_postgres.sh prints one)")
    _two_workers(tmp_path, tiny_config, url, f"pg-{uuid.uuid4().hex[:8]}")


def test_random_sigkills_lose_nothing_keep_trial0_and_train_no_design_twice():
    """The smoke size of benchmarks/sweep_kills.py (20 kills there): one kill while trial 0 trains, one
    at a random moment, then a run to the end; the script checks every invariant, exits 1 on a failure.
    (Trial 0 lost to any number of kills: tests/test_hostile.py.)"""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep_kills.py"
    # 12 trials: on a quiet machine a 4-trial run can finish before its kill, and the script then fails
    # its own "killed while working" check.
    done = subprocess.run([sys.executable, str(script), "--kills", "2", "--trial0-kills", "1", "--trials", "12",
                           "--max-delay", "3"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    assert "12 counted trials (--trials 12)" in done.stdout
