"""Budget strings ("0.5%", "20M", "1.5B", "2e7", "lora:8") -> a parameter count."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from cdka_search.documents import brief
from cdka_search.errors import BudgetError
from cdka_search.limits import MAX_DIM, MAX_TOTAL_PARAMS
from cdka_search.spec.model_spec import TargetModule

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
# ASCII digits only (Python's float() also reads "５", "١" and "1_0"); digits may be grouped in threes
# by "_" or ",", as people write large counts ("20_000_000", "20,000,000").
_DIGITS = r"(?:[0-9]+|[0-9]{1,3}(?:_[0-9]{3})+|[0-9]{1,3}(?:,[0-9]{3})+)"
_AMOUNT = rf"(?:{_DIGITS}(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?"
_PERCENT = re.compile(rf"([+-]?{_AMOUNT})\s*%", re.ASCII | re.IGNORECASE)
_COUNT = re.compile(rf"({_AMOUNT})\s*([kmbg]?)", re.ASCII | re.IGNORECASE)
_LORA = re.compile(r"lora:([0-9]+)", re.ASCII | re.IGNORECASE)
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
    return budget_for(text, total_params=total_params, lora_rank_cost=lora_params(targets, 1))


def check_budget_text(text: str) -> str:
    """``text`` if it is a budget for some model: its form, and the bounds that hold for every model
    (a recipe's budget, read before its model is)."""
    budget_for(text, total_params=MAX_TOTAL_PARAMS, lora_rank_cost=1)
    return text


def budget_for(text: str, *, total_params: int, lora_rank_cost: int) -> Budget:
    """``parse_budget`` for targets known only by what one LoRA rank costs on them (a plan's groups)."""
    if not isinstance(text, str) or len(text) > 64:
        raise BudgetError(f"budget {brief(text)} is not understood; {_HELP}")
    raw = text.strip()
    if not raw.isascii():
        raise BudgetError(f"budget {text!r}: write it with ASCII digits and letters; {_HELP}")
    if raw.lower().startswith("lora:"):
        lora = _LORA.fullmatch(raw)
        if not lora or not 1 <= int(lora.group(1)) <= MAX_DIM:
            raise BudgetError(f"budget {text!r}: the LoRA rank must be an integer from 1 to {MAX_DIM:,}, e.g. lora:8")
        limit = int(lora.group(1)) * lora_rank_cost
        if limit < 1:
            raise BudgetError(f"budget {text!r}: there are no targets to count LoRA parameters on")
        if limit > total_params:
            raise BudgetError(f"budget {text!r} is {limit:,} parameters, more than the model's {total_params:,}")
        return Budget(raw, limit)
    if raw.endswith("%"):
        percent = _PERCENT.fullmatch(raw)
        if not percent:
            raise BudgetError(f"budget {text!r} is not a number; {_HELP}")
        pct = _number(percent.group(1))
        if not math.isfinite(pct) or pct <= 0 or pct > 100:
            raise BudgetError(f"budget {text!r}: a percentage must be above 0 and at most 100")
        limit = int(total_params * pct / 100)
        if limit < 1:
            raise BudgetError(f"budget {text!r} is less than one parameter of this model")
        return Budget(raw, limit)
    count = _COUNT.fullmatch(raw)
    if not count:
        raise BudgetError(f"budget {text!r} is not understood; {_HELP}")
    value = _number(count.group(1)) * _SUFFIX[count.group(2).lower()]
    if not math.isfinite(value) or value > total_params:
        raise BudgetError(f"budget {text!r} exceeds the model's {total_params:,} parameters")
    if value < 1:
        raise BudgetError(f"budget {text!r} must be at least one parameter")
    return Budget(raw, int(value))


def _number(text: str) -> float:
    """The value of an amount the patterns above matched (its digit-group separators dropped)."""
    return float(text.replace("_", "").replace(",", ""))
