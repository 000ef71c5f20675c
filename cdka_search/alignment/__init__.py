"""Data-aware scoring: how much of a reference update each Kronecker shape can keep (torch ring)."""

from cdka_search.alignment.energy import (
    alignment_table,
    divisor_pairs,
    factor_sizes,
    topr_energies,
)
from cdka_search.alignment.rearrange import rearrange

__all__ = [
    "alignment_table",
    "divisor_pairs",
    "factor_sizes",
    "rearrange",
    "topr_energies",
]
