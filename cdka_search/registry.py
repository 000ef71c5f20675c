"""The one shape of every extension point: a closed name -> (module, attribute) table, resolved lazily.

A registry entry names code shipped in the package, never a dotted path taken from the user, and the
module is imported only when the entry is used, so listing or validating names stays free of torch,
numpy and optuna. docs/extending.md says how to add an entry to each registry.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

Entry = tuple[str, str]  # (module, attribute)


def resolve(entry: Entry) -> Any:
    """The attribute an entry names, importing its module now."""
    module, attribute = entry
    return getattr(import_module(module), attribute)
