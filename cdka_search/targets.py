"""Which weights of a ModelSpec get an adapter: "all-linear", "attn", "mlp", "experts", or names and globs,
and how much of the model a selection covers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cdka_search.documents import brief, named
from cdka_search.errors import TargetError
from cdka_search.matching import ModuleIndex, summarise
from cdka_search.patterns import check_pattern, is_pattern
from cdka_search.spec.model_spec import ModelSpec, TargetModule

_ATTENTION = re.compile(r"att", re.IGNORECASE)
_ROUTER_NAMES = ("gate", "router")
_SCALAR_GATES = ("expert_gate", "experts_gate")  # Qwen's shared_expert_gate: H -> 1, weighs the shared expert
WARN_SHARE = 0.20  # untargeted adaptable weights above this share of the model get a warning


def is_attention(module: TargetModule) -> bool:
    """Attention projections: any path segment mentions attention (attn, self_attn, SelfAttention)."""
    return any(_ATTENTION.search(seg) for seg in module.name.split("."))


def is_router(module: TargetModule) -> bool:
    """A MoE router or expert gate: tiny, and adapting it changes which experts see a token (or how
    much), so it is a target only when named. It is a Linear named ``gate`` or ``router``, one inside
    a module named so (``router.layer`` in JetMoE, GraniteMoE, DBRX), or a ``shared_expert_gate``. Other
    ``*_gate`` Linears are projections (xLSTM's ``proj_up_gate``, MiniMax's ``output_gate``, Gemma 4's
    ``per_layer_input_gate``)."""
    *_, parent, leaf = ["", *module.name.split(".")]
    return module.kind == "linear" and (leaf in _ROUTER_NAMES or parent in _ROUTER_NAMES or leaf.endswith(_SCALAR_GATES))


_PRESETS = {
    "all-linear": lambda t: not is_router(t),
    "attn": lambda t: is_attention(t) and not is_router(t),
    "mlp": lambda t: not is_attention(t) and not is_router(t),
    "experts": lambda t: t.kind == "experts",
}
PRESET_SELECTIONS = tuple(_PRESETS)


def selection_items(selection: str) -> tuple[str, ...]:
    """The items of a selection ("attn", "q_proj,v_proj", "attn,experts"), each a preset, a name or a
    glob, checked without a model. A repeated item is dropped: the selection is the union of its items."""
    if not isinstance(selection, str):
        raise TargetError(f"targets {brief(selection)}: expected text such as all-linear, attn or q_proj,v_proj")
    items = tuple(dict.fromkeys(i.strip() for i in selection.split(",") if i.strip()))
    if not items:
        raise TargetError(f"empty target list; use one of {', '.join(PRESET_SELECTIONS)} or module names")
    for item in items:
        check_pattern(item)
    return items


def _selected(spec: ModelSpec, index: ModuleIndex, item: str) -> set[str]:
    """A preset's targets, a pattern's matches, or the names equal to ``item`` or ending in ``.item``."""
    if item in _PRESETS:
        return {t.name for t in spec.targets if _PRESETS[item](t)}
    if is_pattern(item):
        return set(index.find(item))
    return {n for n in index.names if n == item or n.endswith("." + item)}


def select_targets(spec: ModelSpec, selection: str = "all-linear") -> ModelSpec:
    """The spec restricted to the union of the selection's items; an item matching nothing is an error.

    "all-linear" is every weight but routers (expert tensors included), "mlp" every non-attention
    weight but routers (experts included), "experts" only the 3-D expert tensors.
    """
    items = selection_items(selection)
    index = ModuleIndex(t.name for t in spec.targets)
    hits = {i: _selected(spec, index, i) for i in items}
    missing = [i for i in items if not hits[i] and i not in _PRESETS]
    if missing:  # bounded: a selection may list thousands of items
        known = summarise(sorted({t.name.rsplit(".", 1)[-1] for t in spec.targets}), shown=12, sep=", ")
        raise TargetError(f"target {summarise([brief(i) for i in missing], shown=5, sep=', ')} matches no module of "
                          f"{spec.name}; modules end in: {known}")
    empty = [i for i in items if not hits[i]]
    if empty:
        raise TargetError(f"selection {summarise([brief(i) for i in empty], shown=5, sep=', ')} matches no module of {spec.name}")
    picked = set().union(*hits.values())
    return spec.with_targets(tuple(t for t in spec.targets if t.name in picked))


@dataclass(frozen=True)
class Coverage:
    """How much of a model's parameters a target selection covers, and what it leaves out.

    ``left_out``: (role, weights) of every unselected target role, largest first (an option selects
    them). ``unadaptable``: weight matrices no target covers (routers, expert stores in a layout cdka
    does not adapt, convolutions), as ModelSpec lists them. ``trained_whole``: a task model's new head
    (ModelSpec.modules_to_save). The rest, ``other``, is embeddings, norms, biases and the LM head.
    """

    model: str
    total: int
    covered: int
    left_out: tuple[tuple[str, int], ...]
    unadaptable: tuple[tuple[str, int], ...]
    selection: str
    trained_whole: tuple[tuple[str, int], ...] = ()

    @property
    def left_out_params(self) -> int:
        return sum(w for _, w in self.left_out)

    @property
    def unadaptable_params(self) -> int:
        return sum(w for _, w in self.unadaptable)

    @property
    def trained_whole_params(self) -> int:
        return sum(w for _, w in self.trained_whole)

    @property
    def other_params(self) -> int:
        return self.total - self.covered - self.left_out_params - self.unadaptable_params - self.trained_whole_params

    def share(self, params: int) -> str:
        return f"{100 * params / self.total:.1f}%"

    def summary(self) -> str:
        head = ""
        if self.trained_whole:
            names = ", ".join(name for name, _ in self.trained_whole)
            head = f"{self.share(self.trained_whole_params)} in the new task head, trained whole ({names}), "
        return (
            f"coverage: the targets hold {self.share(self.covered)} of {self.model}'s {self.total:,} parameters; "
            f"{self.share(self.left_out_params)} lie in weights not selected, {self.share(self.unadaptable_params)} in "
            f"weights no adapter targets (routers, other layouts), {head}{self.share(self.other_params)} in embeddings, "
            "norms, biases and the LM head"
        )

    def _named(self, roles: tuple[tuple[str, int], ...]) -> str:
        names = ", ".join(f"{role} ({self.share(w)})" for role, w in roles[:4])
        return names + (f" and {len(roles) - 4} more" if len(roles) > 4 else "")

    def warnings(self) -> list[str]:
        """One line for each kind of left-out weight holding more than WARN_SHARE of the model."""
        out = []
        if self.left_out_params > WARN_SHARE * self.total:
            option = "--targets all-linear" if self.selection.strip() != "all-linear" else "their names in --targets"
            out.append(
                f"warning: {self.share(self.left_out_params)} of {self.model}'s parameters are in weights "
                f"--targets {named(self.selection)} leaves out: {self._named(self.left_out)}; include them with {option}"
            )
        if self.unadaptable_params > WARN_SHARE * self.total:
            out.append(
                f"warning: {self.share(self.unadaptable_params)} of {self.model}'s parameters are in weights no cdka "
                f"target covers: {self._named(self.unadaptable)}; no --targets option includes them (docs/models.md)"
            )
        return out


def coverage(spec: ModelSpec, chosen: ModelSpec, selection: str) -> Coverage:
    """The Coverage of ``chosen`` (a selection of ``spec``'s targets)."""
    picked = {t.name for t in chosen.targets}
    left: dict[str, int] = {}
    for t in spec.targets:
        if t.name not in picked:
            left[t.role] = left.get(t.role, 0) + t.weight_params
    ranked = tuple(sorted(left.items(), key=lambda kv: -kv[1]))
    covered = sum(t.weight_params for t in chosen.targets)
    return Coverage(spec.name, spec.total_params, covered, ranked, spec.unadaptable, selection, spec.modules_to_save)
