"""What a sweep reads back from its study, checked where it enters.

A study may hold content that Optuna reads back without complaint but cdka did not write: a journal or
database edited by hand, corrupted, or written by another tool. Every value cdka reads from a study (its
direction, its settings, each trial's value, parameters and the user attributes of
cdka_search.sweep.bookkeeping) is checked here: by a sweep before its first trial, after each trial and
before it picks the best one; by a report as it loads. The first wrong value is one line naming the study,
the trial and the field.

- ``cdka sweep`` refuses a study holding such a trial (SweepError): the sampler and the bookkeeping read
  every trial, and Optuna cannot drop one, so continuing would count, requeue or pick as best a trial
  cdka never measured.
- ``cdka report`` leaves such trials out with one warning line and lists the others: it only shows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cdka_search.documents import brief
from cdka_search.errors import CdkaWarning, SweepError
from cdka_search.limits import MAX_TOTAL_PARAMS
from cdka_search.sweep.bookkeeping import HEURISTIC, REQUEUED, SKIPPED, STAMPED, WORKER
from cdka_search.sweep.objective import PARAMS_USED, PRUNED_REASON
from cdka_search.sweep.space import is_choice_label
from cdka_search.sweep.storage import READ_ERRORS

if TYPE_CHECKING:
    from cdka_search.sweep.space import SearchSpace

T = TypeVar("T")

_EDITED = "edited, corrupt or written by another tool"
_MAX_TEXT = 1000  # characters of a text attribute; cdka's own are one short line
_FLOATS = ("alpha", "lr")
# user attribute -> (the type cdka writes, what it must be, in words)
_ATTRS: dict[str, tuple[type, str]] = {
    HEURISTIC: (bool, "true or false"),
    WORKER: (str, "a host:pid text"),
    STAMPED: (int, "a trial number"),
    REQUEUED: (int, "a count"),
    SKIPPED: (str, "a text"),
    PRUNED_REASON: (str, "a text"),
    PARAMS_USED: (int, "a parameter count"),
}


def read(subject: str, what: Callable[[], T]) -> T:
    """``what()``, a read of ``subject`` ("study 'NAME'", "storage URL") from its storage; SweepError when
    Optuna cannot decode what it holds."""
    try:
        return what()
    except READ_ERRORS as exc:
        raise SweepError(
            f"{subject}: Optuna cannot read it back (it raised {exc.__class__.__name__}); "
            f"it was {_EDITED}"
        ) from None


def check_direction(study: Any) -> None:
    """SweepError unless ``study`` minimises one value, as every cdka sweep does."""
    from optuna.study import StudyDirection

    directions = read(f"study {study.study_name!r}", lambda: study.directions)
    if directions != [StudyDirection.MINIMIZE]:
        what = "maximises its value" if directions == [StudyDirection.MAXIMIZE] else f"has {len(directions)} objectives"
        raise SweepError(f"study {study.study_name!r} {what}; cdka's sweeps minimise one value: give another --study")


def study_settings(study: Any, key: str) -> dict[str, Any] | None:
    """The settings a sweep recorded in the study's user attribute ``key``; None before the first run."""
    have = read(f"study {study.study_name!r}", lambda: study.user_attrs).get(key)
    if have is not None and not isinstance(have, dict):
        raise SweepError(
            f"study {study.study_name!r}: user attribute {key!r} (the sweep's settings) must be a mapping, got "
            f"{brief(have, 60)}; the study was {_EDITED}: start a new one with another --study name"
        )
    return have


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(trial: Any) -> str | None:
    from optuna.trial import TrialState

    values = trial.values
    if values is None:
        return "value: missing from a completed trial" if trial.state == TrialState.COMPLETE else None
    if len(values) != 1:
        return f"values: {len(values)} objective values, not one"
    if not _number(values[0]):
        return f"value: {brief(values[0], 60)} is not a number"
    if trial.state == TrialState.COMPLETE and not math.isfinite(values[0]):
        return f"value: {values[0]} in a completed trial, not a finite number"
    return None


