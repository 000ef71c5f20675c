"""Plan -> PEFT configs: LoraConfig for LoRA groups, LoKrConfig(s) for single Kronecker terms.

What PEFT can express (checked against peft 0.21, peft/tuners/{lora,lokr}):

- LoRA (r1 = r2 = 1, any r): one LoraConfig, ranks per module through ``rank_pattern``. The plan's
  lambda is carried exactly: scalings alpha/sqrt(r*r2) and alpha/sqrt(r) are rsLoRA (lambda =
  lora_alpha / sqrt(r)) with lora_alpha = alpha; alpha/r is plain LoRA with lora_alpha = alpha; "fixed"
  gives each module lora_alpha = scale * r through ``alpha_pattern``.
- LoKr: ONE term kron(w1, w2) per module, w1 = B (m1 x n1), w2 = A (m2 x n2), both shapes fixed by
  ``factorization(d, decompose_factor)`` with one factor per config. A plan group is expressible when its
  r is 1 and some factor gives its shapes (cdka_search.export.lokr_shapes); one LoKrConfig is written per
  distinct factor. PEFT's ``r`` is the rank of w2, and w2 is a full matrix only when r >= max(m2, n2)/2,
  so each module gets r = max(m2, n2) and alpha = lambda * r (LoKr's scale is alpha / r).
- Expert tensors (3-D MoE parameters, kind ``experts``): LoRA designs go into the LoRA config's
  ``target_parameters`` (PEFT's ParamWrapper gives every expert its own rank-r factors, E * r * (d_out +
  d_in) parameters, as the plan counts them), with the same lambda mapping. PEFT has no Kronecker form
  for them and its ParamWrapper refuses dropout, so a non-LoRA design or a non-zero adapter.dropout on an
  expert group is refused by name.
- Everything else (r > 1 components with r1 or r2 > 1, factor shapes LoKr never builds, LoKr on GPT-2's
  Conv1D, which PEFT LoKr rejects) is refused with an ExportError naming the groups.

Keys are '^'-anchored, escaped full module names, each checked to match exactly its module under PEFT's
own matching rules. Then the configs are applied by the installed peft to the model built on the meta device
(cdka_search.export.peft_check) and compared with the plan module by module (adapter, rank, scaling) and in
trainable parameters: peft 0.21 rewrites the LoRA target_modules of some MoE model types (a dense layer's
gate_proj/up_proj/down_proj, a shared expert's, taken for v4 experts; 0.22 does not). Modules PEFT does not apply as listed
move to ``target_parameters`` as ``<module>.weight`` (never rewritten; same factors and scaling) and are
checked again; what still differs, or needs dropout there, is refused by name. Without peft, transformers
or a known model config the export says it was not checked. Output: adapter_config.json, or <adapter_name>/adapter_config.json per config when
there are several (PEFT's save_pretrained layout for named adapters).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from cdka_search.errors import ExportError
from cdka_search.export.base import (
    REPLAN_LORA,
    Export,
    ExportFile,
    ExportRow,
    KeyIndex,
    anchored,
    check_keys,
    group_label,
    note_init_and_dropout,
    refusal,
    resolve_modules,
)
from cdka_search.export.lokr_shapes import peft_factorization, peft_factors

if TYPE_CHECKING:
    from cdka_search.candidates import Design
    from cdka_search.plan import AdapterSettings, Plan
    from cdka_search.spec.model_spec import ModelSpec

__all__ = ["export_peft", "lora_alpha", "lokr_rank_alpha", "choose_factors"]

#: Adapted modules up to which an export is applied with PEFT on the meta device to check it (peft 0.21
#: matches every module against every adapted one: 896 modules took 5.6 s, 14,336 more than 2 minutes).
PEFT_CHECK_MODULES = 1_000
RSLORA_SCALINGS = ("alpha/sqrt(r*r2)", "matched", "alpha/sqrt(r)")
EXPERTS_KRONECKER = (
    "Kronecker designs on expert tensors (PEFT adapts 3-D expert parameters with LoRA only, so --family lora "
    "for them)"
)
EXPERTS_DROPOUT = "adapter.dropout on expert tensors (PEFT's target_parameters LoRA takes no dropout)"
CONV1D = "transformers Conv1D (PEFT LoKr rejects it; PEFT LoRA adapts it)"


def lora_alpha(settings: "AdapterSettings", design: "Design") -> tuple[bool, float]:
    """(use_rslora, lora_alpha) giving PEFT LoRA the plan's lambda for a LoRA design (r2 = 1)."""
    if settings.scaling in RSLORA_SCALINGS:
        return True, float(settings.alpha)  # alpha / sqrt(r * 1) = alpha / sqrt(r)
    if settings.scaling == "alpha/r":
        return False, float(settings.alpha)
    return False, float(settings.scale) * design.r  # type: ignore[arg-type]  # fixed: alpha / r = scale


