"""The SQLite store checkpoints from a thread of its own; scrubbing overwritten values (a TRUNCATE
checkpoint) still leaves nothing of them on disk, whatever that thread is doing."""

from __future__ import annotations

from zerorun import protocol
from zmq_broker.model import CommandRecord
from zmq_broker.store.sqlite import SqliteStore


def _command(secret: str) -> CommandRecord:
    return CommandRecord("c1", protocol.SUCCESS, protocol.SUCCESS, "RunShellScript", "1", "0" * 64,
                         {"password": secret}, ["tag:a=b"], "admin", 1000.0, 1060.0, 60, 1, 0, [])


def test_overwritten_values_are_gone_from_disk_after_a_scrub(tmp_path):
    path = tmp_path / "broker.db"
    store = SqliteStore(path)
    for n in range(50):  # many commits: the checkpoint thread is woken by each
        store.put_command(_command(f"hunter2-{n:03d}-secret"))
        store.flush()
    store.put_command(_command("redacted"))
    store.forget_overwritten()
    assert (tmp_path / "broker.db-wal").stat().st_size == 0
    assert b"hunter2" not in path.read_bytes()
    assert store.get_command("c1").parameters == {"password": "redacted"}
    store.close()
    reopened = SqliteStore(path)
    assert reopened.get_command("c1").parameters == {"password": "redacted"}
    reopened.close()
