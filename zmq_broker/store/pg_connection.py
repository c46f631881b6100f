"""One PostgreSQL session that survives its server: reconnection with backoff, clear errors.

The broker's loop must outlive a restart or fail-over of PostgreSQL. Every use of the session
goes through ``Session.run(fn)``: a connection that has gone away is replaced at once and ``fn``
retried once (a server restarted while the broker was idle costs nothing visible), unless the
caller must look at what changed first (``retry=False``: the group commit of a cluster broker,
whose session may have been ended by another broker that took its commands over); when no
connection can be had, ``run`` raises ``BrokerError("StoreUnavailable", ...)`` and later calls
fail fast until the backoff (jittered, up to ``MAX_BACKOFF``) lets the next attempt through.
Callers keep whatever they could not write and try again on a later call.

The DSN never carries the password: it comes from a password file (``--store-password-file``)
or libpq's own environment (``PGPASSWORD``, ``~/.pgpass``, ``PGPASSFILE``).
"""

from __future__ import annotations

import logging
import random
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from ..errors import BrokerError
from .base import STORE_UNAVAILABLE
from .pg_prepared import Prepared

log = logging.getLogger("zerorun.broker.store")

FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0
# libpq settings the broker wants unless the DSN says otherwise: a dead server or a partition is
# noticed in seconds, not after the kernel's 15-minute TCP retransmission limit.
CONNECTION_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "10",
                       "keepalives_interval": "5", "keepalives_count": "3", "tcp_user_timeout": "15000"}
DSN_SCHEMES = ("postgresql://", "postgres://")

T = TypeVar("T")


def is_postgresql_dsn(value: str) -> bool:
    return value.startswith(DSN_SCHEMES)


def dsn_problem(dsn: str) -> str | None:
    """Why this DSN cannot be used (a password in it, a syntax error), or None."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return "the PostgreSQL store needs psycopg: pip install 'zerorun[postgresql]'"
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        return f"invalid PostgreSQL DSN: {one_line(exc)}"
    if "password" in params:
        return ("the store DSN must not contain a password (it would show in the process list and "
                "the config): put it in a file named by --store-password-file (store_password_file), "
                "or use PGPASSWORD or ~/.pgpass")
    return None


def read_password_file(path: Path | str) -> str:
    """The password in a 0600 (or stricter) file, without its trailing newline."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BrokerError("BadConfig", f"store password file {path} is accessible by group/others "
                              f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
        password = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise BrokerError("BadConfig", f"cannot read store password file {path}: {exc.strerror}") from None
    if not password:
        raise BrokerError("BadConfig", f"store password file {path} is empty")
    return password


