"""Retention pruning's scheduling: in the loop (SQLite) a pass waits for a moment without client
requests and repeats while it removes something; on a thread (PostgreSQL) passes run back to
back until one finds nothing, and the loop only collects what they did. The passes themselves
run against real stores in tests/integration/test_prune.py and test_broker_postgresql.py."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest

from zmq_broker import pruning
from zmq_broker.errors import BrokerError
from zmq_broker.store.base import STORE_UNAVAILABLE


class _Outputs:
    def __init__(self):
        self.passes = 0
        self.data = self

    def prune(self, command_exists):
        self.passes += 1
        return 0


class _LoopStore:
    """A store whose passes run in the loop: ``backlog`` commands, 100 a pass."""

    def __init__(self, backlog: int):
        self.backlog = backlog
        self.calls = []

    def prune_passes(self):
        return None

    def prune(self, older_than, batch, invocations):
        self.calls.append((batch, invocations))
        removed = min(self.backlog, 100)
        self.backlog -= removed
        return removed

    def get_command(self, command_id):
        return None


class _Passes:
    """PrunePasses on a thread: the outcomes in turn (an int removed, or an exception), then 0."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.closed = threading.Event()
        self.calls = 0

    def __call__(self, older_than, batch, invocations):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else 0
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self):
        self.closed.set()


class _ThreadStore(_LoopStore):
    def __init__(self, passes):
        super().__init__(0)
        self.passes = passes

    def prune_passes(self):
        return self.passes

    def prune(self, *args):
        raise AssertionError("a store with passes of its own is not pruned in the loop")


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(pruning, "PRUNE_FIRST", 0.0)
    monkeypatch.setattr(pruning, "PRUNE_AGAIN", 0.0)


def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_in_the_loop_a_pass_waits_for_a_moment_without_requests_then_repeats_until_caught_up(caplog):
    store, outputs, stats = _LoopStore(250), _Outputs(), Counter()
    p = pruning.Pruning(store, 1.0, outputs, stats, now=100.0)
    assert not p.due(100.0 + pruning.PRUNE_FIRST - 0.1, requests_waiting=False)
    now = 100.0 + pruning.PRUNE_FIRST
    assert p.due(now, requests_waiting=False)
    assert not p.due(now, requests_waiting=True)  # replies would wait behind it
    assert p.due(now + pruning.PRUNE_DEFER, requests_waiting=True)  # not for ever
    with caplog.at_level(logging.INFO, "zerorun.broker"):
        while store.backlog or not outputs.passes:
            assert p.due(now, requests_waiting=False)
            p.run(now)
            now = p.next_at
    assert store.calls == [(pruning.PRUNE_INVOCATIONS, pruning.PRUNE_INVOCATIONS)] * 4  # 100, 100, 50, none
    assert stats["pruned_commands"] == 250 and outputs.passes == 1
    assert [r.getMessage() for r in caplog.records] == ["pruned 250 command(s) older than 1 days"]
    assert p.next_at == now and now - pruning.PRUNE_EVERY > 100.0  # caught up: a minute to the next pass


def test_no_retention_no_pass():
    store = _LoopStore(10)
    p = pruning.Pruning(store, 0.0, None, Counter(), now=0.0)
    p.run(pruning.PRUNE_FIRST)
    assert store.calls == [] and p.next_at == pruning.PRUNE_FIRST + pruning.PRUNE_EVERY


def test_on_a_thread_passes_run_back_to_back_and_the_loop_collects_them(fast, caplog):
    passes = _Passes(100, 100, 40)
    stats, outputs = Counter(), _Outputs()
    p = pruning.Pruning(_ThreadStore(passes), 1.0, outputs, stats, now=0.0)
    try:
        assert p.due(0.0 + pruning.PRUNE_REPORT, requests_waiting=True)  # the loop only reads counters
        _until(lambda: p._thread._idle_passes == 1)  # the fourth found nothing: a minute's wait now
        with caplog.at_level(logging.INFO, "zerorun.broker"):
            p.run(1.0)
            p.run(2.0)  # nothing new
        assert stats["pruned_commands"] == 240 and outputs.passes == 1
        assert [r.getMessage() for r in caplog.records] == ["pruned 240 command(s) older than 1 days"]
        assert p.next_at == 2.0 + pruning.PRUNE_REPORT
    finally:
        p.close()
    assert passes.closed.is_set()  # its session is closed with it


def test_a_thread_pass_that_fails_is_counted_and_an_outage_is_not(fast, monkeypatch, caplog):
    monkeypatch.setattr(pruning, "PRUNE_EVERY", 0.0)
    passes = _Passes(BrokerError(STORE_UNAVAILABLE, "server away"), RuntimeError("bug"),
                     BrokerError("Internal", "another refusal"), 7)
    stats = Counter()
    with caplog.at_level(logging.ERROR, "zerorun.broker"):
        p = pruning.Pruning(_ThreadStore(passes), 1.0, None, stats, now=0.0)
        try:
            _until(lambda: passes.calls >= 5)
            p.run(1.0)
        finally:
            p.close()
    assert stats["internal_errors"] == 2 and stats["pruned_commands"] == 7
    assert [r.getMessage() for r in caplog.records] == [
        "internal error while pruning (the broker keeps serving; next pass in 0 s)"] * 2
