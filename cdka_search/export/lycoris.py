"""Plan -> a LyCORIS TOML preset: one ``name_algo_map`` entry per module (checked against lycoris-lora 4.1).

- LoKr groups (r = 1, factor shapes LyCORIS builds: cdka_search.export.lokr_shapes): ``algo = "lokr"``,
  the ``factor`` that gives the plan's w1 = B (m1 x n1) and w2 = A (m2 x n2), ``full_matrix = true`` so
  both factors are full, ``dim = max(m2, n2)`` and ``alpha = dim``.
- LoRA groups (r1 = r2 = 1): ``algo = "lora"``, ``dim = r``, ``alpha = lambda * r / multiplier``.
- Refused with an ExportError naming the groups: r > 1 components (LyCORIS LoKr is one term), shapes
  no factor builds, GPT-2's transformers Conv1D (LyCORIS skips it silently) and 3-D MoE expert
  parameters (LyCORIS wraps modules only).

Scaling: LyCORIS runs a LoKr module whose two factors are full at scale 1 whatever alpha says
(lycoris/modules/lokr.py sets alpha = dim), times the network ``multiplier``. So the plan's lambda is
carried exactly only when every LoKr group has the same lambda: the preset's header then gives that
lambda as the multiplier to pass to ``create_lycoris`` (LoRA alphas are divided by it). Otherwise the
header lists each group's lambda and the export notes it.

The preset turns class-based targeting off (``target_module = []``) and matches names with fnmatch
(``use_fnmatch = true``), so each key is an exact full module name; the preset also resets the class-level
maps LyCORIS keeps between calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdka_search.errors import ExportError
from cdka_search.export.base import (
    Export,
    ExportFile,
    ExportRow,
    KeyIndex,
    check_keys,
    group_label,
    note_init_and_dropout,
    refusal,
    resolve_modules,
)
from cdka_search.export.lokr_shapes import lycoris_factors

if TYPE_CHECKING:
    from cdka_search.plan import Plan
    from cdka_search.spec.model_spec import ModelSpec

__all__ = ["export_lycoris", "PRESET_FILE"]

PRESET_FILE = "lycoris_preset.toml"
EXPERTS = "3-D expert tensors (LyCORIS adapts modules, not parameters)"
CONV1D = "transformers Conv1D (LyCORIS does not adapt it)"


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def export_lycoris(plan: "Plan", spec: "ModelSpec | None" = None, model: object = None) -> Export:
    """A LyCORIS preset expressing ``plan``, or an ExportError naming what LyCORIS cannot express."""
    try:
        import tomli_w
    except ImportError:
        raise ExportError("the LyCORIS export writes TOML with tomli-w: pip install 'cdka[export]'") from None
    groups, all_names = resolve_modules(plan, spec)
    settings = plan.adapter
    refused: dict[str, list[str]] = {}
    factor_of: dict[int, int] = {}
    for i, (g, _) in enumerate(groups):
        d = g.design
        if g.kind == "experts":
            refused.setdefault(EXPERTS, []).append(g.modules[0])
        elif g.kind != "linear":
            refused.setdefault(CONV1D, []).append(g.modules[0])
        elif d.is_lora:
            continue
        elif d.r > 1:
            refused.setdefault("r > 1 Kronecker components (LyCORIS LoKr builds one term)", []).append(f"{g.modules[0]} (r = {d.r})")
        else:
            factors = lycoris_factors(d.m1, d.n1, d.m2, d.n2)
            if not factors:
                refused.setdefault("factor shapes no LyCORIS factor builds", []).append(
                    f"{g.modules[0]} (left {[d.m1, d.n1]}, right {[d.m2, d.n2]})"
                )
            else:
                factor_of[i] = -1 if -1 in factors else min(factors)
    if refused:
        elsewhere = "export a `--family lora` plan of them to PEFT, or leave them out with `cdka plan --targets`"
        raise refusal("LyCORIS", refused, {EXPERTS: elsewhere, CONV1D: elsewhere})

    lokr_lambdas = {settings.scaling_value(groups[i][0].design) for i in factor_of}
    multiplier = lokr_lambdas.pop() if len(lokr_lambdas) == 1 else 1.0
    exact = len(lokr_lambdas) == 0  # popped the only one, or there were no LoKr groups
    entries: dict[str, dict[str, Any]] = {}
    rows: list[ExportRow] = []
    header: list[str] = []
    trainable = 0
    for i, (g, modules) in enumerate(groups):
        d = g.design
        lam = settings.scaling_value(d)
        if i in factor_of:
            dim = max(d.m2, d.n2)
            entry: dict[str, Any] = {"algo": "lokr", "factor": factor_of[i], "dim": dim, "alpha": dim, "full_matrix": True}
            trainable += g.count * (d.m1 * d.n1 + d.m2 * d.n2)
            settings_text = f"factor={factor_of[i]} dim={dim} full_matrix"
        else:
            entry = {"algo": "lora", "dim": d.r, "alpha": float(_fmt(lam * d.r / multiplier))}
            if settings.dropout:
                entry["dropout"] = settings.dropout
            trainable += g.count * d.r * (g.shape[0] + g.shape[1])
            settings_text = f"dim={d.r} alpha={entry['alpha']:g}"
        for n in modules:
            entries[n] = dict(entry)
        rows.append(ExportRow(group_label(g), g.count, d.label(), entry["algo"], settings_text))
        header.append(f"#   {group_label(g)}: {entry['algo']} {d.label()}, lambda = {_fmt(lam)}")
    check_keys("name_algo_map", list(entries), {n: n for n in entries}, KeyIndex(all_names).fnmatch_hits)
    if trainable != plan.used_params:  # by construction; a failure is a bug in this module
        raise ExportError(f"LyCORIS would train {trainable:,} parameters, the plan {plan.used_params:,}; please report this")

    notes: list[str] = []
    if factor_of:
        note_init_and_dropout(plan, notes, dropout_ok=False, what="LyCORIS")
        notes.append("LyCORIS LoKr starts from w1 = B Kaiming and w2 = A zero (the plan: B zero, A Kaiming); dW = 0 either way")
    if plan.modules_to_save:
        from cdka_search.plan import heads_text

        notes.append(f"LyCORIS trains adapters only: also train the new task head whole, as the plan does "
                     f"({heads_text(plan.modules_to_save)}: set requires_grad and save it yourself)")
    if exact:
        notes.append(f"pass multiplier={_fmt(multiplier)} to create_lycoris: it carries the plan's lambda exactly")
    else:
        notes.append("LoKr groups have different lambdas and LyCORIS scales full-matrix LoKr by 1 x multiplier: "
                     "the plan's lambda is not carried for them (see the preset header)")
    preset = {
        "enable_conv": False,
        "target_module": [],
        "target_name": [],
        "module_algo_map": {},
        "exclude_name": [],
        "lora_prefix": "lycoris",
        "use_fnmatch": True,
        "name_algo_map": entries,
    }
    use = (
        f"# Use: create_lycoris(model, multiplier={_fmt(multiplier)}, preset=\"{PRESET_FILE}\") then .apply_to()"
        + ("" if exact else "  (lambda NOT exact: see notes)")
    )
    lines = [
        f"# LyCORIS preset written by cdka for {plan.model_name}: {len(groups)} groups, {trainable:,} trainable parameters.",
        use,
        "# Plan groups and their lambda (scaling " + settings.scaling + "):",
        *header,
    ]
    text = "\n".join(lines) + "\n\n" + tomli_w.dumps(preset)
    return Export("lycoris", (ExportFile(PRESET_FILE, text),), tuple(rows), tuple(notes), ".", trainable, {"preset": preset})
