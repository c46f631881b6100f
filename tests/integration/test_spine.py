"""The spine end to end: real broker, real agents, the real CLI, on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from zerorun import protocol
from zerorun.testing import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared CLI helpers
from cli_support import run_json  # noqa: E402


def by_instance(view):
    return {inv["instance_id"]: inv for inv in view["invocations"]}


def test_send_by_tag_runs_only_on_tagged_instances(web_db_fleet):
    rc, view, _ = run_json(web_db_fleet, "send", "RunShellScript", "-p", "commands=echo hi from $ZERORUN_INSTANCE_ID",
                           "-t", "tag:role=web")
    assert rc == 0
    assert view["status"] == "Success"
    invs = by_instance(view)
    assert set(invs) == {"web-1", "web-2"}
    for instance_id, inv in invs.items():
        assert inv["status"] == "Success"
        assert inv["exit_code"] == 0
        assert inv["stdout"] == f"hi from {instance_id}\n"
        assert inv["steps"][0]["status"] == "Success"
    # the stable JSON contract of a command
    for key in ("command_id", "status", "status_details", "document_name", "document_version",
                "document_sha256", "parameters", "targets", "requested_by", "requested_at", "counts",
                "invocations", "steps"):
        assert key in view
    assert view["counts"] == {"Success": 2}
    executions = (web_db_fleet.agent_dir("web-1") / "executions.jsonl").read_text().splitlines()
    entry = json.loads(executions[-1])
    assert entry["command_id"] == view["command_id"] and entry["status"] == "Success"
    assert entry["sha256"] == view["document_sha256"]
    assert view["document_name"] == "RunShellScript"
    assert len(view["document_sha256"]) == 64


def test_human_output_and_exit_code(web_db_fleet):
    proc = web_db_fleet.cli("send", "RunShellScript", "-p", "commands=echo out; echo err >&2", "-t", "tag:role=db")
    assert proc.returncode == 0, proc.stderr
    assert "--- db-1  Success" in proc.stdout
    assert "  out" in proc.stdout and "  stderr: err" in proc.stdout
    failing = web_db_fleet.cli("send", "RunShellScript", "-p", "commands=exit 3", "-t", "tag:role=db")
    assert failing.returncode == 1
    assert "Failed" in failing.stdout and "exit 3" in failing.stdout


def test_send_by_instance_and_combined_targets(web_db_fleet):
    rc, view, _ = run_json(web_db_fleet, "send", "RunShellScript", "-p", "commands=true", "-i", "db-1")
    assert rc == 0 and set(by_instance(view)) == {"db-1"}
    # several targets are AND-ed; comma-separated values are OR-ed
    rc, view, _ = run_json(web_db_fleet, "send", "RunShellScript", "-p", "commands=true",
                           "-t", "tag:env=prod", "-t", "tag:role=web,db")
    assert rc == 0 and set(by_instance(view)) == {"web-1", "db-1"}
    rc, view, _ = run_json(web_db_fleet, "send", "RunShellScript", "-p", "commands=true", "-t", "tag:env")
    assert set(by_instance(view)) == {"web-1", "web-2", "db-1"}


def test_no_match_is_a_clear_error(web_db_fleet):
    proc = web_db_fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "tag:role=nothing")
    assert proc.returncode == 2
    assert "NoInstancesInTag" in proc.stderr
    bad = web_db_fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "role=web")
    assert bad.returncode == 2 and "InvalidTarget" in bad.stderr


def test_unknown_instance_id_is_undeliverable(web_db_fleet):
    rc, view, _ = run_json(web_db_fleet, "send", "RunShellScript", "-p", "commands=true", "-i", "db-1", "-i", "ghost")
    assert rc == 1
    invs = by_instance(view)
    assert invs["db-1"]["status"] == "Success"
    assert invs["ghost"]["status"] == "Undeliverable"


def test_instances_lists_tags_and_ping_status(web_db_fleet):
    rc, views, _ = run_json(web_db_fleet, "instances", "-t", "tag:role=web")
    assert rc == 0
    assert {v["instance_id"]: v["tags"]["role"] for v in views} == {"web-1": "web", "web-2": "web"}
    assert all(v["ping_status"] == "Online" and v["platform"] == "Linux" for v in views)
    table = web_db_fleet.cli("instances").stdout
    assert "db-1" in table and "role=db" in table and "Online" in table


def test_offline_agent_gets_command_when_it_comes_back(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    fleet.stop_agent("web-2")
    fleet.wait_status("web-2", "ConnectionLost")
    rc, sent, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo back", "-t", "tag:role=web", "--no-wait")
    assert rc == 0
    command_id = sent["command_id"]
    view = fleet.wait_invocations(command_id, "Success", ["web-1"])  # web-1 has run it; web-2 cannot have
    states = {i.instance_id: i.status for i in view.invocations}
    assert states == {"web-1": "Success", "web-2": "Pending"}
    fleet.restart_agent("web-2")
    view = fleet.client().wait(command_id, timeout=30)
    assert view.status == "Success"
    assert {i.instance_id: i.stdout for i in view.invocations} == {"web-1": "back\n", "web-2": "back\n"}


def test_broker_sigkill_with_commands_in_flight(web_db_fleet, tmp_path):
    """Broker killed with SIGKILL mid-command, restarted: nothing lost, nothing run twice."""
    fleet = web_db_fleet
    marks = tmp_path / "marks"
    marks.mkdir()
    script = f"echo run >> {marks}/$ZERORUN_INSTANCE_ID; sleep 1.5; echo finished"
    rc, sent, _ = run_json(fleet, "send", "RunShellScript", "-p", f"commands={script}", "-t", "tag:env",
                           "--no-wait")
    assert rc == 0
    instances = ("web-1", "web-2", "db-1")
    wait_until(lambda: all((marks / i).exists() for i in instances), "the step to start on every instance")
    fleet.kill_broker()
    for instance_id in instances:  # the agents finish while the broker is down; results wait in their outboxes
        fleet.wait_executed(instance_id, sent["command_id"])
    fleet.start_broker()
    view = fleet.client().wait(sent["command_id"], timeout=30)
    assert view.status == "Success", protocol.to_builtins(view)
    for inv in view.invocations:
        assert inv.stdout == "finished\n"
    for instance_id in instances:
        assert (marks / instance_id).read_text() == "run\n"
    # and the broker still works after the restart
    rc, again, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo ok", "-t", "tag:role=db")
    assert rc == 0 and again["invocations"][0]["stdout"] == "ok\n"


def test_agent_killed_mid_run_is_taken_back_and_never_reruns(web_db_fleet, tmp_path):
    """The step's supervisor outlives the agent: the restarted agent reports the real result
    (issue 19; the supervisor-lost cases are in test_supervisor.py)."""
    fleet = web_db_fleet
    mark = tmp_path / "mark"
    rc, sent, _ = run_json(fleet, "send", "RunShellScript", "-p", f"commands=echo run >> {mark}; sleep 3; echo done",
                           "-i", "db-1", "--no-wait")
    assert rc == 0
    wait_until(mark.exists, "the step to start on db-1")
    fleet.stop_agent("db-1", signal.SIGKILL)
    fleet.restart_agent("db-1")
    view = fleet.client().wait(sent["command_id"], timeout=30)
    inv = view.invocations[0]
    assert (inv.status, inv.exit_code, inv.stdout) == ("Success", 0, "done\n")
    # a later command on db-1 has run, so a re-run of the taken-back one would have started by now
    rc, later, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo later", "-i", "db-1")
    assert rc == 0 and later["invocations"][0]["stdout"] == "later\n"
    assert mark.read_text() == "run\n"


def test_cancel_stops_running_invocations(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    marks = tmp_path / "started"
    marks.mkdir()
    rc, sent, _ = run_json(fleet, "send", "RunShellScript", "-p",
                           f"commands=touch {marks}/$ZERORUN_INSTANCE_ID; sleep 30", "-t", "tag:role=web", "--no-wait")
    # InProgress says the agent took it; the step's process may not run yet (a cancel then ends
    # it "cancelled before it started", exit -1): wait until each step runs
    deadline = time.monotonic() + 20
    while {p.name for p in marks.iterdir()} != {"web-1", "web-2"}:
        assert time.monotonic() < deadline, "the steps never started"
        time.sleep(0.05)
    started = time.time()
    proc = fleet.cli("cancel", sent["command_id"])
    assert proc.returncode == 0, proc.stderr
    view = fleet.client().wait(sent["command_id"], timeout=20)
    assert time.time() - started < 10
    assert view.status == "Cancelled"
    assert {i.status for i in view.invocations} == {"Cancelled"}
    # amazon-ssm-agent's CommandStoppedPreemptivelyExitCode, whatever signal ended the step
    assert {i.exit_code for i in view.invocations} == {137}, view.invocations


def test_a_cancel_after_a_failed_step_leaves_the_invocation_failed(web_db_fleet, tmp_path):
    """amazon-ssm-agent's precedence (``contracts.DocumentResultAggregator``: Failed > TimedOut >
    Cancelled): the cancel stops the flow, and the step that failed before it still decides."""
    fleet = web_db_fleet
    marker = tmp_path / "second-started"
    doc = tmp_path / "fails-then-waits.yml"
    doc.write_text(f"""
