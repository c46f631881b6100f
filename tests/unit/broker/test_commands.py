"""The command book's rules, exactly: rate control, canary, idempotent results, recovery (each
test that keeps state runs on each store backend)."""

from __future__ import annotations

import time

import pytest

from zerorun import protocol
from zmq_broker.commands import CommandBook, parse_rate
from zmq_broker.errors import BrokerError
from zmq_broker.model import CommandRecord


class Harness:
    def __init__(self, open_store, online=True):
        self.store = open_store()
        self.delivered: list[str] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        self.online = online
        self.book = self._book()

    def _book(self):
        return CommandBook(self.store, lambda inv, rec: self.delivered.append(inv.invocation_id),
                           lambda inv: self.cancelled.append(inv.invocation_id),
                           lambda instance_id: self.online, lambda rec: self.completed.append(rec.command_id))

    def command(self, n, max_concurrency=50, max_errors=0, first=0, timeout=3600):
        now = time.time()
        rec = CommandRecord(command_id=f"c{len(self.completed)}{now}", status=protocol.PENDING,
                            status_details="", document_name="RunShellScript", document_version="1",
                            document_sha256="0" * 64, parameters={}, targets=["tag:role=web"],
                            requested_by="test", requested_at=now, expires_at=now + timeout,
                            timeout_seconds=timeout, max_concurrency=max_concurrency,
                            max_errors=max_errors, steps=[], first=first)
        self.book.create(rec, [f"i-{k:03d}" for k in range(n)], [])
        return rec

    def report(self, iid, status):
        inv = self.book.invocations[iid]
        res = protocol.InvocationResult(iid, status, exit_code=0 if status == "Success" else 1,
                                        stdout="out", ended_at=time.time())
        return self.book.result(inv.instance_id, res, 1000)


@pytest.fixture
def h(open_store):
    return Harness(open_store)


def test_parse_rate():
    assert parse_rate("", 50, "50", minimum=1, what="max_concurrency") == 50
    assert parse_rate("10%", 50, "0", minimum=0, what="max_errors") == 5
    assert parse_rate("10%", 55, "0", minimum=0, what="max_errors") == 5  # errors round down
    assert parse_rate("10%", 55, "50", minimum=1, what="max_concurrency") == 6  # concurrency rounds up
    assert parse_rate("1%", 10, "50", minimum=1, what="max_concurrency") == 1
    for bad in ("-1", "x", "150%"):
        with pytest.raises(BrokerError):
            parse_rate(bad, 10, "0", minimum=0, what="max_errors")


def test_fifty_targets_ten_percent_stops_at_the_sixth_error(h):
    rec = h.command(50, max_concurrency=1, max_errors=5)
    failures = 0
    while h.delivered:
        iid = h.delivered.pop(0)
        h.report(iid, "Failed")
        failures += 1
    assert failures == 6
    view = h.book.view(rec.command_id)
    assert view.counts == {"Failed": 6, "Cancelled": 44}
    assert all(i.status_details == protocol.TERMINATED for i in view.invocations if i.status == "Cancelled")
    assert view.status == "Failed"


def test_in_flight_invocations_may_overshoot(h):
    rec = h.command(10, max_concurrency=4, max_errors=0)
    assert len(h.delivered) == 4
    for iid in list(h.delivered):
        h.report(iid, "Failed")  # the first error stops dispatch; the other three still finish
    view = h.book.view(rec.command_id)
    assert view.counts == {"Failed": 4, "Cancelled": 6}


def test_concurrency_limit_and_success(h):
    rec = h.command(5, max_concurrency=2)
    assert len(h.delivered) == 2
    for _ in range(5):
        h.report(h.delivered.pop(0), "Success")
    view = h.book.view(rec.command_id)
    assert view.status == "Success" and view.counts == {"Success": 5}
    assert h.completed == [rec.command_id]


def test_canary_first_n_then_the_rest(h):
    rec = h.command(10, max_concurrency=10, first=2)
    assert len(h.delivered) == 2
    h.report(h.delivered.pop(0), "Success")
    assert len(h.delivered) == 1  # still in the canary phase
    h.report(h.delivered.pop(0), "Success")
    assert len(h.delivered) == 8  # canary passed: the rest go out


