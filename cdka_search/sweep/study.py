"""Running a sweep: open or resume the study, enqueue the heuristic plan, optimise, write the best plan.

``--trials N`` is the study's total of counted (complete or pruned, not skipped) trials: a resumed
or second process stops when the study holds N, so rerunning a killed sweep's command finishes the
same sweep. The heuristic plan (make_plan) is enqueued as the first trial of a new study and again
after any kill that loses it, so the best value is never worse than its value; the result reports
both and the improvement. The rules are in cdka_search.sweep.bookkeeping.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cdka_search.documents import brief
from cdka_search.errors import SweepError
from cdka_search.fileio import check_output
from cdka_search.sweep.bookkeeping import (
    HEURISTIC,
    SKIPPED,
    TrialSeededSampler,
    counted_trials,
    ensure_heuristic,
    heuristic_done,
    reap_dead,
)
from cdka_search.sweep.objective import Objective
from cdka_search.sweep.pruners import make_pruner
from cdka_search.sweep.space import DEFAULT_TOP_K
from cdka_search.sweep.storage import normalise, open_storage, redact
from cdka_search.sweep.stored import check_direction, checked_trials, read, study_settings
from cdka_search.sweep.tasks import TaskOptions

STUDY_ATTR = "cdka_sweep"


@dataclass(frozen=True)
class SweepConfig:
    """Everything ``cdka sweep`` takes; defaults are the CLI's."""

    model: str = "llama-2-7b"
    budget: str = "0.5%"
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    seed: int | None = 0
    task: str = "proxy"
    data: Path | None = None
    steps: int = 200
    reference: Path | None = None
    output: Path | None = Path("best.yaml")
    targets: str = "all-linear"
    objective: str = "rank"
    pruner: str = "median"
    top_k: int = DEFAULT_TOP_K
    report_every: int = 0
    lr_range: tuple[float, float] | None = None  # default: the task's
    alpha_range: tuple[float, float] = (4.0, 256.0)

    def __post_init__(self) -> None:
        from cdka_search.limits import MAX_SEED, MAX_TOP_K, MAX_TRIALS, check_int

        check_int(self.trials, "--trials", SweepError, 1, MAX_TRIALS)
        check_int(self.steps, "--steps", SweepError, 1, 10**7)
        check_int(self.top_k, "--top-k", SweepError, 1, MAX_TOP_K)
        if self.seed is not None:
            check_int(self.seed, "--seed", SweepError, 0, MAX_SEED)
        if self.timeout is not None and not 0 < self.timeout < 10**9:
            raise SweepError(f"--timeout must be positive seconds, got {self.timeout}")
        normalise(self.storage)  # a storage that cannot be understood fails before any work or output


@dataclass
class SweepResult:
    """What a sweep ends with (across every worker of the study)."""

    study: str
    storage: str
    complete: int
    pruned: int
    failed: int
    ran_here: int
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    trial0_value: float | None
    plan: Any
    output: Path | None
    seconds: float
    groups: list[tuple[str, str, str]] = field(default_factory=list)  # (group, heuristic, best)

    @property
    def improvement(self) -> float | None:
        return None if self.trial0_value is None else self.trial0_value - self.best_value

    @property
    def improvement_pct(self) -> float | None:
        if self.trial0_value is None or self.trial0_value == 0:
            return None
        return 100.0 * (self.trial0_value - self.best_value) / abs(self.trial0_value)

    def summary(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "best_trial": self.best_number,
            "best_value": self.best_value,
            "trial0_value": self.trial0_value,
            "improvement": self.improvement,
            "improvement_pct": self.improvement_pct,
            "best_lr": self.best_params.get("lr"),
            "best_alpha": self.best_params.get("alpha"),
            "complete": self.complete,
            "pruned": self.pruned,
            "failed": self.failed,
            "ran_here": self.ran_here,
            "seconds": round(self.seconds, 1),
            "output": str(self.output) if self.output else None,
        }


def default_study_name(config: SweepConfig, model_name: str) -> str:
    raw = f"cdka-{model_name}-{config.budget}-{config.task}"
    return re.sub(r"[^A-Za-z0-9_.%-]+", "-", raw)


def _fingerprint(config: SweepConfig, space: Any, task_name: str, model_name: str) -> dict[str, Any]:
    return {
        "version": 1,
        "model": model_name,
        "budget": config.budget,
        "limit": space.budget.limit,
        "task": task_name,
        "steps": config.steps,
        "targets": config.targets,
        "objective": config.objective,
        "space": space.fingerprint(),
        "reference": str(config.reference) if config.reference else None,
        "data": str(config.data) if config.data else None,
    }


