"""``zerorun.sqlite.transaction`` when a write fails: the agent's journal on a full disk (its
real-disk test: tests/integration/test_agent_deliveries.py), the broker's store."""

from __future__ import annotations

import sqlite3

import pytest

from zerorun.sqlite import transaction


def test_an_error_sqlite_rolled_back_itself_is_the_error_raised():
    """SQLITE_FULL (or an I/O error) may roll the transaction back inside SQLite: the ROLLBACK
    after it failed with "cannot rollback - no transaction is active", hiding "database or disk is
    full" from whoever logs it."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        with transaction(db):
            db.execute("INSERT INTO t VALUES (1)")
            db.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")
    assert not db.in_transaction


def test_a_commit_that_fails_leaves_no_transaction_open():
    """A failed COMMIT used to leave the transaction open: every later BEGIN failed ("cannot start a
    transaction within a transaction"), the connection unusable for good."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):
        with transaction(db):
            db.execute("INSERT INTO child VALUES (7)")  # fails at COMMIT, which SQLite does not roll back
    assert not db.in_transaction
    with transaction(db):
        db.execute("INSERT INTO parent VALUES (7)")
        db.execute("INSERT INTO child VALUES (7)")
    assert db.execute("SELECT count(*) FROM child").fetchone() == (1,)