schemaVersion: "2.2"
description: a failed step, then one that waits
mainSteps:
  - action: aws:runShellScript
    name: first
    inputs:
      runCommand: ["exit 3"]
  - action: aws:runShellScript
    name: second
    inputs:
      runCommand: ["touch {marker}", "sleep 30"]
  - action: aws:runShellScript
    name: third
    inputs:
      runCommand: ["echo never"]
""")
    rc, sent, _ = run_json(fleet, "send", "--document-file", str(doc), "-i", "db-1", "--no-wait")
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, "the second step never started"
        time.sleep(0.05)
    assert fleet.cli("cancel", sent["command_id"]).returncode == 0
    view = fleet.client().wait(sent["command_id"], timeout=20)
    inv = view.invocations[0]
    steps = {s.name: s for s in inv.steps}
    assert (steps["first"].status, steps["first"].exit_code) == ("Failed", 3)
    assert (steps["second"].status, steps["second"].exit_code) == ("Cancelled", 137)
    assert steps["third"].status == "Skipped"
    assert (inv.status, inv.status_details) == ("Failed", "step first failed")
    assert view.status == "Failed"


def test_execution_timeout_kills_the_process_group(web_db_fleet):
    rc, view, _ = run_json(web_db_fleet, "send", "RunShellScript", "-p", "commands=sleep 30 & sleep 30",
                           "-i", "db-1", "--execution-timeout", "1")
    assert rc == 1
    inv = view["invocations"][0]
    assert inv["status"] == "TimedOut" and inv["status_details"] == "ExecutionTimedOut"


def test_delivery_timeout(web_db_fleet):
    fleet = web_db_fleet
    fleet.stop_agent("db-1")
    rc, view, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=true", "-i", "db-1", "--timeout", "2")
    assert rc == 1
    inv = view["invocations"][0]
    assert inv["status"] == "TimedOut" and inv["status_details"] == "DeliveryTimedOut"


def test_commands_show_and_wait(web_db_fleet):
    fleet = web_db_fleet
    rc, sent, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo listed", "-t", "tag:role=db",
                           "--comment", "for the list")
    rc, listed, _ = run_json(fleet, "commands")
    assert rc == 0 and listed[0]["command_id"] == sent["command_id"] and listed[0]["target_count"] == 1
    rc, shown, _ = run_json(fleet, "show", sent["command_id"])
    assert shown["invocations"][0]["stdout"] == "listed\n" and shown["comment"] == "for the list"
    assert "echo listed" in shown["steps"][0]["script"]
    assert fleet.cli("wait", sent["command_id"]).returncode == 0
    missing = fleet.cli("show", "nope")
    assert missing.returncode == 2 and "NotFound" in missing.stderr


def test_send_and_wait_in_one_request(web_db_fleet):
    client = web_db_fleet.client()
    quick = client.send("RunShellScript", {"commands": ["echo at once"]}, ["tag:role=db"], wait=20)
    assert quick.status == "Success" and quick.invocations[0].stdout == "at once\n"
    slow = client.send("RunShellScript", {"commands": ["sleep 2; echo late"]}, ["tag:role=db"], wait=0.3)
    assert slow.status in ("Pending", "InProgress")  # answered when the wait ran out; it goes on
    assert client.wait(slow.command_id, timeout=20).invocations[0].stdout == "late\n"


def test_malformed_frames_do_not_stop_the_broker(web_db_fleet, tmp_path):
    import socket as pysocket

    import zmq

    from zerorun import keys
    from zerorun.client import ClientConfig

    fleet = web_db_fleet
    runtime = fleet.runtime()
    config = ClientConfig.load(fleet.client_config)
    ctx = zmq.Context()
    try:
        # 1. an authenticated client sending garbage of every shape
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            config.broker_public_key, config.public_key, config.secret_key)
        sock.connect(runtime["client_endpoint"])
        bad = [[b"junk"], [protocol.HEADER, b"\xc1\xff"], [b"ZRN\x00", protocol.encode(protocol.Ping())],
               [protocol.HEADER, protocol.encode({"op": "nope", "rid": 1})],
               [protocol.HEADER, protocol.encode({"op": "send", "rid": "x", "targets": 5})],
               [protocol.HEADER, b"x", b"y", b"z"]]
        for frames in bad:
            sock.send_multipart(frames)
        replies = 0
        while sock.poll(2000):
            sock.recv_multipart()
            replies += 1
            if replies >= 4:
                break
        assert replies >= 3  # decodable-but-wrong requests get a BadRequest answer
        sock.close(0)
        # 2. an accepted agent key sending garbage on the agent endpoint
        agent_public, agent_secret = keys.load_secret(fleet.agent_dir("db-1") / "agent.key_secret")
        agent_sock = ctx.socket(zmq.DEALER)
        agent_sock.linger = 0
        agent_sock.curve_serverkey, agent_sock.curve_publickey, agent_sock.curve_secretkey = (
            config.broker_public_key, agent_public, agent_secret)
        agent_sock.connect(runtime["agent_endpoint"])
        for frames in bad + [[protocol.HEADER, protocol.encode(protocol.Results([
                protocol.InvocationResult("not-a-real-invocation", "Success")]))]]:
            agent_sock.send_multipart(frames)
        agent_sock.close(0)
        # 3. raw bytes on both TCP ports, no ZMTP at all
        for endpoint in (runtime["client_endpoint"], runtime["agent_endpoint"]):
            host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
            with pysocket.create_connection((host, int(port)), timeout=2) as raw:
                raw.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
    finally:
        ctx.term()
    wait_until(lambda: "dropped client message" in fleet.broker_log() or fleet.broker.poll() is not None,
               "the broker to drop the malformed client messages")
    assert fleet.broker.poll() is None, "broker died"
    assert fleet.cli("ping").returncode == 0
    rc, view, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo still", "-t", "tag:role=db")
    assert rc == 0 and view["invocations"][0]["stdout"] == "still\n"
    assert "dropped client message" in fleet.broker_log()


def test_unknown_client_key_is_refused(fleet, tmp_path):
    from zerorun import keys

    keys.create_keypair(tmp_path / "intruder", "intruder")
    config = tmp_path / "intruder.yaml"
    runtime = fleet.runtime()
    config.write_text(f"endpoint: {runtime['client_endpoint']}\nbroker_public_key: \"{runtime['broker_public_key']}\"\n"
                      f"client_key_file: {tmp_path / 'intruder' / 'intruder.key_secret'}\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "-c", str(config), "instances"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "refused this client's key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_agent_claiming_accepted_instance_id_is_denied(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    import subprocess
    import sys

    impostor_log = open(tmp_path / "impostor.log", "wb")
    impostor = subprocess.Popen(
        [sys.executable, "-m", "agent", "--broker", fleet.agent_endpoint, "--broker-key", str(fleet.broker_key),
         "--instance-id", "db-1", "--tag", "role=db", "--state-dir", str(tmp_path / "impostor"),
         "--heartbeat-interval", "0.5"], stdout=impostor_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and "denied" not in (tmp_path / "impostor.log").read_text():
            time.sleep(0.1)
        assert "is bound to another key" in (tmp_path / "impostor.log").read_text()
        rc, keys_view, _ = run_json(fleet, "keys")
        states = sorted((k["name"], k["state"]) for k in keys_view if k["kind"] == "agent")
        assert ("db-1", "accepted") in states and ("db-1", "denied") in states
        # the real db-1 still gets db-1's commands
        rc, view, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo real", "-i", "db-1")
        assert rc == 0 and view["invocations"][0]["stdout"] == "real\n"
        real_fp = next(v["key_fingerprint"] for v in run_json(fleet, "instances")[1] if v["instance_id"] == "db-1")
        assert real_fp in {k["fingerprint"] for k in keys_view if k["state"] == "accepted"}
    finally:
        impostor.terminate()
        impostor.wait(10)
        impostor_log.close()


def test_pending_keys_must_be_accepted(fleet_factory):
    fleet = fleet_factory("manual", auto_accept=False)
    fleet.start_broker()
    fleet.start_agent("app-1", {"role": "app"})
    deadline = time.time() + 20
    while True:
        rc, views, _ = run_json(fleet, "keys")
        if any(k["name"] == "app-1" and k["state"] == "pending" for k in views):
            break
        assert time.time() < deadline, views
        time.sleep(0.2)
    assert fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "tag:role=app").returncode == 2
    accepted = fleet.cli("keys", "accept", "app-1")
    assert accepted.returncode == 0 and "accepted" in accepted.stdout
    fleet.wait_online(["app-1"], timeout=20)
    rc, view, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo accepted", "-t", "tag:role=app")
    assert rc == 0 and view["invocations"][0]["stdout"] == "accepted\n"
    # reject cuts it off; delete lets it come back as pending
    assert fleet.cli("keys", "reject", "app-1").returncode == 0
    assert fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "tag:role=app").returncode == 2


def test_broker_down_is_a_clear_error(web_db_fleet):
    fleet = web_db_fleet
    fleet.stop_broker()
    proc = fleet.cli("--request-timeout", "1", "instances")
    assert proc.returncode == 3
    assert "no answer from the broker" in proc.stderr and "Traceback" not in proc.stderr


def test_ssm_step_flow_and_exit_codes(web_db_fleet, tmp_path):
    doc = tmp_path / "flow.yml"
    doc.write_text("""
schemaVersion: "2.2"
description: step flow
mainSteps:
  - action: aws:runShellScript
    name: first
    inputs:
      runCommand: ["echo one", "exit 2"]
  - action: aws:runShellScript
    name: second
    inputs:
      runCommand: ["echo two; exit 168"]
  - action: aws:runShellScript
    name: third
    inputs:
      runCommand: ["echo never"]
  - action: aws:runPowerShellScript
    name: windowsOnly
    precondition:
      StringEquals: [platformType, Windows]
    inputs:
      runCommand: ["Write-Host no"]
""")
    rc, view, _ = run_json(web_db_fleet, "send", "--document-file", str(doc), "-i", "db-1")
    inv = view["invocations"][0]
    steps = {s["name"]: s for s in inv["steps"]}
    assert steps["first"]["status"] == "Failed" and steps["first"]["exit_code"] == 2
    assert steps["second"]["status"] == "Success" and steps["second"]["exit_code"] == 168
    assert steps["third"]["status"] == "Skipped"
    assert steps["windowsOnly"]["status"] == "Skipped"
    assert inv["status"] == "Failed" and rc == 1
    assert inv["stdout"] == "one\ntwo\n"