def test_canary_failure_stops_everything(h):
    rec = h.command(10, max_concurrency=10, max_errors=5, first=2)
    h.report(h.delivered.pop(0), "Failed")
    h.report(h.delivered.pop(0), "Success")
    view = h.book.view(rec.command_id)
    assert view.counts == {"Failed": 1, "Success": 1, "Cancelled": 8}
    assert view.status == "Failed"


def test_a_result_reported_twice_is_stored_once(h):
    rec = h.command(1)
    iid = h.delivered[0]
    assert h.report(iid, "Success")
    h.store.flush()
    # the retry after a lost ack: acknowledged again, stored nothing new
    again = protocol.InvocationResult(iid, "Failed", exit_code=9, stdout="second")
    assert h.book.result("i-000", again, 1000)
    h.store.flush()
    view = h.book.view(rec.command_id)
    assert view.invocations[0].status == "Success" and view.invocations[0].stdout == "out"


def test_a_result_from_another_instance_is_refused(h):
    rec = h.command(2)
    iid = h.delivered[0]
    res = protocol.InvocationResult(iid, "Success")
    owner = h.book.invocations[iid].instance_id
    other = "i-001" if owner == "i-000" else "i-000"
    assert h.book.result(other, res, 1000) is False
    assert h.book.invocations[iid].status == "Pending"


def test_offline_targets_wait_and_delivery_timeout(open_store):
    h = Harness(open_store, online=False)
    rec = h.command(2, timeout=1)
    assert h.delivered == []
    h.book.check_timeouts(time.time() + 2)
    view = h.book.view(rec.command_id)
    assert {i.status_details for i in view.invocations} == {protocol.DELIVERY_TIMED_OUT}
    assert view.status == "Failed"


def test_recovery_after_restart_keeps_everything(open_store):
    h = Harness(open_store)
    rec = h.command(3, max_concurrency=3)
    first, second, third = h.delivered
    h.book.acked(h.book.invocations[first].instance_id, first)
    h.report(second, "Success")
    h.store.flush()
    h.store.close()
    # a new broker process over the same database
    h2 = Harness(open_store)
    h2.book.load()
    assert rec.command_id in h2.book.active
    states = {i.invocation_id: i.status for i in h2.book.view(rec.command_id).invocations}
    assert states[second] == "Success" and states[first] == "Pending" and states[third] == "Pending"
    h2.book.instance_online(h2.book.invocations[first].instance_id)
    assert first in h2.delivered  # redelivered: the agent dedupes by id


def test_cancel_pending_and_in_flight(h):
    rec = h.command(4, max_concurrency=2)
    h.book.cancel(rec.command_id)
    assert sorted(h.cancelled) == sorted(h.delivered)
    view = h.book.view(rec.command_id)
    assert view.status == "Cancelling"
    for iid in h.delivered:
        h.report(iid, "Cancelled")
    assert h.book.view(rec.command_id).status == "Cancelled"


def test_retention_prunes_only_old_finished_commands(h):
    old = h.command(1)
    h.report(h.delivered.pop(0), "Success")
    running = h.command(1)
    h.store.flush()
    assert h.store.prune(time.time() + 10, batch=10) == 1  # the finished one only
    assert h.store.get_command(old.command_id) is None
    assert h.store.get_invocations(old.command_id) == []
    assert h.store.get_command(running.command_id) is not None
    assert h.store.prune(time.time() + 10) == 0


def test_an_invocation_the_agent_reports_holding_counts_as_delivered(h):
    """A HELLO that names an invocation as running or awaiting its result's ack acknowledges its
    delivery: HELLOs said again at once (one crossed the agent's earlier messages after a broker
    restart) must not use up the deliveries an agent that never acknowledges is allowed."""
    from zmq_broker.commands import MAX_DELIVERIES

    rec = h.command(1)
    [iid] = h.delivered
    instance_id = h.book.invocations[iid].instance_id
    h.book.acked(instance_id, iid)  # what on_hello does for the ids a HELLO names
    for _ in range(MAX_DELIVERIES + 2):
        h.book.instance_online(instance_id)
        h.book.sent([iid])
    assert h.book.view(rec.command_id).invocations[0].status == protocol.PENDING
    h.report(iid, "Success")
    assert h.book.view(rec.command_id).status == "Success"