def _attr_problem(attrs: dict[str, Any]) -> str | None:
    for name, (kind, what) in _ATTRS.items():
        if name not in attrs:
            continue
        value = attrs[name]
        if kind is bool:
            fits = isinstance(value, bool)
        elif kind is int:  # one bound for every count: JSON numbers have none
            fits = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOTAL_PARAMS
        else:
            fits = isinstance(value, str) and len(value) <= _MAX_TEXT
        if not fits:
            return f"user attribute {name!r} must be {what}, got {brief(value, 60)}"
    return None


def _param_problem(name: str, value: Any, drawn: Any, expected: dict[str, Any] | None) -> str | None:
    """What is wrong with one parameter: its value, the distribution it was ``drawn`` from (None for a
    queued value), and, given the ``expected`` distributions, whether this sweep could have drawn it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if name in _FLOATS:
        kind: type = FloatDistribution
        if not (_number(value) and math.isfinite(value) and value > 0):
            return f"{brief(value, 60)} is not a positive finite number"
    else:
        kind = CategoricalDistribution
        if not is_choice_label(value):
            return f"{brief(value, 60)} is not a design r1,r2,r"
    if expected is None:
        return None if drawn is None or isinstance(drawn, kind) else f"drawn from a {drawn.__class__.__name__}"
    if name not in expected:
        return "not a parameter of this sweep's search space"
    if kind is CategoricalDistribution and value not in expected[name].choices:
        return f"{value!r} is not one of this sweep's choices for it"
    # A value queued outside a range is allowed (trial 0's alpha may lie outside a recipe's alpha range).
    return None if drawn is None or drawn == expected[name] else "drawn from another distribution than this sweep's"


def trial_problem(trial: Any, expected: dict[str, Any] | None = None) -> str | None:
    """What is wrong with ``trial`` (an Optuna FrozenTrial) as "FIELD: why", or None. ``expected`` is a
    sweep's SearchSpace.distributions(); without it (a report), parameters are checked for their kind only."""
    from optuna.trial import TrialState

    problem = _value_problem(trial) or _attr_problem(trial.user_attrs)
    if problem:
        return problem
    queued = trial.system_attrs.get("fixed_params", {})
    if not isinstance(queued, dict):
        return f"system attribute 'fixed_params' must be a mapping, got {brief(queued, 60)}"
    params = {**queued, **trial.params}
    for name, value in params.items():
        if (problem := _param_problem(name, value, trial.distributions.get(name), expected)) is not None:
            return f"parameter {brief(name, 80)}: {problem}"
    if expected is not None and trial.state == TrialState.COMPLETE:
        missing = [name for name in expected if name not in params]
        if missing:
            return f"parameter {missing[0]!r}: missing from a completed trial"
    return None


def checked_trials(study: Any, space: SearchSpace, finished: set[int] | None = None) -> list[Any]:
    """Every trial of ``study``, each checked against ``space``; SweepError names the first wrong one.
    ``finished``: numbers of finished trials already checked, which Optuna no longer lets change; it is
    extended, so that a sweep checking after every trial checks each finished one once, not once a trial."""
    trials = read(f"study {study.study_name!r}", lambda: study.get_trials(deepcopy=False))
    distributions = space.distributions()
    for t in trials:
        if finished is not None and t.number in finished:
            continue
        if (problem := trial_problem(t, distributions)) is not None:
            raise SweepError(
                f"study {study.study_name!r} trial {t.number}: {problem}; the study was {_EDITED}: "
                "start a new one with another --study name"
            )
        if finished is not None and t.state.is_finished():
            finished.add(t.number)
    return trials


def readable_trials(study: Any) -> list[Any]:
    """The trials of ``study`` a report can show; the others are left out with one warning line."""
    trials = read(f"study {study.study_name!r}", lambda: study.get_trials(deepcopy=False))
    wrong = {t.number: problem for t in trials if (problem := trial_problem(t)) is not None}
    if wrong:
        number, problem = next(iter(wrong.items()))
        more = f", as are {len(wrong) - 1} more that cdka cannot read" if len(wrong) > 1 else ""
        warnings.warn(f"study {study.study_name!r} trial {number}: {problem}; left out of the report{more}", CdkaWarning,
                      stacklevel=1)
    return [t for t in trials if t.number not in wrong]
