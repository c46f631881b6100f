"""Hostile and unauthorised input against real broker and agent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from zerorun import keys, protocol
from zerorun.client import Client, ClientConfig, RequestFailed, Unauthorized
from zerorun.testing import wait_until

from tests import raw_agent_support as raw_agent


def client_for(fleet, name: str, tmp_path: Path, role_key_dir: str = "clients") -> tuple[Client, bytes]:
    """A new client keypair, registered by the admin under ``name``."""
    directory = tmp_path / role_key_dir
    keys.create_keypair(directory, name)
    public, _ = keys.load_secret(directory / f"{name}.key_secret")
    fleet.client().add_key("client", name, public.decode())
    runtime = fleet.runtime()
    config = ClientConfig.from_options(endpoint=runtime["client_endpoint"],
                                       broker_key=runtime["broker_public_key"],
                                       client_key_file=str(directory / f"{name}.key_secret"))
    return Client(config, timeout=5), public


POLICY = """
roles:
  operator:
    allow: [read, run, cancel]
    documents: ["RunShellScript"]
    targets: ["tag:role=web", "instance:web-*"]
  superuser:
    allow: ["*"]
    documents: ["*"]
    targets: ["*"]
clients:
  ci-bot: operator
  auditor: readonly
"""


@pytest.fixture
def policy_fleet(fleet_factory):
    fleet = fleet_factory("policy")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(POLICY)
    fleet.start_broker()
    fleet.start_agents({"web-1": {"role": "web"}, "db-1": {"role": "db"}})
    return fleet


def test_policy_allows_and_denies_naming_the_missing_permission(policy_fleet, tmp_path):
    fleet = policy_fleet
    bot, _ = client_for(fleet, "ci-bot", tmp_path)
    auditor, _ = client_for(fleet, "auditor", tmp_path)
    nobody, _ = client_for(fleet, "nobody", tmp_path)
    try:
        view = bot.send("RunShellScript", {"commands": ["echo allowed"]}, ["tag:role=web"])
        assert bot.wait(view.command_id, timeout=20).status == "Success"
        with pytest.raises(RequestFailed) as exc:
            bot.send("RunShellScript", {"commands": ["true"]}, ["tag:role=db"])
        assert exc.value.code == "AccessDenied" and "outside its scope" in str(exc.value)
        assert str(exc.value).endswith(": db-1")  # the instances reached outside the scope, by name
        with pytest.raises(RequestFailed) as exc:
            bot.send("GetInstanceInfo", {}, ["tag:role=web"])
        assert "may not run document 'GetInstanceInfo'" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:
            bot.create_document("Mine", "schemaVersion: '2.2'\nmainSteps: []\n")
        assert "lacks permission 'documents'" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:
            bot.key_action("accept", "db-1")
        assert "lacks permission 'keys'" in str(exc.value)
        assert {i.instance_id for i in auditor.instances()} == {"web-1", "db-1"}
        with pytest.raises(RequestFailed) as exc:
            auditor.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"])
        assert "role readonly) lacks permission 'run'" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:
            nobody.instances()
        assert "no role in the broker policy (default deny)" in str(exc.value)
    finally:
        for c in (bot, auditor, nobody):
            c.close()
    audit = [json.loads(line) for line in (fleet.broker_dir / "audit.jsonl").read_text().splitlines()]
    denied = [e for e in audit if e["event"] == "access.denied"]
    assert len(denied) >= 5 and all(e["reason"] for e in denied)
    sent = [e for e in audit if e["event"] == "command.send"]
    assert sent and sent[0]["client"].startswith("ci-bot") and sent[0]["instances"] == ["web-1"]
    assert len(sent[0]["sha256"]) == 64
    assert any(e["event"] == "key.add" and e["name"] == "ci-bot" for e in audit)


def test_policy_reloads_when_the_file_changes(policy_fleet, tmp_path):
    fleet = policy_fleet
    auditor, _ = client_for(fleet, "auditor", tmp_path)
    try:
        with pytest.raises(RequestFailed):
            auditor.send("RunShellScript", {"commands": ["true"]}, ["tag:role=db"])
        (fleet.broker_dir / "policy.yaml").write_text(POLICY.replace("auditor: readonly", "auditor: superuser"))
        os.utime(fleet.broker_dir / "policy.yaml", (time.time() + 5, time.time() + 5))
        deadline = time.time() + 15
        while True:
            try:
                view = auditor.send("RunShellScript", {"commands": ["true"]}, ["tag:role=db"])
                break
            except RequestFailed:
                assert time.time() < deadline, "policy was not reloaded"
                time.sleep(0.3)
        assert auditor.wait(view.command_id, timeout=20).status == "Success"
    finally:
        auditor.close()


def test_revoked_client_key_is_cut_off_at_once(fleet, tmp_path):
    bot, public = client_for(fleet, "ci-bot", tmp_path)
    try:
        assert bot.ping()["requester"].startswith("ci-bot")  # admin-less names default-deny, but ping
    except RequestFailed as exc:
        assert exc.code == "AccessDenied"
    fleet.client().key_action("revoke", "ci-bot")
    with pytest.raises(RequestFailed) as exc:
        bot.ping()  # still connected: refused per request
    assert "revoked" in str(exc.value)
    bot.close()
    runtime = fleet.runtime()
    again = Client(ClientConfig.from_options(endpoint=runtime["client_endpoint"],
                                             broker_key=runtime["broker_public_key"],
                                             client_key_file=str(tmp_path / "clients" / "ci-bot.key_secret")),
                   timeout=3)
    with pytest.raises(Unauthorized):
        again.ping()  # a new connection fails the handshake
    again.close()
    views = {v.name: v.state for v in fleet.client().keys() if v.kind == "client"}
    assert views["ci-bot"] == "rejected"


def test_agent_cannot_answer_another_instances_invocation(web_db_fleet):
    fleet = web_db_fleet
    fleet.stop_agent("db-1")
    fleet.wait_status("db-1", "ConnectionLost")
    view = fleet.client().send("RunShellScript", {"commands": ["sleep 3; echo genuine"]}, ["tag:role=web"])
    running = fleet.wait_invocations(view.command_id, "InProgress", ["web-1"])
    target = next(i for i in running.invocations if i.instance_id == "web-1")
    public, secret = keys.load_secret(fleet.agent_dir("db-1") / "agent.key_secret")
    runtime = fleet.runtime()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = runtime["broker_public_key"].encode()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.connect(runtime["agent_endpoint"])
    try:
        sock.send_multipart(protocol.frames(protocol.Hello(instance_id="db-1", tags={"role": "db"})))
        assert sock.poll(5000)
        welcome = protocol.broker_to_agent_decoder.decode(sock.recv_multipart()[1])
        assert isinstance(welcome, protocol.Welcome)
        forged = protocol.InvocationResult(target.invocation_id, "Success", exit_code=0, stdout="forged\n")
        unknown = protocol.InvocationResult("f" * 32, "Success")
        sock.send_multipart(protocol.frames(protocol.Results([forged, unknown])))

        def refused() -> set[str]:
            lines = (fleet.broker_dir / "audit.jsonl").read_text().splitlines()
            return {e.get("invocation_id") for e in map(json.loads, lines) if e["event"] == "agent.result_refused"}

        wait_until(lambda: refused() >= {target.invocation_id, unknown.invocation_id},
                   "the broker to refuse both results the impostor sent")
    finally:
        sock.close(0)
        ctx.term()
    final = fleet.client().wait(view.command_id, timeout=30)
    web1 = next(i for i in final.invocations if i.instance_id == "web-1")
    assert web1.stdout == "genuine\n"
    assert "refused" in fleet.broker_log()
    audit = (fleet.broker_dir / "audit.jsonl").read_text()
    assert "agent.result_refused" in audit


def test_a_flood_of_forged_results_is_one_log_line_per_message(web_db_fleet):
    """An accepted agent sends results for thousands of invocations it was never given: each is
    refused and counted, the audit log rate-limits them, and the broker's log says so once per
    message, not once per result (each 64 bytes of the frame made a 157-byte log line)."""
    fleet = web_db_fleet
    fleet.stop_agent("db-1")
    fleet.wait_status("db-1", "ConnectionLost")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), fleet.agent_dir("db-1"))
    try:
        raw_agent.hello(sock, "db-1", tags={"role": "db", "env": "prod"})
        forged = [protocol.InvocationResult(f"{n:032x}", "Success") for n in range(5000)]
        for _ in range(2):
            sock.send_multipart(protocol.frames(protocol.Results(forged)))

        def refusals() -> int:
            return fleet.broker_log().count("never delivered to it")

        wait_until(lambda: refusals() >= 2, "the broker to refuse both messages")
        view = fleet.client().send("RunShellScript", {"commands": ["echo still-serving"]}, ["instance:web-1"])
        assert fleet.client().wait(view.command_id, timeout=30).invocations[0].stdout == "still-serving\n"
    finally:
        sock.close(0)
        ctx.term()
    assert refusals() == 2, refusals()
    assert "refused 5000 result(s) from db-1" in fleet.broker_log()
    audit = [json.loads(line) for line in (fleet.broker_dir / "audit.jsonl").read_text().splitlines()]
    assert len([e for e in audit if e["event"] == "agent.result_refused"]) < 100


def test_a_flood_of_malformed_frames_is_counted_not_logged_line_by_line(web_db_fleet):
    """Each malformed frame an accepted agent sent was a warning line: as many lines as it could
    send frames, each formatted by the loop. A burst is logged, then about one a second, and how
    many were left out."""
    fleet = web_db_fleet
    fleet.stop_agent("db-1")
    fleet.wait_status("db-1", "ConnectionLost")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), fleet.agent_dir("db-1"))
    header = protocol.frames(protocol.Heartbeat())[0]

    def told() -> tuple[int, int]:
        lines = [line for line in fleet.broker_log().splitlines() if "dropped agent message" in line]
        logged = sum(1 for line in lines if "dropped agent message: malformed_body" in line)
        left_out = sum(int(line.split(" more dropped agent messages")[0].rsplit(" ", 1)[1])
                       for line in lines if "more dropped agent messages not logged" in line)
        return logged, left_out

    try:
        for _ in range(2000):
            sock.send_multipart([header, b"\xc1 not msgpack"])
        wait_until(lambda: sum(told()) == 2000, "the broker to log or count every malformed frame")
        view = fleet.client().send("RunShellScript", {"commands": ["echo still-serving"]}, ["instance:web-1"])
        assert fleet.client().wait(view.command_id, timeout=30).invocations[0].stdout == "still-serving\n"
    finally:
        sock.close(0)
        ctx.term()
    logged, left_out = told()
    assert 20 <= logged <= 40 and left_out >= 1960, (logged, left_out)


FORGED_LINE = "\n2026-12-04 10:00:00,000 INFO zerorun.broker: key accept: admin"


def test_why_an_agent_says_something_failed_is_logged_and_kept_as_one_bounded_line(fleet, tmp_path):
    """An agent's error texts (a session it could not start, an output it could not send) were
    logged as sent, so a line break forged a broker log line, and an output's note was stored
    at any size. They are logged and kept escaped and cut, like a refused HELLO's text."""
    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    error = "gone" + FORGED_LINE + "\x1b[31m" + "e" * 100_000
    client = fleet.client()
    try:
        raw_agent.hello(sock)
        view = client.send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        (deliver,) = [m for m in raw_agent.receive(sock, 5, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = deliver.invocations[0].invocation_id
        sock.send_multipart(protocol.frames(protocol.Results([protocol.InvocationResult(
            iid, "Success", exit_code=0, stdout_follows=10)])))
        (read,) = [m for m in raw_agent.receive(sock, 5, until=protocol.OutputRead)
                   if isinstance(m, protocol.OutputRead)]
        sock.send_multipart(protocol.frames(protocol.OutputData(iid, "stdout", read.offset, error=error)))
        client.wait(view.command_id, timeout=30)
        output = wait_until(lambda: (out := client.request(protocol.GetOutput(
            command_id=view.command_id, instance_id="raw-1"))) and not out.get("pending") and out,
                            "the output to be given up on")
        failed: list[BaseException] = []

        def open_session() -> None:
            opener = Client(ClientConfig.load(fleet.client_config), timeout=15)
            try:
                opener.request(protocol.OpenSession(instance_id="raw-1", kind="exec", command="true"))
            except RequestFailed as exc:
                failed.append(exc)
            finally:
                opener.close()

        thread = threading.Thread(target=open_session)
        thread.start()
        (start,) = [m for m in raw_agent.receive(sock, 10, until=protocol.SessionStart)
                    if isinstance(m, protocol.SessionStart)]
        sock.send_multipart(protocol.frames(protocol.SessionStarted(start.session_id, ok=False, error=error)))
        thread.join(20)
        assert failed and failed[0].code == "SessionFailed", failed
    finally:
        sock.close(0)
        ctx.term()
    assert len(output["note"]) < 1200 and FORGED_LINE not in output["note"], output["note"][:200]
    log = fleet.broker_log()
    assert FORGED_LINE not in log and "\x1b[31m" not in log and "e" * 2000 not in log


def test_broker_refuses_a_secret_key_readable_by_others(fleet):
    fleet.stop_broker()
    secret = fleet.broker_dir / "keys" / "broker.key_secret"
    secret.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "zmq_broker", "--state-dir", str(fleet.broker_dir),
                           "--agent-bind", "tcp://127.0.0.1:*", "--client-bind", "tcp://127.0.0.1:*"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "accessible by group/others" in proc.stderr and "chmod 600" in proc.stderr
    assert "Traceback" not in proc.stderr
    secret.chmod(0o600)
    for path in (fleet.broker_dir / "keys").glob("*.key_secret"):
        assert path.stat().st_mode & 0o777 == 0o600


def test_pending_agent_keys_are_capped(fleet_factory):
    fleet = fleet_factory("capped", auto_accept=False)
    fleet.start_broker("--max-pending-keys", "2")
    for n in range(3):
        fleet.start_agent(f"new-{n}", {"role": "x"})
    deadline = time.time() + 20
    while time.time() < deadline:
        pending = [k for k in fleet.client().keys() if k.state == "pending"]
        refused = any("refused this agent's key" in fleet.agent_log(f"new-{n}") for n in range(3))
        if len(pending) == 2 and refused:
            break
        time.sleep(0.2)
    assert len([k for k in fleet.client().keys() if k.state == "pending"]) == 2
    assert "too many pending agent keys" in fleet.broker_log()


class FakeBroker:
    """A CURVE ROUTER with its own keys, to feed an agent deliveries a real broker never sends."""

    def __init__(self, directory: Path):
        keys.create_keypair(directory, "broker")
        self.public, self.secret = keys.load_secret(directory / "broker.key_secret")
        self.key_file = directory / "broker.key"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.curve_server = True
        self.sock.curve_secretkey = self.secret
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.peer = b""

    def recv(self, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.sock.poll(100):
                rid, header, body = self.sock.recv_multipart()
                self.peer = rid
                msg = protocol.agent_message_decoder.decode(body)
                # heartbeats, and facts that changed after HELLO (the agent's FQDN lookup ends
                # when it ends), may come between any two messages a test waits for
                if not isinstance(msg, (protocol.Heartbeat, protocol.FactsUpdate)):
                    return msg
        raise AssertionError("agent said nothing")

    def send(self, message):
        self.sock.send_multipart([self.peer, *protocol.frames(message)])

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def welcomed_agent(tmp_path):
    """A real agent (instance i-1) welcomed by a FakeBroker, which the test drives."""
    fake = FakeBroker(tmp_path / "fake")
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "--broker", fake.endpoint, "--broker-key",
                              str(fake.key_file), "--instance-id", "i-1", "--state-dir", str(tmp_path / "agent"),
                              "--heartbeat-interval", "0.5"], stdout=log, stderr=subprocess.STDOUT)
    try:
        hello = fake.recv()
        assert isinstance(hello, protocol.Hello) and hello.instance_id == "i-1"
        fake.send(protocol.Welcome("i-1", 0.5, time.time()))
        yield fake
    finally:
        agent.terminate()
        agent.wait(15)
        log.close()
        fake.close()


def test_agent_refuses_replayed_expired_and_misaddressed_commands(welcomed_agent, tmp_path):
    fake = welcomed_agent
    marks = tmp_path / "marks"
    now = time.time()
    step = protocol.Step(name="mark", script=f"echo run >> {marks}")

    def inv(iid, expires=now + 60, instance="i-1"):
        return protocol.Invocation(iid, "cmd", instance, "Doc", "1", "0" * 64, [step], now, expires)

    fake.send(protocol.Deliver([inv("one")]))
    seen = []
    while not any(isinstance(m, protocol.Results) for m in seen):
        seen.append(fake.recv())
    first = seen[0]  # an Ack, or the Results alone when the step ended before its Ack was due
    assert (isinstance(first, protocol.Ack) and first.invocation_ids == ["one"]) or (
        isinstance(first, protocol.Results) and [r.invocation_id for r in first.results] == ["one"])
    fake.send(protocol.ResultAck(["one"]))
    # replayed: acknowledged again, never run again
    fake.send(protocol.Deliver([inv("one")]))
    reply = fake.recv()
    assert isinstance(reply, protocol.Ack) and reply.invocation_ids == ["one"]
    # expired, and addressed to another instance: refused
    fake.send(protocol.Deliver([inv("old", expires=now - 1), inv("other", instance="i-2")]))
    refusal = fake.recv()
    assert isinstance(refusal, protocol.Refuse)
    assert {(r.invocation_id, r.reason) for r in refusal.items} == {("old", "expired"), ("other", "invalid")}
    # a later invocation has run and reported, so a second run of "one" would have started before it
    later = protocol.Step(name="later", script=f"echo later >> {marks}")
    fake.send(protocol.Deliver([protocol.Invocation("two", "cmd", "i-1", "Doc", "1", "0" * 64, [later], now,
                                                    now + 60)]))
    after: list = []
    while not any(isinstance(m, protocol.Results) and "two" in {r.invocation_id for r in m.results} for m in after):
        after.append(fake.recv())
    assert not any("one" in {r.invocation_id for r in m.results} for m in after if isinstance(m, protocol.Results)), after
    assert marks.read_text() == "run\nlater\n"


def test_old_protocol_version_is_refused(fleet):
    runtime = fleet.runtime()
    config = ClientConfig.load(fleet.client_config)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
        config.broker_public_key, config.public_key, config.secret_key)
    sock.connect(runtime["client_endpoint"])
    try:
        sock.send_multipart([b"ZRN\x00", protocol.encode(protocol.Ping(rid=7))])
        assert sock.poll(5000)
        header, body = sock.recv_multipart()
        reply = protocol.reply_decoder.decode(body)
        assert not reply.ok and reply.error.code == "BadRequest" and "protocol version" in reply.error.message
    finally:
        sock.close(0)
        ctx.term()
    assert "protocol_version" in fleet.broker_log()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_fuzzed_frames_while_legitimate_clients_keep_working(web_db_fleet, tmp_path):
    """Thousands of random, truncated, oversized and type-confused frames, with and without
    valid keys, at both endpoints; a legitimate client is served throughout; memory stays bounded."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fleet = web_db_fleet
    runtime = fleet.runtime()
    config = ClientConfig.load(fleet.client_config)
    agent_public, agent_secret = keys.load_secret(fleet.agent_dir("web-2") / "agent.key_secret")
    stranger_public, stranger_secret = zmq.curve_keypair()
    ctx = zmq.Context()

    def dealer(endpoint, public, secret):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 100_000
        sock.curve_serverkey = runtime["broker_public_key"].encode()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.connect(endpoint)
        return sock

    senders = [dealer(runtime["client_endpoint"], config.public_key, config.secret_key),
               dealer(runtime["agent_endpoint"], agent_public, agent_secret),
               dealer(runtime["client_endpoint"], stranger_public, stranger_secret),
               dealer(runtime["agent_endpoint"], stranger_public, stranger_secret)]
    plain = ctx.socket(zmq.DEALER)
    plain.linger = 0
    plain.connect(runtime["agent_endpoint"])  # no CURVE at all
    senders.append(plain)
    tags = ["ping", "instances", "send", "command", "wait", "follow", "cancel", "keys", "key", "key-add",
            "document-create", "hello", "hb", "ack", "refuse", "started", "results", "out", "bye", "nope"]
    scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1), st.floats(allow_nan=True), st.text(max_size=20),
                       st.binary(max_size=20))
    value = st.recursive(scalar, lambda children: st.one_of(st.lists(children, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), children, max_size=4)),
                         max_leaves=10)
    body = st.one_of(
        st.binary(max_size=200),
        st.builds(lambda tag, fields: msgspec.msgpack.encode({**fields, "type": tag}),
                  st.sampled_from(tags), st.dictionaries(st.text(max_size=12), value, max_size=6)),
    )
    frames = st.one_of(
        st.tuples(st.just(protocol.HEADER), body).map(list),
        st.lists(st.binary(max_size=64), min_size=1, max_size=5),
        st.tuples(st.sampled_from([b"ZRN\x00", b"ZRN\x02", b"", b"ZR"]), body).map(list),
        st.tuples(st.just(protocol.HEADER), body.map(lambda b: b[: max(0, len(b) // 2)])).map(list),
    )
    stop = threading.Event()
    served: list[float] = []
    failures: list[str] = []

    def legitimate():
        client = Client(config, timeout=10)
        try:
            while not stop.is_set():
                started = time.time()
                try:
                    client.ping()
                    served.append(time.time() - started)
                except Exception as exc:  # noqa: BLE001 - any failure is the test's failure
                    failures.append(repr(exc))
                time.sleep(0.05)
        finally:
            client.close()

    watcher = threading.Thread(target=legitimate)
    watcher.start()
    rss_before = _rss_kib(fleet.broker.pid)
    counter = {"sent": 0}

    @settings(max_examples=4000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frames=frames, which=st.integers(min_value=0, max_value=len(senders) - 1))
    def attack(frames, which):
        try:
            senders[which].send_multipart(frames, zmq.NOBLOCK)
            counter["sent"] += 1
        except zmq.ZMQError:
            pass

    try:
        # Sends to a socket whose peer refused it (no or a stranger's keys) fail with EAGAIN, and
        # how many depends on timing: under a loaded machine one round of 4,000 handed 2,498 to
        # the broker. Another round until 2,500 were (at most three in all).
        for _ in range(3):
            attack()
            if counter["sent"] >= 2500:
                break
        monitor = senders[0].get_monitor_socket(zmq.EVENT_DISCONNECTED)
        big = [protocol.HEADER, b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1024)]  # over MAXMSGSIZE
        senders[0].send_multipart(big)
        # the broker reads everything queued before it, then drops the connection at the oversized frame
        assert monitor.poll(60_000), "the broker did not drop the connection that sent an oversized frame"
        senders[0].disable_monitor()
        monitor.close(0)
        served_before = len(served)
        wait_until(lambda: len(served) >= served_before + 3 or failures,
                   "the legitimate client to be served after the oversized frame", timeout=60)
    finally:
        stop.set()
        watcher.join(30)
        for sock in senders:
            sock.close(0)
        ctx.term()
    assert counter["sent"] >= 2500
    assert fleet.broker.poll() is None, "the broker died"
    assert not failures, failures[:5]
    assert len(served) >= 10
    rss_after = _rss_kib(fleet.broker.pid)
    assert rss_after - rss_before < 150_000, (rss_before, rss_after)
    rc = fleet.cli("send", "RunShellScript", "-p", "commands=echo survived", "-t", "tag:role=db")
    assert rc.returncode == 0 and "survived" in rc.stdout


def test_a_request_nested_too_deeply_is_answered_as_malformed(web_db_fleet):
    """``parameters`` may hold any value: a body that nests it deeper than the decoder follows
    (msgspec raises RecursionError, neither a DecodeError nor a ValidationError) was an internal
    error, with a traceback in the broker's log, and its client was never answered. It is a
    malformed request: counted, logged in one line and answered BadRequest."""
    fleet = web_db_fleet
    runtime = fleet.runtime()
    config = ClientConfig.load(fleet.client_config)
    enc = msgspec.msgpack.encode
    body = (b"\x83" + enc("type") + enc("send") + enc("rid") + enc(77) + enc("parameters")
            + b"\x81" + enc("a") + b"\x91" * 100_000 + b"\xc0")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = runtime["broker_public_key"].encode()
    sock.curve_publickey, sock.curve_secretkey = config.public_key, config.secret_key
    sock.connect(runtime["client_endpoint"])
    try:
        for _ in range(3):
            sock.send_multipart([protocol.HEADER, body])
        replies = []
        while len(replies) < 3 and sock.poll(10_000):
            replies.append(protocol.reply_decoder.decode(sock.recv_multipart()[-1]))
    finally:
        sock.close(0)
        ctx.term()
    assert len(replies) == 3 and all(not r.ok and r.error.code == "BadRequest" for r in replies), replies
    log = fleet.broker_log()
    assert "Traceback" not in log and "internal error" not in log
    assert fleet.client().ping()["instances"] == 3


def test_agent_acks_a_long_step_while_it_runs(welcomed_agent):
    """The Ack of a started invocation waits up to ACK_HOLD (20 ms): a step that ends by then is
    acknowledged by its Results alone (one message fewer); a longer one is acked while it runs."""
    fake = welcomed_agent
    now = time.time()
    slow = protocol.Invocation("slow", "cmd", "i-1", "Doc", "1", "0" * 64,
                               [protocol.Step(name="s", script="sleep 1")], now, now + 60)
    fake.send(protocol.Deliver([slow]))
    first = fake.recv()
    assert isinstance(first, protocol.Ack) and first.invocation_ids == ["slow"] and first.started == ["slow"]
    done = fake.recv()
    assert isinstance(done, protocol.Results) and done.results[0].invocation_id == "slow"
    assert time.time() - now >= 1.0


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_bare_connections_ends_and_is_said(fleet_factory):
    """Anyone who reaches the agent port can open TCP connections and never finish a handshake.
    Once the broker's descriptors ran out, no agent or operator could connect, for as long as
    the flood was held (libzmq kept each such connection 30 s), a file operation of the loop
    failed with a traceback, and nothing said why. It is said (one line), the half-open
    connections are closed after 10 s, and the broker serves again while the flood still holds
    its sockets open."""
    import resource
    import socket

    fleet = fleet_factory("flood")
    flood: list[socket.socket] = []
    try:
        fleet.start_broker()
        fleet.start_agents({"d-1": {"role": "flood"}})
        pid = fleet.broker.pid
        limit = _open_descriptors(pid) + 40
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        host, port = fleet.runtime()["agent_endpoint"].removeprefix("tcp://").rsplit(":", 1)
        for _ in range(60):  # 40 to take every descriptor left, 20 more in the kernel's backlog
            flood.append(socket.create_connection((host, int(port)), timeout=5))
        wait_until(lambda: "out of file descriptors" in fleet.broker_log(), "the broker to say why it refuses", 30)
        wait_until(lambda: sum(map(_closed_by_peer, flood)) >= 40 or None,
                   "the broker to close the connections that never said anything", 40)
        fleet.start_agent("d-2", {"role": "flood"})  # the flood's sockets are still open on this side
        fleet.wait_online(["d-1", "d-2"])
        done = fleet.cli("send", "RunShellScript", "-t", "tag:role=flood", "-p", "commands=echo served")
        assert done.returncode == 0 and done.stdout.count("served") == 2, done.stdout + done.stderr
        assert fleet.broker.poll() is None and "Traceback" not in fleet.broker_log(), fleet.broker_log()[-3000:]
    finally:
        for s in flood:
            s.close()
        fleet.close()


def _closed_by_peer(sock) -> bool:
    import socket

    try:
        while sock.recv(4096, socket.MSG_DONTWAIT):  # what the broker said first (its greeting), then EOF
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_an_agent_key_holds_one_connection_and_one_that_says_nothing_is_closed(fleet_factory, tmp_path):
    """A key the broker admits finished its handshake, which then no longer times out, and libzmq
    closes no connection on its own: one key could hold connections, each a descriptor, until
    the broker had none left. A HELLO on a new connection now cuts the key's earlier one, and a
    connection that says no HELLO in time is cut."""
    from zerorun.zmqutil import close_monitor, drain_monitor

    fleet = fleet_factory("hold")  # heartbeats every 0.5 s: a HELLO is due within 11.5 s
    ctx = zmq.Context()
    watched: list[tuple[zmq.Socket, zmq.Socket]] = []
    seen: dict[int, list[int]] = {}

    def events(index: int) -> list[int]:
        seen.setdefault(index, []).extend(event for event, _ in drain_monitor(watched[index][1]))
        return seen[index]

    def cut(indexes: range) -> bool | None:
        return all(zmq.EVENT_HANDSHAKE_SUCCEEDED in events(i) and zmq.EVENT_DISCONNECTED in events(i)
                   for i in indexes) or None

    try:
        fleet.start_broker()
        fleet.start_agents({"h-1": {"role": "hold"}})
        keys.create_keypair(tmp_path / "k", "agent")
        runtime = fleet.runtime()
        for _ in range(20):  # one key, twenty connections, each says HELLO
            watched.append(raw_agent.connect_watched(ctx, runtime, tmp_path / "k"))
            raw_agent.hello(watched[-1][0], "hold-2")
        wait_until(lambda: cut(range(19)), "the key's earlier connections to be cut", 30)
        raw_agent.hello(watched[19][0], "hold-2")  # the last one is the key's, and still served
        assert zmq.EVENT_DISCONNECTED not in events(19)
        for _ in range(20):  # and twenty that say nothing
            watched.append(raw_agent.connect_watched(ctx, runtime, tmp_path / "k"))
        wait_until(lambda: cut(range(20, 40)), "the connections that said nothing to be cut", 60)
        done = fleet.cli("send", "RunShellScript", "-t", "tag:role=hold", "-p", "commands=echo still")
        assert done.returncode == 0 and "still" in done.stdout, done.stdout + done.stderr
        assert fleet.broker.poll() is None and "Traceback" not in fleet.broker_log(), fleet.broker_log()[-3000:]
    finally:
        for sock, monitor in watched:
            close_monitor(sock, monitor)
        ctx.destroy(linger=0)
        fleet.close()


def test_a_key_that_asks_and_never_reads_is_refused_instead_of_kept_in_memory(fleet_factory, tmp_path):
    """libzmq keeps a peer's replies until its connection takes them, up to a mark counted in
    messages, not bytes: a key that asked for a 200 KiB document 3,000 times and read nothing held
    600 MB of the broker, and enough such requests end it. Past ``--max-unread-reply-mb`` the key's
    requests are refused, one short error each; a new connection of the key is refused too (the
    bound is the key's); other keys are served; once it has read, it is answered again."""
    from zerorun.client import secure_broker_socket

    fleet = fleet_factory("unread")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text("clients:\n  auditor: readonly\n")
    fleet.start_broker("--max-unread-reply-mb", "16")
    admin = fleet.client()
    body = {"schemaVersion": "2.2", "description": "big", "mainSteps": [
        {"action": "aws:runShellScript", "name": "a", "inputs": {"runCommand": ["echo " + "x" * 200_000]}}]}
    admin.create_document("Big", json.dumps(body))
    auditor, _ = client_for(fleet, "auditor", tmp_path)
    auditor.close()
    config = auditor.config
    asked = 3000
    rss_before = _rss_kib(fleet.broker.pid)
    ctx = zmq.Context()
    try:
        greedy = ctx.socket(zmq.DEALER)
        greedy.linger = 0
        greedy.setsockopt(zmq.RCVHWM, 1)  # its libzmq takes one reply off the connection, then no more
        greedy.setsockopt(zmq.RCVBUF, 4096)
        secure_broker_socket(greedy, config)
        greedy.connect(config.endpoint)
        for rid in range(1, asked + 1):
            greedy.send_multipart(protocol.frames(protocol.GetDocument(rid=rid, name="Big")))
        # 16 MiB of 200 KiB replies is about 80; a few more as the kernel takes some
        wait_until(lambda: admin.ping()["refused_unread_replies"] >= asked - 300,
                   "the requests past the bound refused", timeout=60)
        grown_mib = (_rss_kib(fleet.broker.pid) - rss_before) / 1024
        assert grown_mib < 150, f"the broker grew {grown_mib:.0f} MiB for replies nobody reads"

        again = Client(config, timeout=10)
        try:
            with pytest.raises(RequestFailed) as refused:
                again.ping()
            assert refused.value.code == "UnreadReplies" and "16 MiB" in str(refused.value)
        finally:
            again.close()
        assert admin.ping()["online"] == 0  # another key is answered as always
        assert "replies unread" in fleet.broker_log()

        answered = refusals = 0
        while greedy.poll(3000):  # it reads at last: every request had its answer
            reply = protocol.reply_decoder.decode(greedy.recv_multipart()[1])
            if reply.ok:
                answered += 1
            else:
                assert reply.error.code == "UnreadReplies"
                refusals += 1
        assert answered + refusals == asked and 0 < answered < 300
        greedy.send_multipart(protocol.frames(protocol.GetDocument(rid=asked + 1, name="Big")))
        assert greedy.poll(10_000), "answered again once it has read"
        reply = protocol.reply_decoder.decode(greedy.recv_multipart()[1])
        assert reply.ok and reply.rid == asked + 1
    finally:
        ctx.destroy(linger=0)


def test_a_client_key_holds_a_bounded_number_of_connections_and_silent_ones_are_cut(fleet_factory, tmp_path):
    """Each client connection holds a descriptor and libzmq's buffers for as long as its peer keeps
    it, and libzmq closes none: one client key could hold connections until the broker had none
    left. A request on a connection beyond the key's ``--max-client-connections`` is refused
    (TooManyConnections) and that connection closed; the key's earlier ones and other keys are
    served; and beyond as many connections that sent nothing, the oldest is closed."""
    from zerorun.client import secure_broker_socket
    from zerorun.zmqutil import close_monitor, drain_monitor, monitor_socket

    fleet = fleet_factory("conns")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text("clients:\n  many: readonly\n")
    fleet.start_broker("--max-client-connections", "3")
    admin = fleet.client()
    many, _ = client_for(fleet, "many", tmp_path)
    config = many.config
    ctx = zmq.Context()
    watched: list[tuple[zmq.Socket, zmq.Socket]] = []
    seen: dict[int, list[int]] = {}

    def connect() -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one connection, never made again
        secure_broker_socket(sock, config)
        monitor = monitor_socket(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(config.endpoint)
        watched.append((sock, monitor))
        index = len(watched) - 1
        wait_until(lambda: zmq.EVENT_HANDSHAKE_SUCCEEDED in events(index), "the handshake", 10)
        return sock

    def events(index: int) -> list[int]:
        seen.setdefault(index, []).extend(event for event, _ in drain_monitor(watched[index][1]))
        return seen[index]

    def ping(sock: zmq.Socket, rid: int) -> protocol.Reply:
        sock.send_multipart(protocol.frames(protocol.Ping(rid=rid)))
        assert sock.poll(10_000), "no answer"
        return protocol.reply_decoder.decode(sock.recv_multipart()[1])

    others = [Client(config, timeout=10) for _ in range(2)]
    try:
        for client in (many, *others):  # three connections of one key: served
            assert client.ping()["requester"].startswith("many")
        refused = ping(connect(), 1)
        assert not refused.ok and refused.error.code == "TooManyConnections", refused
        assert "3 connections" in refused.error.message or "at most 3" in refused.error.message
        wait_until(lambda: zmq.EVENT_DISCONNECTED in events(0), "the refused connection to be closed", 10)
        assert many.ping() and others[1].ping(), "the key's earlier connections are served"
        assert admin.ping()["online"] == 0, "another key is served"
        for client in others:  # two of the key's close: room for one more of its connections
            client.close()
        wait_until(lambda: ping(connect(), 2).ok or None, "a connection within the bound to be served", 10)

        silent = [len(watched) + i for i in range(4)]
        for _ in silent:  # four that send nothing: beyond three, the oldest is closed
            connect()
        wait_until(lambda: zmq.EVENT_DISCONNECTED in events(silent[0]), "the oldest silent connection closed", 10)
        assert all(zmq.EVENT_DISCONNECTED not in events(i) for i in silent[1:])
        assert ping(watched[silent[-1]][0], 3).ok, "a silent connection that speaks is served"
        assert "client connection(s) past --max-client-connections" in fleet.broker_log()
    finally:
        for sock, monitor in watched:
            close_monitor(sock, monitor)
            sock.close(0)
        for client in others:
            client.close()
        ctx.destroy(linger=0)
