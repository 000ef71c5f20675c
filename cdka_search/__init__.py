"""cdka: plan, refine, export and train Component Designed Kronecker Adapters (CDKA).

The data-free planner is pure Python (plus numpy); the adapter, alignment energies and sweeps
live in the torch ring and are imported on first use, so ``import cdka_search`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from cdka_search.budget import Budget, parse_budget
from cdka_search.candidates import CandidateSpace, Design, enumerate_candidates
from cdka_search.errors import (
    BudgetError,
    CdkaError,
    ExportError,
    ModelSourceError,
    PlanError,
    ReferenceFileError,
    SweepError,
    TargetError,
)
from cdka_search.plan import AdapterSettings, Plan, PlanGroup, load_plan, save_plan
from cdka_search.planner import check_plan, explain_shape, make_plan
from cdka_search.spec import ModelSpec, TargetModule, load_spec, spec_from_module

_LAZY = {
    "CdkaLinear": "cdka_search.adapter",
    "apply_plan": "cdka_search.adapter",
    "merge_adapters": "cdka_search.adapter",
    "unmerge_adapters": "cdka_search.adapter",
    "save_adapter": "cdka_search.adapter",
    "load_adapter": "cdka_search.adapter",
}

__all__ = [
    "AdapterSettings",
    "Budget",
    "BudgetError",
    "CandidateSpace",
    "CdkaError",
    "CdkaLinear",
    "Design",
    "ExportError",
    "ModelSourceError",
    "ModelSpec",
    "Plan",
    "PlanError",
    "PlanGroup",
    "ReferenceFileError",
    "SweepError",
    "TargetError",
    "TargetModule",
    "apply_plan",
    "check_plan",
    "enumerate_candidates",
    "explain_shape",
    "load_adapter",
    "load_plan",
    "load_spec",
    "make_plan",
    "merge_adapters",
    "parse_budget",
    "save_adapter",
    "save_plan",
    "spec_from_module",
    "unmerge_adapters",
]


def __getattr__(name: str) -> Any:
    """Torch-ring names, imported on first access."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdka_search' has no attribute {name!r}")
