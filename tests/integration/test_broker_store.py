"""The broker's store seen from outside: what a real broker process does with its database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

from zmq_broker.store.sqlite import SCHEMA_VERSION


def test_the_broker_refuses_a_newer_schema_with_one_line(tmp_path):
    state = tmp_path / "broker"
    state.mkdir(mode=0o700)
    db = sqlite3.connect(str(state / "broker.db"))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    db.close()
    proc = subprocess.run([sys.executable, "-m", "zmq_broker", "--state-dir", str(state), "--agent-bind",
                           "tcp://127.0.0.1:*", "--client-bind", "tcp://127.0.0.1:*"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("zerorun-broker: ") and "newer than this broker knows" in lines[-1]
    assert "Traceback" not in proc.stderr
