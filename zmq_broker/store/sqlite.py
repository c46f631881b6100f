"""The SQLite backend of the broker's store (WAL), the default for a single broker.

State writes are queued and committed together by ``flush()`` (group commit: one fsync-free WAL
commit per loop iteration rather than one per message). The schema is versioned: numbered
migrations, the version in ``PRAGMA user_version``; a database from a newer broker is refused.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import msgspec

from zerorun import protocol
from zerorun.protocol import InvocationView
from zerorun.sqlite import transaction

from ..errors import BrokerError
from ..model import CommandRecord, InstanceRecord, KeyRecord, OutputRecord, TagRecord, TokenRecord, WebhookRecord
from .base import STORE_UNAVAILABLE, DocumentRow, QueuedWrites, TokenRow
from .terms import command_terms, document_term, target_terms

log = logging.getLogger("zerorun.broker.store")

# Numbered steps, each applied once in its own transaction. Step 1 is the schema every database
# had before versioning began (user_version 0): its statements are idempotent, so such a
# database is adopted as it is.
MIGRATIONS: list[tuple[int, str]] = [(1, """
DROP TABLE IF EXISTS meta;
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
CREATE TABLE IF NOT EXISTS documents (name TEXT NOT NULL, version INTEGER NOT NULL,
    content TEXT NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '',
    document_format TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS document_heads (name TEXT PRIMARY KEY,
    default_version INTEGER NOT NULL, last_version INTEGER NOT NULL);
"""), (2, """
CREATE TABLE instance_tags (instance_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE enrol_tokens (token_id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, uses_left INTEGER NOT NULL,
    expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, instance_prefix TEXT NOT NULL DEFAULT '',
    body BLOB NOT NULL);
"""), (3, """
CREATE TABLE outputs (invocation_id TEXT PRIMARY KEY, command_id TEXT NOT NULL, state TEXT NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX outputs_by_command ON outputs(command_id);
CREATE INDEX outputs_by_state ON outputs(state);
CREATE TABLE webhooks (delivery_id TEXT PRIMARY KEY, command_id TEXT NOT NULL, state TEXT NOT NULL,
    next_at REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX webhooks_due ON webhooks(state, next_at);
CREATE INDEX webhooks_by_command ON webhooks(command_id);
"""), (4, """
CREATE TABLE command_targets (term TEXT NOT NULL, requested_at REAL NOT NULL, command_id TEXT NOT NULL,
    PRIMARY KEY (term, requested_at, command_id)) WITHOUT ROWID;
CREATE INDEX command_targets_by_command ON command_targets(command_id);
DROP INDEX IF EXISTS commands_by_status;
CREATE INDEX commands_by_status ON commands(status, requested_at);
CREATE INDEX commands_by_document ON commands(document_name, requested_at);
"""), (5, """
DROP INDEX command_targets_by_command;
DROP INDEX commands_by_document;
CREATE TABLE command_terms_through (requested_at REAL NOT NULL);
INSERT INTO command_targets SELECT char(31) || 'document:' || document_name, requested_at, command_id FROM commands;
INSERT INTO command_terms_through SELECT coalesce(max(requested_at), 0) FROM commands;
"""), (6, """
DROP INDEX commands_by_time;
CREATE INDEX commands_by_time ON commands(requested_at, command_id);
DROP INDEX commands_by_status;
CREATE INDEX commands_by_status ON commands(status, requested_at, command_id);
""")]
SCHEMA_VERSION = MIGRATIONS[-1][0]
_DOC_COLUMNS = "name, version, sha256, created_at, created_by, description, document_format"

_enc = msgspec.msgpack.Encoder()
_dec_key = msgspec.msgpack.Decoder(KeyRecord)
_dec_instance = msgspec.msgpack.Decoder(InstanceRecord)
_dec_command = msgspec.msgpack.Decoder(CommandRecord)
_dec_invocation = msgspec.msgpack.Decoder(InvocationView)
_dec_tags = msgspec.msgpack.Decoder(TagRecord)
_dec_token = msgspec.msgpack.Decoder(TokenRecord)
_dec_output = msgspec.msgpack.Decoder(OutputRecord)
_dec_webhook = msgspec.msgpack.Decoder(WebhookRecord)


def private_file(path: Path) -> None:
    """Creates ``path`` (and makes it, with its -wal and -shm files) readable by the owner only:
    command bodies can hold secret parameter values while their invocations run."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for extra in ("", "-wal", "-shm"):
        try:
            os.chmod(f"{path}{extra}", 0o600)
        except FileNotFoundError:
            pass


class _Targets(msgspec.Struct):
    """What pruning needs of a command body: the rest of it is skipped, not decoded."""
    targets: list[str] = []


_dec_targets = msgspec.msgpack.Decoder(_Targets)
TERMS_BATCH = 4096  # term rows written together: one page of the terms' B-tree takes many
TERMS_DELAY = 2.0  # seconds a new command's terms may wait to be written (a query writes them at once)
WRITE_RETRY = 1.0  # seconds between attempts to commit while the database cannot be written

# what says the file system cannot take the write (full, failing, read-only), as opposed to a bug
_UNWRITABLE = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN"}


def _cannot_write(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""  # extended names too: SQLITE_IOERR_WRITE
    return any(name == base or name.startswith(base + "_") for base in _UNWRITABLE)


def _backfill_targets(db: sqlite3.Connection) -> None:
    """Step 4: the target terms of the commands written before it."""
    rows = [(term, at, command_id) for command_id, at, body in db.execute(
        "SELECT command_id, requested_at, body FROM commands").fetchall()
        for term in target_terms(_dec_command.decode(body).targets)]
    db.executemany("INSERT OR IGNORE INTO command_targets VALUES (?,?,?)", rows)


BACKFILLS: dict[int, Callable[[sqlite3.Connection], None]] = {4: _backfill_targets}


def migrate(db: sqlite3.Connection, where: str) -> None:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise BrokerError("SchemaTooNew", f"{where} has schema version {current}, newer than this broker "
                          f"knows ({SCHEMA_VERSION}): run a newer zerorun-broker on it")
    for version, sql in MIGRATIONS:
        if version > current:
            db.executescript(f"BEGIN IMMEDIATE; {sql};")  # the transaction stays open
            try:
                if version in BACKFILLS:
                    BACKFILLS[version](db)
                db.execute(f"PRAGMA user_version = {version}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


class Checkpointer:
    """Moves the write-ahead log into the database from a thread of its own (a PASSIVE checkpoint
    on its own connection: writers go on meanwhile), so that the broker's loop never waits for a
    checkpoint's copy and fsync. Left to SQLite's automatic checkpoints, a commit that crosses
    1,000 WAL pages pays for one: 10-40 ms of a pruning pass on this VM (bench/README.md).

    The WAL only starts over when a write finds every frame of it in the database, which a
    thread that copies while the loop commits never achieves under steady load: the log grew to
    278 MB in 4,000 back-to-back commands, and each commit cost more as it grew. So once the log
    is past ``RESTART_FRAMES``, the loop copies the few frames committed since the thread's pass
    itself, after its next commit (``catch_up``), and the commit after that starts the log over."""

    INTERVAL = 0.1  # seconds between checkpoints while there are commits and the log is short
    RESTART_FRAMES = 4000  # 16 MB of 4 KiB pages

    def __init__(self, path: str):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.lock = threading.Lock()  # held while checkpointing: a TRUNCATE elsewhere waits for it
        self.restart_wanted = False  # the log is long: the loop should finish a checkpoint
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        self._wake.set()

    def catch_up(self, db: sqlite3.Connection) -> None:
        """On the loop's connection, right after a commit: copies what the thread has not, so
        that the next commit starts the log over. Skipped while the thread's pass runs."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.restart_wanted = False
        except sqlite3.Error:
            pass
        finally:
            self.lock.release()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stopped.is_set():
                break
            frames = 0
            try:
                with self.lock:
                    _busy, frames, _copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:
                pass  # busy or gone: the next commit asks again, and closing checkpoints in any case
            if frames >= self.RESTART_FRAMES:
                self.restart_wanted = True
            else:
                self._stopped.wait(self.INTERVAL)

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._db.close()


class SqliteStore(QueuedWrites):
    def __init__(self, path: Path | str):
        self.path = path
        if str(path) != ":memory:":
            private_file(Path(path))
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")  # the -wal and -shm files take the database's mode
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
        self._db.execute("PRAGMA secure_delete=ON")  # deleted and overwritten rows are zeroed, not left behind
        try:
            migrate(self._db, str(path))
        except BaseException:
            self._db.close()
            raise
        self._checkpointer: Checkpointer | None = None
        if str(path) != ":memory:":
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = Checkpointer(str(path))
        QueuedWrites.__init__(self)
        # Terms are written in batches: one per command cost a page of the terms' B-tree each, 13 %
        # of the broker's CPU for back-to-back 1-instance commands. Every command requested at or
        # before ``_terms_through`` (stored) has its terms written; a start after a crash writes
        # those of the later ones (``_recover_terms``), a new command that is not later (the clock
        # went back) has them written at once.
        self._pending_terms: list[tuple[str, float, str]] = []
        self._pending_through = 0.0
        self._pending_since = 0.0
        self._terms_through = self._recover_terms()
        self.last_flush_seconds = 0.0
        self.write_failed = ""  # why the last commit failed (a full disk); "" once one succeeds
        self._retry_at = 0.0  # monotonic: no attempt before, while it fails

    def close(self) -> None:
        """Commits what is queued; if the disk still cannot take it (never acknowledged: agents
        send their results again, clients were not answered), says so and drops it."""
        self._retry_at = 0.0  # one last attempt, however recent the one before
        try:
            self.write_terms()
        except BrokerError as exc:
            log.error("closing with uncommitted writes, none of them acknowledged: %s", exc.message)
        except sqlite3.Error as exc:  # the terms alone: written again from the commands at start
            if not _cannot_write(exc):
                raise
            log.error("closing without the commands' target index written (rebuilt at start): %s", exc)
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()

    def _recover_terms(self) -> float:
        """Writes the terms of commands requested after the stored mark (a crash left them
        unwritten); returns the mark."""
        db = self._db
        (through,) = db.execute("SELECT requested_at FROM command_terms_through").fetchone()
        rows = db.execute("SELECT command_id, requested_at, document_name, body FROM commands WHERE requested_at > ?",
                          (through,)).fetchall()
        if not rows:
            return float(through)
        latest = max(at for _, at, _, _ in rows)
        with transaction(db):
            db.executemany("INSERT OR IGNORE INTO command_targets VALUES (?,?,?)",
                           [(term, at, command_id) for command_id, at, document, body in rows
                            for term in command_terms(_dec_targets.decode(body).targets, document)])
            db.execute("UPDATE command_terms_through SET requested_at=?", (latest,))
        return float(latest)

    def write_terms(self) -> None:
        """Writes the pending terms now: before a query by term."""
        self.flush()
        if self._pending_terms:
            with transaction(self._db):
                self._write_pending_terms(self._db)

    def _write_pending_terms(self, db: sqlite3.Connection) -> None:
        db.executemany("INSERT OR IGNORE INTO command_targets VALUES (?,?,?)", self._pending_terms)
        db.execute("UPDATE command_terms_through SET requested_at=?", (self._pending_through,))
        self._terms_through = self._pending_through
        self._pending_terms = []
        self._pending_since = 0.0

    # -- queued writes ----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._queued()

    def flush(self) -> None:
        """Commits every queued write in one transaction. A disk that is full or failing keeps
        them all queued (``BrokerError(STORE_UNAVAILABLE)``, ``write_failed``), and the next
        attempt is a second later: a broker that stopped there stopped every command it had."""
        if not self.dirty:
            return
        if self.write_failed and time.monotonic() < self._retry_at:
            raise self._unwritable()
        started = time.perf_counter()
        terms = self._pending_terms, len(self._pending_terms), self._pending_through, self._pending_since, \
            self._terms_through
        try:
            self._commit_queued(started)
        except sqlite3.Error as exc:
            if not _cannot_write(exc):
                raise
            pending, count, self._pending_through, self._pending_since, self._terms_through = terms
            del pending[count:]  # the batch's terms are queued again with its commands
            self._pending_terms = pending
            if not self.write_failed:
                log.error("cannot write the broker's database %s: %s; refusing new work and keeping what is "
                          "queued in memory until it can be written", self.path, exc)
            self.write_failed = str(exc)
            self._retry_at = time.monotonic() + WRITE_RETRY
            raise self._unwritable() from None
        if self.write_failed:
            log.warning("the broker's database %s can be written again", self.path)
            self.write_failed = ""
        self.last_flush_seconds = time.perf_counter() - started
        if self._checkpointer is not None:
            if self._checkpointer.restart_wanted:
                self._checkpointer.catch_up(self._db)
            self._checkpointer.committed()

    def _unwritable(self) -> BrokerError:
        return BrokerError(STORE_UNAVAILABLE, f"the broker's database cannot be written: {self.write_failed}")

    def _commit_queued(self, started: float) -> None:
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
                # an upsert of what changes: the indexes on document and time are not rewritten
                db.executemany("INSERT INTO commands VALUES (?,?,?,?,?) ON CONFLICT (command_id) DO UPDATE"
                               " SET status=excluded.status, body=excluded.body",
                               [(r.command_id, r.status, r.document_name, r.requested_at, _enc.encode(r))
                                for r in self._commands.values()])
            if self._new_commands:
                self._queue_terms(db, started)
            if self._invocations:
                db.executemany("INSERT INTO invocations VALUES (?,?,?,?,?) ON CONFLICT (invocation_id) DO UPDATE"
                               " SET status=excluded.status, body=excluded.body",
                               [(r.invocation_id, r.command_id, r.instance_id, r.status, _enc.encode(r))
                                for r in self._invocations.values()])
            if self._tags:
                db.executemany("INSERT OR REPLACE INTO instance_tags VALUES (?,?)",
                               [(r.instance_id, _enc.encode(r)) for r in self._tags.values()])
            if self._outputs:
                db.executemany("INSERT OR REPLACE INTO outputs VALUES (?,?,?,?)",
                               [(r.invocation_id, r.command_id, r.state, _enc.encode(r))
                                for r in self._outputs.values()])
            if self._webhooks:
                db.executemany("INSERT OR REPLACE INTO webhooks VALUES (?,?,?,?,?)",
                               [(r.delivery_id, r.command_id, r.state, r.next_at, _enc.encode(r))
                                for r in self._webhooks.values()])
        self._written()

    def _queue_terms(self, db: sqlite3.Connection, now: float) -> None:
        """Queues the new commands' terms; writes the queue when it is long or old enough."""
        late = []
        for r in self._new_commands.values():
            rows = [(term, r.requested_at, r.command_id) for term in command_terms(r.targets, r.document_name)]
            if r.requested_at <= self._terms_through:
                late.extend(rows)
            else:
                self._pending_terms.extend(rows)
                self._pending_through = max(self._pending_through, r.requested_at)
        if late:
            db.executemany("INSERT OR IGNORE INTO command_targets VALUES (?,?,?)", late)
        if not self._pending_since:
            self._pending_since = now
        if len(self._pending_terms) >= TERMS_BATCH or now - self._pending_since >= TERMS_DELAY:
            self._write_pending_terms(db)

    # -- reads (of committed state; the broker keeps live state in memory) ------------------

    def load_keys(self) -> list[KeyRecord]:
        return [_dec_key.decode(b) for (b,) in self._db.execute("SELECT body FROM keys")]

    def load_instances(self) -> list[InstanceRecord]:
        return [_dec_instance.decode(b) for (b,) in self._db.execute("SELECT body FROM instances")]

    def load_tags(self) -> list[TagRecord]:
        self.flush()
        return [_dec_tags.decode(b) for (b,) in self._db.execute("SELECT body FROM instance_tags")]

    def get_tags(self, instance_ids: list[str]) -> list[TagRecord]:
        self.flush()
        marks = ",".join("?" * len(instance_ids))
        return [_dec_tags.decode(b) for (b,) in self._db.execute(
            f"SELECT body FROM instance_tags WHERE instance_id IN ({marks})", instance_ids)]

    # -- enrolment tokens (committed at once; a use is taken atomically) ----------------------

    def create_token(self, rec: TokenRecord, digest: str) -> None:
        self._db.execute("INSERT INTO enrol_tokens VALUES (?, ?, ?, ?, 0, ?, ?)",
                         (rec.token_id, digest, rec.uses, rec.expires_at, rec.instance_prefix, _enc.encode(rec)))

    def tokens(self) -> list[TokenRow]:
        rows = self._db.execute("SELECT body, uses_left, revoked FROM enrol_tokens")
        return [TokenRow(_dec_token.decode(b), int(left), bool(revoked)) for b, left, revoked in rows]

    def token_by_digest(self, digest: str) -> TokenRow | None:
        row = self._db.execute("SELECT body, uses_left, revoked FROM enrol_tokens WHERE digest = ?",
                               (digest,)).fetchone()
        return None if row is None else TokenRow(_dec_token.decode(row[0]), int(row[1]), bool(row[2]))

    def revoke_token(self, token_id: str) -> bool:
        return self._db.execute("UPDATE enrol_tokens SET revoked = 1 WHERE token_id = ? AND revoked = 0",
                                (token_id,)).rowcount == 1

    def redeem_token(self, digest: str, instance_id: str, now: float) -> TokenRow | None:
        # one IMMEDIATE transaction (no RETURNING: SQLite before 3.35 has none)
        with transaction(self._db, "IMMEDIATE"):
            row = self._db.execute(
                "SELECT body, uses_left FROM enrol_tokens WHERE digest = ? AND uses_left > 0 AND revoked = 0"
                " AND expires_at > ? AND substr(?, 1, length(instance_prefix)) = instance_prefix",
                (digest, now, instance_id)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE enrol_tokens SET uses_left = uses_left - 1 WHERE digest = ?", (digest,))
        return TokenRow(_dec_token.decode(row[0]), int(row[1]) - 1, False)

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
                      since: float = 0.0, before: float = 0.0, target: str = "",
                      visible: Callable[[CommandRecord], bool] | None = None,
                      before_id: str = "") -> list[CommandRecord]:
        clauses: list[str] = []
        args: list[Any] = []
        term = target or (document_term(document) if document else "")
        if term:  # by index: newest first along (term, requested_at), each command looked up
            self.write_terms()
            clauses.append("t.term=?")
            args.append(term)
        else:
            self.flush()
        at = "t.requested_at" if term else "requested_at"
        command_id = "t.command_id" if term else "command_id"
        if status:
            clauses.append("status=?")
            args.append(status)
        if document and target:
            clauses.append("document_name=?")
            args.append(document)
        if since:
            clauses.append(f"{at}>=?")
            args.append(since)
        if before and before_id:  # keyset: after the row (before, before_id), ties at that time too
            clauses.append(f"({at}, {command_id}) < (?, ?)")
            args += [before, before_id]
        elif before:
            clauses.append(f"{at}<?")
            args.append(before)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        limit = max(1, min(int(limit), 1000))
        source = "command_targets t CROSS JOIN commands c ON c.command_id = t.command_id" if term else "commands"
        order = f"ORDER BY {at} DESC, {command_id} DESC"  # (requested_at, command_id): one order, no ties
        if visible is None:  # the database applies the limit
            return [_dec_command.decode(b) for (b,) in self._db.execute(
                f"SELECT body FROM {source} {where} {order} LIMIT {limit}", args)]
        rows = self._db.execute(f"SELECT body FROM {source} {where} {order} LIMIT 20000", args)
        out: list[CommandRecord] = []
        for (body,) in rows:  # a client's scope: decoded and checked, at most 20,000 rows
            rec = _dec_command.decode(body)
            if visible(rec):
                out.append(rec)
                if len(out) >= limit:
                    break
        rows.close()
        return out

    def forget_overwritten(self) -> None:
        """Moves the write-ahead log into the database and empties it, so that overwritten rows
        (secret values of finished commands) are no longer anywhere on disk."""
        self.flush()
        if self._checkpointer is None:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return
        with self._checkpointer.lock:  # not while the thread's checkpoint runs: that one would win
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def prune(self, older_than: float, batch: int = 500, invocations: int = 0) -> int:
        """Deletes up to ``batch`` finished commands requested before ``older_than``, oldest first;
        with ``invocations``, no more commands than keep the invocations deleted under that."""
        self.flush()
        placeholders = ",".join("?" * len(protocol.TERMINAL_STATUSES))
        rows = self._db.execute(
            "SELECT command_id, (SELECT count(*) FROM invocations i WHERE i.command_id = c.command_id),"
            " requested_at, document_name, body"
            f" FROM commands c WHERE requested_at < ? AND +status IN ({placeholders}) ORDER BY requested_at LIMIT ?",
            (older_than, *protocol.TERMINAL_STATUSES, batch))
        ids: list[str] = []
        terms: list[tuple[str, float, str]] = []  # deleted by key: the terms have no index by command
        total = 0
        for command_id, count, at, document, body in rows:  # counted lazily: only as far as the pass goes
            if invocations > 0 and total > 0 and total + count > invocations:
                break
            ids.append(command_id)
            terms.extend((term, at, command_id) for term in command_terms(_dec_targets.decode(body).targets, document))
            total += count
        rows.close()
        if not ids:
            return 0
        if self._pending_terms:
            gone = set(ids)
            self._pending_terms = [row for row in self._pending_terms if row[2] not in gone]
        marks = ",".join("?" * len(ids))
        with transaction(self._db):
            self._db.execute(f"DELETE FROM invocations WHERE command_id IN ({marks})", ids)
            self._db.execute(f"DELETE FROM outputs WHERE command_id IN ({marks})", ids)
            self._db.execute(f"DELETE FROM webhooks WHERE command_id IN ({marks})", ids)
            self._db.executemany("DELETE FROM command_targets WHERE term=? AND requested_at=? AND command_id=?", terms)
            self._db.execute(f"DELETE FROM commands WHERE command_id IN ({marks})", ids)
        if self._checkpointer is not None:
            self._checkpointer.committed()
        return len(ids)

    def prune_passes(self) -> None:
        return None  # one writer at a time: a pass on another connection would only wait for the loop's commits

    # -- whole outputs and webhook deliveries -------------------------------------------------

    def get_output(self, invocation_id: str) -> OutputRecord | None:
        pending = self._outputs.get(invocation_id)
        if pending is not None:
            return pending
        row = self._db.execute("SELECT body FROM outputs WHERE invocation_id=?", (invocation_id,)).fetchone()
        return _dec_output.decode(row[0]) if row else None

    def pending_outputs(self, broker_id: str = "", others: bool = False) -> list[OutputRecord]:
        if others:
            return []  # one broker: there are no others
        self.flush()
        return [_dec_output.decode(b) for (b,) in self._db.execute("SELECT body FROM outputs WHERE state='pending'")]

    def webhooks_of(self, command_id: str) -> list[WebhookRecord]:
        found = {r.delivery_id: r for r in (_dec_webhook.decode(b) for (b,) in self._db.execute(
            "SELECT body FROM webhooks WHERE command_id=?", (command_id,)))}
        found.update({k: r for k, r in self._webhooks.items() if r.command_id == command_id})
        return sorted(found.values(), key=lambda r: (r.created_at, r.delivery_id))

    def claim_webhooks(self, now: float, limit: int, claimer: str, lease: float,
                       exclude: set[str]) -> list[WebhookRecord]:
        """One broker owns this file: what it is sending now (``exclude``) is its only claim."""
        self.flush()
        rows = self._db.execute("SELECT body FROM webhooks WHERE state='pending' AND next_at<=? ORDER BY next_at "
                                "LIMIT ?", (now, limit + len(exclude)))
        return [r for r in (_dec_webhook.decode(b) for (b,) in rows) if r.delivery_id not in exclude][:limit]

    def webhook_counts(self) -> dict[str, int]:
        return {state: n for state, n in self._db.execute("SELECT state, count(*) FROM webhooks GROUP BY state")}

    def invocation_belongs(self, invocation_id: str, instance_id: str) -> bool:
        """Whether this invocation exists and was addressed to this instance (a retried report)."""
        row = self._db.execute("SELECT instance_id FROM invocations WHERE invocation_id=?",
                               (invocation_id,)).fetchone()
        return row is not None and row[0] == instance_id

    def invocations_belonging(self, invocation_ids: list[str], instance_id: str) -> set[str]:
        return {i for i in invocation_ids if self.invocation_belongs(i, instance_id)}  # in-process: no round trips

    def bulk_invocations(self, command_ids: Iterable[str]) -> list[InvocationView]:
        ids = list(command_ids)
        out: list[InvocationView] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self._db.execute(
                f"SELECT body FROM invocations WHERE command_id IN ({','.join('?' * len(chunk))})", chunk)
            out.extend(_dec_invocation.decode(b) for (b,) in rows)
        return out

    # -- documents (committed at once) -------------------------------------------------------

    def document_head(self, name: str) -> tuple[int, int] | None:
        row = self._db.execute("SELECT default_version, last_version FROM document_heads WHERE name = ?",
                               (name,)).fetchone()
        return None if row is None else (row[0], row[1])

    def document_version_with_sha256(self, name: str, sha256: str) -> int | None:
        row = self._db.execute("SELECT version FROM documents WHERE name = ? AND sha256 = ?",
                               (name, sha256)).fetchone()
        return None if row is None else row[0]

    def _insert_document(self, row: DocumentRow, content: str) -> None:
        self._db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (row.name, row.version, content, row.sha256, row.created_at, row.created_by,
                          row.description, row.document_format))

    def create_document(self, row: DocumentRow, content: str) -> None:
        with transaction(self._db, "IMMEDIATE"):
            self._db.execute("INSERT INTO document_heads VALUES (?, ?, ?)", (row.name, row.version, row.version))
            self._insert_document(row, content)

    def add_document_version(self, row: DocumentRow, content: str, default_version: int) -> None:
        with transaction(self._db, "IMMEDIATE"):
            self._insert_document(row, content)
            self._db.execute("UPDATE document_heads SET last_version = ?, default_version = ? WHERE name = ?",
                             (row.version, default_version, row.name))

    def set_default_document_version(self, name: str, version: int) -> None:
        self._db.execute("UPDATE document_heads SET default_version = ? WHERE name = ?", (version, name))

    def delete_document(self, name: str, version: int | None = None) -> None:
        if version is not None:
            self._db.execute("DELETE FROM documents WHERE name = ? AND version = ?", (name, version))
            return
        with transaction(self._db, "IMMEDIATE"):
            self._db.execute("DELETE FROM documents WHERE name = ?", (name,))
            self._db.execute("DELETE FROM document_heads WHERE name = ?", (name,))

    def document_row(self, name: str, version: int) -> DocumentRow | None:
        row = self._db.execute(f"SELECT {_DOC_COLUMNS} FROM documents WHERE name = ? AND version = ?",
                               (name, version)).fetchone()
        return None if row is None else DocumentRow(*row)

    def document_content(self, name: str, version: int) -> str | None:
        row = self._db.execute("SELECT content FROM documents WHERE name = ? AND version = ?",
                               (name, version)).fetchone()
        return None if row is None else row[0]

    def document_rows(self, name: str) -> list[DocumentRow]:
        rows = self._db.execute(f"SELECT {_DOC_COLUMNS} FROM documents WHERE name = ? ORDER BY version",
                                (name,))
        return [DocumentRow(*row) for row in rows]

    def latest_document_version(self, name: str) -> int:
        return self._db.execute("SELECT MAX(version) FROM documents WHERE name = ?", (name,)).fetchone()[0] or 0

    def document_heads(self) -> list[tuple[DocumentRow, int, int]]:
        rows = self._db.execute(
            "SELECT d.name, d.version, d.sha256, d.created_at, d.created_by, d.description, d.document_format,"
            " h.default_version, (SELECT MAX(version) FROM documents v WHERE v.name = h.name)"
            " FROM document_heads h JOIN documents d ON d.name = h.name AND d.version = h.default_version")
        return [(DocumentRow(*r[:7]), r[7], r[8]) for r in rows]
