"""Strict reading of YAML/JSON documents into frozen dataclasses (plans, recipes)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping, TypeVar

from cdka_search.errors import CdkaError, PlanError

T = TypeVar("T")


def reject_unknown(data: Mapping[str, Any], allowed: Iterable[str], where: str, error: type[CdkaError] = PlanError) -> None:
    """Raise ``error`` naming the first key not in ``allowed``, the nearest allowed key, and all of them."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            import difflib  # only on the error path

            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise error(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def strict_dataclass(cls: type[T], data: Any, where: str, error: type[CdkaError] = PlanError) -> T:
    """``cls(**data)`` for a mapping whose keys are all fields of ``cls``; every failure is ``error``."""
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping")
    reject_unknown(data, [f.name for f in fields(cls)], where, error)  # type: ignore[arg-type]
    try:
        return cls(**data)
    except TypeError as exc:
        raise error(f"{where}: {exc}") from None
