"""The PostgreSQL backend of the broker's store (psycopg 3), for brokers that share their state.

The same tables as SQLite: bodies are msgpack ``bytea``, beside the columns that queries filter
on. Group commit: ``flush()`` sends every queued write as *one* statement, a writable CTE per
table that upserts a whole batch from arrays (``INSERT ... SELECT FROM unnest(...) ON CONFLICT``),
on an autocommit connection, so that the batch is one implicit transaction in one round trip
(measured against executemany, pipeline mode and an explicit transaction: bench/README.md). Rows
are written in key order, so that two brokers writing the same rows cannot deadlock on them.

When the server goes away, ``flush()`` keeps every queued write and raises
``BrokerError("StoreUnavailable")``; the loop sends nothing that depends on them and calls again
later (``pg_connection.Session``: reconnection with backoff). Writes are idempotent upserts of the
latest state, so a batch whose COMMIT was lost can be written again.

The schema is versioned: numbered steps in ``zerorun_schema``, each applied in its own transaction
under an advisory lock (brokers starting together migrate once); a database from a newer broker is
refused. ``notify()`` queues a NOTIFY that goes out with the next flush (delivered at its commit);
``coordination()`` is the dedicated session for LISTEN and advisory locks (``pg_coordination``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import msgspec

from zerorun import protocol
from zerorun.protocol import InvocationView

from ..errors import BrokerError
from ..model import CommandRecord, InstanceRecord, KeyRecord, OutputRecord, TagRecord, TokenRecord, WebhookRecord
from . import pg_arrays
from .base import DocumentRow, QueuedWrites, TokenRow
from .pg_connection import Session, log
from .pg_coordination import Coordination, lock_key
from .terms import target_terms

# Numbered steps, each applied once in its own transaction; never edit a released step, add one.
MIGRATIONS: list[tuple[int, str]] = [(1, """
CREATE TABLE keys (public_key text PRIMARY KEY, kind text NOT NULL, name text NOT NULL,
    state text NOT NULL, body bytea NOT NULL);
CREATE TABLE instances (instance_id text PRIMARY KEY, body bytea NOT NULL);
CREATE TABLE commands (command_id text PRIMARY KEY, status text NOT NULL,
    document_name text NOT NULL, requested_at double precision NOT NULL, body bytea NOT NULL);
CREATE INDEX commands_by_time ON commands (requested_at);
CREATE INDEX commands_by_status ON commands (status);
CREATE TABLE invocations (invocation_id text PRIMARY KEY, command_id text NOT NULL,
    instance_id text NOT NULL, status text NOT NULL, body bytea NOT NULL) WITH (fillfactor = 80);
