"""The torch ring: the CDKA adapter module, applying a plan to a model, merging, saving and loading."""

from cdka_search.adapter.layer import CdkaLinear

__all__ = ["CdkaLinear"]
