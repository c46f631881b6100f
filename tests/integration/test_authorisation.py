"""Authorisation against hostile clients and agents (issue 16), with a real broker and agents.

Each test plays the attacker: a restricted client key, a raw CURVE socket where the CLI would not
send such a thing, or an accepted agent key trying to take another instance's traffic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from zerorun import keys, protocol
from zerorun.client import Client, ClientConfig, RequestFailed
from zerorun.protocol import Target

from tests import raw_agent_support as raw_agent

POLICY = """
roles:
  devs:
    allow: [read, run, cancel]
    documents: ["*"]
    targets: ["tag:env=dev*"]
  webops:
    allow: [read, run, cancel, exec]
    documents: ["*"]
    targets: ["instance:web-*"]
  webtag:
    allow: [read, run, cancel, exec]
    documents: ["*"]
    targets: ["tag:role=web"]
clients:
  dev-bot: devs
  web-bot: webops
  tag-bot: webtag
"""


def client_for(fleet, name: str, tmp_path: Path) -> Client:
    return fleet.add_client(name, tmp_path / "clients")


@pytest.fixture
def scoped(fleet_factory, tmp_path):
    fleet = fleet_factory("scoped")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(POLICY)
    fleet.start_broker()
    fleet.start_agents({"web-1": {"role": "web", "env": "prod"}, "web-2": {"role": "web", "env": "dev"},
                        "db-1": {"role": "db", "env": "prod"}})
    clients = {name: client_for(fleet, name, tmp_path) for name in ("dev-bot", "web-bot", "tag-bot")}
    yield fleet, clients
    for c in clients.values():
        c.close()


def _audit(fleet) -> list[dict]:
    return [json.loads(line) for line in (fleet.broker_dir / "audit.jsonl").read_text().splitlines()]


def _denied(call) -> str:
    with pytest.raises(RequestFailed) as exc:
        call()
    assert exc.value.code == "AccessDenied", exc.value
    return str(exc.value)


def test_scope_holds_against_the_instances_reached_not_the_text(scoped):
    fleet, c = scoped
    cmd = {"commands": ["echo ran"]}
    # "tag:env=dev*" once matched the whole text "tag:env=dev,prod": it reached env=prod
    reason = _denied(lambda: c["dev-bot"].send("RunShellScript", cmd, ["tag:env=dev,prod"]))
    assert reason.endswith("outside its scope (tag:env=dev*): db-1, web-1")
    # the same as text, the way a client that predates typed targets sends it
    reason = _denied(lambda: c["dev-bot"].request(protocol.SendCommand(
        document="RunShellScript", parameters=cmd, targets=["tag:env=dev,prod"])))
    assert "db-1, web-1" in reason
    view = c["dev-bot"].send("RunShellScript", cmd, ["tag:env=dev"], wait=20)
    assert view.status == "Success" and [i.instance_id for i in view.invocations] == ["web-2"]

    # "instance:web-*" once matched "instance:web-1,db-1"
    reason = _denied(lambda: c["web-bot"].send("RunShellScript", cmd, ["instance:web-1,db-1"]))
    assert reason.endswith(": db-1")
    # and instance ids with a separator inside are not ids at all
    with pytest.raises(RequestFailed) as exc:
        c["web-bot"].request(protocol.SendCommand(document="RunShellScript", parameters=cmd,
                                                  instance_ids=["web-1,db-1"]))
    assert exc.value.code == "InvalidTarget" and "invalid instance id 'web-1,db-1'" in str(exc.value)

    # a role scoped by tag may name an instance that carries the tag (the connection plugin does)
    view = c["tag-bot"].send("RunShellScript", cmd, ["instance:web-1"], wait=20)
    assert view.status == "Success"
    assert c["tag-bot"].exec("web-1", "echo exec-ok").stdout == b"exec-ok\n"
    assert "db-1" in _denied(lambda: c["tag-bot"].exec("db-1", "cat /etc/hostname"))
    with pytest.raises(RequestFailed) as exc:
        c["tag-bot"].fetch_file("db-1", "/etc/hostname", fleet.root / "stolen")
    assert exc.value.code == "AccessDenied"
    assert not (fleet.root / "stolen").exists()

    denied = [e for e in _audit(fleet) if e["event"] == "access.denied"]
    assert len(denied) >= 5 and all("outside its scope" in e["reason"] for e in denied)


def test_reads_follows_and_cancels_stay_inside_the_scope(scoped):
    fleet, c = scoped
    admin = fleet.client()
    marker = fleet.root / "db-marker"
    theirs = admin.send("RunShellScript", {"commands": [f"echo secret-db; sleep 5; touch {marker}"]},
                        ["tag:role=db"])
    mine = c["tag-bot"].send("RunShellScript", {"commands": ["echo mine"]}, ["tag:role=web"], wait=20)
    bot = c["tag-bot"]
    for name, call in [("show", lambda: bot.get_command(theirs.command_id)),
                       ("wait", lambda: bot.wait(theirs.command_id, timeout=1)),
                       ("follow", lambda: bot.follow(theirs.command_id, timeout=1)),
                       ("cancel", lambda: bot.cancel(theirs.command_id))]:
        assert "may not see command" in _denied(call), name
    assert theirs.command_id not in {v.command_id for v in bot.commands(limit=100)}
    assert mine.command_id in {v.command_id for v in bot.commands(limit=100)}
    assert {i.instance_id for i in bot.instances()} == {"web-1", "web-2"}
    assert bot.get_command(mine.command_id).invocations[0].stdout == "mine\n"
    # the cancel was refused: the command runs to its end
    final = admin.wait(theirs.command_id, timeout=30)
    assert final.status == "Success" and marker.exists()
    # a client always sees what it sent itself, even once its scope no longer covers it
    (fleet.broker_dir / "policy.yaml").write_text(POLICY.replace('targets: ["tag:role=web"]',
                                                                 'targets: ["tag:role=nothing"]'))
    fleet.client().ping()
    deadline = time.time() + 15
    while {i.instance_id for i in bot.instances()} and time.time() < deadline:
        time.sleep(0.3)
    assert bot.instances() == []
    assert bot.get_command(mine.command_id).status == "Success"
    refused = [e for e in _audit(fleet) if e["event"] == "access.denied" and e.get("command_id") == theirs.command_id]
    assert {e["op"] for e in refused} == {"GetCommand", "WaitCommand", "FollowOutput", "CancelCommand"}


def _raw_agent(fleet, key_dir: Path, routing_id: bytes | None = None) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    return ctx, raw_agent.connect(ctx, fleet.runtime(), key_dir, routing_id)


def test_the_key_list_stays_inside_the_scope(scoped):
    """``read`` shows the key list within the scope, as it shows instances: a restricted role
    does not learn the ids, tags and proposals of the instances outside it from ``keys list``."""
    fleet, c = scoped
    assert {k.name for k in fleet.client().keys() if k.kind == "agent"} == {"web-1", "web-2", "db-1"}
    for name, seen in (("dev-bot", {"web-2"}), ("web-bot", {"web-1", "web-2"}), ("tag-bot", {"web-1", "web-2"})):
        assert {k.name for k in c[name].keys() if k.kind == "agent"} == seen, name
        assert {i.instance_id for i in c[name].instances()} == seen, name


def test_a_stale_routing_id_receives_nothing(web_db_fleet):
    """The victim's connection goes away; an accepted agent connects with the victim's routing id
    at once and waits: the broker ends the victim's session when its connection closes, so no
    delivery and no exec for the victim ever reaches the other connection."""
    fleet = web_db_fleet
    fleet.stop_agent("db-1")
    stolen_rid = b"\x00victim"
    ctx, victim = _raw_agent(fleet, fleet.agent_dir("db-1"), stolen_rid)
    try:
        victim.send_multipart(protocol.frames(protocol.Hello(instance_id="db-1", tags={"role": "db", "env": "prod"})))
        assert any(isinstance(m, protocol.Welcome) for m in raw_agent.receive(victim, 3, until=protocol.Welcome))
        assert fleet.client().instances(["instance:db-1"])[0].ping_status == "Online"
    finally:
        victim.close(0)
        ctx.term()
    actx, attacker = _raw_agent(fleet, fleet.agent_dir("web-1"), stolen_rid)  # web-1's accepted key
    if True:
        try:
            deadline = time.time() + 1.0  # well inside the liveness window (3 x 0.5 s heartbeats)
            while fleet.client().instances(["instance:db-1"])[0].ping_status == "Online":
                assert time.time() < deadline, "the broker did not notice the closed connection at once"
                time.sleep(0.02)
            view = fleet.client().send("RunShellScript", {"commands": ["echo for-db-only"]}, ["instance:db-1"])
            with pytest.raises(RequestFailed) as exc:
                fleet.client().exec("db-1", "echo exec-for-db-only")
            assert exc.value.code == "AgentUnavailable"
            # the attacker also speaks on the stolen id: not the session's connection
            attacker.send_multipart(protocol.frames(protocol.Heartbeat()))
            received = raw_agent.receive(attacker, 2.0)
            assert not [m for m in received if isinstance(m, (protocol.Deliver, protocol.AgentExec))], received
            assert all(isinstance(m, protocol.PleaseHello) for m in received), received
            assert fleet.client().get_command(view.command_id).invocations[0].status == "Pending"
        finally:
            attacker.close(0)
            actx.term()
    fleet.restart_agent("db-1")
    assert fleet.client().wait(view.command_id, timeout=30).invocations[0].stdout == "for-db-only\n"


def _denied_at_hello(fleet, tmp_path: Path, hello: protocol.Hello, problem: str) -> None:
    """Says ``hello`` with a new key, on a raw socket: the broker answers Denied, naming ``problem``."""
    keys.create_keypair(tmp_path / "evil", "agent")
    ctx, sock = _raw_agent(fleet, tmp_path / "evil")
    try:
        sock.send_multipart(protocol.frames(hello))
        answers = raw_agent.receive(sock, 2.0, until=protocol.Denied)
    finally:
        sock.close(0)
        ctx.term()
    denied = [m for m in answers if isinstance(m, protocol.Denied)]
    assert denied and problem in denied[0].reason, answers


@pytest.mark.parametrize("claimed,problem", [
    ("WEB-1", "differs from the known instance 'web-1' only by case"),
    ("web-1\u200b", "invalid instance id 'web-1\\u200b'"),
    ("x\n2026-12-04 10:00:00,000 INFO zerorun.broker: key accept: admin", "invalid instance id 'x\\n2026"),
    ("\x1b[31mred", "invalid instance id '\\x1b[31mred'"),
])
def test_look_alike_and_control_character_ids_are_refused_at_hello(web_db_fleet, tmp_path, claimed, problem):
    fleet = web_db_fleet
    _denied_at_hello(fleet, tmp_path, protocol.Hello(instance_id=claimed), problem)
    assert claimed not in {k.name for k in fleet.client().keys()}
    log = fleet.broker_log()
    assert "\x1b[31m" not in log and "\n2026-12-04 10:00:00,000 INFO" not in log


def test_tags_with_control_characters_or_separators_are_refused(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    keys.create_keypair(tmp_path / "evil", "agent")
    ctx, sock = _raw_agent(fleet, tmp_path / "evil")
    try:
        sock.send_multipart(protocol.frames(protocol.Hello(instance_id="new-1", tags={"role": "web,db"})))
        answers = raw_agent.receive(sock, 2.0, until=protocol.Denied)
    finally:
        sock.close(0)
        ctx.term()
    assert any(isinstance(m, protocol.Denied) and "invalid value 'web,db' for tag 'role'" in m.reason
               for m in answers), answers
    with pytest.raises(RequestFailed) as exc:
        fleet.client().send("RunShellScript", {"commands": ["true"]}, [Target("tag", "role\x07", ("web",))])
    assert exc.value.code == "InvalidTarget"


FORGED_LINE = "\n2026-12-04 10:00:00,000 INFO zerorun.broker: key accept: admin"


@pytest.mark.parametrize("field,value,problem", [
    ("hostname", "h" + FORGED_LINE, "invalid hostname 'h\\n2026"),
    ("platform_version", "\x1b[31mred", "invalid platform_version '\\x1b[31mred'"),
    ("agent_version", "1.0\u200b", "invalid agent_version '1.0\\u200b'"),
    ("hostname", "h" * 100_000, "invalid hostname 'hhh"),
])
def test_hello_texts_with_control_characters_or_beyond_bounds_are_refused(web_db_fleet, tmp_path, field, value,
                                                                          problem):
    """What a HELLO says about the agent's machine (hostname, platform, versions) is logged,
    stored and listed like its id: a forged log line, a terminal escape or megabytes of it are
    refused at HELLO, before anything logs or stores them."""
    fleet = web_db_fleet
    _denied_at_hello(fleet, tmp_path, protocol.Hello(instance_id="new-1", **{field: value}), problem)
    assert "new-1" not in {v.instance_id for v in fleet.client().instances()}
    log = fleet.broker_log()
    assert FORGED_LINE not in log and "\x1b[31m" not in log and "h" * 1000 not in log

SECRET_DOC = """schemaVersion: '2.2'
description: a secret in the script text
parameters:
  token: {type: String, secret: true}
