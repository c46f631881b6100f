"""The PostgreSQL store against a real server: schema versions, group commit, outages, NOTIFY,
advisory locks, SKIP LOCKED pruning, and the settings that choose it.

The behaviour both backends share (documents, the command book over a store, restarts) is
checked by test_docstore.py and test_commands.py on both; this file holds what only a server
has. Outage tests stop and start the session's server, so they leave it running again.
"""

from __future__ import annotations

import os
import select
import threading
import time
import uuid

import pytest

from zerorun import protocol
from zerorun.protocol import InvocationView
from zmq_broker.errors import BrokerError
from zmq_broker.model import CommandRecord, InstanceRecord, KeyRecord, OutputRecord, TagRecord, WebhookRecord
from zmq_broker.store import open_store, postgresql, store_setting_problem
from zmq_broker.store.pg_connection import read_password_file
from zmq_broker.store.postgresql import MIGRATIONS, SCHEMA_VERSION, PostgresStore


@pytest.fixture
def dsn(postgres_server):
    """A fresh, empty database for one test."""
    name = "t_" + uuid.uuid4().hex[:12]
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


@pytest.fixture
def stores(dsn, postgres_server):
    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        opened.append(PostgresStore(dsn, postgres_server.password))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def outage(postgres_server):
    """Stops the server (as a crash would: no shutdown checkpoint) and always starts it again."""
    yield lambda: postgres_server.stop("immediate")
    postgres_server.start()


def _command(command_id: str, status: str = protocol.PENDING, at: float | None = None) -> CommandRecord:
    now = time.time() if at is None else at
    return CommandRecord(command_id=command_id, status=status, status_details="", document_name="RunShellScript",
                         document_version="1", document_sha256="0" * 64, parameters={}, targets=["tag:role=web"],
                         requested_by="test", requested_at=now, expires_at=now + 60, timeout_seconds=60,
                         max_concurrency=10, max_errors=0, steps=[])


def _invocation(command_id: str, n: int, status: str = protocol.PENDING) -> InvocationView:
    return InvocationView(invocation_id=f"{command_id}-{n}", command_id=command_id, instance_id=f"i-{n:03d}",
                          status=status, stdout="x" * 100)


def _heard(cluster, count: int, timeout: float = 10) -> list:
    """The events a cluster broker drains until it has ``count`` (NOTIFYs come a moment after the
    commit that sends them)."""
    events: list = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        select.select([cluster.fileno()], [], [], 0.1)
        events += cluster.drain()
    return events


def _rows(postgres_server, dsn: str, sql: str) -> list[tuple]:
    with postgres_server.admin(dsn.rsplit("/", 1)[1]) as conn:
        return conn.execute(sql).fetchall()


# -- schema ---------------------------------------------------------------------------------------

def test_a_new_database_gets_the_latest_schema_once(stores, dsn, postgres_server):
    stores().close()
    stores().close()
    assert _rows(postgres_server, dsn, "SELECT version FROM zerorun_schema ORDER BY version") == [
        (v,) for v, _ in MIGRATIONS]  # each step once (numbers are shared out between branches)


def test_a_schema_4_database_gains_target_terms_for_its_old_commands(dsn, postgres_server, stores):
    import msgspec
    import psycopg

    with psycopg.connect(dsn, password=postgres_server.password, autocommit=True) as conn:  # an older broker's
        conn.execute("CREATE TABLE zerorun_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL"
                     " DEFAULT now())")
        for version, sql in MIGRATIONS[:4]:
            conn.execute(sql)
            conn.execute("INSERT INTO zerorun_schema (version) VALUES (%s)", (version,))
        rec = _command("before", protocol.SUCCESS)
        rec.targets = ["tag:role=db", "instance:i-001,i-002"]
        conn.execute("INSERT INTO commands VALUES (%s, %s, %s, %s, %s, '')", (
            rec.command_id, rec.status, rec.document_name, rec.requested_at, msgspec.msgpack.encode(rec)))
    store = stores()
    assert [c.command_id for c in store.list_commands(target="role=db")] == ["before"]
    assert [c.command_id for c in store.list_commands(target="i-002")] == ["before"]
    assert store.prune(time.time() + 1) == 1
    assert _rows(postgres_server, dsn, "SELECT count(*) FROM command_targets") == [(0,)]


def test_brokers_starting_together_migrate_once(stores, dsn, postgres_server):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _rows(postgres_server, dsn, "SELECT version FROM zerorun_schema ORDER BY version") == [
        (v,) for v, _ in MIGRATIONS]  # each step once (numbers are shared out between branches)


