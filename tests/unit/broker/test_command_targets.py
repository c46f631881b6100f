"""``zerorun commands --target`` by index: a command's target terms, written with its first write,
found newest first on both backends, pruned with it, and backfilled for an older database."""

from __future__ import annotations

import sqlite3
import time

import msgspec
import pytest

from zerorun import protocol
from zmq_broker.model import CommandRecord
from zmq_broker.store import sqlite as sqlite_store
from zmq_broker.store.sqlite import SqliteStore
from zmq_broker.store.terms import MAX_TERM, target_terms


def _command(command_id: str, targets: list[str], at: float, status: str = protocol.SUCCESS,
             document: str = "RunShellScript") -> CommandRecord:
    return CommandRecord(command_id, status, status, document, "1", "0" * 64, {}, targets, "admin", at, at + 60,
                         60, 1, 0, [])


def test_terms_are_each_target_and_each_of_its_parts():
    assert target_terms(["tag:role=web,api", "instance:i-1,i-2"]) == sorted({
        "tag:role=web,api", "tag:role", "role", "tag:role=web", "role=web", "tag:role=api", "role=api",
        "instance:i-1,i-2", "instance:i-1", "i-1", "instance:i-2", "i-2"})
    assert target_terms(["tag:env"]) == ["env", "tag:env"]
    many = "instance:" + ",".join(f"i-{n:05d}" for n in range(100))
    assert many not in target_terms([many]) and len(many) > MAX_TERM  # the parts are enough
    assert "instance:i-00099" in target_terms([many])


def test_target_filter_finds_newest_first_with_other_filters_and_forgets_pruned(open_store):
    s = open_store()
    now = time.time()
    for n in range(10):
        s.put_command(_command(f"web-{n}", ["tag:role=web"], now - 100 + n), new=True)
        s.put_command(_command(f"db-{n}", ["tag:role=db", "instance:db-1"], now - 100 + n,
                               document="GetInstanceInfo" if n % 2 else "RunShellScript"), new=True)
    s.put_command(_command("running", ["tag:role=web"], now, protocol.IN_PROGRESS), new=True)
    s.put_command(_command("running", ["tag:role=web"], now, protocol.IN_PROGRESS))  # later writes: once only
    ids = lambda **q: [c.command_id for c in s.list_commands(**q)]  # noqa: E731
    assert ids(target="role=web", limit=3) == ["running", "web-9", "web-8"]
    assert ids(target="tag:role=web", status=protocol.SUCCESS, limit=2) == ["web-9", "web-8"]
    assert ids(target="db-1", document="GetInstanceInfo") == ["db-9", "db-7", "db-5", "db-3", "db-1"]
    assert ids(target="role=db", since=now - 92, before=now - 90) == ["db-9", "db-8"]
    assert ids(target="role=nosuch") == [] and ids(target="rol") == []  # whole terms, not substrings
    assert ids(target="role=web", visible=lambda rec: rec.command_id.endswith("7")) == ["web-7"]
    assert ids(status=protocol.SUCCESS, limit=1) in (["web-9"], ["db-9"])
    assert ids(document="GetInstanceInfo", limit=2) == ["db-9", "db-7"]
    assert s.prune(now - 95) == 10  # web-0..4 and db-0..4
    assert ids(target="role=db") == ["db-9", "db-8", "db-7", "db-6", "db-5"]


def _same_time_history(s) -> list[str]:
    """Commands of which five were requested at the very same time (brokers of a cluster, a coarse
    clock); the ids in the order of the history, newest first."""
    at = time.time() - 100
    for command_id, requested_at in (("new-2", at + 2), ("new-1", at + 1), *((f"same-{n}", at) for n in range(5)),
                                     ("old-0", at - 1)):
        s.put_command(_command(command_id, ["tag:role=web"], requested_at), new=True)
    return ["new-2", "new-1", "same-4", "same-3", "same-2", "same-1", "same-0", "old-0"]


def test_pages_go_on_after_their_last_row_even_at_the_same_time(open_store):
    """A page went on with `requested_at < T`, T the last row's time: the commands requested at
    exactly T that the page had no room for were never listed."""
    s = open_store()
    expected = _same_time_history(s)

    def pages(**query) -> list[str]:
        seen: list[str] = []
        cursor: dict = {}
        while len(seen) <= len(expected):
            rows = s.list_commands(limit=2, **query, **cursor)
            seen += [r.command_id for r in rows]
            if len(rows) < 2:
                break
            cursor = {"before": rows[-1].requested_at, "before_id": rows[-1].command_id}
        return seen

    assert pages() == expected
    assert pages(target="role=web") == expected
    assert pages(document="RunShellScript") == expected
    assert pages(status=protocol.SUCCESS) == expected
    assert pages(target="tag:role=web", document="RunShellScript", status=protocol.SUCCESS) == expected
    assert pages(visible=lambda rec: True) == expected  # a client's scope: decoded and checked
    assert pages(target="role=web", visible=lambda rec: rec.command_id != "same-2") == [
        c for c in expected if c != "same-2"]
    at = s.get_command("same-0").requested_at
    assert [c.command_id for c in s.list_commands(before=at)] == ["old-0"]  # --before alone: strictly older


