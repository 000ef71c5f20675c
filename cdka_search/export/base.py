"""What every exporter shares: the Export result, module-name resolution, key checks, atomic writes."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from cdka_search.errors import ExportError
from cdka_search.fileio import atomic_write_text, write_folder
from cdka_search.matching import ModuleIndex, summarise

if TYPE_CHECKING:
    from cdka_search.plan import Plan, PlanGroup
    from cdka_search.render import Table
    from cdka_search.spec.model_spec import ModelSpec

_GLOB = "*?["


@dataclass(frozen=True)
class ExportFile:
    """One file of an export: a path relative to the output folder and its text."""

    path: str
    text: str


@dataclass(frozen=True)
class ExportRow:
    """How one plan group was translated: into which config, with which of the target's knobs."""

    group: str
    modules: int
    design: str
    config: str
    settings: str


@dataclass(frozen=True)
class Export:
    """The files an exporter produced, one row per group, and notes on what the target treats differently."""

    target: str
    files: tuple[ExportFile, ...]
    rows: tuple[ExportRow, ...]
    notes: tuple[str, ...] = ()
    default_dir: str = "."
    trainable_params: int = 0
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # parsed form of each file, for callers


def group_label(group: "PlanGroup") -> str:
    return group.modules[0] if len(group.modules) == 1 else f"{group.modules[0]} (+{len(group.modules) - 1})"


def resolve_modules(
    plan: "Plan", spec: "ModelSpec | None" = None
) -> tuple[list[tuple["PlanGroup", tuple[str, ...]]], tuple[str, ...]]:
    """Each group with the full names of the modules it adapts (model order), and every adaptable
    module name of the model (what a key must not match by accident).

    With ``spec`` the plan is first checked against it (PlanError listing every problem). Without it, a
    preset plan reads its preset offline; any other plan must name its modules exactly (no globs).
    """
    from cdka_search.planner import check_plan

    if spec is None and plan.model_source == "preset":
        from cdka_search.spec import load_spec

        spec = load_spec(plan.model_name)
    if spec is None:
        globbed = [g for g in plan.groups if any(c in p for p in g.modules for c in _GLOB)]
        if globbed:
            raise ExportError(
                f"group(s) {', '.join(repr(g.modules[0]) for g in globbed)} use globs and the plan's model "
                f"({plan.model_name}, source {plan.model_source}) is not a preset: pass the model "
                "(--model FOLDER_OR_CONFIG, or spec=spec_from_module(model)) so module names can be listed"
            )
        out = []
        for g in plan.groups:
            names = tuple(dict.fromkeys(g.modules))
            if len(names) != g.count:
                raise ExportError(f"group {g.modules[0]!r} names {len(names)} modules but says count {g.count}")
            out.append((g, names))
        return out, tuple(n for _, names in out for n in names)
    check_plan(plan, spec)
    names = tuple(t.name for t in spec.targets)
    index = ModuleIndex(names)
    return [(g, tuple(index.find_any(g.modules))) for g in plan.groups], names


def anchored(name: str) -> str:
    """A rank_pattern / alpha_pattern key that matches exactly ``name`` and nothing else."""
    return "^" + re.escape(name) + "$"


def peft_key_matches(key: str, name: str) -> bool:
    """PEFT's pattern rule (peft.utils.other.get_pattern_key): ``(.*\\.)?(key)$`` from the start."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def peft_target_matches(key: str, name: str) -> bool:
    """PEFT's rule for a list of target_modules: an exact name or a dotted suffix."""
    return name == key or name.endswith("." + key)


def fnmatch_matches(key: str, name: str) -> bool:
    """LyCORIS's rule with use_fnmatch: the key is a shell glob over the whole name."""
    return fnmatch.fnmatchcase(name, key)


def _literal(body: str) -> str | None:
    """The text a regex matches when it is an escaped literal (re.escape of something), else None."""
    text = re.sub(r"\\(.)", r"\1", body, flags=re.S)
    return text if re.escape(text) == body else None


class KeyIndex:
    """A model's module names indexed by every dotted suffix, so that the key checks cost one lookup
    per key: the keys an exporter writes are full names (exact, anchored or suffix rules), and
    comparing each against every name is quadratic on per-layer plans (3,584 modules: 13 M
    comparisons). Keys of any other form fall back to the tool's rule over every name."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._suffixes: dict[str, list[str]] = {}  # "x.y" -> names equal to it or ending in ".x.y", in order
        self._exact: dict[str, list[str]] = {}
        for name in self.names:
            self._exact.setdefault(name, []).append(name)
            parts = name.split(".")
            for i in range(len(parts)):
                self._suffixes.setdefault(".".join(parts[i:]), []).append(name)
        # "$" also matches before a final newline: a name holding one takes the rule's own path
        self._newlines = any("\n" in n for n in self.names)

    def _scan(self, key: str, rule: Callable[[str, str], bool]) -> list[str]:
        return [n for n in self.names if rule(key, n)]

    def peft_target_hits(self, key: str) -> list[str]:
        """The names PEFT's target_modules entry ``key`` adapts (peft_target_matches)."""
        return list(self._suffixes.get(key, ()))

    def peft_pattern_hits(self, key: str) -> list[str]:
        """The names a rank_pattern / alpha_pattern key ``key`` applies to (peft_key_matches)."""
        anchored_key = key.startswith("^")
        body = key[1:] if anchored_key else key
        body = body.removesuffix("$")  # an escaped "\\$" left as a lone "\\" is no literal: scanned
        text = None if self._newlines else _literal(body)
        if text is None:
            return self._scan(key, peft_key_matches)
        return list((self._exact if anchored_key else self._suffixes).get(text, ()))

    def fnmatch_hits(self, key: str) -> list[str]:
        """The names a LyCORIS name_algo_map key ``key`` applies to (fnmatch_matches)."""
        if any(c in key for c in _GLOB):
            return self._scan(key, fnmatch_matches)
        return list(self._exact.get(key, ()))