def test_a_newer_schema_is_refused_with_one_line(stores, dsn, postgres_server):
    stores().close()
    with postgres_server.admin(dsn.rsplit("/", 1)[1]) as conn:
        conn.execute("INSERT INTO zerorun_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(BrokerError) as exc:
        stores()
    assert exc.value.code == "SchemaTooNew"
    assert "newer than this broker knows" in exc.value.message and "\n" not in exc.value.message


# -- group commit -----------------------------------------------------------------------------------

def test_queued_writes_are_invisible_until_the_flush_commits_them(stores):
    writer, reader = stores(), stores()
    writer.put_command(_command("c1"))
    for n in range(3):
        writer.put_invocation(_invocation("c1", n))
    writer.put_key(KeyRecord("k1", "agent", "web-1", "accepted", 1.0, 1.0))
    writer.put_instance(InstanceRecord("web-1", "k1", {"role": "web"}))
    assert reader.get_command("c1") is None and reader.get_invocations("c1") == []
    assert writer.get_command("c1") is not None  # the writer sees its own queue
    writer.flush()
    assert not writer.dirty
    assert reader.get_command("c1").command_id == "c1"
    assert [i.instance_id for i in reader.get_invocations("c1")] == ["i-000", "i-001", "i-002"]
    assert [k.name for k in reader.load_keys()] == ["web-1"]
    assert reader.load_instances()[0].tags == {"role": "web"}
    writer.delete_key("k1")
    writer.put_invocation(_invocation("c1", 1, protocol.SUCCESS))
    writer.flush()
    assert reader.load_keys() == []
    assert {i.instance_id: i.status for i in reader.get_invocations("c1")}["i-001"] == protocol.SUCCESS
    assert writer.last_flush_seconds > 0


def test_a_commit_writes_every_kind_of_row_it_holds_and_only_those(stores):
    """One commit with a row of every kind (a key deleted beside one written), then commits with
    one kind each: each kind is written, and a kind not queued is left as it was."""
    writer, reader = stores(), stores()
    writer.put_key(KeyRecord("k-gone", "agent", "web-9", "accepted", 1.0, 1.0))
    writer.flush()
    writer.delete_key("k-gone")
    writer.put_key(KeyRecord("k1", "agent", "web-1", "accepted", 1.0, 1.0))
    writer.put_instance(InstanceRecord("web-1", "k1"))
    writer.put_command(_command("c1"), new=True)
    writer.put_invocation(_invocation("c1", 0))
    writer.put_tags(TagRecord("web-1", {"role": "web"}))
    writer.put_output(OutputRecord("c1-0", "c1", "web-1", stdout_size=10))
    writer.put_webhook(WebhookRecord("d1", "c1", "ops", "http://127.0.0.1:1/x", "command", b"{}", 1.0, 0.0))
    writer.flush()
    assert [k.public_key for k in reader.load_keys()] == ["k1"]
    assert [r.instance_id for r in reader.load_instances()] == ["web-1"]
    assert [c.command_id for c in reader.list_commands(target="role=web")] == ["c1"]  # its target terms
    assert [i.invocation_id for i in reader.get_invocations("c1")] == ["c1-0"]
    assert reader.get_tags(["web-1"])[0].tags == {"role": "web"}
    assert reader.get_output("c1-0").stdout_size == 10
    assert [w.delivery_id for w in reader.webhooks_of("c1")] == ["d1"]
    writer.put_invocation(_invocation("c1", 0, protocol.SUCCESS))
    assert len(writer._statements()) == 1
    writer.flush()
    writer.put_tags(TagRecord("web-1", {"role": "db"}))
    writer.flush()
    assert reader.get_invocations("c1")[0].status == protocol.SUCCESS
    assert reader.get_tags(["web-1"])[0].tags == {"role": "db"}
    assert reader.get_command("c1").status == protocol.PENDING and reader.get_output("c1-0").stdout_size == 10


def test_a_batch_larger_than_one_statement_is_still_one_transaction(stores, monkeypatch):
    monkeypatch.setattr(postgresql, "CHUNK_ROWS", 3)
    store = stores()
    store.put_command(_command("big"))
    for n in range(10):
        store.put_invocation(_invocation("big", n))
    assert len(store._statements()) > 1
    store.flush()
    assert len(stores().get_invocations("big")) == 10


def test_a_nul_character_from_a_peer_does_not_block_every_later_commit(stores):
    store = stores()
    store.put_instance(InstanceRecord("bad\x00id", "k9"))
    store.put_command(_command("after"))
    store.flush()
    assert not store.dirty
    assert stores().get_command("after") is not None
    assert [r.instance_id for r in stores().load_instances()] == ["bad\x00id"]  # the body keeps it exactly


def test_listing_and_pruning(stores):
    store = stores()
    old = time.time() - 1000
    for n in range(5):
        store.put_command(_command(f"done-{n}", protocol.SUCCESS, at=old + n), new=True)
        store.put_invocation(_invocation(f"done-{n}", 0, protocol.SUCCESS))
    store.put_command(_command("running", protocol.IN_PROGRESS, at=old), new=True)
    assert [c.command_id for c in store.list_commands(limit=2)] == ["done-4", "done-3"]  # flushed first
    assert [c.command_id for c in store.list_commands(status=protocol.IN_PROGRESS)] == ["running"]
    assert len(store.list_commands(target="role=web")) == 6 and store.list_commands(target="role=db") == []
    assert [c.command_id for c in store.load_active_commands()] == ["running"]
    assert store.prune(time.time(), batch=2) == 2
    assert store.prune(time.time()) == 3
    assert store.get_command("running") is not None and store.bulk_invocations(["done-0", "done-4"]) == []


def test_pruning_skips_what_another_broker_has_locked(stores, dsn, postgres_server):
    store = stores()
    old = time.time() - 1000
    for n in range(3):
        store.put_command(_command(f"done-{n}", protocol.SUCCESS, at=old))
    store.flush()
    with postgres_server.admin(dsn.rsplit("/", 1)[1]) as other:
        other.autocommit = False
        other.execute("SELECT 1 FROM commands WHERE command_id = 'done-1' FOR UPDATE")
        started = time.monotonic()
        assert store.prune(time.time()) == 2  # not blocked by the other transaction's row
        assert time.monotonic() - started < 5
        other.rollback()
    assert store.prune(time.time()) == 1



def test_a_prune_pass_deletes_by_index_and_the_session_has_no_jit(stores, dsn, postgres_server):
    """A pass over a long history stays a short stall: its deletes walk the command_id indexes (an
    ``IN (SELECT ...)`` of the doomed commands was a hash join over every invocation) and the
    server does not JIT-compile it (40-500 ms for a plan estimated above ``jit_above_cost``)."""
    store = stores()
    old = time.time() - 1000
    for n in range(3000):
        store.put_command(_command(f"done-{n:04d}", protocol.SUCCESS, at=old + n), new=True)
        store.put_invocation(_invocation(f"done-{n:04d}", 0, protocol.SUCCESS))
    store.flush()
    assert store._query("SHOW jit", ()) == [("off",)]
    with postgres_server.admin(dsn.rsplit("/", 1)[1]) as conn:
        conn.execute("ANALYZE")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + postgresql._PRUNE, (time.time(), list(postgresql._TERMINAL), 100, 100, 100)))
    assert "Seq Scan on invocations" not in plan and "invocations_by_command" in plan, plan
    assert store.prune(time.time(), batch=100, invocations=100) == 100
    assert _rows(postgres_server, dsn, "SELECT count(*) FROM invocations") == [(2900,)]


