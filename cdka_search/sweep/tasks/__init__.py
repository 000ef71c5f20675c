"""Sweep tasks: what a trial trains. A closed name -> (module, class) registry, ``TASKS``.

A task is built from :class:`TaskOptions`, prepared once per process against the search space
(:meth:`Task.prepare`), then :meth:`Task.run` trains one trial's plan and returns the value to minimise.
``run`` calls ``report(step, value)`` every few steps (the objective turns that into Optuna's
intermediate values and may stop the trial there) and raises :class:`NonFiniteLoss` when a loss is NaN
or infinite. Tasks import torch lazily, so importing this registry stays cheap.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from cdka_search.errors import SweepError
from cdka_search.registry import Entry, resolve

if TYPE_CHECKING:
    from cdka_search.plan import Plan
    from cdka_search.sweep.space import SearchSpace

Report = Callable[[int, float], None]


class NonFiniteLoss(Exception):
    """A NaN or infinite loss; the trial ends as pruned with this message as its reason."""


@dataclass(frozen=True)
class TaskOptions:
    """What every task may read. ``steps``: optimiser steps per trial; ``report_every``: steps between
    intermediate values (0 = about ten per trial); ``data``: the lm task's text/JSONL file;
    ``reference``: the proxy task's reference updates (safetensors, see cdka_search.alignment.reference);
    ``model``: the lm task's local Hugging Face folder."""

    steps: int = 200
    seed: int = 0
    report_every: int = 0
    batch_size: int = 0
    data: Path | None = None
    reference: Path | None = None
    model: Path | None = None

    @property
    def every(self) -> int:
        return self.report_every or max(1, self.steps // 10)


class Task(Protocol):
    name: str
    default_lr: float
    lr_range: tuple[float, float]
    #: what the user must give, checked before any storage is opened: "data" (--data FILE),
    #: "model" (--model as a local Hugging Face folder, passed as TaskOptions.model)
    needs: frozenset[str]
    #: the input files it reads beyond ``needs`` if given ("reference"); a file no task reading it
    #: was given for is refused, not ignored
    takes: frozenset[str]

    def prepare(self, space: "SearchSpace") -> None: ...

    def run(self, plan: "Plan", lr: float, report: Report) -> float: ...


#: --task value -> (module, class). Closed: a name outside it is an error, never an import path.
TASKS: dict[str, Entry] = {
    "proxy": ("cdka_search.sweep.tasks.proxy", "ProxyTask"),
    "lm": ("cdka_search.sweep.tasks.lm", "LMTask"),
}


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def check_inputs(name: str, given: dict[str, object]) -> None:
    """SweepError for an input file in ``given`` (option name -> value or None) that task ``name`` does
    not read: running without it would ignore what the user asked for."""
    reads = task_class(name).needs | task_class(name).takes
    for option, value in given.items():
        if value is not None and option not in reads:
            readers = [n for n in task_names() if option in task_class(n).needs | task_class(n).takes]
            raise SweepError(f"--task {name} does not read --{option}; it is for --task {' or '.join(readers)}")


def task_class(name: str) -> type[Task]:
    """The class registered as ``name`` (proxy or lm); importing its module does not import torch."""
    if name not in TASKS:
        near = difflib.get_close_matches(name, task_names(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SweepError(f"unknown task {name!r}{hint}; choose one of {', '.join(task_names())}")
    return resolve(TASKS[name])


def make_task(name: str, options: TaskOptions) -> Task:
    """The task registered as ``name``, built from ``options``."""
    return task_class(name)(options)
