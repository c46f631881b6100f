"""An agent whose disk fills up, through the real broker and CLI: the agent stays up, the result
of what ran reaches the broker whole, a command sent meanwhile fails saying why (never runs), and
the agent goes back to normal by itself once there is space (the journal's hand-driven tests:
test_agent_deliveries.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from zerorun.testing import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared CLI helpers
from cli_support import run_json  # noqa: E402

INSTANCE = "disk-1"


def test_a_full_disk_loses_no_result_and_runs_nothing_twice(small_disk, fleet, tmp_path):
    state = fleet.agent_dir(INSTANCE)
    state.mkdir(parents=True, mode=0o700)
    for name in ("journal.db", "executions.jsonl"):  # the run directories stay on the big disk
        (state / name).symlink_to(small_disk.path / name)
    fleet.start_agent(INSTANCE, {"role": "disk"})
    fleet.wait_online([INSTANCE])
    client = fleet.client()
    rc, sent, err = run_json(fleet, "send", "RunShellScript", "-p", "commands=sleep 1.5; echo kept; exit 3",
                             "-i", INSTANCE, "--no-wait")
    assert rc == 0, err
    fleet.wait_invocations(sent["command_id"], "InProgress", [INSTANCE])
    small_disk.fill()
    inv = client.wait(sent["command_id"], timeout=30).invocations[0]
    assert (inv.status, inv.exit_code, inv.stdout) == ("Failed", 3, "kept\n"), fleet.agent_log(INSTANCE)[-3000:]
    assert fleet.agents[INSTANCE].poll() is None, fleet.agent_log(INSTANCE)[-3000:]

    marker = tmp_path / "ran"
    _, refused, _ = run_json(fleet, "send", "RunShellScript", "-p", f"commands=touch {marker}", "-i", INSTANCE)
    [inv] = refused["invocations"]
    assert inv["status"] == "Failed", inv
    assert "the agent cannot write its journal: database or disk is full" in inv["stderr"], inv
    assert fleet.agent_log(INSTANCE).count("cannot write its journal") == 1  # one line, not one per message

    small_disk.free()
    wait_until(lambda: "the agent can write its journal again" in fleet.agent_log(INSTANCE),
               "the agent to journal again", timeout=10)
    rc, later, err = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo later", "-i", INSTANCE)
    assert rc == 0 and later["invocations"][0]["stdout"] == "later\n", err
    fleet.stop_agent(INSTANCE)  # a restart finds every result journaled: nothing interrupted, nothing run
    fleet.restart_agent(INSTANCE)
    fleet.wait_online([INSTANCE])
    rc, last, err = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo last", "-i", INSTANCE)
    assert rc == 0 and last["invocations"][0]["stdout"] == "last\n", err
    assert "interrupted" not in fleet.agent_log(INSTANCE) and not marker.exists()
    first = client.get_command(sent["command_id"]).invocations[0]
    assert (first.status, first.exit_code, first.stdout) == ("Failed", 3, "kept\n")
