"""The broker's durable state: the interface (``base``) and its backends, one module each.

``sqlite`` (the default: a file in the state dir, for one broker) and ``postgresql`` (a database
several brokers can share; ``pg_connection`` keeps its session alive, ``pg_coordination`` holds
what several brokers need from it beyond storage: LISTEN/NOTIFY and advisory locks).
"""

from __future__ import annotations

from pathlib import Path

from .base import DocumentRow, Store

__all__ = ["DocumentRow", "Store", "open_store", "store_setting_problem"]


def store_setting_problem(store: str, password_file: str | Path | None = None) -> str | None:
    """Why ``--store``/``--store-password-file`` cannot work (one line), or None; checked before
    the broker binds anything."""
    from .pg_connection import dsn_problem, is_postgresql_dsn

    if not store or store == "sqlite":
        if password_file:
            return "--store-password-file is only for a PostgreSQL store (--store postgresql://...)"
        return None
    if not is_postgresql_dsn(store):  # the value is not echoed: it may hold a secret
        return ("--store must be a PostgreSQL DSN (postgresql://USER@HOST:5432/DB), or left unset for "
                "SQLite in the state dir")
    return dsn_problem(store)


def open_store(state_dir: Path, store: str = "", password_file: str | Path | None = None) -> Store:
    """The store the broker runs on: SQLite in its state dir, or PostgreSQL when ``store`` is a
    ``postgresql://`` DSN (the password from ``password_file`` or libpq's environment)."""
    if not store or store == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(state_dir / "broker.db")
    from ..errors import BrokerError
    from .pg_connection import read_password_file
    from .postgresql import PostgresStore

    problem = store_setting_problem(store, password_file)
    if problem:
        raise BrokerError("BadConfig", problem)
    return PostgresStore(store, read_password_file(password_file) if password_file else None)
