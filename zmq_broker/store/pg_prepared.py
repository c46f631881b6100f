"""The store's statements (the group commit's, and its reads) sent with libpq's prepared-statement
calls, not psycopg's cursor.

A commit is one of a few statement texts whose parameters are arrays that ``pg_arrays`` encodes
and a few strings and floats. psycopg's ``execute`` parses the query, looks up a dumper for
every parameter and keeps its own count of executions before it prepares: about a fifth of the
client CPU of a small commit (bench/README.md). Here each text is prepared once per connection
with the parameters' types, then executed with the parameters as they are: libpq's blocking
call, which releases the GIL while it waits. A parameter of another kind (an int, bytes, None,
a string with a NUL character) sends its statement psycopg's way. Errors are psycopg's exception
classes, so that callers (and ``Session.run``, which replaces a broken connection) see no
difference; a read's rows are loaded by psycopg's own loaders, as its binary cursor loads them.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Sequence

from . import pg_arrays
from .pg_arrays import FLOAT8

PREPARED_MAX = 100  # texts prepared on one connection, writes and reads each; beyond, a text is parsed each time
TEXTS_MAX = 1000  # texts remembered (numbered, or read once): beyond, forgotten and made again
_FLOAT8 = struct.Struct("!d")
_PLACEHOLDER = re.compile(r"%%|%[sb]")
UNKNOWN = 0  # a string goes as text of a type the server infers, as psycopg sends it


def numbered(sql: str) -> str:
    """psycopg's placeholders (``%s``, ``%b``) as libpq's (``$1``, ...); ``%%`` is ``%``."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%"
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


class Prepared:
    """The statements prepared on one connection (a new connection has none: make a new one)."""

    def __init__(self, conn: Any):
        self.conn = conn
        # (text, parameter types) -> statement name, for writes [0] and reads [1] (the result's format)
        self._names: tuple[dict[tuple[str, tuple[int, ...]], bytes], ...] = ({}, {})
        self._texts: dict[str, bytes] = {}
        self._seen: set[tuple[str, tuple[int, ...]]] = set()  # reads made once, not prepared yet
        self._loader: Any = None  # psycopg's Transformer, made at the first read

    def execute(self, sql: str, params: list[Any]) -> bool:
        """Runs ``sql`` with ``params``; False (nothing sent) when a parameter is of a kind this
        does not send."""
        return self._run(sql, params, 0) is not None

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]] | None:
        """The rows of a read (or of a write's RETURNING) as a binary cursor gives them, loaded by
        psycopg's own loaders; None (nothing sent) when a parameter is of a kind this does not
        send. psycopg's ``execute`` was most of the client CPU of an owner's read of its relayed
        rows, a read per loop iteration in a cluster (bench/README.md, round twenty-seven)."""
        result = self._run(sql, params, 1)
        if result is None:
            return None
        loader = self._loader
        if loader is None:
            from psycopg.adapt import Transformer

            loader = self._loader = Transformer(self.conn)
        loader.set_pgresult(result)
        rows = loader.load_rows(0, result.ntuples, tuple)
        loader.set_pgresult(None)  # a large read's result is not kept until the next one
        return rows

    def _run(self, sql: str, params: Sequence[Any], result_format: int) -> Any:
        values: list[bytes] = []
        types: list[int] = []
        formats: list[int] = []
        for param in params:
            kind = type(param)
            if kind is list:
                param = pg_arrays.encode(param)
                kind = type(param)
            if isinstance(param, pg_arrays.ArrayParam):
                values.append(param)
                types.append(kind.oid)
                formats.append(1)
            elif kind is str:
                if "\x00" in param:  # libpq would cut a text parameter there: psycopg refuses it
                    return None
                values.append(param.encode())
                types.append(UNKNOWN)
                formats.append(0)
            elif kind is float:
                values.append(_FLOAT8.pack(param))
                types.append(FLOAT8)
                formats.append(1)
            else:
                return None
        pgconn = self.conn.pgconn
        key = (sql, tuple(types))
        names = self._names[result_format]  # reads and writes each have their own PREPARED_MAX
        name = names.get(key)
        if name is None:
            text = self._texts.get(sql)
            if text is None:
                if len(self._texts) >= TEXTS_MAX:
                    self._texts.clear()
                text = self._texts[sql] = numbered(sql).encode()
            # a read is prepared the second time it is made (preparing is a round trip of its
            # own, and some reads are made once: a history filter's, a look after an outage)
            if len(names) >= PREPARED_MAX or (result_format and self._first_time(key)):
                return _check(pgconn, pgconn.exec_params(text, values, types, formats, result_format))
            name = f"zerorun_{'r' if result_format else 'w'}{len(names)}".encode()
            _check(pgconn, pgconn.prepare(name, text, types))
            names[key] = name
        return _check(pgconn, pgconn.exec_prepared(name, values, formats, result_format))

    def _first_time(self, key: tuple[str, tuple[int, ...]]) -> bool:
        if key in self._seen:
            return False
        if len(self._seen) >= TEXTS_MAX:
            self._seen.clear()
        self._seen.add(key)
        return True


_OK = (1, 2)  # libpq's PGRES_COMMAND_OK and PGRES_TUPLES_OK (psycopg's pq.ExecStatus has the same values)


def _check(pgconn: Any, result: Any) -> Any:
    """``result``, or what psycopg would raise for a failed statement (psycopg is imported for a
    failure only: this is called for every commit)."""
    if result.status in _OK:
        return result
    import psycopg
    from psycopg import pq

    message = (result.error_message or pgconn.error_message or b"the statement failed").decode("utf-8", "replace")
    if pgconn.status == pq.ConnStatus.BAD:
        raise psycopg.OperationalError(message)
    state = result.error_field(pq.DiagnosticField.SQLSTATE)
    try:
        cls = psycopg.errors.lookup(state.decode()) if state else psycopg.DatabaseError
    except KeyError:
        cls = psycopg.DatabaseError
    raise cls(message)
