"""Retention pruning keeps pace: a broker with a backlog of expired commands takes all of it in
a few quick passes, not a batch a minute."""

from __future__ import annotations

import sqlite3

from tests.expired_backlog import put_expired
from zerorun.testing.localfleet import _wait_for
from zmq_broker.store.sqlite import SqliteStore

BACKLOG = 3000  # six passes of the old 500-a-minute pruning: minutes; now a few tenths of a second


def _count(db, table: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_backlog_of_expired_commands_is_pruned_in_a_few_passes(fleet):
    fleet.stop_broker()  # the fixture's broker made the state directory; the backlog goes in offline
    db = fleet.broker_dir / "broker.db"
    store = SqliteStore(db)
    put_expired(store, BACKLOG)
    store.close()
    fleet.start_broker("--retention-days", "1")
    client = fleet.client()
    recent = client.send("RunShellScript", {"commands": ["true"]}, instance_ids=["nosuch"]).command_id
    _wait_for(lambda: _count(db, "commands") <= 1, 60, "the backlog to be pruned")
    assert _count(db, "invocations") <= 1 and _count(db, "command_targets") <= 4
    assert client.get_command(recent, include_output=False).command_id == recent  # within the retention: kept
    _wait_for(lambda: "pruned 3000 command(s)" in fleet.broker_log(), 30, "one log line for the catching up")
