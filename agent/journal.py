"""The agent's on-disk journal: every delivery is recorded before it is acknowledged, marked
running before it starts, and its result is kept until the broker acknowledges it.

That gives the two guarantees the broker relies on: an invocation never runs twice (ids are
deduplicated across restarts), and no result is lost while the broker is away. A write may fail
(a full disk: ``sqlite3.OperationalError``, "database or disk is full"): the core keeps both
guarantees meanwhile (``core.py``, its module doc), and writes what it kept once it can.

A running invocation's handle is its run directory, ``<state dir>/work/<invocation id>``: its
supervisor records itself there (pid, start time, boot id) before its first step and leaves its
outcome there, so "running" in the journal plus that directory is all a restarted agent needs to
take it back (``executor.SupervisorRunner.reattach``). An invocation waiting for the reboot one
of its steps asked for keeps where to resume (``resume``, a ``steps.Resume``) until it resumes.

``Journal`` keeps it in SQLite (the daemon); ``MemoryJournal`` in dicts (the fleet simulator,
whose restart is a fleet of new agents, and the core's unit tests). Both fulfil
``core.Journal``, the interface the agent core drives.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path

import msgspec

from zerorun.protocol import Invocation, InvocationResult
from zerorun.sqlite import transaction

from .core import ACCEPTED, DONE, RUNNING
from .steps import Resume

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    invocation_id TEXT PRIMARY KEY,
    command_id TEXT NOT NULL,
    state TEXT NOT NULL,
    invocation BLOB,
    result BLOB,
    acked INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    resume BLOB
);
CREATE INDEX IF NOT EXISTS journal_by_state ON journal(state, acked);
"""

_enc = msgspec.msgpack.Encoder()
_dec_inv = msgspec.msgpack.Decoder(Invocation)
_dec_res = msgspec.msgpack.Decoder(InvocationResult)
_dec_resume = msgspec.msgpack.Decoder(Resume)


class Journal:
    def __init__(self, path: Path, retention_seconds: float = 7 * 86400):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # invocations hold secret values
        for extra in ("", "-wal", "-shm"):
            try:
                os.chmod(f"{path}{extra}", 0o600)
            except FileNotFoundError:
                pass
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")  # a run invocation's script is zeroed, not left behind
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(journal)")}
        if "resume" not in columns:  # a journal written by an agent before reboot-and-resume
            self._db.execute("ALTER TABLE journal ADD COLUMN resume BLOB")
        self.retention_seconds = retention_seconds

    def close(self) -> None:
        self._db.close()

    def state_of(self, invocation_id: str) -> tuple[str, bool] | None:
        row = self._db.execute("SELECT state, acked FROM journal WHERE invocation_id=?",
                               (invocation_id,)).fetchone()
        return (row[0], bool(row[1])) if row else None

    def accept(self, invocations: list[Invocation], running: Collection[str] = frozenset()) -> None:
        """Journals deliveries; those in ``running`` start now and are recorded as running in
        the same commit."""
        now = time.time()
        with transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO journal VALUES (?,?,?,?,NULL,0,?,?,NULL)",
                [(i.invocation_id, i.command_id, RUNNING if i.invocation_id in running else ACCEPTED,
                  _enc.encode(i), now, now) for i in invocations])

    def mark_running(self, invocation_ids: list[str]) -> None:
        now = time.time()
        with transaction(self._db):
            self._db.executemany("UPDATE journal SET state=?, updated_at=? WHERE invocation_id=?",
                                 [(RUNNING, now, i) for i in invocation_ids])

    def record_results(self, results: list[InvocationResult]) -> None:
        """Stores results and drops the invocation body: it ran, it will not run again."""
        now = time.time()
        with transaction(self._db):
            self._db.executemany(
                "INSERT INTO journal VALUES (?, '', ?, NULL, ?, 0, ?, ?, NULL) ON CONFLICT(invocation_id) DO "
                "UPDATE SET state=excluded.state, result=excluded.result, invocation=NULL, resume=NULL,"
                " updated_at=excluded.updated_at",
                [(r.invocation_id, DONE, _enc.encode(r), now, now) for r in results])

    def save_resume(self, invocation_id: str, resume: Resume | None) -> None:
        """Where a running invocation resumes after a reboot (None: it has resumed)."""
        with transaction(self._db):
            self._db.execute("UPDATE journal SET resume=?, updated_at=? WHERE invocation_id=? AND state=?",
                             (_enc.encode(resume) if resume is not None else None, time.time(),
                              invocation_id, RUNNING))

    def resume_point(self, invocation_id: str) -> Resume | None:
        row = self._db.execute("SELECT resume FROM journal WHERE invocation_id=? AND resume IS NOT NULL",
                               (invocation_id,)).fetchone()
        return _dec_resume.decode(row[0]) if row else None

    def mark_acked(self, invocation_ids: list[str]) -> None:
        """Only results it holds: an ack for an invocation still running acknowledges nothing (as
        in ``MemoryJournal``), or its result, once there, would never be sent again."""
        with transaction(self._db):
            self._db.executemany("UPDATE journal SET acked=1, result=NULL WHERE invocation_id=? AND state=?",
                                 [(i, DONE) for i in invocation_ids])

    def unacked_results(self) -> list[InvocationResult]:
        rows = self._db.execute("SELECT result FROM journal WHERE state=? AND acked=0 ORDER BY updated_at",
                                (DONE,))
        return [_dec_res.decode(r) for (r,) in rows]

    def unacked_ids(self) -> list[str]:
        rows = self._db.execute("SELECT invocation_id FROM journal WHERE state=? AND acked=0 ORDER BY updated_at",
                                (DONE,))
        return [r for (r,) in rows]

    def result(self, invocation_id: str) -> InvocationResult | None:
        row = self._db.execute("SELECT result FROM journal WHERE invocation_id=? AND result IS NOT NULL",
                               (invocation_id,)).fetchone()
        return _dec_res.decode(row[0]) if row else None

    def in_state(self, state: str) -> list[Invocation]:
        rows = self._db.execute("SELECT invocation FROM journal WHERE state=? ORDER BY received_at", (state,))
        return [_dec_inv.decode(r) for (r,) in rows if r is not None]

    def prune(self) -> int:
        """Forgets acknowledged invocations past the retention (their ids could then be replayed
        only after their expiry, which the agent checks first)."""
        cutoff = time.time() - self.retention_seconds
        with transaction(self._db):
            cur = self._db.execute("DELETE FROM journal WHERE acked=1 AND updated_at<?", (cutoff,))
        return cur.rowcount


