"""Steps outlive the agent, supervised (issue 19): real agents SIGKILLed and restarted while their
steps run; the supervisors keep the steps, their timeouts, cancels and output, and the next agent
reports each invocation once, with the real result; nothing of a step is left running after it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from zerorun.testing import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared CLI helpers
from cli_support import run_json  # noqa: E402


def run_dirs(fleet, instance_id: str) -> list[Path]:
    work = fleet.agent_dir(instance_id) / "work"
    return [p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".spare-")] if work.exists() else []


def supervisor_pid(fleet, instance_id: str) -> int:
    """The pid of the one supervisor running on ``instance_id`` (from its run directory)."""
    def recorded():
        for run_dir in run_dirs(fleet, instance_id):
            try:
                return json.loads((run_dir / "supervisor").read_bytes()[:256])["pid"]
            except (OSError, ValueError, KeyError):
                continue
        return None

    return wait_until(recorded, f"a supervisor on {instance_id} to record itself")


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a supervisor's session holds it and its steps)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def send(fleet, instance_id: str, script: str, *extra: str) -> str:
    rc, sent, err = run_json(fleet, "send", "RunShellScript", "-p", f"commands={script}", "-i", instance_id,
                             "--no-wait", *extra)
    assert rc == 0, err
    return sent["command_id"]


def executions_of(fleet, instance_id: str, command_id: str) -> list[dict]:
    return [e for e in fleet.executions(instance_id) if e.get("command_id") == command_id]


def test_agent_sigkill_keeps_the_step_its_exit_code_and_whole_output(fleet, tmp_path):
    """The issue's reproduction: the step runs on under its supervisor while the agent is dead;
    the restarted agent reports it once with its real exit code and all of its output."""
    fleet.start_agents({"a-1": {"role": "x"}})
    started, marker = tmp_path / "started", tmp_path / "marker"
    command_id = send(fleet, "a-1", f"echo begin; touch {started}; sleep 4; echo end >> {marker}; echo end; "
                                    "echo oops >&2; exit 7", "--execution-timeout", "30")
    wait_until(started.exists, "the step to start")
    sid = supervisor_pid(fleet, "a-1")
    fleet.stop_agent("a-1", signal.SIGKILL)
    time.sleep(1)  # the agent stays dead for a while: the step must go on without it
    assert session_members(sid), "the supervisor died with the agent"
    fleet.restart_agent("a-1")
    view = fleet.client().wait(command_id, timeout=30)
    inv = view.invocations[0]
    assert (inv.status, inv.exit_code) == ("Failed", 7)
    assert inv.stdout == "begin\nend\n" and inv.stderr == "oops\n"
    assert marker.read_text() == "end\n"
    assert len(executions_of(fleet, "a-1", command_id)) == 1
    wait_until(lambda: not session_members(sid), "the supervisor and its step to be gone")
    wait_until(lambda: not run_dirs(fleet, "a-1"), "the run directory to be removed once reported")


def test_execution_timeout_fires_while_the_agent_is_down(fleet, tmp_path):
    fleet.start_agents({"a-1": {"role": "x"}})
    started, marker = tmp_path / "started", tmp_path / "marker"
    command_id = send(fleet, "a-1", f"touch {started}; sleep 30; echo end >> {marker}", "--execution-timeout", "3")
    wait_until(started.exists, "the step to start")
    sid = supervisor_pid(fleet, "a-1")
    began = time.monotonic()
    fleet.stop_agent("a-1", signal.SIGKILL)
    # the supervisor alone stops the step on time and records the outcome
    wait_until(lambda: all((d / "outcome").exists() for d in run_dirs(fleet, "a-1")) and run_dirs(fleet, "a-1"),
               "the supervisor to record the timed-out step", timeout=20)
    assert time.monotonic() - began < 15
    wait_until(lambda: not session_members(sid), "the timed-out step and its supervisor to be gone")
    fleet.restart_agent("a-1")
    inv = fleet.client().wait(command_id, timeout=30).invocations[0]
    assert inv.status == "TimedOut"
    assert not marker.exists()
    assert len(executions_of(fleet, "a-1", command_id)) == 1


def test_cancel_while_the_agent_is_down_is_applied_when_it_is_back(fleet, tmp_path):
    fleet.start_agents({"a-1": {"role": "x"}})
    started, marker = tmp_path / "started", tmp_path / "marker"
    command_id = send(fleet, "a-1", f"touch {started}; sleep 40; echo end >> {marker}", "--execution-timeout", "60")
    wait_until(started.exists, "the step to start")
    sid = supervisor_pid(fleet, "a-1")
    fleet.stop_agent("a-1", signal.SIGKILL)
    fleet.wait_status("a-1", "ConnectionLost")
    proc = fleet.cli("cancel", command_id)
    assert proc.returncode == 0, proc.stderr
    assert session_members(sid), "the step must still run until the agent is back"
    fleet.restart_agent("a-1")
    inv = fleet.client().wait(command_id, timeout=30).invocations[0]
    assert inv.status == "Cancelled"
    wait_until(lambda: not session_members(sid), "the cancelled step and its supervisor to be gone")
    assert not marker.exists()
    assert len(executions_of(fleet, "a-1", command_id)) == 1


def test_supervisor_killed_too_ends_failed_and_kills_its_step(fleet, tmp_path):
    """A supervisor gone with the agent (the machine's reboot, or a kill): the invocation ends
    Failed with the reason, and the step's process group is checked and killed."""
    fleet.start_agents({"a-1": {"role": "x"}})
    started, marker = tmp_path / "started", tmp_path / "marker"
    command_id = send(fleet, "a-1", f"touch {started}; sleep 20; echo end >> {marker}", "--execution-timeout", "60")
    wait_until(started.exists, "the step to start")
    sid = supervisor_pid(fleet, "a-1")
    fleet.stop_agent("a-1", signal.SIGKILL)
    os.kill(sid, signal.SIGKILL)
    wait_until(lambda: sid not in session_members(sid), "the supervisor to die")
    assert session_members(sid), "its step runs on, unsupervised, until the agent is back"
    fleet.restart_agent("a-1")
    inv = fleet.client().wait(command_id, timeout=30).invocations[0]
    assert inv.status == "Failed"
    assert "supervisor is gone" in inv.stderr and "killed" in inv.stderr
    assert not session_members(sid)
    time.sleep(0.5)
    assert not marker.exists()


def test_twenty_agent_restarts_during_a_ten_instance_command(fleet, tmp_path):
    """Agents SIGKILLed (or stopped) and restarted 20 times at random moments while a 10-instance
    command runs: every invocation ends exactly once with its whole output, no step runs twice,
    and no process is left."""
    ids = [f"r-{n}" for n in range(10)]
    fleet.start_agents({i: {"role": "restart"} for i in ids})
    marks = tmp_path / "marks"
    marks.mkdir()
    script = f"echo run >> {marks}/$ZERORUN_INSTANCE_ID; echo first; sleep 12; echo second"
    rc, sent, err = run_json(fleet, "send", "RunShellScript", "-p", f"commands={script}", "-t", "tag:role=restart",
                             "--no-wait", "--execution-timeout", "60")
    assert rc == 0, err
    command_id = sent["command_id"]
    wait_until(lambda: len(list(marks.iterdir())) == len(ids), "every step to start")
    supervisors = {i: supervisor_pid(fleet, i) for i in ids}
    rng = random.Random(19)
    for n in range(20):
        victim = rng.choice(ids)
        fleet.stop_agent(victim, signal.SIGKILL if n % 4 else signal.SIGTERM)
        time.sleep(rng.uniform(0.0, 0.3))
        fleet.restart_agent(victim)
        time.sleep(rng.uniform(0.1, 0.4))
    view = fleet.client().wait(command_id, timeout=60)
    assert {i.instance_id: (i.status, i.stdout) for i in view.invocations} == \
        {i: ("Success", "first\nsecond\n") for i in ids}
    for instance_id in ids:
        assert (marks / instance_id).read_text() == "run\n", f"{instance_id} ran its step twice"
        assert len(executions_of(fleet, instance_id, command_id)) == 1, f"{instance_id} reported twice"
    for instance_id, sid in supervisors.items():  # no step process is left (an idle supervisor may wait)
        wait_until(lambda: set(session_members(sid)) <= {sid}, f"the step on {instance_id} to be gone")
    for instance_id in ids:  # an agent that stops lets its idle supervisors go
        fleet.stop_agent(instance_id)
    for instance_id, sid in supervisors.items():
        wait_until(lambda: not session_members(sid), f"the supervisor of {instance_id} to be gone")


REBOOT_DOC = """schemaVersion: '2.2'
description: a step that asks for a reboot once (exit 194), between two others
mainSteps:
  - action: aws:runShellScript
    name: before
    inputs:
      runCommand:
        - echo x >> {counts}/before
        - echo before
  - action: aws:runShellScript
    name: reboot
    inputs:
      runCommand:
        - echo x >> {counts}/reboot
        - n=$(wc -l < {counts}/reboot)
        - echo "run $n"
        - if [ "$n" -lt 2 ]; then exit 194; fi
  - action: aws:runShellScript
    name: after
    inputs:
      runCommand:
        - echo x >> {counts}/after
        - echo after
"""


def reboot_fleet(fleet, tmp_path, reboot_command: str):
    counts = tmp_path / "counts"
    counts.mkdir()
    path = tmp_path / "reboot.yml"
    path.write_text(REBOOT_DOC.format(counts=counts))
    proc = fleet.cli("documents", "create", "reboot-once", str(path))
    assert proc.returncode == 0, proc.stderr
    fleet.start_agent("rb-1", {"role": "reboot"}, "--reboot-command", reboot_command)
    fleet.wait_online(["rb-1"])
    return counts


def test_exit_194_reboots_and_resumes_at_the_step_that_asked(fleet, tmp_path):
    """amazon-ssm-agent's semantics: the flow stops at the step that exited 194, the agent reboots
    (here: the reboot command restarts only the agent process, SIGUSR2: it re-executes itself),
    and the document resumes at that same step, which runs again; the steps before it keep their
    results and never run again. The invocation ends once."""
    counts = reboot_fleet(fleet, tmp_path, "sleep 2; kill -USR2 $ZERORUN_AGENT_PID")
    pid = fleet.agents["rb-1"].pid
    command_id = send_document(fleet, "reboot-once", "rb-1")
    # while the reboot is under way the invocation is InProgress, the step has run once
    wait_until(lambda: (counts / "reboot").exists(), "the step to ask for the reboot")
    fleet.wait_invocations(command_id, "InProgress", timeout=10)  # the reboot command waits 2 s first
    wait_until(lambda: "asked for a reboot" in fleet.agent_log("rb-1"), "the agent to log the reboot")
    assert (counts / "reboot").read_text() == "x\n" and not (counts / "after").exists()
    fleet.client().wait(command_id, timeout=60)
    rc, view, err = run_json(fleet, "show", command_id)
    assert rc == 0, err
    inv = view["invocations"][0]
    assert inv["status"] == "Success", inv
    assert [(s["name"], s["status"]) for s in inv["steps"]] == \
        [("before", "Success"), ("reboot", "Success"), ("after", "Success")]
    assert [s["stdout"] for s in inv["steps"]] == ["before\n", "run 2\n", "after\n"]
    assert {p.name: p.read_text() for p in counts.iterdir()} == {"before": "x\n", "reboot": "x\nx\n", "after": "x\n"}
    assert fleet.agents["rb-1"].pid == pid and fleet.agents["rb-1"].poll() is None  # the same process, re-executed
    assert "resuming" in fleet.agent_log("rb-1")
    assert len(executions_of(fleet, "rb-1", view["command_id"])) == 1


def send_document(fleet, name: str, instance_id: str) -> str:
    rc, sent, err = run_json(fleet, "send", name, "-i", instance_id, "--no-wait")
    assert rc == 0, err
    return sent["command_id"]


def test_a_cancel_while_the_reboot_is_under_way_ends_the_invocation_cancelled(fleet, tmp_path):
    counts = reboot_fleet(fleet, tmp_path, "sleep 3; kill -USR2 $ZERORUN_AGENT_PID")
    command_id = send_document(fleet, "reboot-once", "rb-1")
    wait_until(lambda: "asked for a reboot" in fleet.agent_log("rb-1"), "the step to ask for the reboot")
    assert fleet.cli("cancel", command_id).returncode == 0
    inv = fleet.client().wait(command_id, timeout=30).invocations[0]
    assert inv.status == "Cancelled"
    wait_until(lambda: "resuming" not in fleet.agent_log("rb-1") and fleet.agent_log("rb-1").count("connecting to") >= 2,
               "the agent to restart (the reboot still happens)")
    fleet.wait_online(["rb-1"])
    assert (counts / "reboot").read_text() == "x\n" and not (counts / "after").exists()
    assert len(executions_of(fleet, "rb-1", command_id)) == 1


def test_exit_194_with_a_failing_reboot_command_ends_failed(fleet, tmp_path):
    counts = reboot_fleet(fleet, tmp_path, "echo no reboot here >&2; exit 3")
    rc, view, err = run_json(fleet, "send", "reboot-once", "-i", "rb-1", "--timeout", "60")
    inv = view["invocations"][0]
    assert inv["status"] == "Failed" and inv["status_details"] == "reboot failed", inv
    assert "no reboot here" in inv["stderr"]
    # the step that asked for the reboot would have run again after it: it is not run, like the rest
    assert [s["status"] for s in inv["steps"]] == ["Success", "Skipped", "Skipped"]
    assert not (counts / "after").exists()
    # the agent goes on: a later command runs
    rc, later, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo later", "-i", "rb-1")
    assert rc == 0 and later["invocations"][0]["stdout"] == "later\n"


def test_stop_commands_stops_what_a_stopped_agent_left_running(fleet, tmp_path):
    """``systemctl stop`` (SIGTERM to the agent alone, KillMode=process) leaves a running command
    to its supervisor; ``zerorun-agent stop-commands`` stops it (SIGTERM to the supervisor: its
    step is stopped and the invocation recorded Failed), and the next start reports that."""
    fleet.start_agents({"a-1": {"role": "x"}})
    started, marker = tmp_path / "started", tmp_path / "marker"
    command_id = send(fleet, "a-1", f"touch {started}; sleep 30; echo end >> {marker}", "--execution-timeout", "60")
    wait_until(started.exists, "the step to start")
    sid = supervisor_pid(fleet, "a-1")
    assert fleet.stop_agent("a-1") == 0  # drains for up to 3 s, then leaves the step running
    assert session_members(sid)
    proc = subprocess.run([fleet.python, "-m", "agent", "stop-commands", "--state-dir", str(fleet.agent_dir("a-1"))],
                          capture_output=True, text=True, timeout=60, env=fleet.env())
    assert proc.returncode == 0 and "stopped 1 running command" in proc.stdout, proc
    wait_until(lambda: not session_members(sid), "the step and its supervisor to be gone")
    fleet.restart_agent("a-1")
    inv = fleet.client().wait(command_id, timeout=30).invocations[0]
    assert inv.status == "Failed" and "SIGTERM" in inv.status_details, (inv.status, inv.status_details)
    assert not marker.exists()


def test_a_whole_output_of_a_step_taken_back_after_a_restart_is_served(fleet, tmp_path):
    """The result cannot carry the step's output (past the agent's --max-output-bytes): after the
    agent's SIGKILL and restart, the new agent keeps the whole output for the broker to read."""
    fleet.start_agent("a-1", {"role": "x"}, "--max-output-bytes", "1000")
    fleet.wait_online(["a-1"])
    started = tmp_path / "started"
    script = f"touch {started}; sleep 2; seq 1 20000"
    command_id = send(fleet, "a-1", script, "--execution-timeout", "30")
    wait_until(started.exists, "the step to start")
    fleet.stop_agent("a-1", signal.SIGKILL)
    fleet.restart_agent("a-1")
    inv = fleet.client().wait(command_id, timeout=30).invocations[0]
    expected = "".join(f"{n}\n" for n in range(1, 20001)).encode()
    assert inv.status == "Success" and inv.stdout_size == len(expected)

    def full():
        proc = subprocess.run([fleet.python, "-m", "zerorun.cli", "-c", str(fleet.client_config), "show",
                               command_id, "--instance", "a-1", "--output", "full"],
                              capture_output=True, timeout=60, env=fleet.env())
        return proc.stdout if proc.returncode == 0 and proc.stdout == expected else None

    wait_until(full, "the whole output to be served", timeout=30)
