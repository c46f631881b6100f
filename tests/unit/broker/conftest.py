"""The store's backends side by side: tests that take ``open_store`` run once on SQLite (a file
in tmp_path) and once on PostgreSQL (one database of the session's server, emptied before each
test). ``open_store()`` opens a new store on the same data each time: a broker restarted."""

from __future__ import annotations

import pytest

from zmq_broker.store.postgresql import PostgresStore
from zmq_broker.store.sqlite import SqliteStore

UNIT_DATABASE = "zerorun_unit"
TABLES = "keys, instances, commands, command_targets, invocations, documents, document_heads"


@pytest.fixture(scope="session")
def postgres_unit_dsn(postgres_server):
    """A database of the session's server, migrated once."""
    dsn = postgres_server.create_database(UNIT_DATABASE)
    PostgresStore(dsn, postgres_server.password).close()
    return dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request):
    return request.param


@pytest.fixture
def open_store(backend, request, tmp_path):
    opened = []
    if backend == "sqlite":
        def make():
            opened.append(SqliteStore(tmp_path / "broker.db"))
            return opened[-1]
    else:
        server = request.getfixturevalue("postgres_server")
        dsn = request.getfixturevalue("postgres_unit_dsn")
        with server.admin(UNIT_DATABASE) as conn:
            conn.execute(f"TRUNCATE {TABLES}")

        def make():
            opened.append(PostgresStore(dsn, server.password))
            return opened[-1]
    yield make
    for store in opened:
        store.close()