CREATE INDEX invocations_by_command ON invocations (command_id);
CREATE TABLE documents (name text NOT NULL, version integer NOT NULL, content text NOT NULL,
    sha256 text NOT NULL, created_at double precision NOT NULL, created_by text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '', document_format text NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE document_heads (name text PRIMARY KEY, default_version integer NOT NULL,
    last_version integer NOT NULL);
"""), (2, """
ALTER TABLE commands ADD COLUMN owner text NOT NULL DEFAULT '';
CREATE INDEX commands_active_by_owner ON commands (owner) WHERE status NOT IN
    ('Success', 'Failed', 'Cancelled', 'TimedOut', 'Undeliverable');
CREATE TABLE brokers (broker_id text PRIMARY KEY, agent_endpoint text NOT NULL,
    client_endpoint text NOT NULL, started_at double precision NOT NULL, seen_at double precision NOT NULL);
CREATE TABLE agent_sessions (instance_id text PRIMARY KEY, broker_id text NOT NULL, public_key text NOT NULL,
    since double precision NOT NULL);
CREATE INDEX agent_sessions_by_broker ON agent_sessions (broker_id);
CREATE TABLE relay (seq bigserial PRIMARY KEY, command_id text NOT NULL, kind text NOT NULL,
    instance_id text NOT NULL, body bytea NOT NULL);
CREATE INDEX relay_by_command ON relay (command_id, seq);
CREATE TABLE live_output (seq bigserial PRIMARY KEY, command_id text NOT NULL, invocation_id text NOT NULL,
    stream text NOT NULL, data text NOT NULL);
CREATE INDEX live_output_by_command ON live_output (command_id, seq);
"""), (3, """
CREATE TABLE instance_tags (instance_id text PRIMARY KEY, body bytea NOT NULL);
CREATE TABLE enrol_tokens (token_id text PRIMARY KEY, digest text NOT NULL UNIQUE, uses_left integer NOT NULL,
    expires_at double precision NOT NULL, revoked boolean NOT NULL DEFAULT false,
    instance_prefix text NOT NULL DEFAULT '', body bytea NOT NULL);
"""), (4, """
CREATE TABLE outputs (invocation_id text PRIMARY KEY, command_id text NOT NULL, state text NOT NULL,
    broker_id text NOT NULL DEFAULT '', body bytea NOT NULL);
CREATE INDEX outputs_by_command ON outputs (command_id);
CREATE INDEX outputs_pending ON outputs (broker_id) WHERE state = 'pending';
CREATE TABLE output_chunks (invocation_id text NOT NULL, stream text NOT NULL, "offset" bigint NOT NULL,
    command_id text NOT NULL, data bytea NOT NULL, PRIMARY KEY (invocation_id, stream, "offset"));
CREATE INDEX output_chunks_by_command ON output_chunks (command_id);
CREATE TABLE webhooks (delivery_id text PRIMARY KEY, command_id text NOT NULL, state text NOT NULL,
    next_at double precision NOT NULL, claimed_until double precision NOT NULL DEFAULT 0,
    body bytea NOT NULL);
CREATE INDEX webhooks_due ON webhooks (next_at) WHERE state = 'pending';
CREATE INDEX webhooks_by_command ON webhooks (command_id);
"""), (5, """
CREATE TABLE command_targets (term text NOT NULL, requested_at double precision NOT NULL, command_id text NOT NULL,
    PRIMARY KEY (term, requested_at, command_id));
CREATE INDEX command_targets_by_command ON command_targets (command_id);
DROP INDEX IF EXISTS commands_by_status;
CREATE INDEX commands_by_status ON commands (status, requested_at);
CREATE INDEX commands_by_document ON commands (document_name, requested_at);
"""), (6, """
DROP INDEX commands_by_time;
CREATE INDEX commands_by_time ON commands (requested_at, command_id);
DROP INDEX commands_by_status;
CREATE INDEX commands_by_status ON commands (status, requested_at, command_id);
DROP INDEX commands_by_document;
CREATE INDEX commands_by_document ON commands (document_name, requested_at, command_id);
""")]
SCHEMA_VERSION = MIGRATIONS[-1][0]
MIGRATION_LOCK = lock_key("zerorun:schema-migration")
# A pass of ``prune``: ``= ANY(ARRAY(...))``, not ``IN (...)``, because the planner cannot tell
# how many rows ``doomed`` has, and for ``IN`` it chose a hash join over every row of ``invocations``.
_PRUNE = (
    "WITH candidates AS (SELECT command_id, requested_at FROM commands WHERE requested_at < %s"
    " AND status = ANY(%b::text[]) ORDER BY requested_at LIMIT %s FOR UPDATE SKIP LOCKED),"
    " counted AS (SELECT command_id, n, sum(n) OVER (ORDER BY requested_at, command_id) AS running"
    " FROM (SELECT c.command_id, c.requested_at, (SELECT count(*) FROM invocations i"
    " WHERE i.command_id = c.command_id) AS n FROM candidates c) AS k),"
    " doomed AS (SELECT command_id FROM counted WHERE %s <= 0 OR running <= %s OR running = n),"
    " gone AS (DELETE FROM invocations WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed))),"
    " o AS (DELETE FROM outputs WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed))),"
    " c AS (DELETE FROM output_chunks WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed))),"
    " w AS (DELETE FROM webhooks WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed))),"
    " t AS (DELETE FROM command_targets WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed))),"
    # what a broker's crash left of the cluster's relays for these commands
    " l AS (DELETE FROM live_output WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed))),"
    " r AS (DELETE FROM relay WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed)))"
    " DELETE FROM commands WHERE command_id = ANY(ARRAY(SELECT command_id FROM doomed)) RETURNING command_id")

# table -> its key column and columns (name, array type); the body always last
_TABLES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "keys": ("public_key", [("public_key", "text"), ("kind", "text"), ("name", "text"), ("state", "text"),
                            ("body", "bytea")]),
    "instances": ("instance_id", [("instance_id", "text"), ("body", "bytea")]),
    "commands": ("command_id", [("command_id", "text"), ("status", "text"), ("document_name", "text"),
                                ("requested_at", "float8"), ("owner", "text"), ("body", "bytea")]),
    "invocations": ("invocation_id", [("invocation_id", "text"), ("command_id", "text"),
                                      ("instance_id", "text"), ("status", "text"), ("body", "bytea")]),
    "instance_tags": ("instance_id", [("instance_id", "text"), ("body", "bytea")]),
    "outputs": ("invocation_id", [("invocation_id", "text"), ("command_id", "text"), ("state", "text"),
                                  ("broker_id", "text"), ("body", "bytea")]),
    # an update of a delivery (its outcome) ends its claim: claimed_until goes back to 0
    "webhooks": ("delivery_id", [("delivery_id", "text"), ("command_id", "text"), ("state", "text"),
                                 ("next_at", "float8"), ("claimed_until", "float8"), ("body", "bytea")]),
}


def _upsert(table: str) -> str:
    key, columns = _TABLES[table]
    arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
    names = ", ".join(name for name, _ in columns)
    updates = ", ".join(f"{name} = EXCLUDED.{name}" for name, _ in columns if name != key)
    return (f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


_UPSERTS = {table: _upsert(table) for table in _TABLES}
# A whole output's record is final once complete or incomplete: a broker that took over its reading
# (its agent moved) and wrote later never undoes what the broker that finished it wrote.
_UPSERTS["outputs"] += " WHERE outputs.state = 'pending'"
# a command's target terms are written once, with its first write
_INSERT_TARGETS = ("INSERT INTO command_targets (term, requested_at, command_id) SELECT * FROM "
                   "unnest(%b::text[], %b::float8[], %b::text[]) ON CONFLICT DO NOTHING")
_DELETE_KEYS = "DELETE FROM keys WHERE public_key = ANY(%b::text[])"
_NOTIFY = "SELECT pg_notify(channel, payload) FROM unnest(%b::text[], %b::text[]) AS n(channel, payload)"
# A batch beyond these is several statements in one explicit transaction (a parameter is at most
# 1 GB, and one huge statement holds the server's memory).
CHUNK_ROWS = 5000
CHUNK_BYTES = 32 << 20
_DOC_COLUMNS = "name, version, sha256, created_at, created_by, description, document_format"
_TERMINAL = sorted(protocol.TERMINAL_STATUSES)

_enc = msgspec.msgpack.Encoder()
_dec_key = msgspec.msgpack.Decoder(KeyRecord)
_dec_instance = msgspec.msgpack.Decoder(InstanceRecord)
_dec_command = msgspec.msgpack.Decoder(CommandRecord)
_dec_invocation = msgspec.msgpack.Decoder(InvocationView)
_dec_tags = msgspec.msgpack.Decoder(TagRecord)
_dec_token = msgspec.msgpack.Decoder(TokenRecord)
_dec_output = msgspec.msgpack.Decoder(OutputRecord)
_dec_webhook = msgspec.msgpack.Decoder(WebhookRecord)


def _backfill_targets(conn: Any) -> None:
    """Step 5: the target terms of the commands written before it."""
    rows = [(term, float(at), command_id)
            for command_id, at, body in conn.execute("SELECT command_id, requested_at, body FROM commands").fetchall()
            for term in target_terms(_dec_command.decode(body).targets)]
    for chunk in range(0, len(rows), CHUNK_ROWS):
        conn.execute(_INSERT_TARGETS, [list(column) for column in zip(*rows[chunk:chunk + CHUNK_ROWS])])


BACKFILLS: dict[int, Callable[[Any], None]] = {5: _backfill_targets}


def migrate(conn: Any, where: str) -> None:
    """Brings the schema to SCHEMA_VERSION, one numbered step per transaction."""
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS zerorun_schema (version integer PRIMARY KEY,"
                         " applied_at timestamptz NOT NULL DEFAULT now())")
            current = conn.execute("SELECT coalesce(max(version), 0) FROM zerorun_schema").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise BrokerError("SchemaTooNew", f"{where} has schema version {current}, newer than this "
                                  f"broker knows ({SCHEMA_VERSION}): run a newer zerorun-broker on it")
            pending = [(version, sql) for version, sql in MIGRATIONS if version > current]
            if not pending:
                return
            version, sql = pending[0]
            conn.execute(sql)
            if version in BACKFILLS:
                BACKFILLS[version](conn)
            conn.execute("INSERT INTO zerorun_schema (version) VALUES (%s)", (version,))
            log.info("store: %s migrated to schema version %d", where, version)


class PostgresStore(QueuedWrites):
    def __init__(self, dsn: str, password: str | None = None, *, application_name: str = "zerorun-broker"):
        pg_arrays.register()  # before the first connection: its adapters copy the global ones
        self._session = Session(dsn, password, application_name=application_name)
        self.where = self._session.where
        self._password = password
        self._coordination: Coordination | None = None
        try:
            self._session.run(lambda conn: migrate(conn, self.where))
        except BaseException:
            self._session.close()
            raise
        QueuedWrites.__init__(self)
        self._notices: list[tuple[str, str]] = []
        self._writes: list[tuple[str, list[Any]]] = []  # other writes of the next flush (the cluster's)
        self._writes_after: list[tuple[str, list[Any]]] = []
        self.last_flush_seconds = 0.0
        self.write_failed = ""  # the server's outages are ``STORE_UNAVAILABLE`` errors, not this

    def close(self) -> None:
        """Commits what is queued if the server is there; what is not (never acknowledged) is
        reported and dropped."""
        self._session.retry_now()
        try:
            self.flush()
        except BrokerError as exc:
            log.warning("store: closing with uncommitted writes, none of them acknowledged: %s", exc.message)
        finally:
            if self._coordination is not None:
                self._coordination.close()
            self._session.close()

    @property
    def available(self) -> bool:
        """False while an outage is in progress (the last attempt failed)."""
        return self._session.available

    @property
    def outages(self) -> int:
        """How many outages the store's session has had (a change: writes may have waited through one)."""
        return self._session.outages

    # -- queued writes ----------------------------------------------------------------------

    def notify(self, channel: str, payload: str = "") -> None:
        """A NOTIFY sent by the next flush, inside its transaction: listeners get it when (and
        only if) the writes queued with it are committed. PostgreSQL folds identical
        (channel, payload) pairs of one transaction into one; a payload is at most 8000 bytes."""
        self._notices.append((channel, payload))

    def rewrite_notices(self, rewrite: Callable[[str], str | None]) -> None:
        """Replaces each queued NOTIFY's payload with ``rewrite(payload)``; None drops it."""
        self._notices = [(channel, new) for channel, payload in self._notices
                         if (new := rewrite(payload)) is not None]

    def queued_commands(self) -> set[str]:
        """The commands with writes of their own or their invocations' queued (by their owner)."""
        return {rec.command_id for queued in (self._commands, self._invocations) for rec in queued.values()}

    def forget_queued(self, command_ids: set[str]) -> tuple[list[CommandRecord], list[InvocationView]]:
        """Drops the queued writes of these commands, their invocations' and the webhook
        deliveries they created (a cluster broker that lost them to another while it was cut off
        from the server: they are the other's to write); returns the command and invocation
        records dropped. A delivery attempted here keeps its outcome."""
        commands = [rec for rec in self._commands.values() if rec.command_id in command_ids]
        invocations = [rec for rec in self._invocations.values() if rec.command_id in command_ids]
        for queued in (self._commands, self._new_commands, self._invocations):
            for key in [k for k, rec in queued.items() if rec.command_id in command_ids]:
                del queued[key]
        for key in [k for k, rec in self._webhooks.items() if rec.command_id in command_ids and not rec.attempts]:
            del self._webhooks[key]
        return commands, invocations

    def queue_write(self, sql: str, params: list[Any], *, after: bool = False) -> None:
        """Another write for the next flush's transaction (an INSERT/UPDATE/DELETE usable as a
        writable CTE, with its parameters): the cluster's tables commit with the rest. ``after``:
        as a statement of its own after the others (it sees what they wrote; writable CTEs of one
        statement all see the same snapshot, and may not touch a row twice)."""
        (self._writes_after if after else self._writes).append((sql, params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read of committed state (the cluster's tables)."""
        return self._query(sql, params)

    @property
    def dirty(self) -> bool:
        return bool(self._notices or self._writes or self._writes_after) or self._queued()

    def flush(self) -> None:
        """Commits every queued write (and NOTIFY) in one transaction; on failure everything stays
        queued and ``BrokerError("StoreUnavailable")`` is raised. Never on a session other than the
        one the writes were queued on without a word: a session lost meanwhile counts in
        ``outages``, which a cluster broker looks at before it writes (its commands may have been
        taken over)."""
        if not self.dirty:
            return
        started = time.perf_counter()
        statements = self._statements()
        try:
            self._session.run(lambda conn: _execute(self._session, conn, statements), retry=False)
        except BrokerError:
            raise
        except Exception as exc:
            import psycopg

            if not isinstance(exc, psycopg.DataError):
                raise
            # A text column PostgreSQL cannot hold (a NUL character from a peer): write the row
            # with U+FFFD there rather than let one row block every later commit.
            log.warning("store: %s; writing the batch with NUL characters replaced", " ".join(str(exc).split()))
            statements = [(sql, [_without_nul(p) for p in params]) for sql, params in statements]
            self._session.run(lambda conn: _execute(self._session, conn, statements), retry=False)
        self._written()
        self._notices.clear()
        self._writes.clear()
        self._writes_after.clear()
        self.last_flush_seconds = time.perf_counter() - started

    def _statements(self) -> list[tuple[str, list[Any]]]:
        """The batch as writable-CTE statements: one unless it exceeds CHUNK_ROWS or CHUNK_BYTES."""
        parts: list[tuple[str, list[Any], int, int]] = []  # (sql, params, rows, body bytes)
        # only the kinds this batch has (a loop iteration's commit holds two or three of them)
        tables: list[tuple[str, list[tuple[Any, ...]]]] = []
        if self._keys:
            deleted = sorted(k for k, r in self._keys.items() if r is None)
            if deleted:
                parts.append((_DELETE_KEYS, [deleted], len(deleted), 0))
            tables.append(("keys", [(r.public_key, r.kind, r.name, r.state, _enc.encode(r))
                                    for _, r in sorted(self._keys.items()) if r is not None]))
        if self._instances:
            tables.append(("instances", [(r.instance_id, _enc.encode(r)) for _, r in sorted(self._instances.items())]))
        if self._commands:
            tables.append(("commands", [(r.command_id, r.status, r.document_name, float(r.requested_at), r.owner,
                                         _enc.encode(r)) for _, r in sorted(self._commands.items())]))
        if self._invocations:
            tables.append(("invocations", [(r.invocation_id, r.command_id, r.instance_id, r.status, _enc.encode(r))
                                           for _, r in sorted(self._invocations.items())]))
        if self._tags:
            tables.append(("instance_tags", [(r.instance_id, _enc.encode(r)) for _, r in sorted(self._tags.items())]))
        if self._outputs:
            tables.append(("outputs", [(r.invocation_id, r.command_id, r.state, r.broker_id, _enc.encode(r))
                                       for _, r in sorted(self._outputs.items())]))
        if self._webhooks:
            tables.append(("webhooks", [(r.delivery_id, r.command_id, r.state, float(r.next_at), 0.0, _enc.encode(r))
                                        for _, r in sorted(self._webhooks.items())]))
        for table, rows in tables:
            if not rows:
                continue
            columns = [list(column) for column in zip(*rows)]
            size = sum(map(len, columns[-1]))
            if len(rows) <= CHUNK_ROWS and size <= CHUNK_BYTES:  # the common case: one statement
                parts.append((_UPSERTS[table], columns, len(rows), size))
                continue
            for chunk in _chunks(rows):
                parts.append((_UPSERTS[table], [list(column) for column in zip(*chunk)], len(chunk),
                              sum(len(row[-1]) for row in chunk)))
        if self._new_commands:
            terms = sorted((term, float(r.requested_at), r.command_id) for r in self._new_commands.values()
                           for term in target_terms(r.targets))
            for at in range(0, len(terms), CHUNK_ROWS):
                chunk = terms[at:at + CHUNK_ROWS]
                parts.append((_INSERT_TARGETS, [list(column) for column in zip(*chunk)], len(chunk), 0))
        for sql, args in self._writes:
            parts.append((sql, list(args), *_rows_and_bytes(args)))
        statements: list[tuple[str, list[Any]]] = []
        ctes: list[str] = []
        params: list[Any] = []
        rows_in, bytes_in = 0, 0
        for sql, args, nrows, nbytes in parts:
            if ctes and (rows_in + nrows > CHUNK_ROWS or bytes_in + nbytes > CHUNK_BYTES):
                statements.append(_with(ctes, params, "SELECT 1", []))
                ctes, params, rows_in, bytes_in = [], [], 0, 0
            ctes.append(sql)
            params.extend(args)
            rows_in += nrows
            bytes_in += nbytes
        notify = [list(n) for n in zip(*self._notices)] if self._notices else None
        if notify is not None and not self._writes_after:  # the common case: one statement in all
            statements.append(_with(ctes, params, _NOTIFY, notify))
            return statements
        if ctes:
            statements.append(_with(ctes, params, "SELECT 1", []))
        statements.extend((sql, list(args)) for sql, args in self._writes_after)
        if notify is not None:  # NOTIFYs are delivered at commit in any case
            statements.append((_NOTIFY, notify))
        return statements

    # -- reads (of committed state; the broker keeps live state in memory) ------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run(conn: Any) -> list[tuple[Any, ...]]:
            rows = self._session.prepared(conn).query(sql, params)
            if rows is None:  # a parameter the prepared path does not send
                cur = self._session.cursor(conn, binary=True)
                cur.execute(sql, params)
                rows = cur.fetchall()
            return rows

        return self._session.run(run)

    def _command(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._session.run(lambda conn: conn.execute(sql, params))

    def load_keys(self) -> list[KeyRecord]:
        return [_dec_key.decode(b) for (b,) in self._query("SELECT body FROM keys")]

    def load_instances(self) -> list[InstanceRecord]:
        return [_dec_instance.decode(b) for (b,) in self._query("SELECT body FROM instances")]

    def load_active_commands(self) -> list[CommandRecord]:
        rows = self._query("SELECT body FROM commands WHERE status <> ALL(%b::text[])", (_TERMINAL,))
        return [_dec_command.decode(b) for (b,) in rows]

    def get_command(self, command_id: str) -> CommandRecord | None:
        pending = self._commands.get(command_id)
        if pending is not None:
            return pending
        rows = self._query("SELECT body FROM commands WHERE command_id = %s", (command_id,))
        return _dec_command.decode(rows[0][0]) if rows else None

    def get_invocations(self, command_id: str) -> list[InvocationView]:
        rows = self._query("SELECT body FROM invocations WHERE command_id = %s", (command_id,))
        found = {inv.invocation_id: inv for inv in (_dec_invocation.decode(b) for (b,) in rows)}
        for inv in self._invocations.values():
            if inv.command_id == command_id:
                found[inv.invocation_id] = inv
        return sorted(found.values(), key=lambda inv: inv.instance_id)

    def list_commands(self, limit: int = 50, status: str = "", document: str = "",
                      since: float = 0.0, before: float = 0.0, target: str = "",
                      visible: Callable[[CommandRecord], bool] | None = None,
                      before_id: str = "") -> list[CommandRecord]:
        self.flush()
        clauses, args = [], []  # type: list[str], list[Any]
        if target:  # by index: newest first along (term, requested_at), each command looked up
            clauses.append("t.term = %s")
            args.append(target)
        at = "t.requested_at" if target else "requested_at"
        command_id = "t.command_id" if target else "command_id"
        if status:
            clauses.append("status = %s")
            args.append(status)
        if document:
            clauses.append("document_name = %s")
            args.append(document)
        if since:
            clauses.append(f"{at} >= %s")
            args.append(float(since))
        if before and before_id:  # keyset: after the row (before, before_id), ties at that time too
            clauses.append(f"({at}, {command_id}) < (%s, %s)")
            args += [float(before), before_id]
        elif before:
            clauses.append(f"{at} < %s")
            args.append(float(before))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        limit = max(1, min(int(limit), 1000))
        source = "command_targets t JOIN commands c ON c.command_id = t.command_id" if target else "commands"
        # Without a client's scope the database applies the limit; with one, bodies are decoded from
        # a server-side cursor, at most 20,000 rows, as SQLite does.
        scan = 20_000 if visible is not None else limit
        sql = f"SELECT body FROM {source} {where} ORDER BY {at} DESC, {command_id} DESC LIMIT {scan}"

        def run(conn: Any) -> list[CommandRecord]:
            out: list[CommandRecord] = []
            with conn.transaction(), conn.cursor(name="list_commands", binary=True) as cur:
                cur.itersize = 200
                cur.execute(sql, args)
                for (body,) in cur:
                    rec = _dec_command.decode(body)
                    if visible is None or visible(rec):
                        out.append(rec)
                        if len(out) >= limit:
                            break
            return out

        return self._session.run(run)

    def forget_overwritten(self) -> None:
        """PostgreSQL keeps an overwritten row's old version until (auto)vacuum reclaims it, and
        its write-ahead log as long as the operator's archiving does: the broker commits what is
        queued and leaves the rest to the server (SECURITY.md says so)."""
        self.flush()

    def prune(self, older_than: float, batch: int = 500, invocations: int = 0) -> int:
        """Deletes up to ``batch`` finished commands requested before ``older_than``, oldest first;
        with ``invocations``, no more commands than keep the invocations deleted under that (one
        at least). Rows another broker is pruning at the same moment are skipped (SKIP LOCKED),
        not waited for."""
        self.flush()
        return len(self._query(_PRUNE, _prune_params(older_than, batch, invocations)))

    def prune_passes(self) -> _PrunePasses:
        return _PrunePasses(self.session("zerorun-broker-prune"))

    # -- whole outputs and webhook deliveries -------------------------------------------------

    def get_output(self, invocation_id: str) -> OutputRecord | None:
        pending = self._outputs.get(invocation_id)
        if pending is not None:
            return pending
        rows = self._query("SELECT body FROM outputs WHERE invocation_id = %s", (invocation_id,))
        return _dec_output.decode(rows[0][0]) if rows else None

    def pending_outputs(self, broker_id: str = "", others: bool = False) -> list[OutputRecord]:
        rows = self._query("SELECT body FROM outputs WHERE state = 'pending' AND "
                           + ("broker_id <> %s" if others else "broker_id = %s"), (broker_id,))
        return [_dec_output.decode(b) for (b,) in rows]

    def webhooks_of(self, command_id: str) -> list[WebhookRecord]:
        found = {r.delivery_id: r for r in (_dec_webhook.decode(b) for (b,) in self._query(
            "SELECT body FROM webhooks WHERE command_id = %s", (command_id,)))}
        found.update({k: r for k, r in self._webhooks.items() if r.command_id == command_id})
        return sorted(found.values(), key=lambda r: (r.created_at, r.delivery_id))

    def claim_webhooks(self, now: float, limit: int, claimer: str, lease: float,
                       exclude: set[str]) -> list[WebhookRecord]:
        """Due deliveries, each claimed for ``lease`` seconds in one statement: rows another broker
        is claiming at this moment are skipped (SKIP LOCKED), rows it claimed stay hidden until
        its claim ends (it wrote the outcome, or it died and the lease ran out)."""
        rows = self._query(
            "UPDATE webhooks SET claimed_until = %s WHERE delivery_id IN (SELECT delivery_id FROM webhooks"
            " WHERE state = 'pending' AND next_at <= %s AND claimed_until < %s"
            " AND NOT (delivery_id = ANY(%b::text[])) ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING body", (float(now + lease), float(now), float(now), sorted(exclude), int(limit)))
        return [_dec_webhook.decode(b) for (b,) in rows]

    def webhook_counts(self) -> dict[str, int]:
        return {state: int(n) for state, n in self._query("SELECT state, count(*) FROM webhooks GROUP BY state")}

    def get_instances(self, instance_ids: list[str]) -> list[InstanceRecord]:
        rows = self._query("SELECT body FROM instances WHERE instance_id = ANY(%b::text[])", (instance_ids,))
        return [_dec_instance.decode(b) for (b,) in rows]

    def load_tags(self) -> list[TagRecord]:
        return [_dec_tags.decode(b) for (b,) in self._query("SELECT body FROM instance_tags")]

    def get_tags(self, instance_ids: list[str]) -> list[TagRecord]:
        rows = self._query("SELECT body FROM instance_tags WHERE instance_id = ANY(%b::text[])", (instance_ids,))
        found = {r.instance_id: r for r in (_dec_tags.decode(b) for (b,) in rows)}
        found.update((i, self._tags[i]) for i in instance_ids if i in self._tags)  # queued here, newer
        return list(found.values())

    # -- enrolment tokens (committed at once; a use is taken by one atomic UPDATE) --------------

    def create_token(self, rec: TokenRecord, digest: str) -> None:
        self._command("INSERT INTO enrol_tokens VALUES (%s, %s, %s, %s, false, %s, %s)",
                      (rec.token_id, digest, rec.uses, float(rec.expires_at), rec.instance_prefix, _enc.encode(rec)))

    def tokens(self) -> list[TokenRow]:
        rows = self._query("SELECT body, uses_left, revoked FROM enrol_tokens")
        return [TokenRow(_dec_token.decode(b), int(left), bool(revoked)) for b, left, revoked in rows]

    def token_by_digest(self, digest: str) -> TokenRow | None:
        rows = self._query("SELECT body, uses_left, revoked FROM enrol_tokens WHERE digest = %s", (digest,))
        return None if not rows else TokenRow(_dec_token.decode(rows[0][0]), int(rows[0][1]), bool(rows[0][2]))

    def revoke_token(self, token_id: str) -> bool:
        rows = self._query("UPDATE enrol_tokens SET revoked = true WHERE token_id = %s AND NOT revoked "
                           "RETURNING token_id", (token_id,))
        return bool(rows)

    def redeem_token(self, digest: str, instance_id: str, now: float) -> TokenRow | None:
        # Brokers redeeming the same token at once queue on its row lock; each re-checks
        # uses_left > 0 on the row as the one before it left it: no use is taken twice.
        rows = self._query(
            "UPDATE enrol_tokens SET uses_left = uses_left - 1 WHERE digest = %s::text AND uses_left > 0 AND NOT revoked"
            " AND expires_at > %s::float8 AND substr(%s::text, 1, length(instance_prefix)) = instance_prefix"
            " RETURNING body, uses_left", (digest, float(now), instance_id))
        return None if not rows else TokenRow(_dec_token.decode(rows[0][0]), int(rows[0][1]), False)

    def get_keys(self, public_keys: list[str]) -> list[KeyRecord]:
        rows = self._query("SELECT body FROM keys WHERE public_key = ANY(%b::text[])", (public_keys,))
        return [_dec_key.decode(b) for (b,) in rows]

    def invocation_belongs(self, invocation_id: str, instance_id: str) -> bool:
        """Whether this invocation exists and was addressed to this instance (a retried report)."""
        pending = self._invocations.get(invocation_id)
        if pending is not None:
            return pending.instance_id == instance_id
        rows = self._query("SELECT instance_id FROM invocations WHERE invocation_id = %s", (invocation_id,))
        return bool(rows) and rows[0][0] == instance_id

    def invocations_belonging(self, invocation_ids: list[str], instance_id: str) -> set[str]:
        found: set[str] = set()
        asked: list[str] = []
        for iid in dict.fromkeys(invocation_ids):
            pending = self._invocations.get(iid)
            if pending is None:
                asked.append(iid)
            elif pending.instance_id == instance_id:
                found.add(iid)
        for i in range(0, len(asked), 1000):
            found.update(iid for (iid,) in self._query(
                "SELECT invocation_id FROM invocations WHERE invocation_id = ANY(%b::text[]) AND instance_id = %s",
                (asked[i:i + 1000], instance_id)))
        return found

    def bulk_invocations(self, command_ids: Iterable[str]) -> list[InvocationView]:
        ids = list(command_ids)
        out: list[InvocationView] = []
        for i in range(0, len(ids), 1000):
            rows = self._query("SELECT body FROM invocations WHERE command_id = ANY(%b::text[])", (ids[i:i + 1000],))
            out.extend(_dec_invocation.decode(b) for (b,) in rows)
        return out

    # -- documents (committed at once) -------------------------------------------------------

    def document_head(self, name: str) -> tuple[int, int] | None:
        rows = self._query("SELECT default_version, last_version FROM document_heads WHERE name = %s", (name,))
        return None if not rows else (rows[0][0], rows[0][1])

    def document_version_with_sha256(self, name: str, sha256: str) -> int | None:
        rows = self._query("SELECT version FROM documents WHERE name = %s AND sha256 = %s", (name, sha256))
        return None if not rows else rows[0][0]

    def _write_document(self, statements: list[tuple[str, tuple[Any, ...]]],
                        conflict: tuple[str, str] = ("Conflict", "")) -> None:
        import psycopg

        def run(conn: Any) -> None:
            with conn.transaction():
                for sql, params in statements:
                    conn.execute(sql, params)

        try:
            self._session.run(run)
        except psycopg.errors.UniqueViolation:  # another broker wrote the same name or version first
            raise BrokerError(*conflict) from None

    @staticmethod
    def _insert_document(row: DocumentRow, content: str) -> tuple[str, tuple[Any, ...]]:
        return ("INSERT INTO documents VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (row.name, row.version, content, row.sha256, row.created_at, row.created_by,
                 row.description, row.document_format))

    def create_document(self, row: DocumentRow, content: str) -> None:
        self._write_document([("INSERT INTO document_heads VALUES (%s, %s, %s)", (row.name, row.version, row.version)),
                              self._insert_document(row, content)],
                             ("AlreadyExists", f"document {row.name} already exists (use update)"))

    def add_document_version(self, row: DocumentRow, content: str, default_version: int) -> None:
        self._write_document([self._insert_document(row, content),
                              ("UPDATE document_heads SET last_version = %s, default_version = %s WHERE name = %s",
                               (row.version, default_version, row.name))],
                             ("Conflict", f"document {row.name}: version {row.version} was created "
                              "meanwhile by another request; try again"))

    def set_default_document_version(self, name: str, version: int) -> None:
        self._command("UPDATE document_heads SET default_version = %s WHERE name = %s", (version, name))

    def delete_document(self, name: str, version: int | None = None) -> None:
        if version is not None:
            self._command("DELETE FROM documents WHERE name = %s AND version = %s", (name, version))
            return
        self._write_document([("DELETE FROM documents WHERE name = %s", (name,)),
                              ("DELETE FROM document_heads WHERE name = %s", (name,))])

    def document_row(self, name: str, version: int) -> DocumentRow | None:
        rows = self._query(f"SELECT {_DOC_COLUMNS} FROM documents WHERE name = %s AND version = %s", (name, version))
        return None if not rows else DocumentRow(*rows[0])

    def document_content(self, name: str, version: int) -> str | None:
        rows = self._query("SELECT content FROM documents WHERE name = %s AND version = %s", (name, version))
        return None if not rows else rows[0][0]

    def document_rows(self, name: str) -> list[DocumentRow]:
        rows = self._query(f"SELECT {_DOC_COLUMNS} FROM documents WHERE name = %s ORDER BY version", (name,))
        return [DocumentRow(*row) for row in rows]

    def latest_document_version(self, name: str) -> int:
        return self._query("SELECT coalesce(max(version), 0) FROM documents WHERE name = %s", (name,))[0][0]

    def document_heads(self) -> list[tuple[DocumentRow, int, int]]:
        rows = self._query(
            "SELECT d.name, d.version, d.sha256, d.created_at, d.created_by, d.description, d.document_format,"
            " h.default_version, (SELECT max(version) FROM documents v WHERE v.name = h.name)"
            " FROM document_heads h JOIN documents d ON d.name = h.name AND d.version = h.default_version")
        return [(DocumentRow(*r[:7]), r[7], r[8]) for r in rows]

    # -- what several brokers share (not used by the broker yet) -----------------------------

    def mark_sessions(self, name: str) -> None:
        """This broker's sessions (the store's, the coordination one, and those opened later for
        other threads: ``session``) hold the shared advisory lock ``name``: another broker that
        finds this one unresponsive ends them by it."""
        key = lock_key(name)
        self._session.mark(key)
        self.coordination().mark(key)

    def session(self, application_name: str) -> Session:
        """A session of its own for another thread (it connects on first use), marked as this
        broker's sessions are (``mark_sessions``)."""
        return Session(self._session.dsn, self._password, application_name=application_name,
                       marks=self._session.marks)

    def coordination(self) -> Coordination:
        """The broker's dedicated session for LISTEN and advisory locks (opened on first use)."""
        if self._coordination is None:
            self._coordination = Coordination(self._session.dsn, self._password)
        return self._coordination


def _prune_params(older_than: float, batch: int, invocations: int) -> tuple[Any, ...]:
    return float(older_than), _TERMINAL, int(batch), int(invocations), int(invocations)


class _PrunePasses:
    """``prune`` on a session of its own, for the pruning thread: the server works on a pass while
    the loop goes on (a pass is safe to repeat: ``Session.run`` may retry it)."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, older_than: float, batch: int, invocations: int) -> int:
        def run(conn: Any) -> int:
            cur = self.session.cursor(conn, binary=True)
            cur.execute(_PRUNE, _prune_params(older_than, batch, invocations))
            return len(cur.fetchall())

        return self.session.run(run)

    def close(self) -> None:
        self.session.close()


def _chunks(rows: list[tuple[Any, ...]]) -> Iterable[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    size = 0
    for row in rows:
        if chunk and (len(chunk) >= CHUNK_ROWS or size + len(row[-1]) > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += len(row[-1])
    if chunk:
        yield chunk


def _with(ctes: list[str], params: list[Any], final: str, final_params: list[Any]) -> tuple[str, list[Any]]:
    if not ctes:
        return final, final_params
    head = ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(ctes))
    return f"WITH {head} {final}", params + final_params


def _execute(session: Session, conn: Any, statements: list[tuple[str, list[Any]]]) -> None:
    """One statement is its own transaction (autocommit); several share an explicit one. Array
    parameters go in PostgreSQL's binary format, encoded by ``pg_arrays``; a statement goes as a
    prepared one of this connection (``pg_prepared``), or psycopg's way when it cannot."""
    prepared = session.prepared(conn)

    def run(sql: str, params: list[Any]) -> None:
        if not prepared.execute(sql, params):
            session.cursor(conn).execute(sql, pg_arrays.binary(params))

    if len(statements) == 1:
        run(*statements[0])
        return
    with conn.transaction():
        for sql, params in statements:
            run(sql, params)


def _rows_and_bytes(args: list[Any]) -> tuple[int, int]:
    """A queued write's size: its rows (columns given as arrays have one per element) and text."""
    rows, size = 1, 0
    for arg in args:
        if isinstance(arg, (bytes, str)):
            size += len(arg)
        elif isinstance(arg, list):
            rows = max(rows, len(arg))
            size += sum(len(a) for a in arg if isinstance(a, (bytes, str)))
    return rows, size


def _without_nul(column: Any) -> Any:
    if isinstance(column, str):  # a parameter of a queued write (the cluster's live output: text)
        return column.replace("\x00", "\ufffd")
    if isinstance(column, list) and column and isinstance(column[0], str):
        return [value.replace("\x00", "\ufffd") for value in column]
    return column