def _check_compatible(study: Any, wanted: dict[str, Any], storage: str) -> None:
    have = study_settings(study, STUDY_ATTR)
    if have is None:
        study.set_user_attr(STUDY_ATTR, wanted)
        return
    diff = [k for k in wanted if have.get(k) != wanted[k]]
    if diff:
        detail = ", ".join(f"{k}: study has {brief(have.get(k), 80)}, this run {wanted[k]!r}" for k in diff[:3])
        raise SweepError(
            f"study {study.study_name!r} in {storage} was started with other settings ({detail}); "
            "resume it with the same options, or pass a new --study name"
        )


def open_study(storage: str | None, name: str | None, *, create: bool = False, sampler: Any = None,
               pruner: Any = None, heartbeat: bool = True) -> Any:
    """Load (or create) a study; with no name, the storage's only study."""
    from functools import partial

    import optuna

    store = open_storage(storage, heartbeat=heartbeat)
    where = redact(normalise(storage))
    names = read(f"storage {where}", lambda: optuna.get_all_study_names(store))
    if name is None and len(names) != 1:
        listing = ", ".join(names[:10]) or "none"
        raise SweepError(f"{where} holds {len(names)} studies ({listing}); choose one with --study")
    name = names[0] if name is None else name
    if name not in names and not create:
        raise SweepError(f"no study {name!r} in {where}; it holds: {', '.join(names) or 'none'}")
    # An existing study is loaded as it is, whatever its direction (check_direction refuses another), and
    # not created again: a journal records every create_study, even of a study it holds, so a refused
    # resume would still have written to it.
    new = create and name not in names
    load = partial(optuna.create_study, direction="minimize", load_if_exists=True) if new else optuna.load_study
    study = read(f"study {name!r}", lambda: load(study_name=name, storage=store, sampler=sampler, pruner=pruner))
    check_direction(study)
    return study


def _keep_whole(study: Any, space: Any, heuristic: dict[str, Any], trials: int, finished: set[int]) -> bool:
    """Check every trial, requeue what dead workers lost and trial 0 if missing; True while there is work left.
    It runs before the first trial and after each one, so the bookkeeping and the sampler read checked trials
    (``finished``: the finished trials checked already, see checked_trials)."""
    checked_trials(study, space, finished)
    reap_dead(study)
    ensure_heuristic(study, heuristic)
    return counted_trials(study) < trials or not heuristic_done(study)


@dataclass
class PreparedSweep:
    """A sweep whose options, storage, study and task are checked and ready; ``run`` trains."""

    config: SweepConfig
    study: Any
    space: Any
    task: Any
    heuristic: dict[str, Any]
    where: str
    started: float
    work_left: bool
    finished: set[int]

    def run(self, on_trial: Callable[[int, int, float | None], None] | None = None) -> SweepResult:
        """Train until the study is full; write the best plan; return the result.

        ``on_trial(finished, total, best_value)`` is called after each trial this process finishes.
        """
        config, ran = self.config, 0
        if self.work_left:

            def callback(st: Any, trial: Any) -> None:
                nonlocal ran
                if SKIPPED not in trial.user_attrs:
                    ran += 1
                    if on_trial is not None:
                        on_trial(counted_trials(st), config.trials, _best_value(st))
                if not _keep_whole(st, self.space, self.heuristic, config.trials, self.finished):
                    st.stop()

            self.study.optimize(Objective(self.space, self.task, config.trials, config.seed), n_trials=None,
                                timeout=config.timeout, callbacks=[callback], catch=(), gc_after_trial=False)
        return _result(self.study, self.space, config, self.where, ran, time.monotonic() - self.started)


