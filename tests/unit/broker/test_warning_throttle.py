"""The throttle of warnings a peer can cause as often as it likes."""

from __future__ import annotations

import logging

from zmq_broker.warning_throttle import WarningThrottle


def test_a_burst_then_the_rate_and_the_count_of_the_rest(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("zmq_broker.warning_throttle.time.monotonic", lambda: now[0])
    log = logging.getLogger("test.throttle")
    throttle = WarningThrottle(burst=3, per_second=1.0)
    with caplog.at_level(logging.WARNING, "test.throttle"):
        for n in range(10):
            throttle.warning(log, "drops", "dropped %d", n)
        throttle.warning(log, "other", "another kind")  # its own bucket
        now[0] += 1.0
        throttle.warning(log, "drops", "dropped %d", 10)
        throttle.warning(log, "drops", "dropped %d", 11)
        throttle.flush()
        throttle.flush()  # nothing left to say
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 0", "dropped 1", "dropped 2", "another kind",
        "dropped 10 (and 7 more drops not logged)", "1 more drops not logged"]
