"""Per-expert checkpoint weights -> transformers 5's fused expert tensors.

Checkpoints (and transformers 5's own save_pretrained) store MoE experts one 2-D weight per expert
(``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight``), while the model
transformers 5 builds holds them as two 3-D parameters, ``mlp.experts.gate_up_proj`` (E, 2I, H) and
``mlp.experts.down_proj`` (E, H, I). This folds the first naming into the second, following
transformers' conversion mapping for Mixtral (w1, w3 -> gate_up_proj; w2 -> down_proj; the
``block_sparse_moe`` block renamed ``mlp``) and for the Qwen2-MoE family (Qwen3-MoE, DeepSeek-V3,
...: gate_proj, up_proj -> gate_up_proj; down_proj -> down_proj). The block's router (``gate``) is
counted but, as in the built model, not a target. A block that does not fit this layout exactly
(missing experts or projections, unequal shapes) is left as it is, never guessed into shape.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from cdka_search.spec.model_spec import TargetModule

_PER_EXPERT = re.compile(r"^(?P<block>.+)\.(?P<moe>block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)$")
#: Per naming (the block's MoE container), each role's per-expert projection.
_LAYOUTS = {"block_sparse_moe": {"gate": "w1", "up": "w3", "down": "w2"}, "mlp": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}
_ROLE = {proj: role for names in _LAYOUTS.values() for role, proj in names.items()}
#: Each fused parameter's roles, in the order transformers concatenates them along d_out.
_FUSED = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


def _fold(block: str, experts: dict[int, dict[str, TargetModule]]) -> list[TargetModule] | None:
    """The two fused targets of one block's experts, or None when they are not a complete, uniform set."""
    count = len(experts)
    if sorted(experts) != list(range(count)) or any(set(p) != {"gate", "up", "down"} for p in experts.values()):
        return None
    gate, down = experts[0]["gate"], experts[0]["down"]
    uniform = all(
        p["gate"].shape == gate.shape and p["up"].shape == gate.shape and p["down"].shape == down.shape for p in experts.values()
    )
    if not uniform or down.shape != (gate.d_in, gate.d_out):
        return None
    return [
        TargetModule(f"{block}.mlp.experts.gate_up_proj", 2 * gate.d_out, gate.d_in, "experts", count),
        TargetModule(f"{block}.mlp.experts.down_proj", down.d_out, down.d_in, "experts", count),
    ]


def fold_checkpoint_experts(targets: list[TargetModule]) -> list[TargetModule]:
    """``targets`` with every complete per-expert block replaced by its fused expert targets (each
    per-expert weight is then part of a fused target; the block's router is no target)."""
    blocks: dict[tuple[str, str], dict[int, dict[str, TargetModule]]] = {}
    for t in targets:
        match = _PER_EXPERT.match(t.name)
        if match and t.kind == "linear":
            key = (match["block"], match["moe"])
            blocks.setdefault(key, {}).setdefault(int(match["e"]), {})[_ROLE[match["proj"]]] = t
    folded: dict[tuple[str, str], list[TargetModule]] = {}
    for (block, moe), experts in blocks.items():
        fused = _fold(block, experts)
        if fused is not None:
            folded[(block, moe)] = fused
    if not folded:
        return targets
    out: list[TargetModule] = []
    for t in targets:
        match = _PER_EXPERT.match(t.name)
        if match and (match["block"], match["moe"]) in folded:
            continue
        if any(t.name == f"{block}.{moe}.gate" for block, moe in folded):
            continue  # the router: counted in the total, not a target of the built model
        out.append(t)
    return out + [t for fused in folded.values() for t in fused]


def per_expert_keys(name: str, keys: Collection[str]) -> list[list[str]] | None:
    """For the fused expert parameter ``name`` (``<block>.mlp.experts.gate_up_proj``), the checkpoint
    weights of each expert among ``keys``, to be concatenated along d_out in this order (gate before
    up); None when ``keys`` hold no complete set of experts 0, 1, ... in either naming."""
    match = re.fullmatch(r"(?P<block>.+)\.mlp\.experts\.(?P<fused>gate_up_proj|down_proj)", name)
    if match is None:
        return None
    block, roles = match["block"], _FUSED[match["fused"]]
    for moe, names in _LAYOUTS.items():
        experts: list[list[str]] = []
        while True:
            wanted = [f"{block}.{moe}.experts.{len(experts)}.{names[role]}.weight" for role in roles]
            if not all(key in keys for key in wanted):
                break
            experts.append(wanted)
        if experts:
            return experts
    return None