def prepare_sweep(config: SweepConfig) -> PreparedSweep:
    """Check every option, open (or create) the study and prepare the task: whatever is wrong with the
    options, the storage or the data fails here, before the CLI shows any progress."""
    import optuna

    from cdka_search.candidates import CandidateSpace
    from cdka_search.planner import adaptable_targets
    from cdka_search.spec import load_spec
    from cdka_search.spec.hf_config import read_config
    from cdka_search.spec.sources import existing_path
    from cdka_search.sweep.space import build_space
    from cdka_search.sweep.tasks import check_inputs, make_task, task_class
    from cdka_search.textdata import check_data_name, refuse_task_model

    if config.output is not None:
        check_output(config.output)
    started = time.monotonic()
    needs = task_class(config.task).needs
    check_inputs(config.task, {"data": config.data, "reference": config.reference})
    if "data" in needs:
        if config.data is None:
            raise SweepError(f"--task {config.task} needs --data FILE (a local .txt or .jsonl file)")
        check_data_name(config.data)
    folder = existing_path(config.model) if "model" in needs else None
    if "model" in needs and (folder is None or not folder.is_dir()):
        raise SweepError(f"--task {config.task} needs --model to be a local Hugging Face folder, got {config.model!r}")
    if folder is not None:
        refuse_task_model(folder, read_config(folder))
    options = TaskOptions(steps=config.steps, seed=config.seed or 0, report_every=config.report_every,
                          data=config.data, reference=config.reference, model=folder)
    task = make_task(config.task, options)
    make_pruner(config.pruner, config.steps, options.every)  # validate before touching storage
    spec = adaptable_targets(load_spec(config.model), config.targets, CandidateSpace())  # the space build_space scores
    space = build_space(spec, config.budget, objective=config.objective, top_k=config.top_k,
                        lr_range=config.lr_range or task.lr_range, alpha_range=config.alpha_range)
    # Every input (reference updates, data, the model's weights) is read before the storage is touched:
    # a bad one must not leave a study behind whose settings then refuse the corrected run.
    task.prepare(space)
    storage_url = normalise(config.storage)
    where = redact(storage_url)
    name = config.study or default_study_name(config, spec.name)

    # ERROR: a skipped trial ends as FAIL by design, and Optuna warns about each one.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = open_study(config.storage, name, create=True, sampler=TrialSeededSampler(config.seed),
                       pruner=make_pruner(config.pruner, config.steps, options.every))
    _check_compatible(study, _fingerprint(config, space, task.name, spec.name), where)
    heuristic = space.heuristic_params(task.default_lr)
    finished: set[int] = set()
    work_left = _keep_whole(study, space, heuristic, config.trials, finished)
    return PreparedSweep(config, study, space, task, heuristic, where, started, work_left, finished)


def run_sweep(config: SweepConfig, *, on_trial: Callable[[int, int, float | None], None] | None = None) -> SweepResult:
    """Run (or resume, or join) the sweep ``config`` describes; write the best plan; return the result.

    ``on_trial(finished, total, best_value)`` is called after each trial this process finishes.
    """
    return prepare_sweep(config).run(on_trial)


def _best_value(study: Any) -> float | None:
    try:
        return float(study.best_value)
    except ValueError:
        return None


def _result(study: Any, space: Any, config: SweepConfig, where: str, ran: int, seconds: float) -> SweepResult:
    from optuna.trial import TrialState

    trials = checked_trials(study, space)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        from cdka_search.sweep.objective import PRUNED_REASON

        reasons = [t.user_attrs[PRUNED_REASON] for t in trials if PRUNED_REASON in t.user_attrs]
        why = f" ({len(reasons)} pruned, last: {reasons[-1]})" if reasons else ""
        raise SweepError(
            f"study {study.study_name!r} has no finished trial yet{why}; run more trials, raise --timeout, "
            "or check the task with fewer --steps"
        )
    best = min(complete, key=lambda t: (t.value, t.number))
    heuristic = [t.value for t in complete if t.user_attrs.get(HEURISTIC)]
    trial0 = min(heuristic) if heuristic else None
    plan = space.plan_for(best.params)
    start = space.heuristic_params(0)
    result = SweepResult(
        study=study.study_name,
        storage=where,
        complete=len(complete),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL and SKIPPED not in t.user_attrs for t in trials),
        ran_here=ran,
        best_number=best.number,
        best_value=float(best.value),
        best_params=dict(best.params),
        trial0_value=trial0,
        plan=plan,
        output=None,
        seconds=seconds,
        groups=[(g.param, str(start[g.param]), str(best.params[g.param])) for g in space.groups],
    )
    if config.output is not None:
        result.output = write_best_plan(result, config)
    return result


def sweep_record(result: SweepResult, config: SweepConfig) -> Any:
    """The plan document's ``sweep`` block: what the study measured."""
    from cdka_search.plan import SweepRecord

    lr = result.best_params.get("lr")
    return SweepRecord(
        study=result.study,
        storage=result.storage,
        task=config.task,
        steps=config.steps,
        best_trial=result.best_number,
        best_value=result.best_value,
        trial0_value=result.trial0_value,
        improvement=result.improvement,
        improvement_pct=None if result.improvement_pct is None else round(result.improvement_pct, 4),
        lr=None if lr is None else float(lr),
    )


def write_best_plan(result: SweepResult, config: SweepConfig) -> Path:
    """Write the best plan atomically, with the sweep's measured values in its ``sweep`` block."""
    from dataclasses import replace

    from cdka_search.plan import save_plan

    from cdka_search.planner import record_model_path

    result.plan = record_model_path(replace(result.plan, sweep=sweep_record(result, config)), config.model)
    return save_plan(result.plan, Path(config.output))  # type: ignore[arg-type]