# -- outages --------------------------------------------------------------------------------------

def test_flush_keeps_queued_writes_while_the_server_is_down(stores, outage, postgres_server):
    store = stores()
    store.put_command(_command("before"))
    store.flush()
    outage()
    store.put_command(_command("during"))
    store.put_invocation(_invocation("during", 0))
    with pytest.raises(BrokerError) as exc:
        store.flush()
    assert exc.value.code == "StoreUnavailable" and "unavailable" in exc.value.message
    assert store.dirty and not store.available
    with pytest.raises(BrokerError):  # backing off: fails fast, still queued
        store.flush()
    assert store.dirty
    postgres_server.start()
    deadline = time.monotonic() + 15
    while True:
        try:
            store.flush()
            break
        except BrokerError:
            assert time.monotonic() < deadline, "the store did not reconnect"
            time.sleep(0.1)
    assert not store.dirty and store.available
    fresh = stores()
    assert fresh.get_command("before") is not None and fresh.get_command("during") is not None
    assert len(fresh.get_invocations("during")) == 1


def test_a_server_restarted_while_idle_is_not_noticed_by_a_read_and_a_flush_says_so(stores, outage, postgres_server):
    store = stores()
    store.put_command(_command("c1"))
    store.flush()
    outage()
    postgres_server.start()
    assert store.get_command("c1") is not None  # the dead connection is replaced and the read made again
    assert store.outages == 1 and store.available  # a new session: a cluster broker looks before it writes
    outage()
    postgres_server.start()
    store.put_command(_command("c2"))
    with pytest.raises(BrokerError) as exc:  # not written on a new session unasked
        store.flush()
    assert exc.value.code == "StoreUnavailable" and "connection lost" in exc.value.message
    assert store.outages == 2 and store.available and store.dirty
    store.flush()  # on the new session
    assert not store.dirty and stores().get_command("c2") is not None


def test_a_server_that_cannot_be_reached_at_start_is_one_line(postgres_server):
    from zerorun.testing.postgres import free_port

    with pytest.raises(BrokerError) as exc:
        PostgresStore(f"postgresql://zerorun@127.0.0.1:{free_port()}/zerorun", "x")
    assert exc.value.code == "StoreUnavailable" and "\n" not in exc.value.message


def test_a_wrong_password_is_one_line(postgres_server):
    with pytest.raises(BrokerError) as exc:
        PostgresStore(postgres_server.dsn(), "wrong")
    assert "password authentication failed" in exc.value.message and "\n" not in exc.value.message


# -- what several brokers share ---------------------------------------------------------------------

def test_notify_is_delivered_at_commit_through_a_pollable_descriptor(stores):
    sender, listener = stores(), stores().coordination()
    listener.listen("zerorun_wake")
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    assert listener.drain() == []  # never blocks
    sender.put_command(_command("c1"))
    sender.notify("zerorun_wake", "c1")
    assert poller.poll(200) == []  # queued, not committed: nothing sent yet
    sender.flush()
    assert poller.poll(5000), "no wake-up after the commit"
    got = listener.drain()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        got = listener.drain()
    assert got == [("zerorun_wake", "c1")]
    sender.notify("zerorun_wake", "alone")  # a notification alone makes the store dirty
    assert sender.dirty
    sender.flush()
    assert poller.poll(5000) and listener.drain() == [("zerorun_wake", "alone")]


def test_notifications_a_lock_query_read_off_the_socket_are_flagged_unread(stores):
    """The broker loop sleeps in poll(2) on the session's socket; a query that read notifications
    off it leaves the socket quiet, so ``unread`` must say that a drain would find them."""
    sender, listener = stores(), stores().coordination()
    listener.listen("zerorun_wake")
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    assert listener.drain() == [] and not listener.unread
    assert listener.try_lock("command:c1") and not listener.unread  # nothing came meanwhile
    sender.notify("zerorun_wake", "c1")
    sender.flush()
    assert poller.poll(5000), "no wake-up after the commit"
    assert listener.unlock("command:c1")  # reads the notification off the socket with its answer
    assert listener.unread and poller.poll(0) == []
    assert listener.drain() == [("zerorun_wake", "c1")]
    assert not listener.unread and listener.drain() == []


def test_a_drain_returns_what_a_query_read_and_what_the_socket_holds_in_order_once(stores):
    """``drain`` reads through libpq: the notifications psycopg kept when a query read them off the
    socket come first, then those still on the socket; none twice, text as it was sent."""
    sender, listener = stores(), stores().coordination()
    listener.listen("zerorun_wake")
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    assert listener.try_lock("command:c1")
    sender.notify("zerorun_wake", "first ✓")
    sender.flush()
    assert poller.poll(5000), "no wake-up after the commit"
    assert listener.unlock("command:c1")  # reads the first off the socket
    sender.notify("zerorun_wake", "second")
    sender.flush()
    assert poller.poll(5000), "no wake-up after the second commit"
    got = listener.drain()
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += listener.drain()
    assert got == [("zerorun_wake", "first ✓"), ("zerorun_wake", "second")]
    assert listener.drain() == []


