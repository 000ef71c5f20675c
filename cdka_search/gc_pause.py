"""Python's cyclic garbage collector paused while a stage allocates many objects.

Each full collection walks every live object, and a stage that allocates many (building thousands of
adapter modules, or the allocator's search states) triggers many: the larger the live heap, the
longer each one. What such a stage allocates is not garbage until it returns, so nothing is lost.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """The collector paused, and restored as it was (also on failure); a decorator as well."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
