"""Several brokers, one fleet (issue 20): three real brokers on one real PostgreSQL server, with
simulated and real agents spread across them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from zerorun import keys, protocol
from zerorun.client import Client, ClientConfig, RequestFailed
from zmq_broker.store.pg_coordination import lock_key

from tests import raw_agent_support as raw_agent


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory(3)


def _wait_online(client, count: int, prefix: str = "", timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        online = [i for i in client.instances() if i.ping_status == "Online" and i.instance_id.startswith(prefix)]
        if len(online) >= count:
            return online
        assert time.monotonic() < deadline, f"{len(online)}/{count} {prefix}* instances Online"
        time.sleep(0.3)


def test_three_brokers_act_as_one(cluster):
    for i in range(3):
        cluster.start_simulator(i, 50, f"s{i}", {"role": "sim", "part": str(i)})
    cluster.start_agent(0, "real-0", {"role": "real"})
    cluster.start_agent(2, "real-2", {"role": "real"})
    clients = [cluster.client(i) for i in range(3)]
    instances = _wait_online(clients[1], 152)
    assert {i.broker_id for i in instances} == {p["broker_id"] for p in clients[0].ping()["cluster"]}
    assert len({p["broker_id"] for p in clients[2].ping()["cluster"]}) == 3
    for i, client in enumerate(clients):  # a send by tag through each broker reaches every instance
        view = client.send("RunShellScript", {"commands": ["true"]}, ["tag:role=sim"], wait=60)
        assert view.status == "Success" and len(view.invocations) == 150, (i, view.counts)
    _sends_through_every_broker_at_once(cluster)
    view = clients[0].send("RunShellScript", {"commands": ["echo real-$ZERORUN_INSTANCE_ID"]}, ["tag:role=real"],
                           wait=30)
    assert sorted(i.stdout for i in view.invocations) == ["real-real-0\n", "real-real-2\n"]
    # show, wait, follow and cancel from brokers other than the one that took the send
    marker = cluster.root / "go"
    slow = clients[0].send("RunShellScript", {"commands": [
        "echo first-$ZERORUN_INSTANCE_ID", f"while [ ! -e {marker} ]; do sleep 0.1; done", "echo second"]},
        ["tag:role=real"])
    assert clients[1].get_command(slow.command_id).command_id == slow.command_id
    seen, cursors = "", {}
    deadline = time.monotonic() + 30
    while seen.count("first-") < 2:
        update = clients[2].follow(slow.command_id, cursors, timeout=5)
        cursors = update.cursors
        seen += "".join(chunk.data for chunk in update.chunks)
        assert time.monotonic() < deadline, seen
    assert "first-real-0" in seen and "first-real-2" in seen
    marker.touch()
    done = clients[1].wait(slow.command_id, timeout=30)
    assert done.status == "Success" and all(i.stdout.endswith("second\n") for i in done.invocations)
    hold = cluster.root / "never"
    cancelled = clients[2].send("RunShellScript", {"commands": [f"while [ ! -e {hold} ]; do sleep 0.1; done"]},
                                ["tag:role=real"])
    deadline = time.monotonic() + 30
    while clients[0].get_command(cancelled.command_id).counts.get("InProgress", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    clients[0].cancel(cancelled.command_id)  # owned by broker 2, cancelled through broker 0
    final = clients[1].wait(cancelled.command_id, timeout=30)
    assert final.status == "Cancelled" and {i.status for i in final.invocations} == {"Cancelled"}
    # keys, documents and history are the same from every broker
    doc = "schemaVersion: '2.2'\ndescription: x\nmainSteps:\n- action: aws:runShellScript\n  name: a\n  inputs:\n    runCommand: [echo shared]\n"
    clients[1].create_document("Shared-Doc", doc)
    assert clients[2].send("Shared-Doc", {}, ["instance:real-0"], wait=20).invocations[0].stdout == "shared\n"
    assert slow.command_id in {c.command_id for c in clients[2].commands(limit=20)}
    assert {k.name for k in clients[0].keys()} == {k.name for k in clients[2].keys()}


def _sends_through_every_broker_at_once(cluster) -> None:
    """Commands taken by every broker at once: each broker's lock queries (one per command taken
    and per command completed) read the others' notifications off its PostgreSQL session while
    they arrive, and every one of them must still be seen (a lost one leaves a command waiting)."""
    failures: list[str] = []

    def sender(i: int) -> None:
        client = Client(ClientConfig.load(cluster.fleets[i].client_config), timeout=40)  # one per thread
        try:
            for n in range(8):
                view = client.send("RunShellScript", {"commands": ["true"]}, [f"tag:part={n % 3}"],
                                   max_concurrency="100%", wait=30)
                if view.status != "Success" or len(view.invocations) != 50:
                    failures.append(f"broker {i}, command {n}: {view.status} {view.counts}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"broker {i}: {exc!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(3) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures


def _marking(directory: Path, seconds: float) -> str:
    """A step that leaves when it started and ended in a file per instance."""
    return (f"echo start $(date +%s.%N) >> {directory}/$ZERORUN_INSTANCE_ID; sleep {seconds}; "
            f"echo end $(date +%s.%N) >> {directory}/$ZERORUN_INSTANCE_ID")


def _markers(directory: Path) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for path in directory.iterdir():
        out[path.name] = [(line.split()[0], float(line.split()[1])) for line in path.read_text().splitlines()]
    return out


def _each_ran_once(directory: Path, count: int, at_most: int) -> None:
    """Every instance ran the step once, start to end, and never more than ``at_most`` at a time."""
    runs = _markers(directory)
    assert len(runs) == count
    for instance_id, lines in runs.items():
        assert [kind for kind, _ in lines] == ["start", "end"], (instance_id, lines)
    intervals = sorted((lines[0][1], lines[1][1]) for lines in runs.values())
    peak = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert peak <= at_most, peak


def _holders_of_lock(postgres_server, name: str) -> list[str]:
    """application_name of the sessions holding the advisory lock ``name``."""
    key = lock_key(name) & 0xFFFFFFFFFFFFFFFF
    with postgres_server.admin() as conn:
        return [r[0] for r in conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE "
            "l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s",
            (key >> 32, key & 0xFFFFFFFF)).fetchall()]


def _marking_through_broker_1(cluster, per_broker: int, role: str, seconds: float, max_concurrency: int,
                              started: int) -> tuple:
    """Simulated agents with real steps, ``per_broker`` on each of the three brokers, and a
    command by tag sent through broker 1 (its owner) whose step leaves markers; once ``started``
    steps have begun: (the markers' directory, a client of every broker, the command)."""
    markers = cluster.root / "markers"
    markers.mkdir()
    for i in range(3):
        cluster.start_simulator(i, per_broker, f"{role}{i}", {"role": role}, "--max-procs", str(min(per_broker, 20)),
                                executor="real")
    client = cluster.cluster_client(timeout=15)
    _wait_online(client, 3 * per_broker)
    view = cluster.client(1).send("RunShellScript", {"commands": [_marking(markers, seconds)]}, [f"tag:role={role}"],
                                  max_concurrency=max_concurrency)
    deadline = time.monotonic() + 60
    while len(list(markers.iterdir())) < started:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return markers, client, view


def _all_alive(client, count: int = 3) -> None:
    """Until ``count`` brokers are alive in the cluster (one that was away has rejoined)."""
    deadline = time.monotonic() + 30
    while sum(p["alive"] for p in client.ping()["cluster"]) < count:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_a_broker_killed_mid_command_loses_nothing_and_runs_nothing_twice(cluster, postgres_server):
    markers, client, view = _marking_through_broker_1(cluster, 50, "kill", 0.4, max_concurrency=10, started=30)
    # the owner holds the command's lock (taken at its next tick after the send): no live owner's
    # command is adopted by another broker
    assert _holders_of_lock(postgres_server, f"cmd:{view.command_id}") == ["zerorun-broker-coordination"]
    killed_at = time.monotonic()
    cluster.kill(1)  # the owner, and the holder of a third of the sessions
    _wait_online(client, 150, timeout=15)  # its agents are Online on the others within 15 s
    assert time.monotonic() - killed_at < 15
    final = client.wait(view.command_id, timeout=120)
    assert final.status == "Success", final.counts
    _each_ran_once(markers, 150, at_most=10)
    cluster.restart(1)  # the killed broker rejoins
    _all_alive(client)
    again = cluster.client(1).send("RunShellScript", {"commands": ["true"]}, ["tag:role=kill"], wait=60)
    assert again.status == "Success" and len(again.invocations) == 150
    # a finished command's lock is released (at the next tick after it ended)
    deadline = time.monotonic() + 10
    while _holders_of_lock(postgres_server, f"cmd:{again.command_id}"):
        assert time.monotonic() < deadline, "the finished command's lock is still held"
        time.sleep(0.1)


def test_an_owner_killed_right_after_the_send_has_its_command_adopted(cluster, postgres_server):
    """A broker takes the lock of a command it creates at its next tick (issue 20: no lock query
    per send), so an owner killed right after the send may never have held it: the command is
    adopted all the same (its owner is dead: its broker lock is free, its row stale), and ends
    with every instance run once, within its concurrency."""
    owner_id = cluster.client(1).ping()["broker_id"]
    markers, client, view = _marking_through_broker_1(cluster, 8, "early", 0.3, max_concurrency=3, started=0)
    cluster.kill(1)
    final = client.wait(view.command_id, timeout=120)
    assert final.status == "Success", final.counts
    _each_ran_once(markers, 24, at_most=3)
    assert _owner_in_store(cluster, postgres_server, view.command_id) != owner_id


def test_a_frozen_owner_is_ended_and_its_command_taken_over(cluster, postgres_server):
    """SIGSTOP the owner of a running command: its connections stay open (the kernel answers for
    it, as the server's side of a machine gone without a word stays open), so its sessions keep
    its locks and it would never be taken for dead. The others end its sessions once its row has
    not moved for UNRESPONSIVE_AFTER, take the command over, and finish it: every instance ran
    once, never more than ``max_concurrency`` at a time. Thawed, the owner finds the command
    taken, leaves it, and serves again as one of the cluster."""
    markers, client, view = _marking_through_broker_1(cluster, 10, "freeze", 0.3, max_concurrency=4, started=8)
    owner = cluster.client(1)
    owner_id = owner.ping()["broker_id"]
    frozen = cluster.fleets[1].broker
    frozen.send_signal(signal.SIGSTOP)
    try:
        taken_by = _adopted(cluster, postgres_server, view.command_id, owner_id, lambda: time.sleep(0.5))
        final = cluster.client(0 if taken_by == cluster.client(0).ping()["broker_id"] else 2).wait(
            view.command_id, timeout=120)
        assert final.status == "Success", final.counts
        _each_ran_once(markers, 30, at_most=4)
    finally:
        frozen.send_signal(signal.SIGCONT)
    # thawed: its sessions are gone; it finds the command another's and shows it as the store does
    deadline = time.monotonic() + 30
    while (seen := _once_back(lambda: owner.get_command(view.command_id))).status != "Success":
        assert time.monotonic() < deadline, seen.counts
        time.sleep(0.3)
    assert _owner_in_store(cluster, postgres_server, view.command_id) == taken_by
    _all_alive(client)
    again = owner.send("RunShellScript", {"commands": ["true"]}, ["tag:role=freeze"], wait=60)
    assert again.status == "Success" and len(again.invocations) == 30
    _each_ran_once(markers, 30, at_most=4)  # nothing ran again after the thaw


def _held_until_released(cluster, client, role: str, count: int) -> tuple:
    """A command by tag that runs on ``count`` agents until the file returned is made; once each
    holds it InProgress."""
    marker = cluster.root / "release"
    view = client.send("RunShellScript", {"commands": [f"while [ ! -e {marker} ]; do sleep 0.1; done; echo kept"]},
                       [f"tag:role={role}"])
    deadline = time.monotonic() + 30
    while client.get_command(view.command_id).counts.get("InProgress", 0) < count:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return view, marker


def _kept_by_all(client, command_id: str, count: int) -> None:
    """The command ends Success with every agent's output, asked until its broker answers."""
    final = None
    deadline = time.monotonic() + 60
    while final is None or final.status not in protocol.TERMINAL_STATUSES:
        try:
            final = client.wait(command_id, timeout=5)
        except RequestFailed:
            pass
        assert time.monotonic() < deadline, final
    assert final.status == "Success" and [i.stdout for i in final.invocations] == ["kept\n"] * count


def test_postgresql_restarted_mid_command(cluster, postgres_server):
    cluster.start_agent(0, "pg-0", {"role": "pg"})
    cluster.start_agent(1, "pg-1", {"role": "pg"})
    client = cluster.client(0)
    _wait_online(client, 2, "pg-")
    view, marker = _held_until_released(cluster, client, "pg", 2)
    postgres_server.stop("immediate")
    marker.touch()
    time.sleep(2)
    postgres_server.start()
    _kept_by_all(cluster.client(2), view.command_id, 2)


def _postgres_processes(postgres_server) -> list[int]:
    """The postmaster and every process it started (its sessions, its background workers)."""
    pids = [postgres_server.pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == postgres_server.pid:
                pids.append(int(entry))
    return pids


def test_postgresql_frozen_mid_command(cluster, postgres_server):
    """A server that stops answering without closing its connections (SIGSTOP: a paused VM, a
    stalled disk; the kernel still acknowledges, so no TCP timeout ends the wait): longer than the
    window in which a silent broker is judged dead. Once it answers again, the brokers carry on
    as one: the command ends with every result, none of them judged another dead meanwhile (their
    locks were held throughout), and every broker runs new commands on every agent."""
    for i in range(3):
        cluster.start_agent(i, f"fz-{i}", {"role": "fz"})
    client = cluster.client(0)
    _wait_online(client, 3, "fz-")
    view, marker = _held_until_released(cluster, client, "fz", 3)
    frozen = _postgres_processes(postgres_server)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        marker.touch()
        time.sleep(14)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    _kept_by_all(cluster.client(1), view.command_id, 3)
    for i in range(3):
        _wait_online(cluster.client(i), 3, "fz-", timeout=30)
        again = cluster.client(i).send("RunShellScript", {"commands": ["echo again"]}, ["tag:role=fz"], wait=30)
        assert again.status == "Success" and [v.stdout for v in again.invocations] == ["again\n"] * 3
    assert all(p["alive"] for p in client.ping()["cluster"])
    assert _owner_in_store(cluster, postgres_server, view.command_id) == client.ping()["broker_id"]  # not adopted


class _RawAgent:
    """An agent's DEALER socket, driven by hand: it says only what the test makes it say."""

    def __init__(self, cluster, key_dir: Path, instance_id: str = "raw-1"):
        keys.create_keypair(key_dir, "agent")
        self.key_dir = key_dir
        self.instance_id = instance_id
        self.cluster = cluster
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None

    def connect(self, index: int) -> None:
        if self.sock is not None:
            self.sock.close(0)  # gone without a word
        self.sock = raw_agent.connect(self.ctx, self.cluster.fleets[index].runtime(), self.key_dir)

    def send(self, message) -> None:
        self.sock.send_multipart(protocol.frames(message))

    def receive(self, timeout: float, until: type | None = None) -> list:
        return raw_agent.receive(self.sock, timeout, until)

    def hello(self, **fields) -> None:
        raw_agent.hello(self.sock, self.instance_id, timeout=10, **fields)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.ctx.term()


def _pg_backends(broker_pid: int, postgres_server) -> dict[str, int]:
    """application_name -> server pid of a broker process's PostgreSQL sessions (its sockets'
    local ports, from /proc, are the sessions' client ports)."""
    inodes = set()
    for fd in Path(f"/proc/{broker_pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{broker_pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[9] in inodes and remote_port == postgres_server.port:
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    with postgres_server.admin() as conn:
        return dict(conn.execute("SELECT application_name, pid FROM pg_stat_activity WHERE client_port = ANY(%s)",
                                 (ports,)).fetchall())


@contextlib.contextmanager
def _cut_off(cluster, index: int, postgres_server, *, coordination_back: bool = False):
    """Broker ``index`` loses both its PostgreSQL sessions, and none comes back until leaving
    (a role connection limit leaves room for the other brokers' sessions only). With
    ``coordination_back``, its coordination session is ended first and let back (it hears other
    brokers), then its store session is ended with no room left for it: it cannot read or write
    what they tell it. (Ending both at once and leaving room for one was a race: under load the
    store session, reconnecting on its next use, sometimes took the room first.)"""
    pid = cluster.fleets[index].broker.pid
    backends = _pg_backends(pid, postgres_server)
    assert {"zerorun-broker", "zerorun-broker-coordination"} <= set(backends), backends
    try:
        if coordination_back:
            with postgres_server.admin() as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (backends["zerorun-broker-coordination"],))
            deadline = time.monotonic() + 10
            while _pg_backends(pid, postgres_server).get("zerorun-broker-coordination") in (
                    None, backends["zerorun-broker-coordination"]):
                assert time.monotonic() < deadline, "the broker's coordination session did not come back"
                time.sleep(0.05)
        with postgres_server.admin() as conn:
            (sessions,) = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'zerorun'").fetchone()
            ended = ("zerorun-broker",) if coordination_back else ("zerorun-broker", "zerorun-broker-coordination")
            conn.execute(f"ALTER ROLE zerorun CONNECTION LIMIT {sessions - len(ended)}")
            for name in ended:
                conn.execute("SELECT pg_terminate_backend(%s)", (backends[name],))
        yield
        assert "zerorun-broker" not in _pg_backends(pid, postgres_server)  # the store stayed away throughout
    finally:
        with postgres_server.admin() as conn:
            conn.execute("ALTER ROLE zerorun CONNECTION LIMIT -1")


def _store_away_but_not_coordination(cluster, index: int, postgres_server):
    return _cut_off(cluster, index, postgres_server, coordination_back=True)


def _heartbeating(agent: "_RawAgent", seconds: float, until: type | None = None) -> list:
    """What the broker says to a raw agent that keeps its session alive meanwhile."""
    got: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and any(isinstance(m, until) for m in got)):
        agent.send(protocol.Heartbeat())
        got += agent.receive(0.3, until=until)
    return got


def _online_at(client, agent: "_RawAgent", instance_id: str = "raw-1") -> None:
    """Until ``client``'s broker (not the one the raw agent talks to) sees the agent Online."""
    deadline = time.monotonic() + 15
    while not any(i.instance_id == instance_id and i.ping_status == "Online" for i in client.instances()):
        assert time.monotonic() < deadline, f"{instance_id} is not Online at the other broker"
        _heartbeating(agent, 0.3)


def test_what_an_owner_could_not_read_while_its_store_was_away_is_read_when_it_is_back(
        cluster_factory, postgres_server, tmp_path):
    """The owner's coordination session comes back before its store session does: a result
    relayed meanwhile is announced to it, and reading it fails. It is read again once the store
    is back (the command used to stay InProgress for ever)."""
    cluster = cluster_factory(2)
    owner = cluster.client(0)
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        agent.connect(1)  # held by the broker that does not own the command
        agent.hello()
        _online_at(owner, agent)
        view = owner.send("RunShellScript", {"commands": ["echo held"]}, ["instance:raw-1"])
        delivers = [m for m in _heartbeating(agent, 10, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = delivers[0].invocations[0].invocation_id
        with _store_away_but_not_coordination(cluster, 0, postgres_server):
            agent.send(protocol.Results([protocol.InvocationResult(
                iid, "Success", exit_code=0, stdout="held\n", ended_at=time.time())]))
            _heartbeating(agent, 2)  # the holder relays it; the owner is told, and cannot read it
        final = owner.wait(view.command_id, timeout=20)
        assert final.status == "Success" and final.invocations[0].stdout == "held\n"
    finally:
        agent.close()


def test_a_client_of_several_brokers_reads_from_another_when_one_answers_that_its_store_is_away(
        cluster_factory, postgres_server):
    """A broker cut off from PostgreSQL (not from its clients) commits nothing, and sends nothing
    whose truth depends on a commit, until the server is back; a read it cannot make is answered
    StoreUnavailable at once (it used to wait for the store with the rest). A client that knows
    several brokers asks the next one, as it does when a broker does not answer; one that knows
    only that broker gets the error. Both with the broker's coordination session back (it hears
    the others) and with both its sessions away."""
    cluster = cluster_factory(2)
    cluster.start_agent(1, "sa-1", {"role": "sa"})
    _wait_online(cluster.client(1), 1, "sa-")
    done = cluster.client(1).send("RunShellScript", {"commands": ["echo stored"]}, ["tag:role=sa"], wait=30)
    assert done.status == "Success"
    for coordination_back in (True, False):
        answers: dict[str, object] = {}

        def read(name: str, client: Client) -> None:
            try:
                answers[name] = client.get_command(done.command_id)
            except RequestFailed as exc:
                answers[name] = exc

        readers = [threading.Thread(target=read, args=("one broker", cluster.client(0, timeout=60))),
                   threading.Thread(target=read, args=("several", cluster.cluster_client(timeout=60)))]
        with _cut_off(cluster, 0, postgres_server, coordination_back=coordination_back):
            for reader in readers:  # the cluster client asks broker 0 first
                reader.start()
            for reader in readers:
                reader.join(10)
            assert len(answers) == 2, f"answered while the store was away: {sorted(answers)}"
        alone = answers["one broker"]
        assert isinstance(alone, RequestFailed) and alone.code == "StoreUnavailable", alone
        assert answers["several"].invocations[0].stdout == "stored\n"
        assert _once_back(lambda: cluster.client(0).get_command(done.command_id)).status == "Success"


def test_a_wait_on_a_broker_that_is_killed_goes_on_at_another_at_once(cluster_factory):
    """A `wait` long-polling a broker that died waited out its slice plus the request timeout
    before it asked the next broker (15 s + 120 s here); a closed connection sends it on at once."""
    cluster = cluster_factory(2)
    cluster.start_agent(1, "gone-1", {"role": "gone"})
    _wait_online(cluster.client(1), 1, "gone-")
    marker = cluster.root / "gone-go"
    view = cluster.client(1).send("RunShellScript", {"commands": [
        f"while [ ! -e {marker} ]; do sleep 0.1; done", "echo done"]}, ["tag:role=gone"])
    waiter = cluster.cluster_client(timeout=120)  # broker 0 first
    assert waiter.get_command(view.command_id).command_id == view.command_id  # connected to broker 0
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(waiter.wait(view.command_id, timeout=300)), daemon=True)
    thread.start()
    time.sleep(0.5)  # the long poll is at broker 0
    cluster.kill(0)
    marker.touch()
    thread.join(60)
    assert outcome, "the wait still waits for the killed broker"
    assert outcome[0].status == "Success" and outcome[0].invocations[0].stdout == "done\n", outcome[0]


def test_a_delivery_its_holder_could_not_read_while_its_store_was_away_goes_out_when_it_is_back(
        cluster_factory, postgres_server, tmp_path):
    """A command with secret values is not described in its notification: its holder reads it from
    the store. While that store is away the delivery waits (it used to be dropped, and the
    invocation waited for its timeout), and goes to the agent when the store is back."""
    cluster = cluster_factory(2)
    owner = cluster.client(0)
    secret = "s3cr3t-" + uuid.uuid4().hex
    owner.create_document("Check-Secret", _secret_document(secret))
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        agent.connect(1)
        agent.hello()
        _online_at(owner, agent)
        with _store_away_but_not_coordination(cluster, 1, postgres_server):
            view = owner.send("Check-Secret", {"token": secret}, ["instance:raw-1"])
            assert not any(isinstance(m, protocol.Deliver) for m in _heartbeating(agent, 2))
        delivers = [m for m in _heartbeating(agent, 15, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        assert delivers, "the delivery never came"
        invocation = delivers[0].invocations[0]
        assert invocation.command_id == view.command_id and secret in invocation.steps[0].script
    finally:
        agent.close()


def _acked(messages: list, invocation_id: str) -> bool:
    return any((isinstance(m, protocol.ResultAck) and invocation_id in m.invocation_ids)
               or (isinstance(m, protocol.Deliver) and invocation_id in m.results_acked) for m in messages)


def _owner_in_store(cluster, postgres_server, command_id: str) -> str:
    with postgres_server.admin(cluster.dsn.rsplit("/", 1)[1]) as conn:
        return conn.execute("SELECT owner FROM commands WHERE command_id = %s", (command_id,)).fetchone()[0]


def _once_back(call, timeout: float = 30):
    """``call()``'s answer from a broker whose store may still be coming back (its session's backoff
    can outlast its coordination session's): until then a read answers StoreUnavailable."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except RequestFailed as exc:
            assert exc.code == "StoreUnavailable" and time.monotonic() < deadline, exc
            time.sleep(0.2)


def _adopted(cluster, postgres_server, command_id: str, owner_id: str, meanwhile) -> str:
    """Until another broker than ``owner_id`` owns the command (``meanwhile`` between looks); its id."""
    deadline = time.monotonic() + 40
    while (owner := _owner_in_store(cluster, postgres_server, command_id)) == owner_id:
        assert time.monotonic() < deadline, "no other broker adopted the command"
        meanwhile()
    return owner


def _running_at_its_owner(cluster, postgres_server, agent: "_RawAgent", script: str) -> tuple:
    """A command sent through broker 0 and running on a raw agent connected there (seen Online
    by broker 1 too): its view, its invocation's id, and broker 0's id as the store names it."""
    agent.connect(0)
    agent.hello()
    _online_at(cluster.client(1), agent)
    view = cluster.client(0).send("RunShellScript", {"commands": [script]}, ["instance:raw-1"])
    delivers = [m for m in _heartbeating(agent, 10, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
    iid = delivers[0].invocations[0].invocation_id
    agent.send(protocol.Ack([iid], started=[iid], at=time.time()))
    return view, iid, _owner_in_store(cluster, postgres_server, view.command_id)


def test_a_broker_cut_off_until_its_command_was_adopted_leaves_it_to_the_adopter(
        cluster_factory, postgres_server, tmp_path):
    """The owner is cut off from PostgreSQL (not from its agent) long enough to be judged dead;
    the other broker adopts its command. A result the agent sent to the owner meanwhile was
    recorded there and could not be written. When the owner is back it must not write over the
    adopter, nor acknowledge that result: it leaves the command to the adopter and has the agent
    say HELLO again, and the result reaches the adopter through it (it used to write the command
    back as its own, ended, while the adopter kept it InProgress). A client waiting on the owner
    for the command's end is answered with what the adopter records, when it does (it used to get
    the owner's own copy, completed by the result it never wrote, as soon as the owner was back)."""
    cluster = cluster_factory(2)
    owner, adopter = cluster.client(0), cluster.client(1)
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        view, iid, owner_id = _running_at_its_owner(cluster, postgres_server, agent, "echo held")
        with _cut_off(cluster, 0, postgres_server):
            waited: list = []
            patient = cluster.client(0, timeout=90)
            waiter = threading.Thread(target=lambda: waited.append(patient.wait(view.command_id, timeout=60)))
            waiter.start()
            time.sleep(0.5)  # the owner has the waiter before the result
            agent.send(protocol.Results([protocol.InvocationResult(
                iid, "Success", exit_code=0, stdout="held\n", ended_at=time.time())]))
            adopter_id = _adopted(cluster, postgres_server, view.command_id, owner_id,
                                  lambda: _heartbeating(agent, 0.5))
            assert len(_holders_of_lock(postgres_server, f"cmd:{view.command_id}")) == 1
        said: list = []
        deadline = time.monotonic() + 30
        while not any(isinstance(m, protocol.PleaseHello) for m in said):
            assert time.monotonic() < deadline, f"the agent was not asked to say HELLO again: {said}"
            assert not _acked(said, iid), "the owner acknowledged a result it did not write"
            said += _heartbeating(agent, 0.5)
        said += _heartbeating(agent, 0.5)  # what the owner sent with its request for HELLO has come
        assert not waited, f"the waiter was answered before the adopter recorded the result: {waited}"
        agent.send(protocol.Hello(instance_id="raw-1", unacked=[iid]))
        said = agent.receive(10, until=protocol.Welcome)
        agent.send(protocol.Results([protocol.InvocationResult(
            iid, "Success", exit_code=0, stdout="held\n", ended_at=time.time())]))
        deadline = time.monotonic() + 15
        while not _acked(said, iid):
            assert time.monotonic() < deadline, f"the result was not acknowledged: {said}"
            said += _heartbeating(agent, 0.5)
        final = adopter.wait(view.command_id, timeout=20)
        assert final.status == "Success" and final.invocations[0].stdout == "held\n"
        assert _owner_in_store(cluster, postgres_server, view.command_id) == adopter_id
        assert _once_back(lambda: owner.wait(view.command_id, timeout=10)).status == "Success"
        waiter.join(30)
        assert waited and waited[0].status == "Success" and waited[0].invocations[0].stdout == "held\n", waited
        _online_at(adopter, agent)  # its session, forgotten when its broker was judged dead, is known again
    finally:
        agent.close()


def test_a_cancel_a_cut_off_broker_accepted_goes_to_the_broker_that_adopted_its_command(
        cluster_factory, postgres_server, tmp_path):
    """A cancel sent to the owner while it is cut off from PostgreSQL is answered once the owner is
    back; by then another broker has adopted the command, and the cancel must reach it (the owner
    left the command with everything it had queued, the cancel with it), and through the owner,
    which holds the agent's session again, the agent (the adopter took the owner for dead until its
    next look at the cluster, and dropped what it had for the agent)."""
    cluster = cluster_factory(2)
    adopter = cluster.client(1)
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        view, iid, owner_id = _running_at_its_owner(cluster, postgres_server, agent, "sleep 600")
        answered: list = []
        with _cut_off(cluster, 0, postgres_server):
            time.sleep(0.5)  # the owner's sessions are gone before the cancel comes
            patient = cluster.fleets[0].adopt(Client(ClientConfig.load(cluster.fleets[0].client_config), timeout=60))
            canceller = threading.Thread(target=lambda: answered.append(patient.cancel(view.command_id)))
            canceller.start()
            _adopted(cluster, postgres_server, view.command_id, owner_id, lambda: _heartbeating(agent, 0.5))
        said: list = []
        deadline = time.monotonic() + 30
        while not any(isinstance(m, protocol.Cancel) and iid in m.invocation_ids for m in said):
            assert time.monotonic() < deadline, f"the cancel did not reach the agent: {said}"
            if any(isinstance(m, protocol.PleaseHello) for m in said):
                said = []
                agent.send(protocol.Hello(instance_id="raw-1", running=[iid]))
            said += _heartbeating(agent, 0.5)
        canceller.join(30)
        assert answered, "the cancel was not answered"
        agent.send(protocol.Results([protocol.InvocationResult(iid, "Cancelled", exit_code=-15, ended_at=time.time())]))
        final = adopter.wait(view.command_id, timeout=20)
        assert final.status == "Cancelled", final.counts
    finally:
        agent.close()


def test_a_broker_cut_off_from_postgresql_mid_command_leaves_it_to_its_adopter(cluster_factory, postgres_server):
    """The owner of a running command loses PostgreSQL, not its agents' network: they fail over
    (it cannot answer them), the other broker adopts the command and finishes it, and the owner
    comes back meanwhile. Every invocation ends once, at most ``max_concurrency`` at a time, and
    the command is the same seen from both brokers (the owner used to keep its own stale copy,
    InProgress, and wrote the command back as its own)."""
    cluster = cluster_factory(2)
    markers = cluster.root / "markers"
    markers.mkdir()
    cluster.start_simulator(0, 30, "cut", {"role": "cut"}, "--max-procs", "10", executor="real")
    owner, adopter = cluster.client(0), cluster.client(1)
    _wait_online(adopter, 30)
    view = owner.send("RunShellScript", {"commands": [_marking(markers, 0.5)]}, ["tag:role=cut"], max_concurrency=3)
    deadline = time.monotonic() + 30
    while len(list(markers.iterdir())) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    owner_id = _owner_in_store(cluster, postgres_server, view.command_id)
    with _cut_off(cluster, 0, postgres_server):
        _adopted(cluster, postgres_server, view.command_id, owner_id, lambda: time.sleep(0.2))
    final = adopter.wait(view.command_id, timeout=120)
    assert final.status == "Success", final.counts
    _each_ran_once(markers, 30, at_most=3)
    seen = _once_back(lambda: owner.wait(view.command_id, timeout=10))  # once the owner is back, as the store says
    assert (seen.status, seen.counts) == (final.status, final.counts)
    assert _owner_in_store(cluster, postgres_server, view.command_id) != owner_id


def test_hellos_after_failing_over_acknowledge_what_the_agent_holds(cluster_factory, tmp_path):
    """An agent fails over from the broker that owns its command to another one, and says HELLO
    there naming the invocation it runs; a HELLO that crossed the agent's other messages comes
    again at once. The invocation is never taken for undelivered (it would end Undeliverable)."""
    cluster = cluster_factory(2)
    owner, other = cluster.client(0), cluster.client(1)
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        agent.connect(0)
        agent.hello()
        view = owner.send("RunShellScript", {"commands": ["echo held"]}, ["instance:raw-1"])
        delivers = [m for m in agent.receive(10, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = delivers[0].invocations[0].invocation_id
        agent.connect(1)
        for _ in range(4):  # each HELLO in a loop iteration of its own
            agent.send(protocol.Hello(instance_id="raw-1", running=[iid]))
            time.sleep(0.3)
        agent.receive(2.0)
        assert other.get_command(view.command_id).invocations[0].status == "Pending"
        agent.send(protocol.Results([protocol.InvocationResult(
            iid, "Success", exit_code=0, stdout="held\n", ended_at=time.time())]))
        final = owner.wait(view.command_id, timeout=20)
        assert final.status == "Success" and final.invocations[0].stdout == "held\n"
    finally:
        agent.close()


def test_invocation_ids_an_agent_makes_up_cost_the_broker_one_query_per_message(cluster_factory, tmp_path):
    """Results, Acks, Starteds, Refusals and HELLOs name invocations; one this broker does not
    hold may be another broker's, which the store says. Asked one id at a time (a round trip
    each), 50,000 made-up ids in a 3 MB message held the loop for about 13 s, as often as an
    accepted agent sent one: every client and agent of the broker waited. One query asks for
    them all; the results its agent really has are still taken."""
    cluster = cluster_factory(1)
    client = cluster.client(0)
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        agent.connect(0)
        agent.hello()
        view = client.send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        delivers = [m for m in agent.receive(10, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = delivers[0].invocations[0].invocation_id
        made_up = [uuid.uuid4().hex for _ in range(50_000)]
        for message in (protocol.Results([protocol.InvocationResult(i, "Success") for i in made_up]),
                        protocol.Ack(made_up), protocol.Started(made_up, time.time()),
                        protocol.Refuse([protocol.Refusal(i, "invalid") for i in made_up]),
                        protocol.Hello(instance_id="raw-1", unacked=made_up)):
            client.ping()
            agent.send(message)
            time.sleep(0.2)  # in the broker's hands
            started = time.monotonic()
            client.ping()
            assert time.monotonic() - started < 4.0, type(message).__name__
        agent.receive(1.0)
        agent.send(protocol.Results([protocol.InvocationResult(iid, "Success", exit_code=0, stdout="real\n"),
                                     *[protocol.InvocationResult(i, "Success") for i in made_up[:100]]]))
        final = client.wait(view.command_id, timeout=20)
        assert final.status == "Success" and final.invocations[0].stdout == "real\n"
    finally:
        agent.close()


def test_deliveries_through_another_broker_keep_the_agents_limits(cluster_factory, tmp_path):
    """The broker holding the agent's session delivers for the command's owner with the same
    limits as the owner's own deliveries: a command larger than the agent accepts, and an agent
    that never acknowledges (it got the invocation twice), end the invocation Undeliverable."""
    cluster = cluster_factory(2)
    owner = cluster.client(0)
    agent = _RawAgent(cluster, tmp_path / "raw")
    try:
        agent.connect(1)
        agent.hello(max_message_bytes=20000)
        _wait_online(owner, 1, "raw-")
        view = owner.send("RunShellScript", {"commands": ["echo " + "x" * 30000]}, ["instance:raw-1"], wait=20)
        (inv,) = view.invocations
        assert inv.status == "Undeliverable" and "more than this agent accepts" in inv.status_details
        view = owner.send("RunShellScript", {"commands": ["echo small"]}, ["instance:raw-1"])
        deliveries = 0
        for _ in range(4):
            got = agent.receive(2.0, until=protocol.Deliver)
            deliveries += sum(1 for m in got if isinstance(m, protocol.Deliver))
            agent.send(protocol.Hello(instance_id="raw-1", max_message_bytes=20000))
        final = owner.wait(view.command_id, timeout=20)
        assert deliveries == 2
        (inv,) = final.invocations
        assert inv.status == "Undeliverable" and "after 2 deliveries" in inv.status_details
    finally:
        agent.close()


def test_what_an_agent_says_of_another_agents_invocation_is_not_relayed(cluster_factory, tmp_path):
    """A holder relayed live output of an invocation it delivered for another owner whichever of
    its agents sent it: one agent could write into another's output. Only the instance the
    invocation was delivered to is heard, for output as for its result."""
    cluster = cluster_factory(2)
    owner = cluster.client(0)
    target, other = _RawAgent(cluster, tmp_path / "target"), _RawAgent(cluster, tmp_path / "other", "raw-2")
    try:
        for agent in (target, other):
            agent.connect(1)
            agent.hello()
        _wait_online(owner, 2, "raw-")
        view = owner.send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        (deliver,) = [m for m in target.receive(10, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = deliver.invocations[0].invocation_id
        target.send(protocol.Ack([iid]))
        other.send(protocol.Output([protocol.OutputChunk(iid, "stdout", "forged\n")]))
        other.send(protocol.Results([protocol.InvocationResult(iid, "Failed", exit_code=9, stdout="forged\n")]))
        target.send(protocol.Output([protocol.OutputChunk(iid, "stdout", "real\n")]))
        seen, cursors = "", {}
        deadline = time.monotonic() + 20
        while "real" not in seen:
            update = owner.follow(view.command_id, cursors, timeout=2)
            cursors = update.cursors
            seen += "".join(chunk.data for chunk in update.chunks)
            assert time.monotonic() < deadline, seen
            _heartbeating(target, 0.1)
        target.send(protocol.Results([protocol.InvocationResult(iid, "Success", exit_code=0, stdout="real\n")]))
        final = owner.wait(view.command_id, timeout=20)
    finally:
        target.close()
        other.close()
    assert seen == "real\n"
    (inv,) = final.invocations
    assert (inv.status, inv.exit_code, inv.stdout) == ("Success", 0, "real\n")


def _secret_document(secret: str) -> str:
    return ("schemaVersion: '2.2'\ndescription: x\ntemplating: jinja\nparameters:\n"
            "  token:\n    type: String\n    secret: true\n"
            "mainSteps:\n- action: aws:runShellScript\n  name: a\n  inputs:\n    runCommand:\n"
            "    - test {{ token | quote }} = " + secret + " && echo plain-marker-matches\n")


def test_a_secret_goes_through_another_broker_to_its_agent_and_never_into_a_notification(cluster_factory,
                                                                                         postgres_server):
    """A holder delivering another broker's command is told the command in a notification, unless
    the command has secret values: those it reads from the store, and the agent still gets them."""
    cluster = cluster_factory(2)
    cluster.start_agent(1, "sec-1", {"role": "sec"})
    client = cluster.client(0)
    _wait_online(client, 1, "sec-")
    secret = "s3cr3t-V@lue-" + uuid.uuid4().hex
    client.create_document("Check-Secret", _secret_document(secret))
    from zmq_broker.cluster import BROADCAST, channel_of

    with postgres_server.admin(cluster.dsn.rsplit("/", 1)[1]) as listener:
        for channel in [BROADCAST] + [channel_of(p["broker_id"]) for p in client.ping()["cluster"]]:
            listener.execute(f"LISTEN {channel}")
        view = client.send("Check-Secret", {"token": secret}, ["instance:sec-1"], wait=30)
        assert view.status == "Success" and view.invocations[0].stdout == "plain-marker-matches\n", view
        plain = client.send("RunShellScript", {"commands": ["echo plain-" + secret[-8:]]}, ["instance:sec-1"],
                            wait=30)
        assert plain.status == "Success"
        payloads = [n.payload for n in listener.notifies(timeout=2)]
    told = [p for p in payloads if '["m",' in p]
    assert len(told) == 1 and not any(secret in p for p in payloads), payloads  # only the plain command's
    assert any('"v",' in p and view.invocations[0].invocation_id in p for p in payloads)  # delivered by broker 1
