"""The audit log writes a loop iteration's lines at once (``flush``, before the iteration's answers
go out), never raises, and says when it can write again."""

from __future__ import annotations

import json
import os

from zmq_broker.audit import AuditLog


def _events(path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_lines_wait_for_the_flush_and_close_writes_the_rest(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.write("command.send", command_id="c1")
    audit.write("command.complete", command_id="c1")
    assert path.read_text() == ""
    audit.flush()
    assert _events(path) == ["command.send", "command.complete"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    audit.write("command.cancel", command_id="c2")
    audit.close()
    assert _events(path) == ["command.send", "command.complete", "command.cancel"]


def test_a_failed_flush_is_remembered_and_cleared_by_the_next_good_one(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    audit = AuditLog(path)
    audit.write("command.send", command_id="c1")
    audit.flush()  # never raises
    assert audit.failed and audit.failures == 1
    path.unlink()
    audit.retry()  # the loop's tick: a new file, and a line saying so
    audit.flush()
    assert audit.failed == ""
    assert _events(path) == ["audit.recovered"]
    audit.close()


def test_without_a_path_nothing_is_kept(tmp_path):
    audit = AuditLog(None)
    audit.write("command.send", command_id="c1")
    audit.flush()
    audit.close()
    assert audit.failed == ""
