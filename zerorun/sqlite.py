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
    """
    db.execute(f"BEGIN {mode}".strip())
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
