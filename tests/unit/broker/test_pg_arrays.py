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
    for other in ([], [None, None], [1, 2], ["a", b"b"], [1.0, 2], [b"a", bytearray(b"b")], [True]):
        assert pg_arrays.encode(other) is other
    params = ["x", 3, ["a"], [1]]
    encoded = pg_arrays.binary(params)
    assert encoded[:2] == ["x", 3] and isinstance(encoded[2], pg_arrays.TextArray) and encoded[3] == [1]


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
