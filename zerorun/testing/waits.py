"""Waiting for a condition instead of sleeping for a guessed time.

A fixed sleep that stands for "it is in flight" or "it has finished" is too short on a loaded
machine and too long everywhere else; a wait on the condition itself (a status, a marker file, a
log line) is neither, and its failure says what did not happen.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time: a test failure, not an error of the harness."""


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.1,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Calls ``predicate`` until it returns something true, and returns that.

    ``what`` names the condition ("web-1's invocation to be InProgress"); after ``timeout``
    seconds the wait fails with it and the predicate's last value. Exceptions of the ``ignore``
    types count as "not yet" (a broker that is still restarting); any other one fails at once.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            value, last = None, exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            shown = repr(last)
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what} "
                              f"(last: {shown[:500]}{'...' if len(shown) > 500 else ''})")
        time.sleep(interval)
