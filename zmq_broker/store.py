"""Durable broker state in SQLite (WAL), behind a narrow interface.

Writes are queued by the broker loop and committed together by ``flush()`` once per loop
iteration (group commit): replies and acks that promise durability are sent only after the flush,
so a SIGKILL loses nothing that was acknowledged, and persistence costs one fsync-free WAL commit
per batch rather than one per message.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import msgspec

from zerorun import protocol
from zerorun.protocol import InvocationView
from zerorun.sqlite import transaction

from .model import CommandRecord, InstanceRecord, KeyRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (public_key TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
    state TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS instances (instance_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS commands (command_id TEXT PRIMARY KEY, status TEXT NOT NULL,
    document_name TEXT NOT NULL, requested_at REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS commands_by_time ON commands(requested_at);
CREATE INDEX IF NOT EXISTS commands_by_status ON commands(status);
CREATE TABLE IF NOT EXISTS invocations (invocation_id TEXT PRIMARY KEY, command_id TEXT NOT NULL,
    instance_id TEXT NOT NULL, status TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS invocations_by_command ON invocations(command_id);
"""

_enc = msgspec.msgpack.Encoder()
_dec_key = msgspec.msgpack.Decoder(KeyRecord)
_dec_instance = msgspec.msgpack.Decoder(InstanceRecord)
_dec_command = msgspec.msgpack.Decoder(CommandRecord)
_dec_invocation = msgspec.msgpack.Decoder(InvocationView)


