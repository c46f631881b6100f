"""A real broker on a real PostgreSQL server (``--store postgresql://...``), with real agents and
the real CLI: commands by tag, show, wait, logs --follow, cancel, a broker restart, and
PostgreSQL itself restarted in the middle of a command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from tests.metrics_scrape import scrape
from zerorun.testing.localfleet import FleetError
from zerorun.testing.postgres import free_port


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def pg(postgres_server):
    """A fresh database for one test: (server, dsn, broker flags)."""
    name = "it_" + uuid.uuid4().hex[:12]
    dsn = postgres_server.create_database(name)
    yield postgres_server, dsn, ("--store", dsn, "--store-password-file", str(postgres_server.password_file))
    postgres_server.start()  # a test that stopped it leaves it running for the next
    postgres_server.drop_database(name)


def _json(fleet, *args, timeout=120):
    proc = fleet.cli(*args, "--json", timeout=timeout)
    assert proc.stdout.strip(), f"zerorun {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def _rows(server, dsn, sql):
    with server.admin(dsn.rsplit("/", 1)[1]) as conn:
        return conn.execute(sql).fetchall()


def test_a_broker_on_postgresql_runs_commands_and_keeps_them_across_a_restart(fleet_factory, pg, tmp_path):
    server, dsn, store_flags = pg
    fleet = fleet_factory()
    fleet.start_broker(*store_flags)
    assert not (fleet.broker_dir / "broker.db").exists()  # the state is in PostgreSQL, not SQLite
    fleet.start_agents({"web-1": {"role": "web"}, "web-2": {"role": "web"}, "db-1": {"role": "db"}})

    code, hello = _json(fleet, "send", "RunShellScript", "-t", "tag:role=web", "-p",
                        "commands=echo hello-$ZERORUN_INSTANCE_ID")
    assert code == 0 and hello["status"] == "Success"
    assert sorted(i["stdout"].strip() for i in hello["invocations"]) == ["hello-web-1", "hello-web-2"]
    assert _json(fleet, "show", hello["command_id"])[1]["status"] == "Success"

    marker = tmp_path / "go"
    follow_id = fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "--no-wait", "-p",
                          f"commands=echo one; while [ ! -e {marker} ]; do sleep 0.05; done; echo two",
                          check=True).stdout.strip()
    follow = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), "logs",
                               follow_id, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=fleet.env())
    try:
        assert follow.stdout.readline() == "db-1 | one\n"  # live, before the step ends
        marker.touch()
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0 and "db-1 | two" in out, err
    assert fleet.cli("wait", follow_id).returncode == 0

    sleeper = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "--no-wait", "-p", "commands=sleep 60",
                        check=True).stdout.strip()
    _wait_for(lambda: _json(fleet, "show", sleeper)[1]["status"] == "InProgress", 30, "the sleeper to start")
    fleet.cli("cancel", sleeper, check=True)
    code, cancelled = _json(fleet, "wait", sleeper)
    assert cancelled["status"] == "Cancelled" and code == 1
    created = fleet.cli("documents", "create", "Kept", "-", input=_document())
    assert created.returncode == 0, created.stderr

    committed = {r[0]: r[1] for r in _rows(server, dsn, "SELECT command_id, status FROM commands")}
    assert committed == {hello["command_id"]: "Success", follow_id: "Success", sleeper: "Cancelled"}

    fleet.stop_broker()
    fleet.start_broker(*store_flags)
    fleet.wait_online(["web-1", "web-2", "db-1"])
    history = {c["command_id"]: c["status"] for c in _json(fleet, "commands")[1]}
    assert history == committed
    again = _json(fleet, "show", hello["command_id"])[1]
    assert sorted(i["stdout"].strip() for i in again["invocations"]) == ["hello-web-1", "hello-web-2"]
    assert fleet.cli("logs", follow_id).stdout == "db-1 | one\ndb-1 | two\n"
    assert any(d["name"] == "Kept" for d in _json(fleet, "documents", "list")[1])
    code, after = _json(fleet, "send", "Kept", "-t", "tag:role=db")
    assert code == 0 and after["invocations"][0]["stdout"].strip() == "kept"


def _document() -> str:
    return ('{"schemaVersion": "2.2", "description": "kept across restarts", "mainSteps": [{"action": '
            '"aws:runShellScript", "name": "say", "inputs": {"runCommand": ["echo kept"]}}]}')


def test_postgresql_restarted_in_the_middle_of_a_command_loses_nothing_acknowledged(fleet_factory, pg, tmp_path):
    server, dsn, store_flags = pg
    fleet = fleet_factory()
    fleet.start_broker(*store_flags)
    fleet.start_agents({"web-1": {"role": "web"}, "web-2": {"role": "web"}})
    marker = tmp_path / "go"
    command_id = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "--no-wait", "-p",
                           f"commands=while [ ! -e {marker} ]; do sleep 0.05; done; echo done-$ZERORUN_INSTANCE_ID; "
                           f"touch {tmp_path}/ended-$ZERORUN_INSTANCE_ID",
                           check=True).stdout.strip()
    _wait_for(lambda: _json(fleet, "show", command_id)[1]["counts"].get("InProgress") == 2, 30,
              "both invocations to be in flight")

    server.stop("immediate")  # as a crash: no shutdown checkpoint, recovery at the next start
    marker.touch()  # the steps end while the broker cannot commit their results
    # a send while the store is away: not answered until it is committed
    during = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), "send",
                               "RunShellScript", "-t", "tag:role=web", "--json", "--request-timeout", "60", "-p",
                               "commands=echo during"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=fleet.env())
    try:
        _wait_for(lambda: "is unavailable" in fleet.broker_log(), 30, "the broker to notice the outage")
        _wait_for(lambda: all((tmp_path / f"ended-{i}").exists() for i in ("web-1", "web-2")), 30,
                  "both steps to end")
        time.sleep(1.0)  # the outage goes on while their results reach the broker and wait there
        assert during.poll() is None, "a send was answered while nothing could be committed"
        assert fleet.broker.poll() is None, "the broker must survive its store going away"
        server.start()
        out, err = during.communicate(timeout=90)
    finally:
        if during.poll() is None:
            during.kill()
    assert during.returncode == 0, err
    assert {i["stdout"].strip() for i in json.loads(out)["invocations"]} == {"during"}
    code, view = _json(fleet, "wait", command_id)
    assert code == 0 and view["status"] == "Success", view
    assert sorted(i["stdout"].strip() for i in view["invocations"]) == ["done-web-1", "done-web-2"]
    assert "reconnected to PostgreSQL" in fleet.broker_log()

    fleet.kill_broker()  # what was acknowledged is in PostgreSQL, not only in the broker's memory
    rows = dict(_rows(server, dsn, "SELECT command_id, status FROM commands"))
    assert rows[command_id] == "Success" and len(rows) == 2 and set(rows.values()) == {"Success"}
    fleet.start_broker(*store_flags)
    again = _json(fleet, "show", command_id)[1]
    assert sorted(i["stdout"].strip() for i in again["invocations"]) == ["done-web-1", "done-web-2"]


def test_a_password_in_the_dsn_is_refused_saying_where_it_goes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zmq_broker", "--state-dir", str(tmp_path / "b"),
                           "--store", "postgresql://zerorun:hunter2@127.0.0.1:5432/zerorun", "--check-config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "must not contain a password" in proc.stderr and "--store-password-file" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_the_broker_refuses_a_newer_postgresql_schema_with_one_line(fleet_factory, pg):
    from zmq_broker.store.postgresql import SCHEMA_VERSION, PostgresStore

    server, dsn, store_flags = pg
    PostgresStore(dsn, server.password).close()
    with server.admin(dsn.rsplit("/", 1)[1]) as conn:
        conn.execute("INSERT INTO zerorun_schema (version) VALUES (%s)", (SCHEMA_VERSION + 3,))
    fleet = fleet_factory()
    with pytest.raises(FleetError):
        fleet.start_broker(*store_flags)
    lines = [line for line in fleet.broker_log().splitlines() if line.strip()]
    assert lines[-1].startswith("zerorun-broker: ") and "newer than this broker knows" in lines[-1]
    assert "Traceback" not in fleet.broker_log()


def test_pruning_runs_on_a_session_of_its_own_and_a_held_pass_does_not_hold_the_loop(fleet_factory, pg):
    """On PostgreSQL the retention passes run on a thread with their own session: a pass that the
    server holds (here behind a table lock; in the soak, its deletes and its commit's flush) leaves
    the loop answering, and the backlog goes once the server lets it."""
    from tests.expired_backlog import put_expired
    from zmq_broker.store.postgresql import PostgresStore

    server, dsn, store_flags = pg
    store = PostgresStore(dsn, server.password)
    put_expired(store, 250)  # three passes of at most 100 invocations
    store.close()
    database = dsn.rsplit("/", 1)[1]
    fleet = fleet_factory()
    with server.admin(database) as holder:
        holder.autocommit = False
        holder.execute("LOCK TABLE output_chunks IN SHARE MODE")  # a pass deletes from it: it waits
        fleet.start_broker(*store_flags, "--retention-days", "1", "--metrics-bind", f"127.0.0.1:{free_port()}")
        _wait_for(lambda: _rows(server, dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                                " 'zerorun-broker-prune' AND wait_event_type = 'Lock'")[0][0] == 1,
                  60, "the first pass to wait for the lock")
        client = fleet.client(timeout=10)
        assert client.ping()["broker_version"]  # the loop answers while the pass waits
        assert _json(fleet, "commands")[0] == 0
        assert _rows(server, dsn, "SELECT count(*) FROM commands")[0][0] == 250
        holder.rollback()
    _wait_for(lambda: _rows(server, dsn, "SELECT count(*) FROM commands")[0][0] == 0, 60, "the backlog to be pruned")
    assert _rows(server, dsn, "SELECT count(*) FROM invocations")[0][0] == 0
    _wait_for(lambda: "pruned 250 command(s)" in fleet.broker_log(), 30, "one log line for the catching up")
    address = fleet.runtime()["metrics"]
    _wait_for(lambda: scrape(address).get("zerorun_pruned_commands_total") == 250, 30, "the metrics to count them")
    assert scrape(address)["zerorun_internal_errors_total"] == 0
    assert "Traceback" not in fleet.broker_log()
