"""Documented bounds on every size and count cdka accepts (docs/errors.md lists them).

Each bound is far above what any released model has, and low enough that arithmetic on it stays
fast and small: a divisor search up to sqrt(MAX_DIM) is a thousand steps, and no count can make a
loop or an allocation run away. Values outside them are refused where they enter (a header, a
config, a plan, a command-line option), with the error type of that input.
"""

from __future__ import annotations

from typing import Any

from cdka_search.errors import CdkaError

MAX_DIM = 1 << 20  # one side of an adaptable weight (largest today: about 60k; vocabularies 260k)
MAX_TENSOR_DIM = 1 << 32  # one dimension of any tensor in a checkpoint header
MAX_TOTAL_PARAMS = 10**14  # parameters of a whole model (largest today: about 2 * 10**12)
MAX_MODULES = 1 << 20  # modules of one group, or target modules of one model
MAX_EXPERTS = 1 << 14  # experts of one expert tensor
MAX_LAYERS = 1 << 14  # layers of one model
MAX_TRIALS = 100_000  # trials of one sweep
MAX_TOP_K = 1000  # design families per group of a sweep's space (--top-k, recipe sweep.top_k)
MAX_SEED = 2**32 - 1  # seeds numpy and Optuna's samplers accept
# Candidate designs of one weight shape, and their (r1, r2) pairs: released shapes have at most about
# 70,000 designs even under --family every or a raised --max-r (16384x16384 with --max-r 16384: 67,119,
# 2.5 s and 0.4 GB to score) and 800 pairs (129280x7168 under --family every); scoring costs about 5 KB
# and 40 us a design and 1.6 ms a pair (720720x720720 under --family every has 57,600 pairs: 92 s).
MAX_DESIGNS = 1 << 18
MAX_PAIRS = 1 << 12
# Name tests of a plan's '**' patterns (each scans every module name): distinct patterns x names. A plan
# has a handful; 16 on a model of a million modules is within it.
MAX_SCANS = 1 << 24


def check_int(value: Any, where: str, error: type[CdkaError], low: int = 1, high: int = MAX_DIM) -> int:
    """``value`` if it is an integer (not a bool) in [low, high], else ``error`` saying which bound."""
    from cdka_search.documents import brief

    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where}: expected an integer, got {brief(value)}")
    if not low <= value <= high:
        raise error(f"{where}: {brief(value)} is outside [{low:,}, {high:,}]")
    return value