@pytest.mark.parametrize("query", [{}, {"target": "role=web"}, {"document": "RunShellScript"},
                                   {"status": protocol.SUCCESS}, {"target": "role=web", "status": protocol.SUCCESS}])
@pytest.mark.parametrize("cursor", [{}, {"before": 1e10}, {"before": 1e10, "before_id": "same-3"}])
def test_sqlite_history_pages_are_read_in_index_order(tmp_path, query, cursor):
    """(requested_at, command_id) order from the indexes: no sort of the matching rows first."""
    s = SqliteStore(tmp_path / "broker.db")
    _same_time_history(s)
    statements: list[str] = []
    s._db.set_trace_callback(statements.append)
    found = s.list_commands(limit=2, **query, **cursor)
    s._db.set_trace_callback(None)
    assert found
    [select] = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT BODY")]
    plan = [row[3] for row in s._db.execute("EXPLAIN QUERY PLAN " + select)]
    assert not any("TEMP B-TREE" in step for step in plan), (select, plan)
    assert any("USING INDEX" in step or "USING PRIMARY KEY" in step for step in plan), plan
    s.close()


def test_a_schema_3_database_gains_target_terms_for_its_old_commands(tmp_path):
    path = tmp_path / "broker.db"
    db = sqlite3.connect(str(path), isolation_level=None)
    for version, sql in sqlite_store.MIGRATIONS[:3]:  # what a broker before step 4 wrote
        db.executescript(f"BEGIN; {sql}; PRAGMA user_version = {version}; COMMIT;")
    rec = _command("before", ["tag:role=db", "instance:i-1,i-2"], time.time() - 10)
    db.execute("INSERT INTO commands VALUES (?,?,?,?,?)",
               (rec.command_id, rec.status, rec.document_name, rec.requested_at, msgspec.msgpack.encode(rec)))
    db.close()
    s = SqliteStore(path)
    assert s._db.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    assert [c.command_id for c in s.list_commands(target="role=db")] == ["before"]
    assert [c.command_id for c in s.list_commands(target="i-2")] == ["before"]
    s.put_command(_command("after", ["tag:role=db"], time.time()), new=True)
    assert [c.command_id for c in s.list_commands(target="tag:role=db")] == ["after", "before"]
    assert s.prune(time.time() + 1) == 2
    assert s._db.execute("SELECT count(*) FROM command_targets").fetchone()[0] == 0
    s.close()


def _crash(s: SqliteStore) -> None:
    """Stops a store as a killed broker would: what was committed stays, nothing more is written."""
    if s._checkpointer is not None:
        s._checkpointer.close()
    s._db.close()


def test_terms_written_in_batches_are_recovered_after_a_crash(tmp_path):
    path = tmp_path / "broker.db"
    s = SqliteStore(path)
    now = time.time()
    for n in range(5):
        s.put_command(_command(f"c-{n}", [f"instance:i-{n}"], now + n, document="GetInstanceInfo"), new=True)
    s.flush()  # the commands are committed; their terms wait for a batch
    terms = lambda db: db.execute("SELECT count(*) FROM command_targets").fetchone()[0]  # noqa: E731
    assert terms(s._db) == 0
    _crash(s)
    s = SqliteStore(path)  # the next start writes them
    assert terms(s._db) == 5 * 3
    assert [c.command_id for c in s.list_commands(target="i-3")] == ["c-3"]
    assert [c.command_id for c in s.list_commands(document="GetInstanceInfo", limit=2)] == ["c-4", "c-3"]
    s.put_command(_command("late", ["instance:i-9"], now - 50), new=True)  # the clock went back
    s.flush()
    assert terms(s._db) == 6 * 3  # written at once: a start after a crash would not look for it
    s.put_command(_command("new", ["instance:i-9"], now + 60), new=True)
    s.flush()
    assert [c.command_id for c in s.list_commands(target="i-9")] == ["new", "late"]  # a query writes the batch
    assert s.prune(now + 100) == 7
    assert terms(s._db) == 0
    s.close()


def test_a_document_never_matches_a_target_term(open_store):
    s = open_store()
    s.put_command(_command("doc", ["tag:env=prod"], time.time(), document="RunShellScript"), new=True)
    s.put_command(_command("tag", ["tag:RunShellScript"], time.time()), new=True)
    assert [c.command_id for c in s.list_commands(target="RunShellScript")] == ["tag"]
    assert [c.command_id for c in s.list_commands(document="RunShellScript")] == ["tag", "doc"]
