"""Which weights of a ModelSpec get an adapter: "all-linear", "attn", "mlp", or names and globs."""

from __future__ import annotations

import re

from cdka_search.errors import TargetError
from cdka_search.matching import ModuleIndex
from cdka_search.patterns import check_pattern, is_pattern
from cdka_search.spec.model_spec import ModelSpec, TargetModule

PRESET_SELECTIONS = ("all-linear", "attn", "mlp")
_ATTENTION = re.compile(r"att", re.IGNORECASE)


def is_attention(module: TargetModule) -> bool:
    """Attention projections: any path segment mentions attention (attn, self_attn, SelfAttention)."""
    return any(_ATTENTION.search(seg) for seg in module.name.split("."))


def _selected(index: ModuleIndex, item: str) -> set[str]:
    """A pattern's matches, or the names equal to ``item`` or ending in ``.item``."""
    if is_pattern(item):
        return set(index.find(check_pattern(item)))
    return {n for n in index.names if n == item or n.endswith("." + item)}


def select_targets(spec: ModelSpec, selection: str = "all-linear") -> ModelSpec:
    """The spec restricted to the selected targets; an item matching nothing is an error."""
    choice = selection.strip()
    if choice == "all-linear":
        chosen = list(spec.targets)
    elif choice == "attn":
        chosen = [t for t in spec.targets if is_attention(t)]
    elif choice == "mlp":
        chosen = [t for t in spec.targets if not is_attention(t)]
    else:
        items = [i.strip() for i in choice.split(",") if i.strip()]
        if not items:
            raise TargetError(f"empty target list; use one of {', '.join(PRESET_SELECTIONS)} or module names")
        index = ModuleIndex(t.name for t in spec.targets)
        hits = {i: _selected(index, i) for i in items}
        missing = [i for i in items if not hits[i]]
        if missing:
            known = ", ".join(sorted({t.name.rsplit(".", 1)[-1] for t in spec.targets}))
            raise TargetError(f"target {', '.join(map(repr, missing))} matches no module of {spec.name}; modules end in: {known}")
        picked = set().union(*hits.values())
        chosen = [t for t in spec.targets if t.name in picked]
    if not chosen:
        raise TargetError(f"selection {selection!r} matches no module of {spec.name}")
    return spec.with_targets(tuple(chosen))
