"""The store's share of issue 22 on both backends: output records, webhook deliveries (claimed once
among brokers), and both pruned with their command."""

from __future__ import annotations

import time

import pytest

from zerorun import protocol
from zmq_broker.model import CommandRecord, OutputRecord, WebhookRecord


@pytest.fixture
def store(open_store, backend, request):
    if backend == "postgresql":
        server = request.getfixturevalue("postgres_server")
        with server.admin("zerorun_unit") as conn:
            conn.execute("TRUNCATE outputs, output_chunks, webhooks")
    return open_store


def _command(command_id: str, status: str = protocol.SUCCESS, at: float = 1000.0) -> CommandRecord:
    return CommandRecord(command_id, status, status, "RunShellScript", "1", "0" * 64, {}, ["tag:a=b"], "admin",
                         at, at + 60, 60, 1, 0, [])


def _hook(delivery_id: str, command_id: str = "c1", next_at: float = 0.0) -> WebhookRecord:
    return WebhookRecord(delivery_id, command_id, "ops", "http://127.0.0.1:1/x", "command", b"{}", 1.0, next_at)


def test_output_records_survive_a_restart_and_pending_ones_are_found(store):
    s = store()
    s.put_output(OutputRecord("i1", "c1", "web-1", stdout_size=10, stdout_want=10, stdout_have=4))
    s.put_output(OutputRecord("i2", "c1", "web-1", state="complete"))
    assert s.get_output("i1").stdout_have == 4  # queued writes are read back before the commit
    s.flush()
    s.close()
    s = store()
    assert s.get_output("i2").state == "complete" and s.get_output("nope") is None
    assert [r.invocation_id for r in s.pending_outputs("")] == ["i1"]


def test_a_due_delivery_is_claimed_once(store, backend):
    first, second = store(), store()  # two brokers on one store (SQLite: one broker, what it sends is excluded)
    first.put_webhook(_hook("d1"))
    first.put_webhook(_hook("d2", next_at=time.time() + 3600))  # not due
    first.flush()
    now = time.time()
    claimed = first.claim_webhooks(now, 10, "b1", 60.0, set())
    assert [r.delivery_id for r in claimed] == ["d1"]
    assert first.claim_webhooks(now, 10, "b1", 60.0, {"d1"}) == []
    if backend == "postgresql":  # another broker does not see it while the claim holds
        assert second.claim_webhooks(now, 10, "b2", 60.0, set()) == []
    claimed[0].state, claimed[0].attempts = "delivered", 1
    first.put_webhook(claimed[0])
    first.flush()
    assert second.claim_webhooks(now + 120, 10, "b2", 60.0, set()) == []
    assert [(r.delivery_id, r.state) for r in second.webhooks_of("c1")] == [("d1", "delivered"), ("d2", "pending")]
    assert second.webhook_counts() == {"delivered": 1, "pending": 1}


def test_prune_takes_outputs_and_deliveries_with_their_command(store):
    s = store()
    s.put_command(_command("old"))
    s.put_command(_command("new", at=time.time()))
    s.put_output(OutputRecord("i1", "old", "web-1", state="complete"))
    s.put_output(OutputRecord("i2", "new", "web-1", state="complete"))
    s.put_webhook(_hook("d1", "old"))
    s.put_webhook(_hook("d2", "new"))
    s.flush()
    assert s.prune(time.time() - 60) == 1
    assert s.get_output("i1") is None and s.get_output("i2") is not None
    assert s.webhooks_of("old") == [] and len(s.webhooks_of("new")) == 1


def test_a_backlog_is_pruned_in_passes_bounded_by_invocations(store):
    """A pass stops before the command that would take it past ``invocations`` (one command at
    least), so that each pass is a short stall; repeated passes take the whole backlog."""
    s = store()
    for n in range(30):
        s.put_command(_command(f"old-{n:02d}", at=1000.0 + n))
        for k in range(10):
            s.put_invocation(protocol.InvocationView(f"old-{n:02d}-{k}", f"old-{n:02d}", f"web-{k}", protocol.SUCCESS))
    s.put_command(_command("huge", at=2000.0))  # more invocations than one pass takes: still goes
    for k in range(40):
        s.put_invocation(protocol.InvocationView(f"huge-{k}", "huge", f"web-{k}", protocol.SUCCESS))
    s.flush()
    passes = []
    while removed := s.prune(time.time() - 60, batch=1000, invocations=25):
        passes.append(removed)
        assert len(passes) <= 31
    assert passes == [2] * 15 + [1]
    assert s.get_command("old-29") is None and s.get_invocations("old-29") == [] and s.get_invocations("huge") == []
