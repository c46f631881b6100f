"""Retention pruning keeps pace: a broker with a backlog of expired commands takes all of it in
a few quick passes, not a batch a minute."""

from __future__ import annotations

import sqlite3
import time

from zerorun import protocol
from zerorun.testing.localfleet import _wait_for
from zmq_broker.model import CommandRecord
from zmq_broker.store.sqlite import SqliteStore

BACKLOG = 3000  # six passes of the old 500-a-minute pruning: minutes; now a few tenths of a second


def _count(db, table: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_backlog_of_expired_commands_is_pruned_in_a_few_passes(fleet):
    fleet.stop_broker()  # the fixture's broker made the state directory; the backlog goes in offline
    db = fleet.broker_dir / "broker.db"
    store = SqliteStore(db)
    old = time.time() - 3 * 86400
    for n in range(BACKLOG):
        cid = f"old-{n:05d}"
        store.put_command(CommandRecord(cid, protocol.SUCCESS, protocol.SUCCESS, "RunShellScript", "1", "0" * 64, {},
                                        [f"instance:web-{n % 7}"], "admin", old + n, old + n + 60, 60, 1, 0, [],
                                        completed_at=old + n + 1))
        store.put_invocation(protocol.InvocationView(f"inv-{n:05d}", cid, f"web-{n % 7}", protocol.SUCCESS))
    store.close()
    fleet.start_broker("--retention-days", "1")
    client = fleet.client()
    recent = client.send("RunShellScript", {"commands": ["true"]}, instance_ids=["nosuch"]).command_id
    _wait_for(lambda: _count(db, "commands") <= 1, 60, "the backlog to be pruned")
    assert _count(db, "invocations") <= 1 and _count(db, "command_targets") <= 4
    assert client.get_command(recent, include_output=False).command_id == recent  # within the retention: kept
    _wait_for(lambda: "pruned 3000 command(s)" in fleet.broker_log(), 30, "one log line for the catching up")
