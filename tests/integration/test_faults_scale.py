"""Faults at fleet scale, with the fleet simulator (one process, one CURVE DEALER per instance)."""

from __future__ import annotations

import signal
import time
from pathlib import Path


def test_broker_sigkill_during_a_200_instance_command(fleet, tmp_path):
    """Every invocation ends terminal, every result is kept, nothing runs twice."""
    marks = tmp_path / "marks"
    marks.mkdir()
    fleet.start_simulator(200, "big", {"role": "big"}, executor="real")
    fleet.wait_online([f"big-{i:05d}" for i in range(200)], timeout=60)
    script = f"echo $ZERORUN_INVOCATION_ID >> {marks}/$ZERORUN_INSTANCE_ID; sleep 1; echo done"
    view = fleet.client().send("RunShellScript", {"commands": [script]}, ["tag:role=big"],
                               max_concurrency="100%")
    time.sleep(0.6)
    fleet.kill_broker()
    fleet._clients.clear()
    time.sleep(1.0)
    fleet.start_broker()
    final = fleet.client().wait(view.command_id, timeout=90)
    assert final.status == "Success", final.counts
    assert final.counts == {"Success": 200}
    assert all(inv.stdout == "done\n" for inv in final.invocations)
    runs = {p.name: p.read_text().splitlines() for p in marks.iterdir()}
    assert len(runs) == 200
    assert all(len(lines) == 1 for lines in runs.values()), {k: v for k, v in runs.items() if len(v) != 1}


def test_broker_restart_with_100_connected_agents(fleet):
    """All reconnect (jittered backoff, HELLO on PleaseHello) and are Online again within a few
    heartbeat intervals."""
    fleet.start_simulator(100, "rc", {"role": "rc"})
    ids = [f"rc-{i:05d}" for i in range(100)]
    fleet.wait_online(ids, timeout=60)
    fleet.stop_broker(signal.SIGTERM)
    fleet._clients.clear()
    time.sleep(1.0)
    restarted = time.monotonic()
    fleet.start_broker()
    fleet.wait_online(ids, timeout=30)
    took = time.monotonic() - restarted
    view = fleet.client().send("RunShellScript", {"commands": ["true"]}, ["tag:role=rc"], max_concurrency="100%")
    assert fleet.client().wait(view.command_id, timeout=30).counts == {"Success": 100}
    assert took < 30
    hellos = [line for line in fleet.broker_log().splitlines() if "online (" in line]
    assert len(hellos) >= 200  # every agent said HELLO to both broker processes


def test_max_errors_ten_percent_of_fifty_stops_at_the_sixth_error(fleet):
    """SSM's rule, exactly: 50 targets, max_errors 10% (5): dispatch stops at the 6th error."""
    fleet.start_simulator(50, "me", {"role": "me"}, executor="real")
    fleet.wait_online([f"me-{i:05d}" for i in range(50)], timeout=60)
    proc = fleet.cli("send", "RunShellScript", "-t", "tag:role=me", "-p", "commands=exit 3",
                     "--max-concurrency", "1", "--max-errors", "10%", "--json")
    import json

    view = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert view["counts"] == {"Failed": 6, "Cancelled": 44}
    assert {i["status_details"] for i in view["invocations"] if i["status"] == "Cancelled"} == {"Terminated"}
