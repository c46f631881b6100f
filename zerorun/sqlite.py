"""The one way Zerorun writes SQLite: an explicit transaction on an autocommit connection."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def transaction(db: sqlite3.Connection, mode: str = "") -> Iterator[None]:
    """BEGIN [mode] ... COMMIT, rolled back on any error: a whole batch is one WAL commit.

    The connection must be in autocommit mode (``isolation_level=None``), so that nothing else
    opens transactions behind the caller's back.

    A failed COMMIT is rolled back too (a full disk fails the WAL's append there: the transaction
    would otherwise stay open, and every later BEGIN fail); one that SQLite already rolled back
    by itself (SQLITE_FULL, SQLITE_IOERR may) is not rolled back twice, so that the caller sees
    the error that failed it, not "no transaction is active".
    """
    db.execute(f"BEGIN {mode}".strip())
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