def describe(dsn: str) -> str:
    """user@host:port/db, for messages (never a password: there is none in the DSN)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
    return f"{params['user']}@{where}" if params.get("user") else where


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Session:
    """A connection (autocommit) that is re-established when it breaks."""

    def __init__(self, dsn: str, password: str | None = None, *, application_name: str = "zerorun-broker",
                 on_connect: Callable[[Any], None] | None = None, marks: Iterable[int] = ()):
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(dsn)
        defaults = {**CONNECTION_DEFAULTS, "application_name": application_name}
        self._params: dict[str, Any] = {k: v for k, v in defaults.items() if k not in given}
        if password is not None:
            self._params["password"] = password
        self.dsn = dsn
        self.where = f"PostgreSQL database {describe(dsn)}"
        self._on_connect = on_connect
        self._conn: Any = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._down_since = 0.0
        self._last_error = ""
        self.connects = 0  # successful connections so far: a change means a new server session
        self.outages = 0  # times a session was lost, or the server could not be reached, after one had been had
        self._marks: list[int] = list(marks)  # shared advisory locks every session of this one holds (``mark``)
        self._cursors: dict[bool, Any] = {}  # binary -> a cursor of the current connection (``cursor``)
        self._prepared: Prepared | None = None  # statements prepared on the current connection

    # -- the connection -----------------------------------------------------------------------

    def connection(self) -> Any:
        """The live connection, connecting if needed (fails fast while backing off)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        now = time.monotonic()
        if now < self._retry_at:
            raise self._error(f"{self._last_error}; next attempt in {self._retry_at - now:.1f}s")
        import psycopg

        if conn is not None:  # broken: release its socket before replacing it
            conn.close()
        self._conn = None
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, **self._params)
        except psycopg.Error as exc:
            raise self._failed(exc) from None
        try:
            # Every statement of a broker is short; the JIT compiler, which the server starts for
            # any plan estimated above jit_above_cost, spent 47 ms compiling a prune pass whose
            # run took 2 ms, while the broker's loop waited (bench/README.md, round twenty-eight).
            conn.execute("SET jit = off")
            for key in self._marks:
                conn.execute("SELECT pg_advisory_lock_shared(%s)", (key,))
            if self._on_connect is not None:
                self._on_connect(conn)
        except psycopg.Error as exc:
            conn.close()
            raise self._failed(exc) from None
        self._conn = conn
        self.connects += 1
        if self._down_since:
            log.info("store: reconnected to %s after %.1fs", self.where, time.monotonic() - self._down_since)
        self._backoff = self._retry_at = self._down_since = 0.0
        return conn

    def run(self, fn: Callable[[Any], T], retry: bool = True) -> T:
        """``fn(connection)``; a connection lost on the way is replaced and ``fn`` retried once,
        so ``fn`` must be safe to repeat (a lost COMMIT may or may not have happened). With
        ``retry=False`` a new session is opened and ``BrokerError("StoreUnavailable")`` raised
        instead: the caller sees ``outages`` change before it tries again."""
        import psycopg

        for attempt in (1, 2):
            conn = self.connection()
            try:
                return fn(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if not (conn.closed or conn.broken):  # a deadlock, a statement timeout: nothing is lost
                    raise BrokerError(STORE_UNAVAILABLE, f"{self.where}: {one_line(exc)}") from None
                self._conn = None
                conn.close()
                if attempt == 2 or self._down_since:
                    raise self._failed(exc) from None
                self.outages += 1  # a new session: what the old one held (locks) is gone, others may have acted
                log.info("store: connection to %s lost (%s); reconnecting", self.where, one_line(exc))
                if not retry:
                    self.connection()  # the usual error (and backoff) when the server cannot be reached
                    raise BrokerError(STORE_UNAVAILABLE, f"{self.where}: connection lost ({one_line(exc)}); "
                                                         "a new session is open, not written on unasked") from None
        raise AssertionError("unreachable")

    def cursor(self, conn: Any, binary: bool = False) -> Any:
        """A cursor of ``conn`` kept for as long as it is the session's connection: psycopg sets up
        a cursor (and its adapters) for every ``conn.execute``, a fixed cost that a group commit of
        one invocation, or a read, paid each time."""
        cur = self._cursors.get(binary)
        if cur is None or cur.connection is not conn or cur.closed:
            cur = self._cursors[binary] = conn.cursor(binary=binary)
        return cur

    def prepared(self, conn: Any) -> Prepared:
        """The statements prepared on ``conn`` (``pg_prepared``), for as long as it is the session's."""
        prepared = self._prepared
        if prepared is None or prepared.conn is not conn:
            prepared = self._prepared = Prepared(conn)
        return prepared

    def mark(self, key: int) -> None:
        """Every session of this one (now and after each reconnection) holds the shared advisory
        lock ``key``: another broker can find them by it (``pg_locks``) and end them."""
        if key not in self._marks:
            self._marks.append(key)
            self.run(lambda conn: conn.execute("SELECT pg_advisory_lock_shared(%s)", (key,)))

    @property
    def marks(self) -> tuple[int, ...]:
        """The shared advisory locks this session holds (``mark``), for another session of the same broker."""
        return tuple(self._marks)

    @property
    def available(self) -> bool:
        """Whether the last attempt succeeded (no outage in progress)."""
        return not self._down_since

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def retry_now(self) -> None:
        """Lets the next call try to connect at once, whatever the backoff says (at shutdown)."""
        self._retry_at = 0.0

    # -- failures -----------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> BrokerError:
        now = time.monotonic()
        self._last_error = one_line(exc)
        self._backoff = min(MAX_BACKOFF, self._backoff * 2) if self._backoff else FIRST_BACKOFF
        self._retry_at = now + self._backoff * random.uniform(0.8, 1.2)  # brokers do not retry in step
        if not self._down_since:
            self._down_since = now
            if self.connects:  # an outage (at start the caller reports the error itself)
                self.outages += 1
                log.warning("store: %s is unavailable (%s); retrying with backoff", self.where, self._last_error)
        else:
            log.debug("store: %s still unavailable: %s", self.where, self._last_error)
        return self._error(self._last_error)

    def _error(self, reason: str) -> BrokerError:
        return BrokerError(STORE_UNAVAILABLE, f"{self.where} is unavailable: {reason}")
