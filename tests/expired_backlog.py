"""A backlog of finished commands past any retention, written straight into a store (SQLite or
PostgreSQL) while no broker runs: what pruning tests start from."""

from __future__ import annotations

import time

from zerorun import protocol
from zmq_broker.model import CommandRecord


def put_expired(store, count: int, days_ago: float = 3.0) -> None:
    """``count`` commands ``old-NNNNN``, one invocation each, finished ``days_ago`` days ago; the store
    is left open (the caller closes it: that commits)."""
    old = time.time() - days_ago * 86400
    for n in range(count):
        cid = f"old-{n:05d}"
        store.put_command(CommandRecord(cid, protocol.SUCCESS, protocol.SUCCESS, "RunShellScript", "1", "0" * 64, {},
                                        [f"instance:web-{n % 7}"], "admin", old + n, old + n + 60, 60, 1, 0, [],
                                        completed_at=old + n + 1))
        store.put_invocation(protocol.InvocationView(f"inv-{n:05d}", cid, f"web-{n % 7}", protocol.SUCCESS))
