"""A sweep killed with SIGKILL at random moments, resumed each time: is the study still whole?

Runs `cdka sweep` (proxy task, a tiny LLaMA config, SQLite storage) in a subprocess, kills it with
SIGKILL, starts it again with the same command and --seed, KILLS times; then lets the last run
finish. The first TRIAL0_KILLS kills come while trial 0 (the heuristic plan) trains, a random
0 to 0.5 s after it starts (three such kills used to lose it for good); the others come at a random
moment MIN_DELAY to MAX_DELAY seconds after the process starts its first trial (start-up takes
seconds and holds nothing to lose). After every kill it checks, and prints one row per kill:

- lost: completed trials (number -> value) seen before the kill and missing or changed after it;
- trial 0: whether the heuristic plan's trial has completed yet;
- duplicates: counted trials (complete or pruned, not skipped) whose design (the choice of every
  group) another counted trial already had, while untried designs remained.

At the end: the study must hold exactly --trials counted trials, a completed trial 0 whose value is
the best plan file's trial0_value, no lost trial and no duplicate. Exit status 1 if any check fails.

Run:  python benchmarks/sweep_kills.py                                   (20 kills, 40 trials)
      python benchmarks/sweep_kills.py --kills 3 --trial0-kills 2 --trials 5   (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
}
CDKA = [sys.executable, "-c", "from cdka_search.cli.app import main; main()"]


def sweep_command(folder: Path, trials: int, steps: int) -> list[str]:
    return [*CDKA, "sweep", "-m", str(folder / "config.json"), "-b", "lora:4", "--steps", str(steps),
            "--trials", str(trials), "--storage", f"sqlite:///{folder / 'kills.db'}", "--study", "kills",
            "--seed", "0", "-o", str(folder / "best.yaml"), "--json"]


def load_trials(folder: Path) -> list:
    import optuna

    from cdka_search.sweep.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name="kills", storage=open_storage(f"sqlite:///{folder / 'kills.db'}", heartbeat=False))
    except KeyError:
        return []
    return study.get_trials(deepcopy=False)


def completed(trials: list) -> dict[int, float]:
    import optuna

    return {t.number: t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE}


def design_duplicates(trials: list) -> int:
    """Counted trials repeating an earlier counted trial's design while untried designs remained."""
    from cdka_search.sweep.bookkeeping import counted

    done = sorted((t for t in trials if counted(t)), key=lambda t: t.number)
    if not done:
        return 0
    groups = sorted(n for n, d in done[0].distributions.items() if hasattr(d, "choices"))
    total = math.prod(len(done[0].distributions[n].choices) for n in groups)
    seen: set[tuple] = set()
    duplicates = 0
    for t in done:
        key = tuple(str(t.params.get(n)) for n in groups)
        if key in seen and len(seen) < total:
            duplicates += 1
        seen.add(key)
    return duplicates


def running_in(folder: Path, pid: int, *, trial0: bool) -> bool:
    """A trial (trial 0 if ``trial0``) is training in process ``pid``."""
    import optuna

    try:
        trials = load_trials(folder)
    except Exception:  # the study is being created: not yet
        return False
    return any((t.user_attrs.get("heuristic") or not trial0) and t.state == optuna.trial.TrialState.RUNNING
               and str(t.user_attrs.get("worker", "")).endswith(f":{pid}") for t in trials)


def heuristic_value(trials: list) -> float | None:
    import optuna

    values = [t.value for t in trials if t.user_attrs.get("heuristic") and t.state == optuna.trial.TrialState.COMPLETE]
    return values[0] if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    parser.add_argument("--trial0-kills", type=int, default=3, help="Kills while trial 0 trains (the first ones).")
    parser.add_argument("--min-delay", type=float, default=0.0, help="Seconds after the first trial starts, at the earliest, of a kill.")
    parser.add_argument("--max-delay", type=float, default=6.0, help="Seconds after the first trial starts, at the latest, of a kill.")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(TINY))
        command = sweep_command(folder, args.trials, args.steps)
        print(f"{'kill':>4} {'after s':>8} {'killed':>6} {'completed':>9} {'lost':>4} {'trial 0':>8} {'duplicates':>10}")
        real_kills = 0
        for kill in range(1, args.kills + 1):
            before = completed(load_trials(folder))
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = time.monotonic()
            trial0 = kill <= args.trial0_kills
            while proc.poll() is None and not running_in(folder, proc.pid, trial0=trial0) and time.monotonic() - started < 300:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5) if trial0 else rng.uniform(args.min_delay, args.max_delay))
            delay = time.monotonic() - started
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
                real_kills += 1
            proc.wait()
            trials = load_trials(folder)
            after = completed(trials)
            lost = sum(after.get(n) != v for n, v in before.items())
            duplicates = design_duplicates(trials)
            trial0 = "done" if heuristic_value(trials) is not None else "-"
            print(f"{kill:>4} {delay:>8.2f} {'yes' if killed else 'no':>6} {len(after):>9} {lost:>4} {trial0:>8} {duplicates:>10}", flush=True)
            if lost:
                failures.append(f"kill {kill}: {lost} completed trial(s) lost or changed")
        before = completed(load_trials(folder))
        started = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        trials = load_trials(folder)
        from cdka_search.sweep.bookkeeping import counted

        counted_trials = sum(counted(t) for t in trials)
        after = completed(trials)
        lost = sum(after.get(n) != v for n, v in before.items())
        duplicates = design_duplicates(trials)
        trial0 = heuristic_value(trials)
        print(f"{real_kills} of {args.kills} runs were killed while working")
        if real_kills < args.kills:
            failures.append(f"only {real_kills} of {args.kills} runs were still working when killed (raise --trials)")
        print(f"final run: exit {done.returncode} after {time.monotonic() - started:.1f} s; {counted_trials} counted "
              f"trials (--trials {args.trials}), {len(after)} completed, lost {lost}, duplicates {duplicates}, "
              f"trial 0 value {trial0}")
        if done.returncode != 0:
            failures.append(f"final run exited {done.returncode}: {done.stderr.strip()[-300:]}")
        else:
            summary = json.loads(done.stdout)["summary"]
            if trial0 is None or summary["trial0_value"] != trial0:
                failures.append(f"trial 0 value {trial0} but the summary says {summary['trial0_value']}")
            if summary["best_value"] > min(after.values()):
                failures.append("the best value is not the study's best")
        if counted_trials != args.trials:
            failures.append(f"{counted_trials} counted trials, not --trials {args.trials}")
        if lost:
            failures.append(f"the final run lost {lost} completed trial(s)")
        if duplicates:
            failures.append(f"{duplicates} counted trial(s) repeat a design")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
