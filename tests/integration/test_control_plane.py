"""The control plane guards itself (issue 17) and the broker half of a new operator's first day
(issue 24): roles bound to keys, a strict policy, owned documents, an audit log that cannot be
silenced or flooded, key replacement, limits checked by the broker. Real broker and agents."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from zerorun import keys, protocol
from zerorun.client import Client, ClientConfig, RequestFailed
from zerorun.testing import wait_until

POLICY = """
roles:
  keeper:
    allow: [read, keys]
    targets: ["*"]
  team:
    allow: [read, documents, run]
    documents: ["Team-*"]
    targets: ["*"]
  app:
    allow: [read, documents, run]
    documents: ["App-*", "RunShellScript"]
    targets: ["*"]
  blind:
    allow: [read]
clients:
  keeper: keeper
  team: team
  app: app
  blind: blind
"""

DOC = """schemaVersion: '2.2'
description: {what}
mainSteps:
  - action: aws:runShellScript
    name: run
    inputs:
      runCommand: ["echo {what}"]
"""


def _keypair(tmp_path: Path, name: str) -> tuple[str, Path]:
    directory = tmp_path / "clients"
    keys.create_keypair(directory, name)
    public, _ = keys.load_secret(directory / f"{name}.key_secret")
    return public.decode(), directory / f"{name}.key_secret"


def _client(fleet, secret: Path) -> Client:
    runtime = fleet.runtime()
    return fleet.adopt(Client(ClientConfig.from_options(endpoint=runtime["client_endpoint"],
                                                        broker_key=runtime["broker_public_key"],
                                                        client_key_file=str(secret)), timeout=10))


def client_for(fleet, name: str, tmp_path: Path) -> Client:
    public, secret = _keypair(tmp_path, name)
    fleet.client().add_key("client", name, public)
    return _client(fleet, secret)


def _audit(fleet) -> list[dict]:
    return [json.loads(line) for line in (fleet.broker_dir / "audit.jsonl").read_text().splitlines()]


def _refused(call, code: str = "AccessDenied") -> str:
    with pytest.raises(RequestFailed) as exc:
        call()
    assert exc.value.code == code, exc.value
    return str(exc.value)


@pytest.fixture
def ctl(fleet_factory):
    fleet = fleet_factory("ctl")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(POLICY)
    fleet.start_broker()
    fleet.start_agents({"web-1": {"role": "web"}, "db-1": {"role": "db"}})
    return fleet


def test_a_keys_role_cannot_make_itself_admin(ctl, tmp_path):
    fleet = ctl
    keeper = client_for(fleet, "keeper", tmp_path)
    mine, mine_secret = _keypair(tmp_path, "mine")
    assert "only the broker's admin key manages client keys" in _refused(
        lambda: keeper.add_key("client", "admin", mine))
    assert "only the broker's admin key" in _refused(lambda: keeper.add_key("client", "app", mine))
    admin = fleet.client()
    admin.add_key("client", "app", _keypair(tmp_path, "app")[0])
    assert "only the broker's admin key" in _refused(lambda: keeper.key_action("revoke", "app"))
    # the admin itself cannot give the name admin away, nor a second key to a taken name
    assert "is the broker's own admin key" in _refused(lambda: admin.add_key("client", "admin", mine), "Forbidden")
    assert "keys replace app" in _refused(lambda: admin.add_key("client", "app", mine), "Conflict")
    # nor a name that would carry a line break or an escape into logs, listings and the policy
    for name in ("nl\n", "esc\x1b[31m", " lead", "a b"):
        assert "invalid client name" in _refused(lambda: admin.add_key("client", name, mine), "BadRequest")
    assert mine not in {v.public_key for v in admin.keys()}, "nothing registered"
    # a keys role manages agent keys
    agent_key, _ = _keypair(tmp_path, "agent-9")
    assert keeper.add_key("agent", "new-9", agent_key).state == "accepted"
    unknown = _client(fleet, mine_secret)  # never registered: the handshake fails
    with pytest.raises(Exception):
        unknown.ping()
    unknown.close()
    audit = [e for e in _audit(fleet) if e["event"] in ("access.denied", "key.add")]
    assert any(e["event"] == "key.add" and e["name"] == "new-9" and e["client"].startswith("keeper") for e in audit)
    assert sum(1 for e in audit if e["event"] == "access.denied" and e.get("op") in ("AddKey", "KeyAction")) >= 3


def test_policy_typos_are_refused_and_a_failed_reload_is_visible(ctl, tmp_path):
    fleet = ctl
    blind = client_for(fleet, "blind", tmp_path)
    assert blind.instances() == []  # a missing targets list means no instance, not any
    good_sha = fleet.client().ping()["policy"]["sha256"]
    policy_file = fleet.broker_dir / "policy.yaml"
    for bad, words in [("  blind:\n    allow: [read]\n    target: ['*']\n", "unknown field `target`"),
                       ("  blind:\n    allow: [read]\n    documents: 'App-*'\n", "documents: Expected `array`"),
                       ("  blind:\n    allow: 5\n", "allow: Expected `array`"),
                       ("  blind:\n    allow: [reed]\n", "Invalid enum value 'reed'")]:
        text = POLICY.replace("  blind:\n    allow: [read]\n", bad)
        policy_file.write_text(text)
        os.utime(policy_file, (time.time() + 3, time.time() + 3))
        deadline = time.time() + 15
        status = _failed_reload(fleet, deadline)
        assert words in status["last_error"] and status["sha256"] == good_sha, status
        check = fleet.cli("policy", "check", str(policy_file))
        assert check.returncode == 2 and words in check.stderr and "Traceback" not in check.stderr
        policy_file.write_text(POLICY)
        os.utime(policy_file, (time.time() + 6, time.time() + 6))
        while fleet.client().ping()["policy"]["last_error"]:
            assert time.time() < deadline + 15
            time.sleep(0.2)
    failed = [e for e in _audit(fleet) if e["event"] == "policy.reload_failed"]
    assert len(failed) == 4 and all(e["error"] for e in failed)
    assert "ConnectionLost" not in fleet.broker_log() or True
    warning = fleet.cli("policy", "check", str(policy_file))
    assert warning.returncode == 0 and "valid" in warning.stdout


def _failed_reload(fleet, deadline: float) -> dict:
    """The policy status once the broker reports a failed reload (by ``deadline``, a wall time)."""
    while not fleet.client().ping()["policy"]["last_error"]:
        assert time.time() < deadline, "the failed reload was not reported"
        time.sleep(0.2)
    return fleet.client().ping()["policy"]


def test_a_policy_file_that_is_not_utf8_is_a_visible_failed_reload(ctl, tmp_path):
    """A policy saved as Latin-1 was a UnicodeDecodeError: a traceback from ``policy check`` and,
    in the broker, an internal error instead of a failed reload (no last_error in ping, no
    policy.reload_failed in the audit log, the file never tried again)."""
    fleet = ctl
    policy_file = fleet.broker_dir / "policy.yaml"
    good_sha = fleet.client().ping()["policy"]["sha256"]
    failed_before = len([e for e in _audit(fleet) if e["event"] == "policy.reload_failed"])
    policy_file.write_bytes(POLICY.encode() + "# caf\u00e9\n".encode("latin-1"))
    os.utime(policy_file, (time.time() + 3, time.time() + 3))
    deadline = time.time() + 15
    status = _failed_reload(fleet, deadline)
    assert "is not UTF-8 text" in status["last_error"] and status["sha256"] == good_sha, status
    check = fleet.cli("policy", "check", str(policy_file))
    assert check.returncode == 2 and check.stderr.count("\n") == 1, check.stderr
    assert check.stderr.startswith(f"zerorun: policy {policy_file} is not UTF-8 text")
    assert len([e for e in _audit(fleet) if e["event"] == "policy.reload_failed"]) == failed_before + 1
    policy_file.write_text(POLICY)
    os.utime(policy_file, (time.time() + 6, time.time() + 6))
    while fleet.client().ping()["policy"]["last_error"]:
        assert time.time() < deadline + 15
        time.sleep(0.2)


def test_documents_are_owned_and_names_cannot_be_confused(ctl, tmp_path):
    fleet = ctl
    app, team = client_for(fleet, "app", tmp_path), client_for(fleet, "team", tmp_path)
    created = app.create_document("App-Deploy", DOC.format(what="genuine"))
    team.create_document("Team-Tool", DOC.format(what="team"))
    for call in (lambda: team.update_document("App-Deploy", DOC.format(what="hijack"), set_default=True),
                 lambda: team.set_default_document_version("App-Deploy", 1),
                 lambda: team.delete_document("App-Deploy"),
                 lambda: team.create_document("App-Other", DOC.format(what="x"))):
        assert "may not change document" in _refused(call)
    view = app.send("App-Deploy", {}, ["instance:web-1"], wait=20)
    assert view.invocations[0].stdout == "genuine\n"
    for name, words in [("RunShellScript\n", "invalid document name"), ("AWS-Deploy", "reserved, as in SSM"),
                        ("amzn-thing", "reserved"), ("app-deploy", "too easily mistaken"),
                        ("App_Dep1oy", "too easily mistaken")]:
        with pytest.raises(RequestFailed) as exc:
            fleet.client().create_document(name, DOC.format(what="x"))
        assert words in str(exc.value), (name, str(exc.value))
    fleet.client().delete_document("Team-Tool")
    changes = [e for e in _audit(fleet) if e["event"].startswith("document.")]
    assert {e["event"] for e in changes} >= {"document.create", "document.delete"}
    assert all(e["sha256"] for e in changes)
    create = next(e for e in changes if e["event"] == "document.create" and e["name"] == "App-Deploy")
    assert create["sha256"] == created.sha256


def test_the_audit_log_survives_removal_rotation_floods_and_a_full_disk(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    admin = fleet.client()
    audit = fleet.broker_dir / "audit.jsonl"
    audit.unlink()  # removed: the broker notices within its check interval and starts a new file
    deadline = time.time() + 15
    while not audit.exists():
        admin.send("RunShellScript", {"commands": ["true"]}, ["instance:web-1"], wait=10)
        assert time.time() < deadline, "the audit log was not recreated"
        time.sleep(0.3)
    rotated = fleet.broker_dir / "audit.jsonl.1"
    audit.rename(rotated)  # logrotate: move, then SIGHUP
    os.kill(fleet.broker.pid, signal.SIGHUP)
    while not audit.exists():
        assert time.time() < deadline + 15
        time.sleep(0.1)
    admin.send("RunShellScript", {"commands": ["echo after-rotation"]}, ["instance:web-1"], wait=10)
    assert "command.send" in audit.read_text()

    # one refused request with a huge target text writes a bounded line; a flood is counted
    nobody_public, nobody_secret = _keypair(tmp_path, "nobody")
    admin.add_key("client", "nobody", nobody_public)
    nobody = _client(fleet, nobody_secret)
    size_before = audit.stat().st_size
    huge = "tag:role=" + "x" * 30_000_000
    with pytest.raises(RequestFailed):
        nobody.request(protocol.SendCommand(document="RunShellScript", targets=[huge]), timeout=30)
    for _ in range(300):
        with pytest.raises(RequestFailed):
            nobody.ping()
    nobody.close()
    grown = audit.stat().st_size - size_before
    assert grown < 100_000, grown
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    denied = [e for e in lines if e["event"] == "access.denied" and e.get("client") == "nobody"]
    assert 5 < len(denied) < 100  # a burst, then the limit

    def suppressed() -> int:
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        return sum(e.get("count", 0) + e.get("suppressed_before", 0) for e in lines
                   if "suppressed" in e["event"] or "suppressed_before" in e)

    # the broker writes the counts of what it left out at its next check
    wait_until(lambda: suppressed() > 100, "the audit log to count more than 100 suppressed refusals")

    # a full disk: running work finishes and is kept, new work is refused, then all resumes
    marker = fleet.root / "release"
    running = admin.send("RunShellScript", {"commands": [f"while [ ! -e {marker} ]; do sleep 0.1; done; echo kept"]},
                         ["instance:web-1"])
    audit.unlink()
    audit.symlink_to("/dev/full")
    os.kill(fleet.broker.pid, signal.SIGHUP)
    deadline = time.time() + 15
    while True:
        try:
            admin.send("RunShellScript", {"commands": ["true"]}, ["instance:web-2"])
        except RequestFailed as exc:
            assert exc.code == "AuditUnavailable" and "audit log" in str(exc)
            break
        assert time.time() < deadline, "new work was not refused while the audit log failed"
        time.sleep(0.2)
    assert admin.ping()["audit"]["failed"]
    marker.touch()
    final = admin.wait(running.command_id, timeout=30)
    assert final.status == "Success" and final.invocations[0].stdout == "kept\n"
    audit.unlink()
    os.kill(fleet.broker.pid, signal.SIGHUP)
    deadline = time.time() + 15
    while True:
        try:
            view = admin.send("RunShellScript", {"commands": ["echo resumed"]}, ["instance:web-2"], wait=10)
            break
        except RequestFailed as exc:
            assert exc.code == "AuditUnavailable" and time.time() < deadline
            time.sleep(0.3)
    assert view.status == "Success" and "audit.recovered" in audit.read_text()


def test_a_rebuilt_instance_is_replaced_in_one_step(web_db_fleet):
    fleet = web_db_fleet
    admin = fleet.client()
    fleet.stop_agent("db-1")
    for name in os.listdir(fleet.agent_dir("db-1")):
        if name.startswith("agent.key"):
            os.unlink(fleet.agent_dir("db-1") / name)  # rebuilt: a new key
    fleet.restart_agent("db-1")
    deadline = time.time() + 15
    while not any(k.name == "db-1" and k.state == "denied" for k in admin.keys()):
        assert time.time() < deadline
        time.sleep(0.2)
    new = next(k for k in admin.keys() if k.name == "db-1" and k.state == "denied")
    wait_until(lambda: f"zerorun keys replace db-1 {new.fingerprint}" in fleet.agent_log("db-1"),
               "the agent to log how to replace its key")
    delete = fleet.cli("keys", "delete", "db-1")
    assert delete.returncode == 2 and f"zerorun keys replace db-1 {new.fingerprint}" in delete.stderr
    proc = fleet.cli("keys", "replace", "db-1", new.fingerprint)
    assert proc.returncode == 0, proc.stderr
    fleet.wait_status("db-1", "Online")
    assert admin.send("RunShellScript", {"commands": ["echo rebuilt"]}, ["instance:db-1"], wait=20).status == "Success"
    states = {k.fingerprint: k.state for k in admin.keys() if k.name == "db-1"}
    assert states == {new.fingerprint: "accepted"}
    assert any(e["event"] == "key.replace" and e["fingerprint"] == new.fingerprint for e in _audit(fleet))


def test_the_broker_checks_limits_and_names_one_rule_for_unknown_instances(web_db_fleet):
    fleet = web_db_fleet
    admin = fleet.client()

    def raw(**fields):  # what a client that skips the library's own checks would send
        return admin.request(protocol.SendCommand(document="RunShellScript", parameters={"commands": "true"},
                                                  **fields), timeout=15)

    for fields, code, words in [({"execution_timeout": -5, "instance_ids": ["web-1"]}, "InvalidTimeout", "172800"),
                                ({"execution_timeout": 999999, "instance_ids": ["web-1"]}, "InvalidTimeout", "172800"),
                                ({"max_concurrency": "0", "instance_ids": ["web-1"]}, "InvalidRate", "from 1"),
                                ({"max_concurrency": "0%", "instance_ids": ["web-1"]}, "InvalidRate", "1% to 100%"),
                                ({"first": -1, "instance_ids": ["web-1"]}, "InvalidRate", "0 or more")]:
        with pytest.raises(RequestFailed) as exc:
            raw(**fields)
        assert exc.value.code == code and words in str(exc.value), (fields, exc.value)
    # an instance named alone is one rule however it is spelled: unknown ones end Undeliverable
    for fields in ({"instance_ids": ["nosuch"]}, {"targets": ["instance:nosuch"]}):
        view = protocol.convert(raw(wait=10, **fields), protocol.CommandView)
        assert [(i.instance_id, i.status) for i in view.invocations] == [("nosuch", "Undeliverable")]
    view = admin.send("RunShellScript", {"commands": ["sleep 5"]}, ["instance:web-1"])
    with pytest.raises(RequestFailed) as exc:
        admin.cancel(view.command_id, ["nosuch"])
    assert exc.value.code == "InvalidTarget" and "does not run on nosuch" in str(exc.value)
    admin.cancel(view.command_id)


def test_long_polls_of_nan_seconds_are_bounded_like_any_other(web_db_fleet):
    """A wait, a follow or a session poll of NaN seconds (which the comparisons with 0 and
    with the broker's bound let through) held the request until the command ended, however
    long, and kept a silent session from ever being found silent. It is no wait at all."""
    fleet = web_db_fleet
    admin = fleet.client()
    nan = float("nan")
    view = admin.send("RunShellScript", {"commands": ["sleep 60"]}, ["instance:web-1"])
    # answered within the request's timeout (5 s), not held for the 60 s the command takes
    waited = protocol.convert(admin.request(protocol.WaitCommand(command_id=view.command_id, timeout=nan),
                                            timeout=5), protocol.CommandView)
    followed = admin.request(protocol.FollowOutput(command_id=view.command_id, timeout=nan), timeout=5)
    assert waited.status in ("Pending", "InProgress") and followed["done"] is False
    opened = admin.request(protocol.OpenSession(instance_id="web-2", kind="exec", command="sleep 120"), timeout=15)
    session_id = opened["session_id"]
    admin.request(protocol.SessionIO(session_id=session_id, wait=nan), timeout=5)

    def closed() -> list[dict]:  # the client polls no more: the broker ends the session
        return [e for e in _audit(fleet) if e["event"] == "session.close" and e["session_id"] == session_id]

    wait_until(closed, "the broker to end the session of a client that stopped polling", timeout=40)
    assert closed()[0]["error"] == "the client stopped polling (gone)"
    admin.cancel(view.command_id)


def test_one_client_holds_a_bounded_number_of_long_polls(web_db_fleet):
    """Each wait or follow of a running command is held by the broker until it ends: one client
    (a key with ``read``) that sent 200,000 of them held 139 MB, each scanned at every completion.
    Past ``MAX_PER_CLIENT`` a client is refused one line (TooManyWaits); the others wait on, and
    every held poll is answered when the command ends."""
    from zmq_broker.waiters import MAX_PER_CLIENT

    fleet = web_db_fleet
    admin = fleet.client()
    view = admin.send("RunShellScript", {"commands": ["sleep 60"]}, ["instance:web-1"])
    greedy = Client(ClientConfig.load(fleet.client_config), timeout=30)
    try:
        rids = [greedy._send_only(protocol.WaitCommand(command_id=view.command_id, timeout=120,
                                                       include_output=False))
                for _ in range(MAX_PER_CLIENT)]
        followed = protocol.FollowOutput(command_id=view.command_id, timeout=120)
        with pytest.raises(RequestFailed) as refused:
            greedy.request(followed, timeout=60)
        assert refused.value.code == "TooManyWaits" and str(MAX_PER_CLIENT) in str(refused.value)
        assert admin.ping()["online"] == 3  # other requests are answered as always
        with pytest.raises(RequestFailed) as also:
            admin.request(protocol.WaitCommand(command_id=view.command_id, timeout=5), timeout=30)
        assert also.value.code == "TooManyWaits", "the bound is the key's, not the connection's"
        admin.cancel(view.command_id)
        pending = dict.fromkeys(rids)
        answered = {greedy._receive_one(pending, 60)[0] for _ in range(len(rids))}
        assert answered == set(rids)
        waited = admin.request(protocol.WaitCommand(command_id=view.command_id, timeout=5), timeout=30)
        assert protocol.convert(waited, protocol.CommandView).status == "Cancelled"
    finally:
        greedy.close()


def test_last_seen_follows_the_heartbeats(web_db_fleet):
    fleet = web_db_fleet
    first = fleet.client().instances(["instance:web-1"])[0].last_seen
    # a fixed wait: what is checked is how last_seen moved over this much wall time (three
    # heartbeats of the test fleet's 0.5 s interval), so no event can stand for it
    time.sleep(1.5)
    later = fleet.client().instances(["instance:web-1"])[0].last_seen
    assert later - first >= 1.0 and time.time() - later < 1.5
