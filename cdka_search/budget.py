"""Budget strings ("0.5%", "20M", "1.5B", "2e7", "lora:8") -> a parameter count."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from cdka_search.documents import brief
from cdka_search.errors import BudgetError
from cdka_search.limits import MAX_DIM
from cdka_search.spec.model_spec import TargetModule

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_NUMBER = re.compile(r"^(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([kmbg]?)$", re.IGNORECASE)
_HELP = 'use a percentage ("0.5%"), a count ("20M", "1.5B", "2e7", "20000000") or "lora:R"'


@dataclass(frozen=True)
class Budget:
    """A trainable-parameter budget: the text the user gave and the count it means."""

    spec: str
    limit: int


def lora_params(targets: Sequence[TargetModule], rank: int) -> int:
    """Parameters of LoRA rank ``rank`` on ``targets``: rank * (d_out + d_in) each (per expert)."""
    return sum(t.experts * rank * (t.d_out + t.d_in) for t in targets)


def parse_budget(text: str, *, total_params: int, targets: Sequence[TargetModule]) -> Budget:
    """The parameter count ``text`` stands for, for a model of ``total_params`` and these targets."""
    if not isinstance(text, str) or len(text) > 64:
        raise BudgetError(f"budget {brief(text)} is not understood; {_HELP}")
    raw = text.strip()
    low = raw.lower().replace("_", "").replace(",", "")
    if low.startswith("lora:"):
        rank_text = low[len("lora:") :]
        if not rank_text.isdigit() or not 1 <= int(rank_text) <= MAX_DIM:
            raise BudgetError(f"budget {text!r}: the LoRA rank must be an integer from 1 to {MAX_DIM:,}, e.g. lora:8")
        limit = lora_params(targets, int(rank_text))
        if limit < 1:
            raise BudgetError(f"budget {text!r}: there are no targets to count LoRA parameters on")
        if limit > total_params:
            raise BudgetError(f"budget {text!r} is {limit:,} parameters, more than the model's {total_params:,}")
        return Budget(raw, limit)
    if low.endswith("%"):
        try:
            pct = float(low[:-1])
        except ValueError:
            raise BudgetError(f"budget {text!r} is not a number; {_HELP}") from None
        if not math.isfinite(pct) or pct <= 0 or pct > 100:
            raise BudgetError(f"budget {text!r}: a percentage must be above 0 and at most 100")
        limit = int(total_params * pct / 100)
        if limit < 1:
            raise BudgetError(f"budget {text!r} is less than one parameter of this model")
        return Budget(raw, limit)
    match = _NUMBER.match(low)
    if not match:
        raise BudgetError(f"budget {text!r} is not understood; {_HELP}")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if not math.isfinite(value) or value > total_params:
        raise BudgetError(f"budget {text!r} exceeds the model's {total_params:,} parameters")
    if value < 1:
        raise BudgetError(f"budget {text!r} must be at least one parameter")
    return Budget(raw, int(value))
