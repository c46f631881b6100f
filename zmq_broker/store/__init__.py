"""The broker's durable state: the interface (``base``) and its backends, one module each."""

from __future__ import annotations

from pathlib import Path

from .base import DocumentRow, Store

__all__ = ["DocumentRow", "Store", "open_store"]


def open_store(state_dir: Path) -> Store:
    """The store the broker runs on: SQLite in its state dir."""
    from .sqlite import SqliteStore

    return SqliteStore(state_dir / "broker.db")