mainSteps:
  - action: aws:runShellScript
    name: run
    inputs:
      runCommand: ["echo token-length ${#TOKEN}", "TOKEN='{{ token }}'"]
"""


def _state_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_file()]


def test_a_key_added_for_an_instance_id_that_is_no_instance_id_is_refused(web_db_fleet, tmp_path):
    """``keys add agent ID KEY`` names an instance: its id follows the rule a HELLO's does, so
    a line break in it forges no log line and no key waits for an instance that can never say
    HELLO."""
    fleet = web_db_fleet
    public, _ = keys.ensure_keypair(tmp_path / "added", "agent")
    for claimed in ("x" + FORGED_LINE, "\x1b[31mred", "web-1\u200b", "-dash", "a" * 129):
        with pytest.raises(RequestFailed) as exc:
            fleet.client().add_key("agent", claimed, public.decode())
        assert exc.value.code == "BadRequest" and "invalid instance id" in str(exc.value), (claimed, exc.value)
    with pytest.raises(RequestFailed) as exc:
        fleet.client().add_key("agent", "WEB-1", public.decode())
    assert exc.value.code == "BadRequest" and "only by case" in str(exc.value)
    assert public.decode() not in {k.public_key for k in fleet.client().keys()}
    log = fleet.broker_log()
    assert FORGED_LINE not in log and "\x1b[31m" not in log
    assert fleet.client().add_key("agent", "new-9", public.decode()).state == "accepted"


def test_secrets_leave_the_store_and_state_files_are_private(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    secret = "Zr-secret-4f1c2e9a"
    doc = tmp_path / "secret.yml"
    doc.write_text(SECRET_DOC)
    admin = fleet.client()
    view = admin.send("RunShellScript", {"commands": ["true"]}, ["instance:web-1"], wait=20)
    assert view.status == "Success"
    view = admin.send(document_content=doc.read_text(), parameters={"token": secret},
                      targets=["instance:web-1"], wait=20)
    assert view.status == "Success"
    deadline = time.time() + 20  # the store forgets overwritten rows within seconds
    while True:
        holders = [p.name for p in fleet.broker_dir.glob("broker.db*") if secret.encode() in p.read_bytes()]
        if not holders:
            break
        assert time.time() < deadline, f"the secret value is still on disk in {holders}"
        time.sleep(0.5)
    assert secret not in (fleet.broker_dir / "audit.jsonl").read_text()
    assert "***" in admin.get_command(view.command_id).steps[0].script
    for path in _state_files(fleet.broker_dir):
        mode = path.stat().st_mode & 0o777
        if path.name == "broker.key":  # the public key agents need
            continue
        assert mode == 0o600, (path.name, oct(mode))
    for path in _state_files(fleet.broker_dir / "keys"):
        if path.name.endswith(".key_secret"):
            assert path.stat().st_mode & 0o777 == 0o600
    # restarted, a broker whose files an earlier version left readable makes them private again
    fleet.stop_broker()
    (fleet.broker_dir / "broker.db").chmod(0o644)
    fleet.start_broker()
    assert (fleet.broker_dir / "broker.db").stat().st_mode & 0o777 == 0o600


def test_a_transfer_belongs_to_the_client_key_that_opened_it(scoped, tmp_path):
    fleet, c = scoped
    owner, other = c["web-bot"], c["tag-bot"]  # both may exec on web-1
    transfer = "t-" + "a" * 30
    target = fleet.root / "owned-upload"
    owner.request(protocol.FileTransfer(instance_id="web-1", transfer_id=transfer, op="open-put", path=str(target)))
    for op, extra in [("write", {"data": b"evil", "offset": 0}), ("read", {"length": 10}),
                      ("commit", {"sha256": "0" * 64})]:
        with pytest.raises(RequestFailed) as exc:
            other.request(protocol.FileTransfer(instance_id="web-1", transfer_id=transfer, op=op, **extra))
        assert exc.value.code == "NotFound", op
    # an abort by another key is a no-op for that key, not for the owner's transfer
    other.request(protocol.FileTransfer(instance_id="web-1", transfer_id=transfer, op="abort"))
    import hashlib
    owner.request(protocol.FileTransfer(instance_id="web-1", transfer_id=transfer, op="write", data=b"mine",
                                        offset=0))
    done = owner.request(protocol.FileTransfer(instance_id="web-1", transfer_id=transfer, op="commit",
                                               sha256=hashlib.sha256(b"mine").hexdigest()))
    assert done["ok"] and target.read_bytes() == b"mine"


def _jinja_doc(line: str) -> str:
    return ("schemaVersion: '2.2'\ndescription: hostile\ntemplating: jinja\nmainSteps:\n"
            f"  - action: aws:runShellScript\n    name: run\n    inputs:\n      runCommand: [{json.dumps(line)}]\n")


def test_rendering_is_bounded_in_size_time_and_memory_and_never_blocks_the_loop(fleet_factory):
    fleet = fleet_factory("render")
    fleet.start_broker("--render-timeout", "5")  # generous: a busy test machine renders slowly
    fleet.start_agents({"web-1": {"role": "web"}})
    admin = fleet.client()
    for line, code, words in [
        ("{{ 'A' * 2000000 }}", "RenderTooLarge", ["renders to 2000000 bytes", "1048576 per step", "--max-step-bytes"]),
        ("{{ 'A' * 70000000 }}", "RenderTooLarge", ["renders to 70000000 bytes"]),
        ("{{ 'A' * 900000000 }}", "RenderFailed", ["more memory than a render worker may use"]),
        ("{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}", "RenderTimeout",
         ["took longer than 5s"]),
    ]:
        with pytest.raises(RequestFailed) as exc:
            admin.send(document_content=_jinja_doc(line), targets=["instance:web-1"], dry_run=True)
        assert exc.value.code == code, (line, exc.value)
        for word in words:
            assert word in str(exc.value), (word, str(exc.value))
    # while a hostile rendering runs, the loop answers everyone at once and agents stay online
    hostile = Client(ClientConfig.load(fleet.client_config), timeout=15)  # its own connection: another thread
    done = {}

    def attack():
        try:
            hostile.send(document_content=_jinja_doc(
                "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}"),
                targets=["instance:web-1"])
        except RequestFailed as exc:
            done["code"] = exc.code

    import threading
    thread = threading.Thread(target=attack)
    thread.start()
    time.sleep(0.3)
    other = fleet.client()
    started = time.monotonic()
    for _ in range(10):
        other.ping()
    assert time.monotonic() - started < 1.5, "the broker's loop waited on a rendering"
    thread.join(20)
    hostile.close()
    assert done.get("code") == "RenderTimeout"
    assert {i.ping_status for i in admin.instances()} == {"Online"}  # agents noticed no stall
    # the same agent still takes normal commands; the worker that was stopped was replaced
    assert admin.send("RunShellScript", {"commands": ["echo fine"]}, ["instance:web-1"], wait=20).status == "Success"
    ok = admin.send(document_content=_jinja_doc("echo {{ 6 * 7 }}"), targets=["instance:web-1"], wait=20)
    assert ok.status == "Success" and ok.invocations[0].stdout == "42\n"


def test_a_delivery_the_agent_cannot_take_ends_with_a_reason(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    admin = fleet.client()
    keys.create_keypair(tmp_path / "small", "agent")
    ctx, sock = _raw_agent(fleet, tmp_path / "small")
    try:
        sock.send_multipart(protocol.frames(protocol.Hello(instance_id="small-1", max_message_bytes=20000)))
        assert any(isinstance(m, protocol.Welcome) for m in raw_agent.receive(sock, 3, until=protocol.Welcome))
        view = admin.send("RunShellScript", {"commands": ["echo " + "x" * 30000]}, ["instance:small-1"], wait=10)
        (inv,) = view.invocations
        assert inv.status == "Undeliverable" and "more than this agent accepts" in inv.status_details
        # an agent that never acknowledges gets a delivery at most twice
        view = admin.send("RunShellScript", {"commands": ["echo small"]}, ["instance:small-1"])
        deliveries = 0
        for _ in range(3):
            got = raw_agent.receive(sock, 2.0, until=protocol.Deliver)
            deliveries += sum(1 for m in got if isinstance(m, protocol.Deliver))
            sock.send_multipart(protocol.frames(protocol.Hello(instance_id="small-1", max_message_bytes=20000)))
        final = admin.wait(view.command_id, timeout=10)
        assert deliveries == 2
        (inv,) = final.invocations
        assert inv.status == "Undeliverable" and "after 2 deliveries" in inv.status_details
    finally:
        sock.close(0)
        ctx.term()
    assert admin.send("RunShellScript", {"commands": ["echo ok"]}, ["instance:web-1"], wait=20).status == "Success"


def test_hellos_naming_an_invocation_the_agent_holds_do_not_use_up_its_deliveries(web_db_fleet, tmp_path):
    """After a broker restart an agent's HELLO may cross its other messages and come again at once:
    a HELLO naming the invocation as running acknowledges it, so it is never Undeliverable."""
    fleet = web_db_fleet
    admin = fleet.client()
    keys.create_keypair(tmp_path / "raw", "agent")
    ctx, sock = _raw_agent(fleet, tmp_path / "raw")
    try:
        sock.send_multipart(protocol.frames(protocol.Hello(instance_id="raw-1")))
        assert any(isinstance(m, protocol.Welcome) for m in raw_agent.receive(sock, 3, until=protocol.Welcome))
        view = admin.send("RunShellScript", {"commands": ["echo held"]}, ["instance:raw-1"])
        delivers = [m for m in raw_agent.receive(sock, 3, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = delivers[0].invocations[0].invocation_id
        for _ in range(4):  # each in a loop iteration of its own
            sock.send_multipart(protocol.frames(protocol.Hello(instance_id="raw-1", running=[iid])))
            time.sleep(0.1)
        raw_agent.receive(sock, 1.0)
        assert admin.get_command(view.command_id).invocations[0].status == "Pending"
        sock.send_multipart(protocol.frames(protocol.Results([protocol.InvocationResult(
            iid, "Success", exit_code=0, stdout="held\n", ended_at=time.time())])))
        final = admin.wait(view.command_id, timeout=10)
        assert final.status == "Success" and final.invocations[0].stdout == "held\n"
    finally:
        sock.close(0)
        ctx.term()


def test_a_huge_request_from_a_key_without_a_role_is_answered_and_costs_little(web_db_fleet, tmp_path):
    import msgspec

    fleet = web_db_fleet
    directory = tmp_path / "clients"
    keys.create_keypair(directory, "nobody")
    public, secret = keys.load_secret(directory / "nobody.key_secret")
    fleet.client().add_key("client", "nobody", public.decode())
    runtime = fleet.runtime()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = runtime["broker_public_key"].encode()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.connect(runtime["client_endpoint"])
    try:
        bomb = {f"k{i}": i for i in range(1_500_000)}
        bomb.update(type="instances", rid=7)  # a valid request, made huge with unknown fields
        sock.send_multipart([protocol.HEADER, msgspec.msgpack.encode(bomb)])
        assert sock.poll(20000)
        reply = protocol.reply_decoder.decode(sock.recv_multipart()[1])
        assert reply.rid == 7 and not reply.ok and reply.error.code == "AccessDenied"
        garbage = msgspec.msgpack.encode({"rid": 9, "type": "no-such-operation", "pad": "x" * 10_000_000})
        sock.send_multipart([protocol.HEADER, garbage])
        assert sock.poll(20000)
        reply = protocol.reply_decoder.decode(sock.recv_multipart()[1])
        assert reply.rid == 9 and reply.error.code == "BadRequest"
    finally:
        sock.close(0)
        ctx.term()
    assert fleet.client().ping()["online"] == 3
