"""wait_until, which the integration tests use instead of fixed sleeps."""

from __future__ import annotations

import pytest

from zerorun.testing import WaitTimeout, wait_until


def test_returns_the_first_true_value():
    values = iter([None, 0, [], "ready"])
    assert wait_until(lambda: next(values), "the value", timeout=5, interval=0.001) == "ready"


def test_a_timeout_is_an_assertion_naming_the_condition_and_the_last_value():
    with pytest.raises(AssertionError) as exc:
        wait_until(lambda: [], "the list to fill", timeout=0.05, interval=0.01)
    assert isinstance(exc.value, WaitTimeout)
    assert "waiting for the list to fill" in str(exc.value) and "(last: [])" in str(exc.value)


def test_ignored_exceptions_mean_not_yet_and_others_fail_at_once():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("still starting")
        return len(calls)

    assert wait_until(flaky, "the service", timeout=5, interval=0.001, ignore=(ConnectionError,)) == 3

    def down():
        raise ConnectionError("no answer")

    with pytest.raises(WaitTimeout, match="no answer"):
        wait_until(down, "the service", timeout=0.05, interval=0.01, ignore=(ConnectionError,))
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, "a bug", timeout=5, ignore=(ConnectionError,))
