"""Module-name patterns: `*` matches inside one dotted part, `**` across parts, `?` one character.

So ``roberta.encoder.layer.*.output.dense`` names the MLP output of every layer and not also
``...layer.0.attention.output.dense`` (fnmatch's ``*`` would cross the dots).

Matching never backtracks: a pattern compiles to a small automaton whose states are bits of one
integer (shift-and), so a name of n characters costs n steps whatever the pattern, at most
MAX_PATTERN_CHARS characters long (a regex translation took 45 s on a 33-character pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cdka_search.errors import TargetError

#: Longest pattern accepted. Real module names are under 150 characters (model-shapes.md); the
#: limit keeps every automaton a few machine words wide.
MAX_PATTERN_CHARS = 512


class PatternError(TargetError):
    """A module pattern that is too long or empty."""


def is_pattern(text: str) -> bool:
    return "*" in text or "?" in text


def check_pattern(pattern: str) -> str:
    """``pattern`` itself when it is a usable pattern or name; PatternError otherwise."""
    if not pattern:
        raise PatternError("empty module pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"module pattern of {len(pattern)} characters: the limit is {MAX_PATTERN_CHARS}")
    return pattern


@dataclass(frozen=True)
class Glob:
    """A compiled pattern: state i means "the first i tokens are matched".

    ``step[c]`` holds the states that advance on the character c, ``any_step`` those advancing on any
    non-dot character (``?``); ``loop`` / ``loop_dot`` the states that stay on a non-dot / dot character
    (``*`` / ``**``); ``skip`` the states a star lets through without a character.
    """

    pattern: str
    step: dict[str, int]
    any_step: int
    loop: int
    loop_dot: int
    skip: int
    accept: int
    crosses_dots: bool

    def fullmatch(self, name: str) -> bool:
        step, any_step, loop, loop_dot, skip = self.step, self.any_step, self.loop, self.loop_dot, self.skip
        states = 1 | ((1 & skip) << 1)
        for c in name:
            if c == ".":
                states = ((states << 1) & step.get(c, 0)) | (states & loop_dot)
            else:
                states = ((states << 1) & (step.get(c, 0) | any_step)) | (states & loop)
            if not states:
                return False
            states |= (states & skip) << 1  # no two stars are adjacent, so one closure step suffices
        return bool(states & self.accept)


def _tokens(pattern: str) -> list[str]:
    """Characters, "?" and the stars "*" / "**"; adjacent stars merge (the widest wins)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "*":
            j = i
            while j < len(pattern) and pattern[j] == "*":
                j += 1
            star = "**" if j - i > 1 else "*"
            if out and out[-1] in ("*", "**"):
                out[-1] = "**" if "**" in (out[-1], star) else "*"
            else:
                out.append(star)
            i = j
        else:
            out.append(pattern[i])
            i += 1
    return out


@lru_cache(maxsize=4096)  # a pure memo: one automaton per distinct pattern
def compile_pattern(pattern: str) -> Glob:
    """The automaton of ``pattern`` (PatternError past MAX_PATTERN_CHARS)."""
    check_pattern(pattern)
    step: dict[str, int] = {}
    any_step = loop = loop_dot = skip = 0
    for i, token in enumerate(_tokens(pattern)):
        bit = 1 << i
        if token == "**":
            loop |= bit
            loop_dot |= bit
            skip |= bit
        elif token == "*":
            loop |= bit
            skip |= bit
        elif token == "?":
            any_step |= bit << 1
        else:
            step[token] = step.get(token, 0) | bit << 1
    accept = 1 << len(_tokens(pattern))
    return Glob(pattern, step, any_step, loop, loop_dot, skip, accept, "**" in pattern)


def match_module(name: str, pattern: str) -> bool:
    """Whether ``name`` is ``pattern`` (exact when it has no wildcard)."""
    if not is_pattern(pattern):
        return name == pattern
    return compile_pattern(pattern).fullmatch(name)
