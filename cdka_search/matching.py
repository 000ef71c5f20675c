"""The one place where module patterns meet a model's module names.

``ModuleIndex`` indexes the names once: exact names are a dict lookup and a pattern walks a tree of
dotted parts, testing only the parts at its own depth, so a glob such as
``model.layers.*.mlp.up_proj`` costs the layers it visits, not every module of the model. Only a
pattern with ``**`` (which may cross dots) scans every name. ``match_groups`` matches every group of
a plan at once and reports every problem (unmatched groups, wrong counts, names claimed twice) in
one pass, linear in names + groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from cdka_search.documents import brief
from cdka_search.errors import PlanError
from cdka_search.limits import MAX_SCANS
from cdka_search.patterns import PatternError, compile_pattern, is_pattern


@dataclass(frozen=True)
class _Node:
    children: dict[str, "_Node"] = field(default_factory=dict)
    position: list[int] = field(default_factory=list)  # index of the name ending here, if any


class ModuleIndex:
    """Module names in model order, indexed for exact lookups, and for patterns by a tree of parts
    built once on the first pattern (one pass over the names)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self._position = {n: i for i, n in enumerate(self.names)}
        self._root: _Node | None = None  # the tree of parts, built by the first glob (exact names never need it)
        self._found: dict[str, list[int]] = {}  # each glob's matches, once: a plan may repeat a pattern

    def _tree(self) -> _Node:
        if self._root is None:
            root = _Node()
            for i, name in enumerate(self.names):
                node = root
                for part in name.split("."):
                    child = node.children.get(part)
                    if child is None:
                        child = node.children[part] = _Node()
                    node = child
                node.position.append(i)
            self._root = root
        return self._root

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._position

    def position(self, name: str) -> int:
        return self._position[name]

    def positions(self, pattern: str) -> list[int]:
        """Indices (model order) of the names ``pattern`` matches; PatternError for a bad pattern."""
        if not is_pattern(pattern):
            index = self._position.get(pattern)
            return [] if index is None else [index]
        if pattern not in self._found:
            self._found[pattern] = self._glob_positions(pattern)
        return self._found[pattern]

    def _glob_positions(self, pattern: str) -> list[int]:
        glob = compile_pattern(pattern)
        if glob.crosses_dots:
            # The text before the first and after the last wildcard is literal: a cheap test first.
            literal = re.split(r"[*?]", pattern)
            head, tail = literal[0], literal[-1]
            return [i for i, n in enumerate(self.names)
                    if n.startswith(head) and n.endswith(tail) and len(n) >= len(head) + len(tail) and glob.fullmatch(n)]
        nodes = [self._tree()]
        for part in pattern.split("."):
            if is_pattern(part):
                part_glob = compile_pattern(part)
                nodes = [c for node in nodes for key, c in node.children.items() if part_glob.fullmatch(key)]
            else:
                nodes = [c for node in nodes if (c := node.children.get(part)) is not None]
            if not nodes:
                return []
        return sorted(i for node in nodes for i in node.position)

    def find(self, pattern: str) -> list[str]:
        """The names ``pattern`` matches, in model order."""
        if not is_pattern(pattern):  # the common case of per-layer plans: one dict lookup
            return [pattern] if pattern in self._position else []
        return [self.names[i] for i in self.positions(pattern)]

    def find_any(self, patterns: Sequence[str]) -> list[str]:
        """The names any of ``patterns`` matches, each once, in model order."""
        if len(patterns) == 1:
            return self.find(patterns[0])
        return [self.names[i] for i in sorted({i for p in patterns for i in self.positions(p)})]


@dataclass(frozen=True)
class GroupMatch:
    """Which names each group (a list of patterns) matches, and every problem found doing so.

    ``hits[g]`` lists group g's names in model order; ``owner`` maps each name matched by exactly
    one group to that group; ``problems`` are complete sentences, one per problem.
    """

    hits: tuple[tuple[str, ...], ...]
    owner: dict[str, int]
    problems: tuple[str, ...]


def match_groups(
    groups: Sequence[Sequence[str]],
    names: Iterable[str] | ModuleIndex,
    *,
    counts: Sequence[int] | None = None,
    model: str = "the model",
) -> GroupMatch:
    """Match every group's patterns against ``names`` (each pattern compiled once).

    Problems: a pattern that cannot be compiled, a group matching no name, a group matching a
    number of names other than ``counts[g]``, and a name matched by more than one group.
    """
    index = names if isinstance(names, ModuleIndex) else ModuleIndex(names)
    scanning = {p for patterns in groups for p in patterns if "**" in p}
    if len(scanning) * len(index) > MAX_SCANS:
        raise PlanError(
            f"{len(scanning):,} patterns with '**' would each test all {len(index):,} modules of {model}, more than "
            f"{MAX_SCANS:,} tests; name the modules, or use '*' (one dotted part) instead of '**'"
        )
    problems: list[str] = []
    hits: list[tuple[str, ...]] = []
    first_claim: dict[str, int] = {}  # name -> the first group matching it
    more_claims: dict[str, list[int]] = {}  # name -> every group matching it, where more than one does

    def label(g: int) -> str:  # bounded: a pattern or name may be thousands of characters long
        return brief(groups[g][0]) if groups[g] else f"#{g}"

    for g, patterns in enumerate(groups):
        try:
            found = index.find_any(patterns)
        except PatternError as exc:
            problems.append(f"group {label(g)}: {exc}")
            found = []
        else:
            if counts is not None and len(found) != counts[g]:
                problems.append(f"group {label(g)} matches {len(found)} modules of {model}, but the plan says {counts[g]}")
            elif not found:
                problems.append(f"group {label(g)} matches no module of {model}")
        hits.append(tuple(found))
        for name in found:
            if first_claim.setdefault(name, g) != g:
                more_claims.setdefault(name, [first_claim[name]]).append(g)
    for name in sorted(more_claims, key=index.position):
        owners = more_claims[name]
        shown = name if len(name) <= 80 else brief(name)
        problems.append(f"module {shown}: matched by {len(owners)} groups ({summarise([label(g) for g in owners], 4, ', ')})")
    owner = {name: first_claim[name] for name in index.names if name in first_claim and name not in more_claims}
    return GroupMatch(tuple(hits), owner, tuple(problems))


def summarise(problems: Sequence[str], shown: int = 10, sep: str = "; ") -> str:
    """The first ``shown`` problems joined, with how many more there are: one bounded error line."""
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return sep.join(problems[:shown]) + more


def raise_problems(problems: Sequence[str], prefix: str = "") -> None:
    """PlanError listing ``problems`` (bounded) when there is any."""
    if problems:
        raise PlanError(prefix + summarise(problems))