def lokr_rank_alpha(settings: "AdapterSettings", designs: "list[Design]") -> tuple[int, list[float]]:
    """(r, alpha of each design) for the modules of one PEFT LoKr config: r keeps every w2 a full matrix
    (PEFT builds w2 whole when r >= max(m2, n2) / 2) and alpha / r equals each design's lambda.

    One r for the whole config: PeftMixedModel.add_adapter builds a layer with the config's r, not its
    rank_pattern, so a per-module r would give a low-rank w2 to the modules whose r the default misses."""
    r = max(max(d.m2, d.n2) for d in designs)
    return r, [settings.scaling_value(d) * r for d in designs]


def choose_factors(options: dict[int, tuple[int, ...]]) -> dict[int, int]:
    """Group index -> decompose_factor, using as few distinct factors as a greedy cover finds
    (preferring PEFT's default -1, then the smallest factor)."""
    left = dict(options)
    chosen: dict[int, int] = {}
    while left:
        counts = Counter(f for fs in left.values() for f in fs)
        best = max(counts, key=lambda f: (counts[f], f == -1, -f))
        for i in [i for i, fs in left.items() if best in fs]:
            chosen[i] = best
            del left[i]
    return chosen


def _defaults_and_patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value (first seen wins ties) and anchored keys for the modules that differ."""
    default = Counter(values.values()).most_common(1)[0][0]
    return default, {anchored(n): v for n, v in values.items() if v != default}


def _config(base: dict[str, Any], names: list[str], r: dict[str, int], alpha: dict[str, float], alpha_key: str) -> dict[str, Any]:
    r0, rank_pattern = _defaults_and_patterns(r)
    a0, alpha_pattern = _defaults_and_patterns(alpha)
    return {
        **base,
        "target_modules": names,
        "r": r0,
        alpha_key: a0,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def _patterns_name_parameters(cfg: dict[str, Any]) -> bool:
    """True when a rank_pattern or alpha_pattern key of ``cfg`` is written for one of its target_parameters."""
    keys = {anchored(n) for n in cfg.get("target_parameters", [])}
    return any(k in keys for pattern in ("rank_pattern", "alpha_pattern") for k in cfg[pattern])


def _differences(model: Any, configs: dict[str, dict[str, Any]], expected: dict[tuple[str, str], tuple[int, float]],
                 used: int) -> tuple[list[str], list[str], str]:
    """(expected keys PEFT applies otherwise or not at all, keys PEFT adapts that the plan does not,
    PEFT's error or a trainable-count difference) for ``configs`` applied to ``model``."""
    import math

    from cdka_search.export.peft_check import PeftRefused, applied_adapters

    try:
        got, trainable = applied_adapters(model, configs)
    except PeftRefused as exc:
        return [], [], f"PEFT refuses the config: {exc}"
    wrong = [k for k, (r, s) in expected.items()
             if k not in got or got[k][0] != r or not math.isclose(got[k][1], s, rel_tol=1e-9)]
    extra = [f"{k} ({c})" for k, c in got if (k, c) not in expected]
    return [k for k, _ in wrong], extra, "" if trainable == used else f"PEFT trains {trainable:,} parameters, the plan {used:,}"


def _as_parameters(cfg: dict[str, Any], modules: list[str]) -> dict[str, Any]:
    """``cfg`` with ``modules`` targeted through their weight in target_parameters (patterns re-keyed)."""
    moved = set(modules)
    out = dict(cfg)
    out["target_modules"] = [n for n in cfg["target_modules"] if n not in moved]
    out["target_parameters"] = [*cfg.get("target_parameters", []), *(f"{n}.weight" for n in cfg["target_modules"] if n in moved)]
    keys = {anchored(n): anchored(f"{n}.weight") for n in moved}
    for pattern in ("rank_pattern", "alpha_pattern"):
        out[pattern] = {keys.get(k, k): v for k, v in cfg[pattern].items()}
    return out


def _check_with_peft(plan: Plan, spec: ModelSpec | None, model: Any, configs: dict[str, dict[str, Any]],
                     expected: dict[tuple[str, str], tuple[int, float]], groups: list, group_of: dict[str, int],
                     notes: list[str]) -> list[str]:
    """Apply ``configs`` with the installed peft to the model built on meta and compare with the plan.
    Modules PEFT rewrites move to target_parameters (``configs`` is updated in place; their names are
    returned); anything still different is an ExportError naming the groups."""
    from cdka_search.export.peft_check import meta_model
    from cdka_search.matching import summarise

    if len(expected) > PEFT_CHECK_MODULES:
        notes.append(
            f"not checked against PEFT: {len(expected):,} adapted modules, more than the {PEFT_CHECK_MODULES:,} the check "
            "applies (PEFT's own matching grows with the square of the modules: 896 took 5.6 s, 14,336 over 2 minutes, "
            "and loading this export into PEFT costs the same); PEFT may rewrite some targets of MoE models"
        )
        return []
    built, why = meta_model(plan, spec, model)
    if built is None:
        notes.append(f"not checked against PEFT: {why}; PEFT may rewrite some targets of MoE models")
        return []
    what = f"{type(built).__name__} on the meta device"
    wrong, extra, other = _differences(built, configs, expected, plan.trained_params)
    if not (wrong or extra or other):
        return []
    lora = configs.get("cdka_lora")
    listed = set(lora["target_modules"]) if lora else set()
    if other.startswith("PEFT refuses") and not wrong:  # which targets: those whose leaf name PEFT's message names
        said = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", other))
        wrong = [n for n in listed if n.rsplit(".", 1)[-1] in said]
    movable = [n for n in dict.fromkeys(wrong) if n in listed]
    if movable and not plan.adapter.dropout:  # accepted only if PEFT then applies everything as the plan says
        trial = {**configs, "cdka_lora": _as_parameters(lora, movable)}
        wrong2, extra2, other2 = _differences(meta_model(plan, spec, model)[0], trial, expected_moved(expected, movable),
                                              plan.trained_params)
        if not (wrong2 or extra2 or other2):
            configs.update(trial)
            notes.append(
                f"PEFT rewrites the target_modules entries of {len(movable)} module(s) of this {type(built).__name__} "
                "(it takes them for fused experts), so they are targeted as `<module>.weight` in target_parameters "
                "(PeftModel names them ParamWrapper: the same rank-r factors and scaling); checked on "
                f"{what}: every module gets the plan's adapter"
            )
            return movable
    labels = list(dict.fromkeys(group_label(groups[group_of[n]][0]) for n in wrong if n in group_of))
    reasons = []
    if labels:
        why_not = " (adapter.dropout: target_parameters take none)" if movable and plan.adapter.dropout else ""
        reasons.append(f"group(s) PEFT would not adapt as listed{why_not}: {summarise(labels, sep=', ')}")
    if extra:
        reasons.append(f"adapted by PEFT but not in the plan: {summarise(extra, sep=', ')}")
    if other:
        reasons.append(other)
    raise ExportError(f"PEFT would not apply this plan as written (checked on {what}): {'; '.join(reasons)}; "
                      "nothing was written")


def expected_moved(expected: dict[tuple[str, str], tuple[int, float]], modules: list[str]) -> dict[tuple[str, str], tuple[int, float]]:
    moved = set(modules)
    return {(f"{k}.weight" if k in moved and c == "cdka_lora" else k, c): v for (k, c), v in expected.items()}


def export_peft(plan: Plan, spec: ModelSpec | None = None, model: Any = None) -> Export:
    """PEFT configs expressing ``plan`` exactly, or an ExportError naming what PEFT cannot express.

    ``model``: the live model the plan's spec was read from (spec_from_module), to check the configs on;
    without it the model is built from the plan's preset or local config."""
    groups, all_names = resolve_modules(plan, spec)
    settings = plan.adapter
    refused: dict[str, list[str]] = {}
    lora: dict[str, list[int]] = {}
    lokr_options: dict[int, tuple[int, ...]] = {}
    for i, (g, _) in enumerate(groups):
        d = g.design
        if g.kind == "experts":
            if not d.is_lora:
                refused.setdefault(EXPERTS_KRONECKER, []).append(f"{g.modules[0]} (r1 = {d.r1}, r2 = {d.r2})")
            elif settings.dropout:
                refused.setdefault(EXPERTS_DROPOUT, []).append(g.modules[0])
            else:
                lora.setdefault("linear", []).append(i)
        elif d.is_lora:
            lora.setdefault(g.kind, []).append(i)
        elif g.kind != "linear":
            refused.setdefault(CONV1D, []).append(g.modules[0])
        elif d.r > 1:
            refused.setdefault("r > 1 Kronecker components (PEFT LoKr builds one term)", []).append(f"{g.modules[0]} (r = {d.r})")
        else:
            factors = peft_factors(d.m1, d.n1, d.m2, d.n2)
            if factors:
                lokr_options[i] = factors
            else:
                refused.setdefault("factor shapes no decompose_factor builds", []).append(
                    f"{g.modules[0]} (left {[d.m1, d.n1]}, right {[d.m2, d.n2]})"
                )
    if refused:
        raise refusal("PEFT", refused, {EXPERTS_KRONECKER: REPLAN_LORA, CONV1D: REPLAN_LORA,
                                        EXPERTS_DROPOUT: "set adapter.dropout to 0 in the plan"})

    configs: dict[str, dict[str, Any]] = {}
    rows: list[ExportRow] = []
    notes: list[str] = []
    trainable = 0
    expected: dict[tuple[str, str], tuple[int, float]] = {}  # (module or parameter, config) -> (params, scaling)
    group_of: dict[str, int] = {}

    for kind, members in lora.items():
        name = "cdka_lora" if kind == "linear" else "cdka_lora_conv1d"
        rslora = lora_alpha(settings, groups[members[0]][0].design)[0]
        r, alpha, names, parameters = {}, {}, [], []
        for i in members:
            g, modules = groups[i]
            _, a = lora_alpha(settings, g.design)
            for n in modules:
                (parameters if g.kind == "experts" else names).append(n)
                r[n], alpha[n] = g.design.r, a
                expected[(n, name)] = (g.experts * g.design.r * (g.shape[0] + g.shape[1]), settings.scaling_value(g.design))
                group_of[n] = i
            trainable += g.count * g.experts * g.design.r * (g.shape[0] + g.shape[1])
            target = "target_parameters" if g.kind == "experts" else ""
            rows.append(ExportRow(group_label(g), g.count, g.design.label(), name,
                                  f"r={g.design.r} lora_alpha={a:g}{' rslora' if rslora else ''}"
                                  f"{f' {target} ({g.experts} experts)' if target else ''}"))
        base = {
            "peft_type": "LORA", "task_type": None, "lora_dropout": settings.dropout, "bias": "none",
            "use_rslora": rslora, "fan_in_fan_out": kind == "conv1d", "init_lora_weights": True,
        }
        configs[name] = _config(base, names, r, alpha, "lora_alpha")
        if parameters:
            configs[name]["target_parameters"] = parameters

    factor_of = choose_factors(lokr_options)
    for f in sorted(set(factor_of.values()), key=lambda f: (f != -1, f)):
        name = "cdka_lokr" if f == -1 else f"cdka_lokr_f{f}"  # not "lokr": PEFT warns when a name is in its "lokr_" prefix
        r, alpha, names = {}, {}, []
        members = sorted(i for i, fi in factor_of.items() if fi == f)
        rk, alphas = lokr_rank_alpha(settings, [groups[i][0].design for i in members])
        for i, a in zip(members, alphas):
            g, modules = groups[i]
            d = g.design
            assert peft_factorization(g.shape[0], f) == (d.m1, d.m2) and peft_factorization(g.shape[1], f) == (d.n1, d.n2)
            for n in modules:
                names.append(n)
                r[n], alpha[n] = rk, a
                expected[(n, name)] = (d.m1 * d.n1 + d.m2 * d.n2, settings.scaling_value(d))
                group_of[n] = i
            trainable += g.count * (d.m1 * d.n1 + d.m2 * d.n2)
            rows.append(ExportRow(group_label(g), g.count, d.label(), name, f"factor={f} r={rk} alpha={a:g}"))
        base = {
            "peft_type": "LOKR", "task_type": None, "decompose_factor": f, "decompose_both": False,
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
        }
        configs[name] = _config(base, names, r, alpha, "alpha")

    index = KeyIndex(all_names)
    for name, cfg in configs.items():
        targets = [*cfg["target_modules"], *cfg.get("target_parameters", [])]
        check_keys(name, targets, {n: n for n in targets}, index.peft_target_hits)
        written_for = {anchored(n): n for n in targets}
        for pattern in ("rank_pattern", "alpha_pattern"):
            check_keys(name, cfg[pattern], written_for, index.peft_pattern_hits)
    if trainable != plan.used_params:  # by construction; a failure is a bug in this module
        raise ExportError(f"PEFT would train {trainable:,} parameters, the plan {plan.used_params:,}; please report this")
    if plan.modules_to_save:  # PEFT trains a copy of each whole and saves it with the adapter
        configs[next(iter(configs))]["modules_to_save"] = [name for name, _ in plan.modules_to_save]
        trainable = plan.trained_params
    moved = _check_with_peft(plan, spec, model, configs, expected, groups, group_of, notes)
    if moved:
        rows = [ExportRow(r.group, r.modules, r.design, r.config, f"{r.settings} target_parameters (weight)")
                if any(group_label(groups[group_of[n]][0]) == r.group for n in moved) else r for r in rows]

    if lokr_options:
        note_init_and_dropout(plan, notes, dropout_ok=False, what="PEFT")
    elif plan.adapter.init != "kaiming-A-zero-B":
        note_init_and_dropout(plan, notes, dropout_ok=True, what="PEFT")
    if any(_patterns_name_parameters(cfg) for cfg in configs.values()):
        notes.append(
            "PEFT warns that the rank_pattern keys of target_parameters (and alpha_pattern keys) \"did not match "
            "any targeted module\"; it applies them to the parameters all the same"
        )
    if len(configs) > 1:
        notes.append(
            f"{len(configs)} configs ({', '.join(configs)}): load each as a named adapter of one PeftMixedModel "
            "and activate them all (see docs/ecosystem.md)"
        )
        if any(cfg["rank_pattern"] or cfg["alpha_pattern"] for cfg in configs.values()):
            notes.append(
                "PeftMixedModel's add_adapter warns that the rank_pattern and alpha_pattern keys of the adapter it adds "
                "\"did not match any targeted module\"; it applies them all the same (the trained parameters are the "
                "plan's), and loading the adapters that have such keys first avoids the warning"
            )
    single = len(configs) == 1
    files = tuple(
        ExportFile("adapter_config.json" if single else f"{name}/adapter_config.json", json.dumps(cfg, indent=2) + "\n")
        for name, cfg in configs.items()
    )
    return Export("peft", files, tuple(rows), tuple(notes), "peft_adapter", trainable, configs)
