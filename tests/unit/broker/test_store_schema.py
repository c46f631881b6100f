"""The SQLite store's versioned schema: migrations applied once, a newer schema refused."""

from __future__ import annotations

import sqlite3

import pytest

from zmq_broker.errors import BrokerError
from zmq_broker.store.sqlite import SCHEMA_VERSION, SqliteStore


def _user_version(path) -> int:
    db = sqlite3.connect(str(path))
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_a_new_database_gets_the_latest_schema(tmp_path):
    SqliteStore(tmp_path / "broker.db").close()
    assert _user_version(tmp_path / "broker.db") == SCHEMA_VERSION


def test_a_database_from_before_versioning_is_adopted_with_its_data(tmp_path):
    path = tmp_path / "broker.db"
    db = sqlite3.connect(str(path))  # the unversioned schema of earlier brokers, with a row
    db.executescript("""
        CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
        CREATE TABLE documents (name TEXT NOT NULL, version INTEGER NOT NULL, content TEXT NOT NULL,
            sha256 TEXT NOT NULL, created_at REAL NOT NULL, created_by TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '', document_format TEXT NOT NULL, PRIMARY KEY (name, version));
        CREATE TABLE document_heads (name TEXT PRIMARY KEY, default_version INTEGER NOT NULL,
            last_version INTEGER NOT NULL);
        INSERT INTO documents VALUES ('Old', 1, 'x', 'abc', 1.0, '', '', 'YAML');
        INSERT INTO document_heads VALUES ('Old', 1, 1);
    """)
    db.close()
    store = SqliteStore(path)
    assert store.document_head("Old") == (1, 1)
    store.close()
    assert _user_version(path) == SCHEMA_VERSION
    tables = {r[0] for r in sqlite3.connect(str(path)).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "meta" not in tables  # the unused table of earlier brokers is dropped


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "broker.db"
    db = sqlite3.connect(str(path))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(BrokerError) as exc:
        SqliteStore(path)
    assert exc.value.code == "SchemaTooNew"
    assert "newer than this broker knows" in exc.value.message
