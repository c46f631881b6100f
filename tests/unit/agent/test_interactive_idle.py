"""An upload whose client vanished mid-transfer is dropped by the agent's loop (drop_idle),
not only when the next file request happens to arrive."""

from __future__ import annotations

import queue
import time

from agent import interactive
from zerorun import protocol


def test_idle_upload_is_dropped_and_its_temp_file_removed(tmp_path, monkeypatch):
    replies: queue.Queue = queue.Queue()
    agent_side = interactive.Interactive(replies.put, workers=1)
    try:
        target = tmp_path / "upload.bin"
        agent_side.handle(protocol.AgentFileOp("r1", "t1", "open-put", path=str(target)))
        agent_side.handle(protocol.AgentFileOp("r2", "t1", "write", data=b"half a file"))
        assert [replies.get(timeout=10).ok for _ in range(2)] == [True, True]
        temps = [p for p in tmp_path.iterdir() if p != target]
        assert len(temps) == 1  # the 0600 temporary file beside the target

        agent_side.drop_idle()  # not idle yet: kept
        assert temps[0].exists()
        later = time.monotonic() + interactive.IDLE_TRANSFER_SECONDS + 1
        monkeypatch.setattr(interactive.time, "monotonic", lambda: later)
        agent_side.drop_idle()
        assert not temps[0].exists() and not target.exists()

        agent_side.handle(protocol.AgentFileOp("r3", "t1", "commit", sha256="0" * 64))
        done = replies.get(timeout=10)
        assert not done.ok and "unknown or expired transfer" in done.error
    finally:
        agent_side.close()