def test_a_completing_command_is_seen_as_the_store_will_show_it(open_store):
    """The waiters of a command that just completed are answered from memory: the same view the
    store gives afterwards (order, counts, output or not)."""
    seen = {}
    harness = Harness(open_store)

    def on_complete(rec):
        seen["full"] = harness.book.view(rec.command_id)
        seen["brief"] = harness.book.view(rec.command_id, include_output=False)

    harness.book = CommandBook(harness.store, lambda inv, rec: harness.delivered.append(inv.invocation_id),
                               lambda inv: None, lambda instance_id: True, on_complete)
    rec = harness.command(3)
    for iid in list(harness.book.invocations)[::-1]:
        harness.report(iid, "Success")
    harness.store.flush()
    assert seen["full"] == harness.book.view(rec.command_id)
    assert seen["brief"] == harness.book.view(rec.command_id, include_output=False)
    assert [i.instance_id for i in seen["full"].invocations] == ["i-000", "i-001", "i-002"]
    assert seen["full"].invocations[0].stdout == "out" and seen["brief"].invocations[0].stdout == ""
    assert harness.book._completing is None


def test_a_record_and_its_view_come_from_one_read(open_store):
    """``show`` and ``wait`` of a finished command need its record (webhooks, who may see it) and
    its view: one read of the record from the store gives both, the same as each alone."""
    seen = {}
    harness = Harness(open_store)

    def on_complete(rec):
        seen["completing"] = harness.book.record_and_view(rec.command_id, include_output=False)

    harness.book = CommandBook(harness.store, lambda inv, rec: harness.delivered.append(inv.invocation_id),
                               lambda inv: None, lambda instance_id: True, on_complete)
    rec = harness.command(2)
    active_rec, active_view = harness.book.record_and_view(rec.command_id)
    assert active_rec is harness.book.record(rec.command_id) and active_view == harness.book.view(rec.command_id)
    for iid in list(harness.book.invocations):
        harness.report(iid, "Success")
    completing_rec, completing_view = seen["completing"]
    assert completing_rec.command_id == rec.command_id and completing_view.status == "Success"
    harness.store.flush()

    reads = []
    get_command = harness.store.get_command
    harness.store.get_command = lambda command_id: reads.append(command_id) or get_command(command_id)
    finished_rec, finished_view = harness.book.record_and_view(rec.command_id, include_output=False)
    assert reads == [rec.command_id]
    assert finished_rec == get_command(rec.command_id)
    assert finished_view == harness.book.view(rec.command_id, include_output=False) == completing_view
    assert harness.book.record_and_view("no-such-command") is None


def test_released_commands_are_forgotten_without_a_write_and_the_others_kept(h):
    """Commands another broker adopted while this one was cut off from the store: forgotten here,
    nothing written; their open invocations are named (what was queued for them is taken back)."""
    lost = h.command(3, max_concurrency=2)
    kept = h.command(2)
    h.report(f"{lost.invocation_ids[0]}", "Success")
    h.store.flush()
    before = {inv.invocation_id: inv.status for inv in h.store.get_invocations(lost.command_id)}
    released = h.book.release([lost.command_id, "not-active"])
    assert released == {iid: f"i-{n:03d}" for n, iid in enumerate(lost.invocation_ids) if n}
    assert lost.command_id not in h.book.active and kept.command_id in h.book.active
    assert not set(lost.invocation_ids) & set(h.book.invocations)
    assert all(lost.invocation_ids[n] not in h.book.by_instance.get(f"i-{n:03d}", ()) for n in range(3))
    assert h.book.by_instance["i-000"] == {kept.invocation_ids[0]}
    assert not h.store.dirty
    assert {inv.invocation_id: inv.status for inv in h.store.get_invocations(lost.command_id)} == before
