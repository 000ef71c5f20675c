"""The Optuna objective: sample a plan from the space, train it with the task, report, prune."""

from __future__ import annotations

import math
import os
import socket
from typing import TYPE_CHECKING, Any

from cdka_search.sweep.tasks import NonFiniteLoss

if TYPE_CHECKING:
    from cdka_search.sweep.space import SearchSpace
    from cdka_search.sweep.tasks import Task

#: user attribute naming why a trial was pruned (the pruner, or a NaN/infinite loss)
PRUNED_REASON = "pruned_reason"
#: user attribute set on the heuristic plan's trial (trial 0)
HEURISTIC = "heuristic"
#: user attribute naming the process (host:pid) that ran a trial
WORKER = "worker"


def suggest(trial: Any, space: "SearchSpace") -> tuple[dict[str, object], float]:
    """A trial's choices: one design label per group, alpha and the learning rate (both log scale)."""
    params: dict[str, object] = {g.param: trial.suggest_categorical(g.param, list(g.labels)) for g in space.groups}
    params["alpha"] = trial.suggest_float("alpha", *space.alpha_range, log=True)
    lr = trial.suggest_float("lr", *space.lr_range, log=True)
    return params, lr


class Objective:
    """Callable Optuna objective; every trial's plan fits the budget (SearchSpace.plan_for checks)."""

    def __init__(self, space: "SearchSpace", task: "Task") -> None:
        self.space, self.task = space, task

    def __call__(self, trial: Any) -> float:
        import optuna

        params, lr = suggest(trial, self.space)
        plan = self.space.plan_for(params)
        trial.set_user_attr("params_used", plan.used_params)
        trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
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
