"""Optuna pruners a sweep can use (``--pruner``): a closed name -> (module, builder) registry, ``PRUNERS``.

A builder takes ``(steps, every)``: the optimiser steps of one trial and the steps between its
intermediate values, and returns an Optuna pruner. Builders import optuna themselves, so importing
this module stays cheap.
"""

from __future__ import annotations

from typing import Any

from cdka_search.errors import SweepError
from cdka_search.registry import Entry, resolve

#: --pruner value -> (module, builder). Closed: a name outside it is an error, never an import path.
PRUNERS: dict[str, Entry] = {
    "median": ("cdka_search.sweep.pruners", "median_pruner"),
    "hyperband": ("cdka_search.sweep.pruners", "hyperband_pruner"),
    "none": ("cdka_search.sweep.pruners", "no_pruner"),
}


def make_pruner(name: str, steps: int, every: int) -> Any:
    """The pruner registered as ``name`` for trials of ``steps`` steps reporting every ``every``."""
    if name not in PRUNERS:
        raise SweepError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    return resolve(PRUNERS[name])(steps, every)


def median_pruner(steps: int, every: int) -> Any:
    """Stop a trial below the median of earlier trials at the same step, once five trials and the
    first fifth of the steps are in (earlier values are too noisy to compare)."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(0, steps // 5), interval_steps=1)


def hyperband_pruner(steps: int, every: int) -> Any:
    """Successive halving from the first intermediate value to the last step."""
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=every, max_resource=steps, reduction_factor=3)


def no_pruner(steps: int, every: int) -> Any:
    """Every trial runs all its steps."""
    import optuna

    return optuna.pruners.NopPruner()
