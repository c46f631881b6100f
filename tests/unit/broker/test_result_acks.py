"""Result acks: held to ride on the session's next Deliver, alone once they waited
RESULT_ACK_DELAY; an iteration looks only at the sessions whose wait is over."""

from __future__ import annotations

from zerorun import protocol
from zmq_broker.sessions import MAX_HELD_ACKS, RESULT_ACK_DELAY, SessionTable


def _table(n: int = 3):
    table = SessionTable(5.0, 100.0)
    sessions = [table.open(f"key-{i}", f"i-{i}", f"rid-{i}".encode(), 10 + i, 0.0) for i in range(n)]
    return table, sessions


def _flush(table: SessionTable, now: float) -> list[tuple[bytes, object]]:
    sent: list[tuple[bytes, object]] = []
    table.flush(lambda rid, msg, fd: sent.append((rid, msg)), now)
    return sent


def _held(table: SessionTable) -> list:
    return [session for _, _, session in sorted(table.held)]


def _invocation(instance_id: str, n: int) -> protocol.Invocation:
    return protocol.Invocation(invocation_id=f"inv-{n}", command_id="c", instance_id=instance_id,
                               document_name="d", document_version="1", document_sha256="0" * 64, steps=[],
                               issued_at=0.0, expires_at=0.0)


def test_held_acks_go_alone_once_due_and_only_due_sessions_are_looked_at():
    table, (a, b, _) = _table()
    table.queue_result_ack(a, "r-a", 1.0)
    table.queue_result_ack(b, "r-b", 1.1)
    assert _flush(table, 1.1) == [] and _held(table) == [a, b] and not table.dirty
    assert _flush(table, 1.0 + RESULT_ACK_DELAY) == [(a.routing_id, protocol.ResultAck(["r-a"]))]
    assert _held(table) == [b]
    assert _flush(table, 1.1 + RESULT_ACK_DELAY) == [(b.routing_id, protocol.ResultAck(["r-b"]))]
    assert not table.held and not a.ack_due and not b.ack_due


def test_held_acks_ride_on_a_deliver_and_later_ones_wait_their_own_time():
    table, (a, _, _) = _table()
    table.queue_result_ack(a, "r-1", 1.0)
    _flush(table, 1.0)
    table.queue_delivery("i-0", _invocation("i-0", 1), 100)
    [(rid, deliver)] = _flush(table, 1.1)
    assert isinstance(deliver, protocol.Deliver) and deliver.results_acked == ["r-1"]
    table.queue_result_ack(a, "r-2", 1.2)  # while its old place in the queue still waits
    assert _flush(table, 1.2) == []
    assert _flush(table, 1.0 + RESULT_ACK_DELAY) == []  # the old place came due: r-2 waits its own
    assert _held(table) == [a]
    assert _flush(table, 1.2 + RESULT_ACK_DELAY) == [(a.routing_id, protocol.ResultAck(["r-2"]))]


def test_many_held_acks_go_at_once_and_an_offline_session_sends_none():
    table, (a, b, _) = _table()
    for n in range(MAX_HELD_ACKS):
        table.queue_result_ack(a, f"r-{n}", 1.0)
    [(rid, ack)] = _flush(table, 1.0)
    assert rid == a.routing_id and len(ack.invocation_ids) == MAX_HELD_ACKS
    table.queue_result_ack(b, "r-b", 1.0)
    _flush(table, 1.0)
    b.online = False
    assert _flush(table, 2.0) == [] and not b.acks and not table.held


def test_what_is_withdrawn_is_not_sent_and_the_rest_is():
    """A broker that lost commands to another (``handlers.cluster.taken_over``) takes back what it
    queued about their invocations: a delivery, a cancel, a result ack (the result was not written:
    the agent must keep it)."""
    table, (a, b, _) = _table()
    table.queue_delivery("i-0", _invocation("i-0", 1), 100)
    table.queue_delivery("i-0", _invocation("i-0", 2), 100)
    table.queue_cancel("i-1", "inv-3")
    table.queue_cancel("i-1", "inv-4")
    table.queue_result_ack(a, "inv-5", 1.0)
    table.queue_result_ack(b, "inv-6", 1.0)
    table.withdraw({"inv-1": "i-0", "inv-3": "i-1", "inv-5": "i-0", "inv-6": "i-1", "inv-9": "i-9"})
    sent = dict(_flush(table, 1.0 + RESULT_ACK_DELAY))
    assert [inv.invocation_id for inv in sent[a.routing_id].invocations] == ["inv-2"]
    assert sent[a.routing_id].results_acked == []
    assert sent[b.routing_id] == protocol.Cancel(["inv-4"])
    assert _flush(table, 2.0) == []  # inv-6's ack is gone from its held place too
