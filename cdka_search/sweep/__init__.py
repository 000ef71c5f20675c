"""Optuna sweeps that refine a plan by short real training of the adapter (``cdka sweep``, ``cdka report``).

Importing this package is cheap: torch, optuna and matplotlib are imported inside the functions that
need them.
"""

from cdka_search.sweep.report import StudyReport, study_report
from cdka_search.sweep.space import SearchSpace, build_space
from cdka_search.sweep.study import SweepConfig, SweepResult, run_sweep
from cdka_search.sweep.tasks import TaskOptions, make_task

__all__ = [
    "SearchSpace",
    "StudyReport",
    "SweepConfig",
    "SweepResult",
    "TaskOptions",
    "build_space",
    "make_task",
    "run_sweep",
    "study_report",
]
