"""The store's array parameters, encoded by ``pg_arrays`` in PostgreSQL's binary format: what a
real server reads back is what was sent; what the encoder does not recognise goes to psycopg."""

from __future__ import annotations

import os
import uuid

import pytest

from zmq_broker.store import pg_arrays


def test_columns_of_one_kind_are_encoded_and_the_rest_left_to_psycopg():
    assert isinstance(pg_arrays.encode(["a", None, "b"]), pg_arrays.TextArray)
    assert isinstance(pg_arrays.encode([b"a", b""]), pg_arrays.ByteaArray)
    assert isinstance(pg_arrays.encode([1.0, 2.5]), pg_arrays.Float8Array)
    assert isinstance(pg_arrays.encode([1, 2]), pg_arrays.Int8Array)
    for other in ([], [None, None], ["a", b"b"], [1.0, 2], [b"a", bytearray(b"b")], [True], [1, True],
                  [1, None], [1, 2 ** 63]):
        assert pg_arrays.encode(other) is other
    params = ["x", 3, ["a"], [1.0, 2]]
    encoded = pg_arrays.binary(params)
    assert encoded[:2] == ["x", 3] and isinstance(encoded[2], pg_arrays.TextArray) and encoded[3] == [1.0, 2]


@pytest.fixture
def connection(postgres_server):
    import psycopg

    pg_arrays.register()
    name = "t_" + uuid.uuid4().hex[:12]
    dsn = postgres_server.create_database(name)
    with psycopg.connect(dsn, password=postgres_server.password, autocommit=True) as conn:
        yield conn
    postgres_server.drop_database(name)


@pytest.mark.parametrize("kind, values", [
    ("text", ["a", "", "ünïcødé ✓ 字", None, "x" * 70_000, "quote ' and \\ backslash",
              "y" * 1023, "z" * 1024, "é" * 600]),  # around the short lengths' table (1,024 bytes)
    ("bytea", [b"", b"\x00\xff\x01", None, os.urandom(300), os.urandom(1023), os.urandom(1024)]),
    ("float8", [0.0, -1.5, 1e300, 5e-324, float("inf"), float("-inf")]),
    ("int8", [0, -1, 2 ** 63 - 1, -2 ** 63, 7]),
])
def test_what_postgresql_reads_is_what_was_sent(connection, kind, values):
    param = pg_arrays.encode(values)
    assert isinstance(param, pg_arrays.ArrayParam)
    assert connection.execute(f"SELECT %b::{kind}[]", [param]).fetchone()[0] == values
    rows = connection.execute(f"SELECT * FROM unnest(%b::{kind}[], %b::text[])",
                              [param, pg_arrays.encode([str(i) for i in range(len(values))])]).fetchall()
    assert rows == [(v, str(i)) for i, v in enumerate(values)]


def test_a_nul_character_is_refused_as_psycopg_would_have_it_refused(connection):
    import psycopg

    with pytest.raises(psycopg.DataError):
        connection.execute("SELECT %b::text[]", [pg_arrays.encode(["a\x00b"])])


# -- statements prepared on the connection (pg_prepared) ------------------------------------------


def test_placeholders_are_numbered_as_libpq_has_them():
    from zmq_broker.store.pg_prepared import numbered

    assert numbered("SELECT %s, %b::text[], '100%%' WHERE x = %s") == "SELECT $1, $2::text[], '100%' WHERE x = $3"


