"""The Optuna objective: sample a plan from the space, train it with the task, report, prune.

Before training, a trial follows the study's bookkeeping (cdka_search.sweep.bookkeeping): it is
skipped, untrained and uncounted, when the study already holds ``--trials`` counted trials or when
its design is one the study already holds (an untried design is queued in its place). A skipped
trial ends as FAIL, so Optuna's samplers ignore it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cdka_search.sweep.bookkeeping import (
    HEURISTIC,
    SKIPPED,
    WAIT_S,
    WORKER,
    counted_trials,
    design_key,
    earlier_heuristic,
    longest_wait_s,
    may_start,
    reap_dead,
    stamp,
    trial_seed,
    tried_designs,
    untried_design,
)
from cdka_search.sweep.tasks import NonFiniteLoss

if TYPE_CHECKING:
    from cdka_search.sweep.space import SearchSpace
    from cdka_search.sweep.tasks import Task

#: user attribute naming why a trial was pruned (the pruner, or a NaN/infinite loss)
PRUNED_REASON = "pruned_reason"
#: user attribute: the parameters of the trial's plan
PARAMS_USED = "params_used"

__all__ = ["HEURISTIC", "PARAMS_USED", "PRUNED_REASON", "WORKER", "Objective", "suggest"]


def suggest(trial: Any, space: "SearchSpace") -> tuple[dict[str, object], float]:
    """A trial's choices, drawn from ``space.distributions()``: one design label per group and alpha; and
    the learning rate."""
    from optuna.distributions import CategoricalDistribution

    params: dict[str, object] = {
        name: trial.suggest_categorical(name, d.choices) if isinstance(d, CategoricalDistribution)
        else trial.suggest_float(name, d.low, d.high, log=d.log)
        for name, d in space.distributions().items()
    }
    lr = float(params.pop("lr"))  # type: ignore[arg-type]
    return params, lr


class Objective:
    """Callable Optuna objective; every trial's plan fits the budget (SearchSpace.plan_for checks).

    ``trials`` is the study's total of counted trials; ``seed`` picks, reproducibly, the untried
    design queued in place of a duplicate.
    """

    def __init__(self, space: "SearchSpace", task: "Task", trials: int | None = None, seed: int | None = 0) -> None:
        self.space, self.task, self.trials, self.seed = space, task, trials, seed

    def _skip(self, trial: Any, why: str) -> float:
        trial.set_user_attr(SKIPPED, why)
        return math.nan  # Optuna records FAIL: not counted, ignored by the sampler

    def _wait_for_room(self, trial: Any) -> bool:
        """True once this trial may train; False when the study holds --trials counted trials.
        While other workers' trials would fill the study, wait for them to end or die: dead ones on
        this host are reaped, RDB heartbeats fail those of other hosts. A journal storage cannot tell
        a dead worker of another host from a slow one, so after longest_wait_s this trial trains
        anyway (the study may then hold one trial more than --trials)."""
        import time

        import optuna

        study = trial.study
        give_up = time.monotonic() + longest_wait_s(study)
        while not may_start(study, trial.number, self.trials):  # type: ignore[arg-type]
            if counted_trials(study) >= self.trials:  # type: ignore[operator]
                return False
            if time.monotonic() > give_up:
                return True
            reap_dead(study)
            optuna.storages.fail_stale_trials(study)
            time.sleep(WAIT_S)
        return True

    def __call__(self, trial: Any) -> float:
        import optuna

        stamp(trial)
        heuristic = bool(trial.user_attrs.get(HEURISTIC))
        if heuristic and (first := earlier_heuristic(trial.study, trial.number)) is not None:
            return self._skip(trial, f"a copy of the heuristic plan, trial {first}")
        if self.trials is not None and not heuristic and not self._wait_for_room(trial):
            trial.study.stop()
            return self._skip(trial, f"the study already holds --trials {self.trials}")
        params, lr = suggest(trial, self.space)
        if not heuristic and self.trials is not None:
            names = [g.param for g in self.space.groups]
            tried = tried_designs(trial.study, names, trial.number)
            key = design_key(params, names)
            if key in tried:
                fresh = untried_design([g.labels for g in self.space.groups], tried, trial_seed(self.seed or 0, trial.number))
                if fresh is not None:
                    trial.study.enqueue_trial({**dict(zip(names, fresh)), "alpha": params["alpha"], "lr": lr}, skip_if_exists=False)
                    return self._skip(trial, f"design of trial {tried[key]}; queued an untried one")
        plan = self.space.plan_for(params)
        trial.set_user_attr(PARAMS_USED, plan.used_params)

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if not heuristic and trial.should_prune():  # trial 0 must complete: never pruned
                trial.set_user_attr(PRUNED_REASON, f"pruner: value {value:.4g} at step {step}")
                raise optuna.TrialPruned(f"pruned at step {step}")

        try:
            value = self.task.run(plan, lr, report)
        except NonFiniteLoss as exc:
            trial.set_user_attr(PRUNED_REASON, str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        if not math.isfinite(value):
            trial.set_user_attr(PRUNED_REASON, f"non-finite final value {value}")
            raise optuna.TrialPruned("non-finite final value")
        return float(value)