class MemoryJournal:
    """The journal in memory. Results the broker acknowledged are forgotten, all but the last
    ``remember_acked`` ids (so a late re-delivery is still recognised, not re-run)."""

    __slots__ = ("states", "invocations", "results", "acked", "remember_acked", "resumes")

    def __init__(self, remember_acked: int = 256):
        self.states: dict[str, str] = {}  # accepted | running | done (until acked)
        self.invocations: dict[str, Invocation] = {}  # until the result is recorded
        self.results: dict[str, InvocationResult] = {}  # until acked
        self.acked: OrderedDict[str, None] = OrderedDict()
        self.remember_acked = remember_acked
        self.resumes: dict[str, Resume] = {}

    def close(self) -> None:
        pass

    def state_of(self, invocation_id: str) -> tuple[str, bool] | None:
        state = self.states.get(invocation_id)
        if state is not None:
            return state, False
        return (DONE, True) if invocation_id in self.acked else None

    def accept(self, invocations: list[Invocation], running: Collection[str] = frozenset()) -> None:
        states, bodies = self.states, self.invocations
        for inv in invocations:
            iid = inv.invocation_id
            if iid not in states and iid not in self.acked:
                states[iid] = RUNNING if iid in running else ACCEPTED
                bodies[iid] = inv

    def mark_running(self, invocation_ids: list[str]) -> None:
        for iid in invocation_ids:
            if iid in self.states:
                self.states[iid] = RUNNING

    def record_results(self, results: list[InvocationResult]) -> None:
        states, bodies, kept = self.states, self.invocations, self.results
        for r in results:
            iid = r.invocation_id
            if iid in self.acked:
                continue
            states[iid] = DONE
            kept[iid] = r
            bodies.pop(iid, None)
            self.resumes.pop(iid, None)

    def save_resume(self, invocation_id: str, resume: Resume | None) -> None:
        if resume is None:
            self.resumes.pop(invocation_id, None)
        elif self.states.get(invocation_id) == RUNNING:
            self.resumes[invocation_id] = resume

    def resume_point(self, invocation_id: str) -> Resume | None:
        return self.resumes.get(invocation_id)

    def mark_acked(self, invocation_ids: list[str]) -> None:
        acked = self.acked
        for iid in invocation_ids:
            if self.states.get(iid) != DONE:
                continue  # not a result this journal holds (the broker acks only what it stored)
            del self.states[iid]
            del self.results[iid]
            acked[iid] = None
            if len(acked) > self.remember_acked:
                acked.popitem(last=False)

    def unacked_results(self) -> list[InvocationResult]:
        return list(self.results.values())

    def unacked_ids(self) -> list[str]:
        return list(self.results)

    def result(self, invocation_id: str) -> InvocationResult | None:
        return self.results.get(invocation_id)

    def in_state(self, state: str) -> list[Invocation]:
        return [self.invocations[iid] for iid, s in self.states.items()
                if s == state and iid in self.invocations]

    def prune(self) -> int:
        return 0