def test_the_statuses_taken_for_success_are_psycopgs():
    from psycopg import pq

    from zmq_broker.store.pg_prepared import _OK

    assert _OK == (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


def test_a_prepared_statement_writes_what_psycopg_would(connection):
    """Arrays, strings (of a type the server infers) and floats go as prepared statements; a
    statement with another kind of parameter is left to the caller (nothing sent)."""
    from zmq_broker.store.pg_prepared import Prepared

    connection.execute("CREATE TABLE t (k text PRIMARY KEY, n bigint, f float8, b bytea, d date)")
    prepared = Prepared(connection)
    insert = "INSERT INTO t (k, n, f, b) SELECT * FROM unnest(%b::text[], %b::bigint[], %b::float8[], %b::bytea[])"
    for batch in (["a", "b"], ["c"]):  # prepared once, executed twice
        assert prepared.execute(insert, [batch, [1] * len(batch), [0.5] * len(batch), [b"\x00x"] * len(batch)])
    assert prepared.execute("UPDATE t SET f = %s, d = %s WHERE k = %s", [2.5, "2026-12-06", "a"])
    assert not prepared.execute("UPDATE t SET n = %s WHERE k = %s", [3, "a"])  # an int: psycopg's
    assert not prepared.execute("UPDATE t SET k = %s WHERE k = %s", ["x\x00y", "a"])  # libpq would cut it
    assert not prepared.execute("UPDATE t SET b = %s WHERE k = %s", [b"z", "a"])
    rows = connection.execute("SELECT k, n, f, b, d::text FROM t ORDER BY k").fetchall()
    assert rows == [("a", 1, 2.5, b"\x00x", "2026-12-06"), ("b", 1, 0.5, b"\x00x", None), ("c", 1, 0.5, b"\x00x", None)]


def test_a_failed_prepared_statement_raises_psycopgs_error(connection, postgres_server, monkeypatch):
    import psycopg

    from zmq_broker.store import pg_prepared

    connection.execute("CREATE TABLE t (k text PRIMARY KEY)")
    prepared = pg_prepared.Prepared(connection)
    insert = "INSERT INTO t SELECT * FROM unnest(%b::text[])"
    assert prepared.execute(insert, [["a"]])
    with pytest.raises(psycopg.errors.UniqueViolation):
        prepared.execute(insert, [["a"]])
    with pytest.raises(psycopg.DataError):  # a NUL character in a text array
        prepared.execute(insert, [["b\x00"]])
    monkeypatch.setattr(pg_prepared, "PREPARED_MAX", 1)  # beyond it a text is parsed each time: still works
    assert prepared.execute("INSERT INTO t SELECT %s", ["c"])
    assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    with psycopg.connect(postgres_server.dsn(), password=postgres_server.password, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [connection.info.backend_pid])
    with pytest.raises(psycopg.OperationalError):
        prepared.execute(insert, [["d"]])
    assert connection.broken  # what Session.run looks at to replace the connection


def test_a_prepared_read_gives_the_rows_a_binary_cursor_gives(connection, monkeypatch):
    """The store's reads go the prepared way too (``Prepared.query``): every column type the
    store reads, and some it does not, loaded as psycopg's binary cursor loads them; a parameter
    of another kind leaves the read to psycopg, before anything is sent."""
    from zmq_broker.store import pg_prepared

    connection.execute("CREATE TABLE r (seq bigserial PRIMARY KEY, k text, n int, b bytea, f float8, ok bool,"
                       " at timestamptz, tags text[], j jsonb, d numeric)")
    connection.execute("INSERT INTO r (k, n, b, f, ok, at, tags, j, d) VALUES ('a', 1, '\\x00ff', 0.5, true, "
                       "'2026-12-07 20:00:00+00', '{x,y}', '{\"a\": [1]}', 1.25), (NULL, NULL, NULL, NULL, NULL, "
                       "NULL, NULL, NULL, NULL), ('ünï', -3, '', 1e300, false, now(), '{}', 'null', 12345678901234567890)")
    prepared = pg_prepared.Prepared(connection)
    reads = [("SELECT * FROM r WHERE k = ANY(%b::text[]) OR k IS NULL ORDER BY seq", [["a", "ünï"]]),
             ("SELECT seq, k FROM r WHERE seq = ANY(%b::bigint[]) ORDER BY seq", [[1, 3]]),
             ("SELECT count(*), %s::text, %s FROM r", ["x", 2.5]),
             ("SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory'", []),
             ("UPDATE r SET n = 7 WHERE k = %s RETURNING seq, n", ["a"]),
             ("SELECT k FROM r WHERE false", [])]
    for sql, params in reads:
        for _ in range(3):  # sent as it is, then prepared, then executed as prepared
            rows = prepared.query(sql, params)
            expected = connection.cursor(binary=True).execute(sql, params).fetchall()
            assert rows == expected and all(type(r) is tuple for r in rows), sql
            assert [[type(v) for v in r] for r in rows] == [[type(v) for v in r] for r in expected]
    assert prepared.query("SELECT k FROM r WHERE n = %s", [1]) is None  # an int: psycopg's
    assert prepared.query("SELECT k FROM r WHERE k = %s", ["x\x00"]) is None

    def names() -> list[str]:
        return sorted(n for (n,) in connection.execute("SELECT name FROM pg_prepared_statements"))

    assert names() == [f"zerorun_r{i}" for i in sorted(range(len(reads)), key=str)]
    assert prepared.query("SELECT k FROM r WHERE k = %s", ["a"]) == [("a",)]  # a read made once is not prepared
    assert len(names()) == len(reads)
    assert prepared.execute("UPDATE r SET f = %s WHERE k = %s", [1.5, "a"])  # a write is, at once
    assert "zerorun_w0" in names()
    monkeypatch.setattr(pg_prepared, "PREPARED_MAX", 1)  # beyond it a text is parsed each time: still works
    for _ in range(3):
        assert prepared.query("SELECT k FROM r WHERE k = %s", ["ünï"]) == [("ünï",)]
    assert len(names()) == len(reads) + 1