def test_a_drain_that_fails_with_the_server_clears_unread(stores, outage, postgres_server):
    """Otherwise a broker whose session died with notifications unread would never wait in
    poll(2) again until the server came back (a busy loop through the outage)."""
    sender, listener = stores(), stores().coordination()
    listener.listen("zerorun_wake")
    sender.notify("zerorun_wake", "c1")
    sender.flush()
    deadline = time.monotonic() + 5
    while not listener.unread:  # a lock query reads it off the socket once it has arrived
        assert time.monotonic() < deadline, "the notification never arrived"
        listener.try_lock("command:c1")
        time.sleep(0.02)
    outage()
    with pytest.raises(BrokerError):  # the session is found dead, with the notification unread in it
        listener.try_lock("command:c2")
    assert listener.unread
    with pytest.raises(BrokerError):
        listener.drain()
    assert not listener.unread
    postgres_server.start()
    generation = listener.generation
    deadline = time.monotonic() + 10
    while True:  # the session reconnects on a call once its backoff allows
        try:
            got = listener.drain()
            break
        except BrokerError:
            assert time.monotonic() < deadline, "no new session after the server came back"
            time.sleep(0.05)
    assert got == [] and listener.generation == generation + 1 and not listener.unread  # a new session


def test_an_advisory_lock_has_one_holder_and_dies_with_its_session(stores):
    first, second = stores().coordination(), stores().coordination()
    assert first.try_lock("command:c1") and first.try_lock("command:c1")  # idempotent for its holder
    assert not second.try_lock("command:c1")
    assert second.try_lock("command:c2")
    assert first.unlock("command:c1") and not first.unlock("command:c1")
    assert second.try_lock("command:c1")
    second.close()  # a broker that dies: the server releases what it held, once its backend has gone
    deadline = time.monotonic() + 10
    while not first.try_lock("command:c1"):
        assert time.monotonic() < deadline, "the lock of a closed session was not released"
        time.sleep(0.02)
    assert first.held == {"command:c1"}


def test_locks_taken_and_released_several_in_one_query(stores):
    first, second = stores().coordination(), stores().coordination()
    assert second.try_lock("command:c2")
    assert first.try_locks(["command:c1", "command:c2", "command:c3", "command:c1"]) == {"command:c1", "command:c3"}
    assert first.try_locks(["command:c1"]) == {"command:c1"} and first.try_locks([]) == set()
    assert first.holds("command:c1") and not first.holds("command:c2")
    first.unlock_many(["command:c1", "command:c2", "command:c4"])  # c2 and c4 are not its own: left alone
    assert first.held == {"command:c3"}
    assert second.try_lock("command:c1") and not second.try_lock("command:c3") and second.held == {
        "command:c1", "command:c2"}


