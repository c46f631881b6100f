"""An agent whose disk fills up, through the real broker and CLI: the agent stays up, the result
of what ran reaches the broker whole, a command sent meanwhile fails saying why (never runs), and
the agent goes back to normal by itself once there is space (the journal's hand-driven tests:
test_agent_deliveries.py)."""

from __future__ import annotations

import json
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


def test_a_full_disk_for_run_directories_is_said_once(small_disk_few_inodes, fleet):
    """The run directories made ahead (spares) on a disk where no file or directory can be made:
    the agent says so in one line, not a traceback nor a line each time it tries again (at the
    start and after every run), and makes them again once there is room."""
    disk = small_disk_few_inodes
    state = fleet.agent_dir(INSTANCE)
    state.mkdir(parents=True, mode=0o700)
    (disk.path / "work").mkdir(mode=0o700)
    (state / "work").symlink_to(disk.path / "work")
    disk.fill()  # spares are made at the start, and after every run
    fleet.start_agent(INSTANCE, {"role": "disk"})
    fleet.wait_online([INSTANCE])
    for n in range(6):
        disk.fill()  # what the last run's directory, removed, left
        run_json(fleet, "send", "RunShellScript", "-p", f"commands=echo {n}", "-i", INSTANCE)
    log = fleet.agent_log(INSTANCE)
    assert log.count("ahead in ") == 1, log[-3000:]
    assert "cannot make run directories ahead in" in log and "Traceback" not in log, log[-3000:]
    assert ": No space left on device (each run makes its own meanwhile)" in log, log[-3000:]
    assert fleet.agents[INSTANCE].poll() is None, log[-3000:]

    disk.free()
    rc, later, err = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo later", "-i", INSTANCE)
    assert rc == 0 and later["invocations"][0]["stdout"] == "later\n", err
    wait_until(lambda: len(list((disk.path / "work").glob(".spare-*"))) == 2, "spares again", timeout=10)
    assert fleet.agent_log(INSTANCE).count("ahead in ") == 1


def test_agent_json_on_a_full_disk_leaves_no_temporary_file(small_disk, fleet):
    """agent.json, written after every Welcome, on a full disk: one line said, no agent.json.tmp
    left behind; written again after the next Welcome once there is room."""
    state = fleet.agent_dir(INSTANCE)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.symlink_to(small_disk.path)  # the whole state dir on the small disk
    fleet.start_agent(INSTANCE, {"role": "disk"})
    fleet.wait_online([INSTANCE])
    wait_until(lambda: (state / "agent.json").exists(), "agent.json", timeout=10)
    first = json.loads((state / "agent.json").read_text())
    small_disk.fill()
    for _ in range(2):  # a Welcome each time the broker comes back
        fleet.stop_broker()
        fleet.start_broker()
        fleet.wait_online([INSTANCE])
        wait_until(lambda: "cannot write" in fleet.agent_log(INSTANCE), "the agent.json failure", timeout=10)
    log = fleet.agent_log(INSTANCE)
    assert log.count(f"cannot write {state / 'agent.json'}") == 1, log[-3000:]
    assert f"cannot write {state / 'agent.json'}: No space left on device\n" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # the last Welcome's attempt may be under way (its line was said at the first): the file it
    # made goes with its failure
    wait_until(lambda: not (state / "agent.json.tmp").exists(), "no agent.json.tmp left behind", timeout=10)
    assert json.loads((state / "agent.json").read_text()) == first  # the last whole one stays

    small_disk.free()
    fleet.stop_broker()
    fleet.start_broker()
    fleet.wait_online([INSTANCE])
    wait_until(lambda: "can write" in fleet.agent_log(INSTANCE), "agent.json written again", timeout=10)
    assert json.loads((state / "agent.json").read_text())["welcomed_at"] > first["welcomed_at"]
    assert not (state / "agent.json.tmp").exists()


def test_a_step_that_fills_the_run_directories_disk_keeps_its_exit_code_and_output(small_disk, fleet):
    """A step fills the disk of ``<state dir>/work`` and exits 7: its supervisor cannot write the
    outcome file there. It used to end the invocation lost ("SupervisorLost", the exit code and
    output gone); now the supervisor sends the outcome to the agent on its socket, and the result
    is the step's: Failed with exit code 7, the output written before the disk filled, and a line
    saying the output may be cut. The agent stays up; the run directory, removed once the result
    is journaled, gives the space back, and the next command runs."""
    state = fleet.agent_dir(INSTANCE)
    state.mkdir(parents=True, mode=0o700)
    (small_disk.path / "work").mkdir(mode=0o700)
    (state / "work").symlink_to(small_disk.path / "work")  # the journal stays on the big disk
    fleet.start_agent(INSTANCE, {"role": "disk"})
    fleet.wait_online([INSTANCE])
    client = fleet.client()
    script = ("echo before; echo to-stderr >&2; head -c 100000000 /dev/zero > fill; "
              "echo filled >&2; exit 7")
    rc, sent, err = run_json(fleet, "send", "RunShellScript", "-p", f"commands={script}", "-i", INSTANCE,
                             "--no-wait")
    assert rc == 0, err
    inv = client.wait(sent["command_id"], timeout=30).invocations[0]
    log = fleet.agent_log(INSTANCE)
    assert (inv.status, inv.exit_code) == ("Failed", 7), (inv, log[-3000:])
    assert inv.status_details != "SupervisorLost" and "lost" not in inv.stderr, inv
    assert inv.stdout == "before\n", inv
    assert inv.stderr.startswith("to-stderr\n"), inv
    assert "[output may be cut: the run directory could not take the result (No space left on device)" \
        in inv.stderr, inv
    assert "its outcome came on its supervisor's socket" in log, log[-3000:]
    assert fleet.agents[INSTANCE].poll() is None, log[-3000:]

    wait_until(lambda: not list((small_disk.path / "work").glob("*/fill")), "the run directory to go",
               timeout=10)
    rc, later, err = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo later", "-i", INSTANCE)
    assert rc == 0 and later["invocations"][0]["stdout"] == "later\n", (err, later)
    assert fleet.agents[INSTANCE].poll() is None