class Store:
    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
        self._db.executescript(SCHEMA)
        self._keys: dict[str, KeyRecord | None] = {}
        self._instances: dict[str, InstanceRecord] = {}
        self._commands: dict[str, CommandRecord] = {}
        self._invocations: dict[str, InvocationView] = {}
        self.last_flush_seconds = 0.0

    @property
    def db(self) -> sqlite3.Connection:
        """For tables with their own module (documents), written outside the group commit."""
        return self._db

    def close(self) -> None:
        self.flush()
        self._db.close()

    # -- queued writes ----------------------------------------------------------------------

    def put_key(self, rec: KeyRecord) -> None:
        self._keys[rec.public_key] = rec

    def delete_key(self, public_key: str) -> None:
        self._keys[public_key] = None

    def put_instance(self, rec: InstanceRecord) -> None:
        self._instances[rec.instance_id] = rec

    def put_command(self, rec: CommandRecord) -> None:
        self._commands[rec.command_id] = rec

    def put_invocation(self, rec: InvocationView) -> None:
        self._invocations[rec.invocation_id] = rec

    @property
    def dirty(self) -> bool:
        return bool(self._keys or self._instances or self._commands or self._invocations)

    def flush(self) -> None:
        """Commits every queued write in one transaction."""
        if not self.dirty:
            return
        started = time.perf_counter()
        db = self._db
        with transaction(db):
            if self._keys:
                db.executemany("DELETE FROM keys WHERE public_key=?",
                               [(k,) for k, r in self._keys.items() if r is None])
                db.executemany("INSERT OR REPLACE INTO keys VALUES (?,?,?,?,?)",
                               [(r.public_key, r.kind, r.name, r.state, _enc.encode(r))
                                for r in self._keys.values() if r is not None])
            if self._instances:
                db.executemany("INSERT OR REPLACE INTO instances VALUES (?,?)",
                               [(r.instance_id, _enc.encode(r)) for r in self._instances.values()])
            if self._commands:
                db.executemany("INSERT OR REPLACE INTO commands VALUES (?,?,?,?,?)",
                               [(r.command_id, r.status, r.document_name, r.requested_at, _enc.encode(r))
                                for r in self._commands.values()])
            if self._invocations:
                db.executemany("INSERT OR REPLACE INTO invocations VALUES (?,?,?,?,?)",
                               [(r.invocation_id, r.command_id, r.instance_id, r.status, _enc.encode(r))
                                for r in self._invocations.values()])
        self._keys.clear()
        self._instances.clear()
        self._commands.clear()
        self._invocations.clear()
        self.last_flush_seconds = time.perf_counter() - started

    # -- reads (of committed state; the broker keeps live state in memory) ------------------

    def load_keys(self) -> list[KeyRecord]:
        return [_dec_key.decode(b) for (b,) in self._db.execute("SELECT body FROM keys")]

    def load_instances(self) -> list[InstanceRecord]:
        return [_dec_instance.decode(b) for (b,) in self._db.execute("SELECT body FROM instances")]

    def load_active_commands(self) -> list[CommandRecord]:
        placeholders = ",".join("?" * len(protocol.TERMINAL_STATUSES))
        rows = self._db.execute(
            f"SELECT body FROM commands WHERE status NOT IN ({placeholders})",
            tuple(protocol.TERMINAL_STATUSES))
        return [_dec_command.decode(b) for (b,) in rows]

    def get_command(self, command_id: str) -> CommandRecord | None:
        pending = self._commands.get(command_id)
        if pending is not None:
            return pending
        row = self._db.execute("SELECT body FROM commands WHERE command_id=?", (command_id,)).fetchone()
        return _dec_command.decode(row[0]) if row else None

    def get_invocations(self, command_id: str) -> list[InvocationView]:
        rows = self._db.execute(
            "SELECT body FROM invocations WHERE command_id=? ORDER BY instance_id", (command_id,))
        found = {inv.invocation_id: inv for inv in (_dec_invocation.decode(b) for (b,) in rows)}
        for inv in self._invocations.values():
            if inv.command_id == command_id:
                found[inv.invocation_id] = inv
        return sorted(found.values(), key=lambda inv: inv.instance_id)

    def list_commands(self, limit: int = 50, status: str = "", document: str = "",
                      since: float = 0.0, before: float = 0.0, target: str = "") -> list[CommandRecord]:
        self.flush()
        clauses, args = [], []  # type: list[str], list[Any]
        if status:
            clauses.append("status=?")
            args.append(status)
        if document:
            clauses.append("document_name=?")
            args.append(document)
        if since:
            clauses.append("requested_at>=?")
            args.append(since)
        if before:
            clauses.append("requested_at<?")
            args.append(before)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        limit = max(1, min(int(limit), 1000))
        rows = self._db.execute(f"SELECT body FROM commands {where} ORDER BY requested_at DESC", args)
        out: list[CommandRecord] = []
        for scanned, (body,) in enumerate(rows):
            rec = _dec_command.decode(body)
            if not target or any(target in t for t in rec.targets):
                out.append(rec)
            if len(out) >= limit or scanned >= 20_000:
                break
        return out

    def prune(self, older_than: float, batch: int = 500) -> int:
        """Deletes up to ``batch`` finished commands requested before ``older_than``."""
        self.flush()
        placeholders = ",".join("?" * len(protocol.TERMINAL_STATUSES))
        ids = [r[0] for r in self._db.execute(
            f"SELECT command_id FROM commands WHERE requested_at < ? AND status IN ({placeholders}) LIMIT ?",
            (older_than, *protocol.TERMINAL_STATUSES, batch))]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with transaction(self._db):
            self._db.execute(f"DELETE FROM invocations WHERE command_id IN ({marks})", ids)
            self._db.execute(f"DELETE FROM commands WHERE command_id IN ({marks})", ids)
        return len(ids)

    def invocation_belongs(self, invocation_id: str, instance_id: str) -> bool:
        """Whether this invocation exists and was addressed to this instance (a retried report)."""
        row = self._db.execute("SELECT instance_id FROM invocations WHERE invocation_id=?",
                               (invocation_id,)).fetchone()
        return row is not None and row[0] == instance_id

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def bulk_invocations(self, command_ids: Iterable[str]) -> list[InvocationView]:
        ids = list(command_ids)
        out: list[InvocationView] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self._db.execute(
                f"SELECT body FROM invocations WHERE command_id IN ({','.join('?' * len(chunk))})", chunk)
            out.extend(_dec_invocation.decode(b) for (b,) in rows)
        return out