def check_keys(config_name: str, keys: Iterable[str], wanted: dict[str, str], hits: Callable[[str], list[str]]) -> None:
    """Each key must match exactly the one module it was written for (``hits``: a KeyIndex method)."""
    for key in keys:
        found = hits(key)
        if found != [wanted[key]]:
            raise ExportError(
                f"{config_name}: key {key!r} matches {found[:3] or 'no module'}, not only {wanted[key]!r}; "
                "this is a bug in the exporter, please report it"
            )


REPLAN = "re-plan with `cdka plan --family lokr` (single Kronecker terms) or `--family lora`"
REPLAN_LORA = "re-plan with `cdka plan --family lora`"


def refusal(tool: str, refused: dict[str, list[str]], advice: Mapping[str, str] | None = None) -> ExportError:
    """One error naming the groups the tool cannot express, grouped by reason (the first ten of each:
    a per-layer plan would otherwise put thousands of names on the one error line), and what to do
    for each reason (``advice``; REPLAN where none is given)."""
    count = sum(len(v) for v in refused.values())
    parts = [f"{reason}: {summarise(groups, sep=', ')}" for reason, groups in refused.items()]
    todo = "; ".join(dict.fromkeys((advice or {}).get(reason, REPLAN) for reason in refused))
    return ExportError(f"{tool} cannot express {count} group(s) of this plan; {'; '.join(parts)}. To export: {todo}; nothing was written")


def note_init_and_dropout(plan: "Plan", notes: list[str], *, dropout_ok: bool, what: str) -> None:
    """Notes shared by the exporters on settings the target sets its own way."""
    if plan.adapter.init != "kaiming-A-zero-B":
        notes.append(f"adapter.init {plan.adapter.init!r} has no {what} equivalent: {what} starts from its own init")
    if plan.adapter.dropout and not dropout_ok:
        notes.append(f"adapter.dropout {plan.adapter.dropout} has no {what} LoKr equivalent (input dropout); not exported")
    if plan.adapter.dtype != "float32":
        notes.append(f"adapter.dtype {plan.adapter.dtype}: {what} keeps adapter weights in the base layer's dtype")


def write_export(export: Export, *, out_dir: str | Path | None = None, out_file: str | Path | None = None) -> list[Path]:
    """Write every file of ``export`` atomically under ``out_dir`` (default: export.default_dir), or its
    only file to ``out_file``. Returns the paths written."""
    if out_dir is not None and out_file is not None:
        raise ExportError("give an output folder or an output file, not both")
    if out_file is not None:
        if len(export.files) != 1:
            raise ExportError(
                f"this {export.target} export has {len(export.files)} files "
                f"({', '.join(f.path for f in export.files)}); write them to a folder with --out DIR"
            )
        return [atomic_write_text(Path(out_file), export.files[0].text)]
    root = Path(out_dir if out_dir is not None else export.default_dir)
    if root.exists() and not root.is_dir():
        raise ExportError(f"{root} exists and is not a folder; use -o FILE for a single file")
    if len(export.files) == 1 and "/" not in export.files[0].path and not _earlier_export(root):
        return [atomic_write_text(root / export.files[0].path, export.files[0].text)]
    if root.exists() and not _earlier_export(root):
        raise ExportError(
            f"{root} holds files that are not an earlier cdka export; a {len(export.files)}-file export replaces "
            "its folder whole, so give a new or empty folder with --out"
        )
    return write_folder(root, {f.path: f.text.encode("utf-8") for f in export.files})


_EXPORT_FILE_NAMES = ("adapter_config.json", "lycoris_preset.toml")


def _earlier_export(root: Path) -> bool:
    """True when ``root`` is a folder holding only what an export writes (config files, at most one
    folder deep), so replacing it whole loses nothing else; an empty folder counts."""
    if not root.is_dir() or root.resolve() == Path.cwd().resolve():
        return False
    entries = 0
    for path in root.rglob("*"):
        entries += 1
        depth = len(path.relative_to(root).parts)
        if entries > 1000 or depth > 2 or path.is_symlink():
            return False
        if path.is_file() and path.name not in _EXPORT_FILE_NAMES or path.is_dir() and depth > 1:
            return False
    return True


def export_table(export: Export, written: Sequence[Path] = ()) -> "Table":
    from cdka_search.render import Table

    notes = [f"wrote {p}" for p in written] + [f"note: {n}" for n in export.notes]
    return Table(
        title=f"{export.target} export: {len(export.rows)} groups, {export.trainable_params:,} trainable parameters",
        columns=("Group", "Modules", "Design (r1,r2,r)", "Config", "Settings"),
        rows=tuple((r.group, r.modules, r.design, r.config, r.settings) for r in export.rows),
        notes=tuple(notes),
        extra={"target": export.target, "files": [str(p) for p in written], "notes": list(export.notes),
               "trainable_params": export.trainable_params},
    )
