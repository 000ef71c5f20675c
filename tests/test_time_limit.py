"""cdka_search.time_limit: a SIGALRM limit that stops Python code and leaves no trace behind."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from cdka_search.time_limit import TimeLimitExceeded, time_limit


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_block_past_its_limit_is_stopped_and_the_handler_restored():
    def mine(signum, frame):
        raise AssertionError("the limit's handler should have been the one called")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        started = time.monotonic()
        with pytest.raises(TimeLimitExceeded, match="still running after 0.2 s"), time_limit(0.2):
            _spin(5)
        assert 0.15 < time.monotonic() - started < 2
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        with time_limit(5):  # a block that ends in time: no exception, no timer left running
            _spin(0.05)
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_another_running_timer_is_left_alone():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with time_limit(0.05):
            _spin(0.1)  # past the limit, and nothing raised: the other timer is running
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
        _spin(0.4)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_outside_the_main_thread_the_block_runs_unlimited():
    outcome = []

    def run():
        try:
            with time_limit(0.05):
                _spin(0.15)
            outcome.append("finished")
        except TimeLimitExceeded:
            outcome.append("stopped")

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert outcome == ["finished"] and signal.getitimer(signal.ITIMER_REAL)[0] == 0
