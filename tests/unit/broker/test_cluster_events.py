"""What one broker of a cluster tells the others in a commit: events folded together and cut so
that every one fits a NOTIFY payload, whatever the ids' lengths (pure logic; the brokers' talk
itself is tested with a real server in test_store_postgresql.py and tests/integration/test_cluster.py)."""

from __future__ import annotations

from zmq_broker import cluster as c


def _longest_instance(n: int) -> str:
    return f"i{n:05d}".ljust(128, "x")  # instance ids may be 128 characters long


def test_a_commands_deliveries_in_a_row_are_one_event_and_keep_their_order_with_cancels():
    events = [c.DeliverEvent("cmd-a", [(f"a-{n}", f"i-{n}")]) for n in range(3)]
    events += [c.CancelEvent([("a-0", "i-0")]), c.DeliverEvent("cmd-a", [("a-3", "i-3")]),
               c.DeliverEvent("cmd-b", [("b-0", "i-0")])]
    merged = c._merged(events)
    assert [(type(e).__name__, getattr(e, "command_id", None), e.invocations) for e in merged] == [
        ("DeliverEvent", "cmd-a", [("a-0", "i-0"), ("a-1", "i-1"), ("a-2", "i-2")]),
        ("CancelEvent", None, [("a-0", "i-0")]),
        ("DeliverEvent", "cmd-a", [("a-3", "i-3")]),
        ("DeliverEvent", "cmd-b", [("b-0", "i-0")]),
    ]


def test_every_event_fits_a_payload_with_the_longest_ids():
    cid = "c" * 36
    events: list = [c.DeliverEvent(cid, [(f"{n:036d}", _longest_instance(n))]) for n in range(250)]
    events += [c.CancelEvent([(f"{n:036d}", _longest_instance(n))]) for n in range(250)]
    events += [c.FleetEvent(instances=[_longest_instance(n)]) for n in range(250)]
    events += [c.DoneEvent([f"{n:036d}"]) for n in range(250)]
    merged = c._merged(events)
    assert all(len(c._encode(e)) + 2 <= c.PAYLOAD_LIMIT for e in merged)
    delivered = [pair for e in merged if isinstance(e, c.DeliverEvent) for pair in e.invocations]
    assert delivered == [(f"{n:036d}", _longest_instance(n)) for n in range(250)]
    assert sum(len(e.invocations) for e in merged if isinstance(e, c.CancelEvent)) == 250
    assert [i for e in merged if isinstance(e, c.FleetEvent) for i in e.instances] == [
        _longest_instance(n) for n in range(250)]
    short = c._merged([c.DoneEvent([f"{n:036d}"]) for n in range(250)])
    assert [len(e.commands) for e in short] == [100, 100, 50]  # short ids: IDS_PER_EVENT each


def test_after_its_own_session_came_back_a_broker_judges_no_peer_before_the_peer_could_retry():
    """A restart of the server ends every broker's session; each comes back when its own backoff
    lets it. One that came back first must not take the others for dead (and adopt their commands,
    which they still dispatch) before they have tried again."""
    from zmq_broker.cluster import RECONNECT_WITHIN
    from zmq_broker.store.pg_connection import MAX_BACKOFF

    assert RECONNECT_WITHIN >= MAX_BACKOFF * 1.2  # the backoff's longest wait, jitter included