def test_a_created_commands_lock_is_taken_at_the_next_tick_and_a_completed_ones_released_there(stores):
    """No query per command in the request path: the locks of commands a broker creates are taken
    together at its next tick (one that completes before then never takes its own), and those of
    commands that completed are released together there."""
    from zmq_broker.cluster import Cluster

    a_store, b_store = stores(), stores()
    a = Cluster(a_store, "b-a", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    b = Cluster(b_store, "b-b", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    for cid in ("c1", "c2", "c3"):
        a.own_created(cid)
    a.disown("c3", at_once=False)  # completed before the tick
    assert not a.coord.holds("cmd:c1") and b.coord.try_lock("cmd:c2")  # b adopts c2 (a was taken for dead)
    assert a.fence(time.monotonic()) == ["c2"]  # lost to b
    assert a.coord.held == {"broker:b-a", "cmd:c1"}
    assert not b.coord.try_lock("cmd:c1") and b.coord.try_lock("cmd:c3")
    a.disown("c1", at_once=False)
    assert a.coord.holds("cmd:c1") and not b.coord.try_lock("cmd:c1")  # until the next tick
    assert a.fence(time.monotonic()) == [] and a.coord.held == {"broker:b-a"}
    assert b.coord.try_lock("cmd:c1")


def test_after_a_server_restart_locks_are_gone_and_the_generation_says_so(stores, outage, postgres_server):
    store = stores()
    coordination = store.coordination()
    coordination.listen("zerorun_wake")
    assert coordination.try_lock("owner")
    generation = coordination.generation
    outage()
    postgres_server.start()
    assert coordination.try_lock("other")  # a new session: listens again, holds only what it takes now
    assert coordination.generation == generation + 1 and coordination.held == {"other"}
    store.notify("zerorun_wake", "again")
    with pytest.raises(BrokerError):  # the store's own session was lost too: its flush says so, once
        store.flush()
    store.flush()
    deadline = time.monotonic() + 5
    got: list = []
    while not got and time.monotonic() < deadline:
        got = coordination.drain()
        time.sleep(0.02)
    assert got == [("zerorun_wake", "again")]


# -- choosing the store ---------------------------------------------------------------------------

def test_the_store_setting_is_checked_before_anything_starts(tmp_path):
    assert store_setting_problem("") is None and store_setting_problem("postgresql://u@h:5432/db") is None
    with_password = store_setting_problem("postgresql://u:secret@h:5432/db")
    assert "must not contain a password" in with_password and "--store-password-file" in with_password
    assert "secret" not in with_password
    assert "must not contain a password" in store_setting_problem("postgresql://u@h/db?password=secret")
    assert "PostgreSQL DSN" in store_setting_problem("mysql://u:secret@h/db")
    assert "secret" not in store_setting_problem("mysql://u:secret@h/db")
    assert "only for a PostgreSQL store" in store_setting_problem("", tmp_path / "pw")


def test_the_password_file_must_be_private(tmp_path):
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    os.chmod(path, 0o644)
    with pytest.raises(BrokerError) as exc:
        read_password_file(path)
    assert "chmod 600" in exc.value.message
    os.chmod(path, 0o600)
    assert read_password_file(path) == "s3cret"
    with pytest.raises(BrokerError) as exc:
        read_password_file(tmp_path / "missing")
    assert "cannot read store password file" in exc.value.message


def test_open_store_chooses_the_backend(tmp_path, postgres_server):
    sqlite = open_store(tmp_path)
    assert type(sqlite).__name__ == "SqliteStore"
    sqlite.close()
    pg = open_store(tmp_path, postgres_server.dsn(), postgres_server.password_file)
    assert isinstance(pg, PostgresStore)
    pg.close()


def test_a_queued_write_with_a_nul_character_is_written_with_it_replaced(stores, dsn, postgres_server):
    store = stores()
    store.queue_write("INSERT INTO live_output (command_id, invocation_id, stream, data) VALUES (%s, %s, %s, %s)",
                      ["c1", "i1", "stdout", "a\x00b"])
    store.flush()  # a live output chunk of a remote command: text, and an agent's output may hold NUL
    assert _rows(postgres_server, dsn, "SELECT data FROM live_output") == [("a\ufffdb",)]


def test_the_cluster_forgets_live_output_only_where_there_is_some(stores, dsn, postgres_server):
    """A finished invocation's live output leaves the store with its result, the command's last
    one included (its completion comes first); results of commands that never had live output in
    the store add no delete to the group commit (which then stays one statement)."""
    from zmq_broker.cluster import Cluster

    store = stores()
    cluster = Cluster(store, "b-live", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    try:
        cluster.live_output("c-live", "i-1", "stdout", "one\n")
        cluster.live_output("c-live", "i-2", "stdout", "two\n")
        cluster.live_seen(["c-live"])
        cluster.flush()
        store.flush()
        assert _rows(postgres_server, dsn, "SELECT count(*) FROM live_output") == [(2,)]

        cluster.forget_live("i-9", "c-quiet")  # no live output: nothing queued
        cluster.flush()
        assert store._writes_after == []

        cluster.forget_live("i-1", "c-live")
        cluster.disown("c-live")  # the last result completed the command before it is forgotten
        cluster.forget_live("i-2", "c-live")
        cluster.flush()
        store.flush()
        assert _rows(postgres_server, dsn, "SELECT count(*) FROM live_output") == [(0,)]
        cluster.forget_live("i-3", "c-live")  # a late result of the finished command: nothing queued
        cluster.flush()
        assert store._writes_after == []
    finally:
        cluster.coord.close()


def test_pruning_takes_the_relay_and_live_rows_a_crash_left(stores, dsn, postgres_server):
    store = stores()
    old = time.time() - 1000
    store.put_command(_command("gone", protocol.SUCCESS, at=old), new=True)
    store.put_command(_command("kept", protocol.IN_PROGRESS, at=old), new=True)
    for command_id in ("gone", "kept"):
        store.queue_write("INSERT INTO relay (command_id, kind, instance_id, body) VALUES (%s, 'result', 'i', '')",
                          [command_id])
        store.queue_write("INSERT INTO live_output (command_id, invocation_id, stream, data) "
                          "VALUES (%s, 'i', 'stdout', 'x')", [command_id])
    store.flush()
    assert store.prune(time.time()) == 1
    assert _rows(postgres_server, dsn, "SELECT command_id FROM relay") == [("kept",)]
    assert _rows(postgres_server, dsn, "SELECT command_id FROM live_output") == [("kept",)]


def test_deliveries_for_others_that_ended_elsewhere_are_forgotten(stores):
    """An invocation delivered here for another owner whose result never came back through this
    broker (its agent moved on, the owner timed it out) is forgotten once the store says it ended
    or its row is gone; one still running is kept, and looked at after the others next time."""
    from zmq_broker.cluster import Cluster

    store = stores()
    store.put_command(_command("c-away"))
    store.put_invocation(_invocation("c-away", 1, protocol.IN_PROGRESS))
    store.put_invocation(_invocation("c-away", 2, protocol.TIMED_OUT))
    store.put_invocation(_invocation("c-away", 3, protocol.SUCCESS))
    store.flush()
    cluster = Cluster(store, "b-sweep", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    try:
        for iid in ("c-away-1", "c-away-2", "c-away-3", "c-away-pruned"):
            cluster.delivered_for(iid, "c-away", "i-1")
        cluster.sent_for_others(["c-away-1", "c-away-2"])
        assert cluster.sweep_relayed() == 3
        assert list(cluster.relayed) == ["c-away-1"] and cluster.attempts == {"c-away-1": 1}
        cluster.delivered_for("c-away-4", "c-away", "i-1")  # not in the store: gone
        assert cluster.sweep_relayed() == 1 and list(cluster.relayed) == ["c-away-1"]
    finally:
        cluster.coord.close()


def test_a_holder_is_told_what_it_delivers_and_reads_only_commands_with_secrets(stores):
    """The owner tells the broker holding its agents' sessions what it needs of a command with
    the first delivery of it in a commit, so the holder does not read it from the store; a command
    with secret values is not sent in a notification, and the holder reads that one."""
    from zmq_broker.cluster import CommandEvent, Cluster, DeliverEvent

    owner_store, holder_store = stores(), stores()
    owner = Cluster(owner_store, "b-owner", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    holder = Cluster(holder_store, "b-holder", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    try:
        step = protocol.Step(name="a", script="echo hi")
        plain = _command("c-plain")
        plain.steps, plain.display_steps, plain.owner, plain.steps_bytes = [step], [step], "b-owner", 40
        secret = _command("c-secret")
        secret.steps, secret.owner = [protocol.Step(name="a", script="echo s3cret")], "b-owner"
        secret.display_steps = [protocol.Step(name="a", script="echo ***")]
        for rec in (plain, secret):
            owner_store.put_command(rec, new=True)
            for n in range(3):
                owner.deliver_through("b-holder", rec, f"{rec.command_id}-{n}", f"i-{n}")
        owner.flush()
        owner_store.flush()
        events = _heard(holder, 3)
        assert [type(e) for e in events] == [CommandEvent, DeliverEvent, DeliverEvent]
        assert [(e.command_id, [iid for iid, _ in e.invocations]) for e in events[1:]] == [
            ("c-plain", ["c-plain-0", "c-plain-1", "c-plain-2"]), ("c-secret", ["c-secret-0", "c-secret-1", "c-secret-2"])]
        holder.described(events[0])
        read: list[str] = []
        real_get = holder_store.get_command
        holder_store.get_command = lambda cid: read.append(cid) or real_get(cid)
        told = holder.command("c-plain")
        assert (told.owner, told.steps, told.steps_bytes, told.expires_at) == ("b-owner", [step], 40, plain.expires_at)
        assert holder.command("c-secret").steps == secret.steps
        assert read == ["c-secret"]
    finally:
        owner.coord.close()
        holder.coord.close()


def test_relayed_rows_applied_in_an_iteration_leave_the_store_in_one_statement(stores, dsn, postgres_server):
    """Rows relayed to an owner are applied event by event, and deleted with the iteration's
    commit by one statement (one per event made the commit's text differ from commit to commit)."""
    from zmq_broker.cluster import Cluster

    holder_store, owner_store = stores(), stores()
    holder = Cluster(holder_store, "b-holder", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    owner = Cluster(owner_store, "b-owner", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    try:
        for command_id in ("c-1", "c-2"):
            result = protocol.InvocationResult(invocation_id=f"{command_id}-i", status=protocol.SUCCESS, exit_code=0)
            holder.relay("b-owner", command_id, "result", "i-1", result)
        holder.flush()
        holder_store.flush()
        for command_id in ("c-1", "c-2"):  # as two drained events would
            items = owner.relayed_items([command_id])
            assert [(i.command_id, i.result().invocation_id) for i in items] == [(command_id, f"{command_id}-i")]
            owner.applied(items)
        owner.flush()
        assert [sql for sql, _ in owner_store._writes if "DELETE FROM relay" in sql] == [
            "DELETE FROM relay WHERE seq = ANY(%b::bigint[])"]
        owner_store.flush()
        assert _rows(postgres_server, dsn, "SELECT count(*) FROM relay") == [(0,)]
    finally:
        holder.coord.close()
        owner.coord.close()



def test_a_holders_items_go_a_run_to_a_row_and_come_back_in_order(stores, dsn, postgres_server):
    """A command's consecutive items of one kind are one ``relay`` row; the owner reads each item
    back, in the order the holder relayed them, and one delete takes the rows."""
    from zmq_broker.cluster import Cluster

    holder_store, owner_store = stores(), stores()
    holder = Cluster(holder_store, "b-holder", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    owner = Cluster(owner_store, "b-owner", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    try:
        def result(n: int) -> protocol.InvocationResult:
            return protocol.InvocationResult(invocation_id=f"c-1-{n}", status=protocol.SUCCESS, exit_code=n,
                                             stdout=f"out {n}")
        for n in range(20):
            holder.relay("b-owner", "c-1", "result", f"i-{n:03d}", result(n))
        holder.relay("b-owner", "c-1", "cancel", "", ["i-099"])
        holder.relay("b-owner", "c-2", "result", "i-000", protocol.InvocationResult(
            invocation_id="c-2-0", status=protocol.FAILED, exit_code=1))
        holder.relay("b-owner", "c-1", "result", "i-020", result(20))
        holder.flush()
        holder_store.flush()
        assert _rows(postgres_server, dsn, "SELECT command_id, kind, instance_id FROM relay ORDER BY seq") == [
            ("c-1", "result*", ""), ("c-1", "cancel", ""), ("c-1", "result", "i-020"), ("c-2", "result", "i-000")]
        items = owner.relayed_items(["c-1", "c-2"])
        assert [(i.command_id, i.kind, i.instance_id) for i in items] == (
            [("c-1", "result", f"i-{n:03d}") for n in range(20)] + [("c-1", "cancel", ""), ("c-1", "result", "i-020"),
                                                                   ("c-2", "result", "i-000")])
        assert [i.result() for i in items if i.command_id == "c-1" and i.kind == "result"] == [
            result(n) for n in range(21)]
        assert items[20].instances() == ["i-099"]
        owner.applied(items)
        owner.flush()
        owner_store.flush()
        assert _rows(postgres_server, dsn, "SELECT count(*) FROM relay") == [(0,)]
    finally:
        holder.coord.close()
        owner.coord.close()


def test_after_missed_notifications_a_broker_reads_where_agents_are_and_what_completed(stores):
    """What ``SessionEvent``s and ``DoneEvent``s announce, read from the store instead (a broker
    that missed them while its coordination session was away): sessions that moved to another
    live broker, those that closed, and an instance held here stays here."""
    from zmq_broker.cluster import Cluster

    a_store, b_store, c_store = stores(), stores(), stores()
    a = Cluster(a_store, "b-a", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    b = Cluster(b_store, "b-b", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    c = Cluster(c_store, "b-c", "tcp://127.0.0.1:5", "tcp://127.0.0.1:6")
    try:
        for broker, store, instances in ((b, b_store, ["i-1", "i-2", "i-4"]), (c, c_store, ["i-3"])):
            for instance_id in instances:
                broker.session_opened(instance_id, "key-" + instance_id)
            broker.flush()
            store.flush()
        a.refresh_peers()
        a.remote = {"i-1": "b-b", "i-2": "b-c", "i-5": "b-b"}  # what a knew before it stopped hearing
        changed = a.reread_sessions(lambda instance_id: instance_id == "i-4")
        assert sorted(changed) == ["i-2", "i-3"]  # moved, and new; i-5 closed; i-4 is held by a now
        assert a.remote == {"i-1": "b-b", "i-2": "b-b", "i-3": "b-c"}
        for command_id, status in (("c-done", protocol.SUCCESS), ("c-running", protocol.IN_PROGRESS)):
            a_store.put_command(_command(command_id, status), new=True)
        a_store.flush()
        assert a.completed(["c-done", "c-running", "c-unknown"]) == ["c-done"] and a.completed([]) == []
    finally:
        for broker in (a, b, c):
            broker.coord.close()



def test_a_result_sent_again_to_another_broker_mid_read_does_not_let_the_agent_drop_its_output(stores):
    """Several brokers: an agent moves to another broker while its first one reads its whole output,
    and sends the (unacknowledged) result again there. The new broker must not tell the agent it is
    done with that output: it takes the reading over (``rebalance``) from what is stored, and the
    agent drops its copy only once the output is read whole. (It was told at once, and the output
    was lost: seen in a cluster test under load.)"""
    from zmq_broker.outputs import CHUNK, StoreData, WholeOutputs

    reads: dict[str, list[protocol.OutputRead]] = {"b-1": [], "b-2": []}
    done: dict[str, list[str]] = {"b-1": [], "b-2": []}

    def reader(broker_id: str, store: PostgresStore) -> WholeOutputs:
        return WholeOutputs(store, StoreData(store), 10 * CHUNK, broker_id,
                            lambda instance_id, read: reads[broker_id].append(read) or True,
                            lambda instance_id, ids: done[broker_id].extend(ids))

    def answer(whole: WholeOutputs, read: protocol.OutputRead) -> None:
        whole.data_arrived("web-1", protocol.OutputData(read.invocation_id, read.stream, read.offset,
                                                        b"x" * read.length))

    result = protocol.InvocationResult("moved", "Success", stdout_follows=3 * CHUNK)
    old_store, store = stores(), stores()
    old, new = reader("b-1", old_store), reader("b-2", store)
    old.result_arrived("web-1", "c1", result, 1000)
    old.pump()
    answer(old, reads["b-1"].pop(0))  # one chunk read there, then the agent moved
    old_store.flush()
    new.result_arrived("web-1", "c1", result, 1000)
    assert done["b-2"] == []
    new.rebalance(lambda instance_id: True, lambda instance_id: False)
    while True:
        new.pump()
        if not reads["b-2"]:
            break
        answer(new, reads["b-2"].pop(0))
    rec = store.get_output("moved")
    assert (rec.state, rec.stdout_have, done["b-2"]) == ("complete", 3 * CHUNK, ["moved"])
    store.flush()
    new.result_arrived("web-1", "c1", result, 1000)  # once more, now that it is read whole
    assert done["b-2"] == ["moved", "moved"]  # the agent may drop it


def test_a_broker_back_from_an_outage_finds_what_another_took_over_before_it_writes(stores):
    """Broker a was cut off from the server long enough to be judged dead: b took one of its
    commands over (compare-and-set on the owner, after the lock) and finished another, whose lock
    it let go; b also forgot one of a's sessions. Back, a finds both commands lost, though it
    could take the finished one's lock again, and the session to announce again; it drops what it
    had queued for the lost commands, rows and events, and keeps the rest; the cancels it accepted
    meanwhile go to the adopter."""
    from zmq_broker.cluster import (CancelEvent, Cluster, CommandEvent, DeliverEvent, DoneEvent, RelayEvent,
                                    SessionEvent, channel_of)

    a_store, b_store = stores(), stores()
    a = Cluster(a_store, "b-a", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    b = Cluster(b_store, "b-b", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    try:
        commands = {cid: _command(cid) for cid in ("c-adopted", "c-finished", "c-kept")}
        for rec in commands.values():
            rec.owner = "b-a"
            a_store.put_command(rec, new=True)
            a_store.put_invocation(_invocation(rec.command_id, 0))
            assert a.own(rec.command_id)
        for instance_id in ("i-001", "i-002"):
            a.session_opened(instance_id, "key-" + instance_id)
        a.flush()
        a_store.flush()
        a.owned = lambda: sorted(commands)
        assert len(_heard(b, 2)) == 2  # a's two sessions, announced
        a.coord.close()  # its session ends: the server frees its locks (once its backend has exited)
        deadline = time.monotonic() + 10
        while not b.own("c-adopted"):
            assert time.monotonic() < deadline, "the closed session's locks were not freed"
            time.sleep(0.05)
        assert b.own("c-finished")
        assert b.take_over(["c-adopted", "c-finished"], ["b-a"]) == {"c-adopted", "c-finished"}
        assert b.take_over(["c-adopted"], ["b-a"]) == set()  # a's no longer: none takes it twice
        finished = _command("c-finished", protocol.SUCCESS)
        finished.owner = "b-b"
        b_store.put_command(finished)
        b_store.queue_write("DELETE FROM agent_sessions WHERE instance_id = 'i-002'", [])
        b_store.flush()
        b.disown("c-finished")
        for cid in commands:  # what a recorded meanwhile, queued
            failed = _command(cid, protocol.FAILED)
            failed.owner = "b-a"
            a_store.put_command(failed)
            a_store.put_invocation(_invocation(cid, 0, protocol.FAILED))
        a_store._commands["c-adopted"].cancel_requested = True  # a cancel a accepted meanwhile
        a_store.put_invocation(_invocation("c-finished", 1, protocol.CANCELLING))  # and one of an instance
        a.deliver_through("b-b", commands["c-adopted"], "c-adopted-1", "i-001")  # events queued meanwhile
        assert [type(e) for e in a._out[channel_of("b-b")]] == [CommandEvent, DeliverEvent]
        a.broadcast(DoneEvent(["c-finished", "c-kept"]))
        a.flush()
        a.tell("b-b", CancelEvent([("c-adopted-0", "i-000"), ("c-kept-0", "i-000")]))
        lost, forgotten = a.fence_after_outage(time.monotonic(), ["i-001", "i-002"])
        assert lost == {"c-adopted", "c-finished"} and forgotten == ["i-002"]
        assert a.forget_commands(lost, {"c-adopted-1": "i-001"}) == {
            "c-adopted-0": "i-000", "c-adopted-1": "i-001", "c-finished-0": "i-000", "c-finished-1": "i-001"}
        assert a_store.queued_commands() == {"c-kept"}
        a.flush()
        a_store.flush()
        assert _heard(b, 3) == [DoneEvent(["c-kept"]), CancelEvent([("c-kept-0", "i-000")]),
                                RelayEvent(["c-adopted", "c-finished"])]
        assert [(i.command_id, i.kind, i.instances()) for i in b.relayed_items(["c-adopted", "c-finished"])] == [
            ("c-adopted", "cancel", []), ("c-finished", "cancel", ["i-001"])]  # the cancels go to the adopter
        b.refresh_peers()
        b.peers["b-a"].alive = False  # as b judged it while it was cut off
        assert b.apply_session(SessionEvent("i-002", "b-a", True)) and b.holder("i-002") == "b-a"  # it spoke: alive
        rows = dict((r[0], r[1:]) for r in a_store.query("SELECT command_id, owner, status FROM commands", ()))
        assert rows == {"c-adopted": ("b-b", protocol.PENDING), "c-finished": ("b-b", protocol.SUCCESS),
                        "c-kept": ("b-a", protocol.FAILED)}
    finally:
        for broker in (a, b):
            broker.coord.close()


def test_a_peer_that_holds_its_locks_without_writing_has_its_sessions_ended(stores, monkeypatch):
    """Broker b stops writing its row while its sessions (and so its locks) stay, as a frozen
    process or a machine gone without closing its connections would: a finds it unresponsive only
    after watching it, without a break of its own, for UNRESPONSIVE_AFTER; ends its sessions (the
    store's and the coordination one, found by the lock each holds); then takes it for dead. b,
    back, is told by its store before it writes anything, and by its coordination session. The
    session b's S3 sink reads whole outputs with is ended too."""
    from zmq_broker import cluster as cluster_mod
    from zmq_broker.cluster import Cluster
    from zmq_broker.outputs import StoreData

    monkeypatch.setattr(cluster_mod, "UNRESPONSIVE_AFTER", 0.4)
    monkeypatch.setattr(cluster_mod, "DEAD_AFTER", 0.4)
    monkeypatch.setattr(cluster_mod, "PEER_CHECK", 0.2)  # a look more than 0.6 s after the last is a break
    a_store, b_store = stores(), stores()
    a = Cluster(a_store, "b-a", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    b = Cluster(b_store, "b-b", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    b_reader = StoreData(b_store).reader()
    assert b_reader.store.query("SELECT 1") == [(1,)]
    assert b.coord.try_lock("cmd:c1")
    a.refresh_peers()
    time.sleep(0.8)  # unchanged, but not watched throughout: a break in a's own view starts it afresh
    assert a.refresh_peers() == [] and a.unresponsive == []
    for _ in range(3):
        time.sleep(0.15)
        b_store.queue_write("UPDATE brokers SET seen_at = %s WHERE broker_id = %s", [time.time(), "b-b"])
        b_store.flush()  # b writes: never unresponsive
        assert a.refresh_peers() == [] and a.unresponsive == []
    for _ in range(4):
        time.sleep(0.15)
        a.refresh_peers()
    assert a.unresponsive == ["b-b"] and a.peers["b-b"].alive  # its lock is held
    assert not a.coord.try_lock("cmd:c1")

    assert a.end_sessions_of(a.unresponsive) == 3 and a.stats["peers_ended"] == 1  # store, coordination, reader
    deadline = time.monotonic() + 5
    while a.peers["b-b"].alive:
        assert time.monotonic() < deadline, "b's lock was not released"
        time.sleep(0.05)
        dead = a.refresh_peers()
    assert dead == ["b-b"] and a.coord.try_lock("cmd:c1")
    assert a_store.outages == 0  # a's own sessions are left alone

    b_store.put_command(_command("written-only-after-a-look"))
    with pytest.raises(BrokerError) as exc:  # b's group commit is not made on a new session unasked
        b_store.flush()
    assert "connection lost" in exc.value.message and b_store.outages == 1 and b_store.dirty
    generation = b.coord.generation
    assert not b.coord.try_lock("cmd:c1") and b.coord.generation == generation + 1  # a has it now


def test_a_peer_taken_for_dead_loses_what_is_left_of_its_sessions(stores, monkeypatch, postgres_server):
    """The server dropped only b's coordination session (the one that receives notifications,
    whose unacknowledged data its TCP timeouts notice first): b's lock is free and its row stale,
    so a takes it for dead; b's store session, idle, is still there, and b would write on it when
    back without a look. a ends it before b's commands are adopted."""
    from zmq_broker import cluster as cluster_mod
    from zmq_broker.cluster import Cluster

    monkeypatch.setattr(cluster_mod, "DEAD_AFTER", 0.4)
    a_store, b_store = stores(), stores()
    a = Cluster(a_store, "b-a", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    b = Cluster(b_store, "b-b", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    coordination_pid = b.coord._session.run(lambda conn: conn.info.backend_pid)
    with postgres_server.admin() as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (coordination_pid,)).fetchone()[0]
    time.sleep(0.6)
    a._grace_until = a._next_peer_check = 0.0
    assert a.tick(time.monotonic()) == ["b-b"]
    b_store.put_command(_command("written-only-after-a-look"))
    with pytest.raises(BrokerError) as exc:
        b_store.flush()
    assert "connection lost" in exc.value.message and b_store.outages == 1
