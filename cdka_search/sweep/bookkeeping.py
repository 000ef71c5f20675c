"""What a study holds and what a worker may start: the rules that keep a sweep whole across kills.

- **Counted trials**: COMPLETE and PRUNED trials, except those a worker *skipped* without training
  (user attribute ``skipped``: a duplicate design, or a trial beyond ``--trials``). ``--trials N`` is
  a number of counted trials, for all workers together.
- **Trial 0 completes**: the heuristic plan is queued again whenever the study holds no completed,
  waiting or live running copy of it (after any number of kills), it is never pruned, and a worker
  does not stop while it is missing.
- **Dead workers' trials** (RUNNING, started by a process of this host that no longer exists) are
  failed at once and queued again with the same parameters, so a kill loses no design and the next
  run does not wait for Optuna's heartbeat.
- **No design twice**: a sampled combination of group designs that the study already holds is not
  trained; an untried combination is queued instead (unless every combination has been tried).
- **No overshoot**: a worker starts training only while the counted trials plus the live running
  trials numbered below its own are fewer than ``--trials``; the lowest-numbered trial wins a tie.
  Otherwise it waits: it stops once the study holds ``--trials``, and trains if a trial it waited
  for dies instead (or, on a journal storage, which cannot tell a dead worker of another host from a
  slow one, after three times the longest trial so far, at least 10 minutes).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from typing import Any, Iterable, Sequence

#: user attribute: the trial number the WORKER stamp was made for (copies of a trial carry stale stamps)
STAMPED = "worker_trial"
#: user attribute set on the heuristic plan's trial (trial 0)
HEURISTIC = "heuristic"
#: user attribute naming the process (host:pid) that ran a trial
WORKER = "worker"
#: user attribute on a trial that was not trained (why), and is not counted
SKIPPED = "skipped"
#: how many times a trial whose worker died has been queued again
REQUEUED = "requeued"
MAX_REQUEUE = 3  # a trial that kills its worker this often is dropped (trial 0 never is)
STAMP_GRACE_S = 30.0
WAIT_S = 1.0  # how often a worker that must wait for others' trials looks again
MIN_WAIT_S = 600.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stamp(trial: Any) -> None:
    """Record which process runs ``trial`` (an optuna.Trial), first thing when it starts."""
    trial.set_user_attr(WORKER, worker_id())
    trial.set_user_attr(STAMPED, trial.number)


def _alive(trial: Any) -> bool:
    """False for a trial started by a process of this host that no longer runs, and for a trial not
    stamped for itself within STAMP_GRACE_S of its start (its process died before its first step;
    stamping is the first thing a trial does, so until then it counts as alive)."""
    if trial.user_attrs.get(STAMPED) != trial.number:
        import datetime

        started = trial.datetime_start
        return started is None or (datetime.datetime.now() - started).total_seconds() < STAMP_GRACE_S
    host, _, pid = str(trial.user_attrs.get(WORKER, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def counted(trial: Any) -> bool:
    return trial.state in (_state("COMPLETE"), _state("PRUNED")) and SKIPPED not in trial.user_attrs


def counted_trials(study: Any) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def reap_dead(study: Any) -> int:
    """Fail every RUNNING trial whose worker process on this host is gone and queue it again
    (trial 0 always, others up to MAX_REQUEUE times). Returns how many were reaped."""
    from optuna.exceptions import UpdateFinishedTrialError

    reaped = 0
    for t in study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
        if _alive(t):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, state=_state("FAIL"))
        except (UpdateFinishedTrialError, RuntimeError):
            continue  # another worker reaped it first, or it just finished
        reaped += 1
        times = int(t.user_attrs.get(REQUEUED, 0)) + 1
        if t.user_attrs.get(HEURISTIC) or times <= MAX_REQUEUE:
            attrs = {k: v for k, v in t.user_attrs.items() if k not in (WORKER, STAMPED)}
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}  # killed before it drew them all
            study.enqueue_trial(params, user_attrs={**attrs, REQUEUED: times}, skip_if_exists=False)
    return reaped


def ensure_heuristic(study: Any, params: dict[str, Any]) -> bool:
    """Queue the heuristic plan unless a copy ran to its end (heuristic_done), waits, or runs live. True if queued."""
    if earlier_heuristic(study, math.inf) is not None:
        return False
    study.enqueue_trial(params, user_attrs={HEURISTIC: True}, skip_if_exists=False)
    return True


def may_start(study: Any, number: int, trials: int) -> bool:
    """True while the counted trials plus the live running ones numbered below ``number`` are
    fewer than ``trials`` (so concurrent workers stop at the total, not past it)."""
    held = 0
    for t in study.get_trials(deepcopy=False):
        if counted(t) or (t.state == _state("RUNNING") and t.number < number and _alive(t)):
            held += 1
    return held < trials


def longest_wait_s(study: Any) -> float:
    """How long a worker waits for other workers' running trials: three times the longest trial the
    study has completed, and at least MIN_WAIT_S."""
    longest = 0.0
    for t in study.get_trials(deepcopy=False, states=(_state("COMPLETE"),)):
        if t.datetime_start and t.datetime_complete:
            longest = max(longest, (t.datetime_complete - t.datetime_start).total_seconds())
    return max(MIN_WAIT_S, 3 * longest)


def design_key(params: dict[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    """The design of a trial: its choice for every group (alpha and the learning rate excluded)."""
    return tuple(str(params.get(n)) for n in names)


def tried_designs(study: Any, names: Sequence[str], number: int) -> dict[tuple[str, ...], int]:
    """Design -> trial number, for every trial other than ``number`` that trained, trains or will train it."""
    holding = (_state("COMPLETE"), _state("PRUNED"), _state("RUNNING"), _state("WAITING"))
    out: dict[tuple[str, ...], int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.number == number or t.state not in holding or SKIPPED in t.user_attrs:
            continue
        if t.state == _state("RUNNING") and not _alive(t):
            continue
        params = t.params if t.state != _state("WAITING") else {**t.params, **t.system_attrs.get("fixed_params", {})}
        out.setdefault(design_key(params, names), t.number)
    return out


def trial_seed(seed: int, number: int) -> int:
    """A sampler seed for one trial: reproducible from (seed, trial number), different per trial, so
    a resumed process with the same --seed does not replay the draws of the one before it."""
    digest = hashlib.sha256(f"cdka-sweep:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def untried_design(labels: Sequence[Sequence[str]], tried: Iterable[tuple[str, ...]], seed: int) -> tuple[str, ...] | None:
    """A combination of one label per group not in ``tried``, chosen reproducibly from ``seed``;
    None when every combination has been tried."""
    import itertools
    import random

    tried = set(tried)
    total = 1
    for group in labels:
        total *= len(group)
    if len(tried) >= total:
        return None
    rng = random.Random(seed)
    for _ in range(256):  # a sparse history: a random combination is almost always new
        pick = tuple(rng.choice(list(group)) for group in labels)
        if pick not in tried:
            return pick
    for pick in itertools.product(*labels):  # a dense history: walk the (then small) rest in order
        if pick not in tried:
            return tuple(pick)
    return None


def earlier_heuristic(study: Any, number: float) -> int | None:
    """The number of a copy of trial 0 below ``number`` that ran, runs or waits, if any: two workers
    opening a new study at once may both queue the heuristic plan, and only the first copy trains."""
    held = (_state("COMPLETE"), _state("PRUNED"), _state("RUNNING"), _state("WAITING"))
    for t in study.get_trials(deepcopy=False):
        if t.number < number and t.user_attrs.get(HEURISTIC) and t.state in held and SKIPPED not in t.user_attrs:
            if t.state != _state("RUNNING") or _alive(t):
                return t.number
    return None


def heuristic_done(study: Any) -> bool:
    """Trial 0 has run to its end: completed, or pruned for a non-finite loss (it is never pruned
    otherwise, and running it again would give the same loss)."""
    done = (_state("COMPLETE"), _state("PRUNED"))
    return any(t.user_attrs.get(HEURISTIC) and t.state in done for t in study.get_trials(deepcopy=False))


class TrialSeededSampler:
    """Optuna's TPE sampler, seeded afresh for each trial from (seed, trial number).

    One TPESampler(seed) per process replays the same draws when a sweep is resumed with the same
    --seed; seeding per trial number keeps a single-process sweep reproducible and makes a resumed
    or second process draw differently from the trials already in the study.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._current: tuple[int, Any] | None = None

    def _for(self, trial: Any) -> Any:
        if self._current is None or self._current[0] != trial.number:
            from optuna.samplers import TPESampler

            seed = None if self.seed is None else trial_seed(self.seed, trial.number)
            self._current = (trial.number, TPESampler(seed=seed))
        return self._current[1]

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._current = None
