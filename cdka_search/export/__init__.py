"""Exports of a plan to other tools' adapter configs: a closed name -> exporter registry.

    export_plan(plan, "peft")      -> Export   PEFT LoraConfig / LoKrConfig JSON (adapter_config.json)
    export_plan(plan, "lycoris")   -> Export   a LyCORIS TOML preset (name_algo_map, one entry per module)

An exporter never changes the plan: what the target cannot express is an ExportError naming the groups,
raised before any file is written. The LyCORIS export is pure standard library (tomli-w for the TOML text);
the PEFT export checks its configs with the installed peft on the model built on the meta device when
peft and transformers are installed (cdka_search.export.peft_check).
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


def export_plan(plan: Plan, target: str, spec: ModelSpec | None = None, *, model=None) -> Export:
    """Translate ``plan`` for ``target``; ``spec`` lists the model's module names (see resolve_modules).
    ``model``: the live module ``spec`` was read from, which the PEFT export checks its configs on
    (without it, the model is built on the meta device from the plan's preset or local config)."""
    if model is not None:
        return get_exporter(target)(plan, spec, model=model)
    return get_exporter(target)(plan, spec)


def write_export(export: "Export", *, out_dir=None, out_file=None):
    """Write an export's files atomically (see cdka_search.export.base.write_export)."""
    from cdka_search.export.base import write_export as _write

    return _write(export, out_dir=out_dir, out_file=out_file)
