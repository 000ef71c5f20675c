"""The torch ring: the CDKA adapter modules (linear layers and 3-D expert parameters), applying a plan to a
model, merging, saving and loading."""

from cdka_search.adapter.experts import CdkaExperts, ExpertAdapter
from cdka_search.adapter.io import load_adapter, read_adapter, save_adapter
from cdka_search.adapter.layer import CdkaLinear
from cdka_search.adapter.model import (
    ApplySummary,
    adapter_modules,
    applied_plan,
    apply_plan,
    idle_adapters,
    merge_adapters,
    unmerge_adapters,
)

__all__ = [
    "ApplySummary",
    "CdkaExperts",
    "CdkaLinear",
    "ExpertAdapter",
    "adapter_modules",
    "applied_plan",
    "apply_plan",
    "idle_adapters",
    "load_adapter",
    "merge_adapters",
    "read_adapter",
    "save_adapter",
    "unmerge_adapters",
]
