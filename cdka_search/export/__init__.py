"""Exports of a plan to other tools' adapter configs: a closed name -> exporter registry.

    export_plan(plan, "peft")      -> Export   PEFT LoraConfig / LoKrConfig JSON (adapter_config.json)
    export_plan(plan, "lycoris")   -> Export   a LyCORIS TOML preset (name_algo_map, one entry per module)

An exporter never changes the plan: what the target cannot express is an ExportError naming the groups,
raised before any file is written. Pure standard library (tomli-w for the TOML text); neither PEFT nor
LyCORIS is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from cdka_search.errors import ExportError
from cdka_search.registry import Entry, resolve

if TYPE_CHECKING:
    from cdka_search.export.base import Export
    from cdka_search.plan import Plan
    from cdka_search.spec.model_spec import ModelSpec

__all__ = ["EXPORTERS", "export_plan", "get_exporter", "write_export"]

#: Export target -> (module, function). Closed: a name outside it is an error, never an import path.
EXPORTERS: dict[str, Entry] = {
    "peft": ("cdka_search.export.peft", "export_peft"),
    "lycoris": ("cdka_search.export.lycoris", "export_lycoris"),
}


def get_exporter(target: str) -> Callable[..., "Export"]:
    """The export function registered under ``target``."""
    key = target.strip().lower()
    if key not in EXPORTERS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(EXPORTERS)}")
    return resolve(EXPORTERS[key])


def export_plan(plan: "Plan", target: str, spec: "ModelSpec | None" = None) -> "Export":
    """Translate ``plan`` for ``target``; ``spec`` lists the model's module names (see resolve_modules)."""
    return get_exporter(target)(plan, spec)


def write_export(export: "Export", *, out_dir=None, out_file=None):
    """Write an export's files atomically (see cdka_search.export.base.write_export)."""
    from cdka_search.export.base import write_export as _write

    return _write(export, out_dir=out_dir, out_file=out_file)
