"""Module-name patterns: `*` matches inside one dotted part, `**` across parts, `?` one character.

So ``roberta.encoder.layer.*.output.dense`` names the MLP output of every layer and not also
``...layer.0.attention.output.dense`` (fnmatch's ``*`` would cross the dots).
"""

from __future__ import annotations

import re
from functools import lru_cache

_WILDCARDS = ("*", "?")


def is_pattern(text: str) -> bool:
    return any(w in text for w in _WILDCARDS)


@lru_cache(maxsize=1024)  # a pure memo of compiled patterns
def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def match_module(name: str, pattern: str) -> bool:
    """Whether ``name`` is ``pattern`` (exact when it has no wildcard)."""
    if not is_pattern(pattern):
        return name == pattern
    return _compile(pattern).fullmatch(name) is not None
