"""A wall-clock limit for calls into code that hostile input can keep running.

A model folder's chat template is a Jinja program: ``{% for i in range(100000) %}`` nested twice runs
for hours, and Jinja's sandbox bounds only each ``range``. The limit is a SIGALRM timer, which stops
Python code (a compiled template is Python) between bytecodes. It applies in the main thread of a
POSIX process where no other timer is running; elsewhere the call runs unlimited, as before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class TimeLimitExceeded(Exception):
    """The block ran past its limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimitExceeded in the block once ``seconds`` have passed; the SIGALRM handler and the
    timer are restored as they were, also on failure."""
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):  # no timer here, or someone else's: leave it alone
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeLimitExceeded(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
