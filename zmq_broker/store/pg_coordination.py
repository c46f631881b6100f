"""What lives and dies with one broker's PostgreSQL session: LISTENs and advisory locks.

Several brokers on one database wake each other with NOTIFY (sent by ``PostgresStore.notify``
inside a group commit, so delivered exactly when the writes it announces are visible) and take
turns with session-level advisory locks (a lock is released by the server when its holder's
session ends: a broker that dies gives up what it owned without anyone expiring it). Both belong
to a session, so both sit on this dedicated connection, apart from the store's: the store's
connection is replaced freely on error, this one's loss means something.

The broker loop polls ``fileno()`` with its sockets (no polling of the database): when it is
readable, ``drain()`` returns the notifications received, without blocking. ``generation`` changes
whenever the session had to be re-established: every lock held before is gone (``held`` is empty
again), notifications sent meanwhile were missed (re-read the state they announce), and
``fileno()`` is a new descriptor (register it again). While the server cannot be reached, calls
raise ``BrokerError("StoreUnavailable")`` and reconnect with backoff on a later call.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, TypeVar

from .pg_connection import Session

# Advisory locks of the broker live in the single-bigint key space; names are hashed into it.
_LOCK_PREFIX = b"zerorun:"
T = TypeVar("T")


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for a lock name (the same on every broker and platform)."""
    digest = hashlib.blake2b(_LOCK_PREFIX + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _received(conn: Any) -> list[tuple[str, str]]:
    """(channel, payload) of the notifications on ``conn``, read through libpq: first those psycopg
    kept when its queries read them off the socket, then what the socket holds now. psycopg's
    ``notifies(timeout=0)`` costs 40-50 us a call (a generator, its wait, and an exception when
    nothing more came: bench/README.md, round sixteen), once per drain of the broker's loop."""
    backlog = getattr(conn, "_notifies_backlog", None)  # psycopg 3.2.4 and later
    if backlog is None:
        return [(n.channel, n.payload) for n in conn.notifies(timeout=0)]
    out = [(n.channel, n.payload) for n in backlog]
    backlog.clear()
    pgconn = conn.pgconn
    pgconn.consume_input()  # what the socket has, without blocking; OperationalError when the session is gone
    while (n := pgconn.notifies()) is not None:
        out.append((n.relname.decode("utf-8", "replace"), n.extra.decode("utf-8", "replace")))
    return out


class Coordination:
    def __init__(self, dsn: str, password: str | None = None):
        self._channels: set[str] = set()
        self._locks: dict[str, int] = {}
        self.generation = 0
        self.unread = False  # notifications a query read off the socket: only ``drain()`` shows them now
        self._session = Session(dsn, password, application_name="zerorun-broker-coordination",
                                on_connect=self._setup)

    def _setup(self, conn: Any) -> None:
        """A new session: nothing held any more; listening again on every channel."""
        from psycopg import sql

        self._locks.clear()
        self.generation += 1
        self.unread = True  # its LISTENs may have read some
        for channel in sorted(self._channels):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def fileno(self) -> int:
        """The session's socket, to poll for POLLIN beside the broker's sockets."""
        return self._session.run(lambda conn: conn.fileno())

    # -- LISTEN / NOTIFY ----------------------------------------------------------------------

    def listen(self, channel: str) -> None:
        from psycopg import sql

        self._query(lambda conn: conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel))))
        self._channels.add(channel)

    def unlisten(self, channel: str) -> None:
        from psycopg import sql

        self._channels.discard(channel)
        self._query(lambda conn: conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel))))

    def drain(self) -> list[tuple[str, str]]:
        """(channel, payload) of every notification received so far; never blocks. Call it when
        ``fileno()`` is readable or ``unread`` is set. A drain that fails lost the session, and
        what it had read with it (``generation`` then tells the broker to re-read what such
        notifications announce): ``unread`` is cleared either way, or the loop would never wait."""
        try:
            return self._session.run(_received)
        finally:
            self.unread = False

    def _query(self, fn: Callable[[Any], T]) -> T:
        """``fn`` on the session; then ``unread`` says whether it read notifications off the
        socket (psycopg keeps those for ``notifies()``; where that list cannot be seen, assume
        it did)."""
        def run(conn: Any) -> T:
            try:
                return fn(conn)
            finally:
                backlog = getattr(conn, "_notifies_backlog", None)  # psycopg 3.2.4 and later
                self.unread = self.unread or backlog is None or bool(backlog)

        return self._session.run(run)

    # -- advisory locks -----------------------------------------------------------------------

    def mark(self, key: int) -> None:
        """This session, and each that replaces it, holds the shared advisory lock ``key``."""
        self._session.mark(key)
        self.unread = True  # the query may have read notifications off the socket

    def try_lock(self, name: str) -> bool:
        """Takes the lock ``name`` if no other session holds it; True when this session has it.
        Always asks the server, so a session that died since is noticed here, not trusted."""
        key = lock_key(name)

        def take(conn: Any) -> bool:
            if name in self._locks:  # held: the lock is ours as long as this session is alive
                conn.execute("SELECT 1")
                return True
            return bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])

        if self._query(take):
            self._locks[name] = key
            return True
        return False

    def try_locks(self, names: list[str]) -> set[str]:
        """``try_lock`` of several locks in one query: the names this session holds afterwards."""
        wanted = [(name, lock_key(name)) for name in dict.fromkeys(names) if name not in self._locks]

        def take(conn: Any) -> list[bool]:
            if not wanted:
                conn.execute("SELECT 1")
                return []
            return [bool(r[0]) for r in conn.execute(
                "SELECT pg_try_advisory_lock(k) FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
                ([key for _, key in wanted],)).fetchall()]

        for (name, key), taken in zip(wanted, self._query(take)):
            if taken:
                self._locks[name] = key
        return {name for name in names if name in self._locks}

    def holds(self, name: str) -> bool:
        return name in self._locks

    def unlock(self, name: str) -> bool:
        """Releases the lock; False when this session did not hold it."""
        key = self._locks.pop(name, None)
        if key is None:
            return False
        return bool(self._query(lambda conn: conn.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone()[0]))

    def unlock_many(self, names: list[str]) -> None:
        """``unlock`` of several locks in one query (those this session holds)."""
        keys = [key for name in names if (key := self._locks.pop(name, None)) is not None]
        if keys:
            self._query(lambda conn: conn.execute("SELECT pg_advisory_unlock(k) FROM unnest(%s::bigint[]) AS k",
                                                  (keys,)))

    @property
    def held(self) -> set[str]:
        """The locks this session held when it last reached the server (empty after a new
        session: see ``generation``). A dead session shows as EOF on ``fileno()``."""
        return set(self._locks)

    def close(self) -> None:
        """Ends the session: the server releases every lock and forgets every LISTEN."""
        self._locks.clear()
        self._session.close()
