"""The fleet simulator against a real broker: simulated agents answer real commands by tag."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zerorun.protocol import SUCCESS

ROOT = Path(__file__).resolve().parents[2]


class Sim:
    def __init__(self, fleet, n, executor, prefix, *extra):
        args = [sys.executable, "-m", "agent.fleetsim", "--broker", fleet.agent_endpoint,
                "--broker-key", str(fleet.broker_key), "-n", str(n), "--prefix", prefix,
                "--executor", executor, "--tag", "role=web", "--tag-spread", "az=a,b,c", *extra]
        self.log = fleet.root / f"fleetsim-{prefix}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ROOT),
                                         env=fleet.env())
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("fleetsim: all"):
                self.ready.set()
        self.ready.set()

    def wait_welcomed(self, timeout=20):
        assert self.ready.wait(timeout) and self.proc.poll() is None, self.log.read_text()[-2000:]

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                return self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def sims():
    started: list[Sim] = []
    yield started
    for sim in started:
        sim.stop()


def test_noop_fleet_answers_by_tag_with_spread_tags(fleet, sims):
    sim = Sim(fleet, 50, "noop", "noop")
    sims.append(sim)
    sim.wait_welcomed()
    fleet.wait_online([f"noop-{i:05d}" for i in range(50)])
    views = {v.instance_id: v for v in fleet.client().instances(["tag:role=web"])}
    assert len(views) == 50
    assert views["noop-00000"].tags == {"role": "web", "az": "a"}
    assert views["noop-00004"].tags == {"role": "web", "az": "b"}
    assert "fleetsim" in views["noop-00001"].agent_version
    # the real CLI, by tag
    proc = fleet.cli("send", "RunShellScript", "-p", "commands=echo ignored", "-t", "tag:role=web",
                     "--max-concurrency", "100%", "--json")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["status"] == SUCCESS and view["counts"] == {SUCCESS: 50}
    assert {inv["instance_id"] for inv in view["invocations"]} == set(views)
    assert all(inv["exit_code"] == 0 and inv.get("stdout", "") == "" for inv in view["invocations"])
    # spread tags select a third of the fleet; the client library waits for it
    client = fleet.client()
    sent = client.send("RunShellScript", {"commands": ["true"]}, targets=["tag:az=c"])
    done = client.wait(sent.command_id, timeout=20)
    assert done.status == SUCCESS
    assert sorted(i.instance_id for i in done.invocations) == sorted(
        f"noop-{i:05d}" for i in range(50) if i % 3 == 2)
    assert sim.stop() == 0  # SIGTERM: clean exit
    fleet.wait_status("noop-00000", "ConnectionLost", timeout=10)


def test_real_executor_runs_scripts(fleet, sims):
    sim = Sim(fleet, 5, "real", "real")
    sims.append(sim)
    sim.wait_welcomed()
    fleet.wait_online([f"real-{i:05d}" for i in range(5)])
    proc = fleet.cli("send", "RunShellScript", "-p", "commands=echo hi from $ZERORUN_INSTANCE_ID; echo oops >&2",
                     "-t", "tag:role=web", "--json")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["counts"] == {SUCCESS: 5}
    for inv in view["invocations"]:
        assert inv["stdout"] == f"hi from {inv['instance_id']}\n"
        assert inv["stderr"] == "oops\n"
        assert inv["exit_code"] == 0
    failing = fleet.cli("send", "RunShellScript", "-p", "commands=exit 3", "-i", "real-00002", "--json")
    assert failing.returncode == 1
    inv = json.loads(failing.stdout)["invocations"][0]
    assert inv["status"] == "Failed" and inv["exit_code"] == 3
    # execution timeout and cancel are honoured
    timed = fleet.cli("send", "RunShellScript", "-p", "commands=sleep 30", "-i", "real-00001",
                      "--execution-timeout", "1", "--json", timeout=30)
    inv = json.loads(timed.stdout)["invocations"][0]
    assert inv["status"] == "TimedOut", inv
    client = fleet.client()
    sent = client.send("RunShellScript", {"commands": ["sleep 30"]}, instance_ids=["real-00003"])
    deadline = time.monotonic() + 10
    while client.get_command(sent.command_id).invocations[0].status != "InProgress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.cancel(sent.command_id)
    done = client.wait(sent.command_id, timeout=15)
    assert done.invocations[0].status == "Cancelled"


def test_refuses_clearly_when_descriptors_are_short(fleet):
    env = fleet.env()
    proc = subprocess.run(
        [sys.executable, "-c",
         "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256));"
         "from agent.fleetsim import main; sys.exit(main(sys.argv[1:]))",
         "--broker", fleet.agent_endpoint, "--broker-key", str(fleet.broker_key), "-n", "5000"],
        capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "file descriptors" in proc.stderr


def test_a_larger_fleet_is_told_to_heartbeat_less_often(fleet_factory, sims):
    """--max-heartbeats-per-second: 24 agents at 0.5 s would send 48/s; capped at 10/s the
    broker gives them 2.5 s (steps of the base interval), they adopt it, and the broker's liveness
    check follows: nobody is ConnectionLost after more than 3 x 0.5 s of silence."""
    fleet = fleet_factory(heartbeat_interval=0.5)
    fleet.start_broker("--max-heartbeats-per-second", "10")
    real = fleet.start_agent("real-1", {"role": "real"})
    assert real.poll() is None
    fleet.wait_online(["real-1"])
    sim = Sim(fleet, 23, "noop", "hb")
    sims.append(sim)
    sim.wait_welcomed()
    client = fleet.client()
    assert client.ping()["heartbeat_interval"] == 2.5
    time.sleep(6.0)  # agents welcomed early were told 0.5 s, and learn 2.5 s from a Pong
    views = client.instances()
    assert len(views) == 24 and {v.ping_status for v in views} == {"Online"}, views
    send = client.send("RunShellScript", {"commands": ["echo hi"]}, targets=["tag:role=real"])
    assert client.wait(send.command_id, timeout=30).status == SUCCESS
