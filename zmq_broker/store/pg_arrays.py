"""Array parameters in PostgreSQL's binary format, made here rather than by psycopg.

The store writes each batch as columns of arrays (``unnest(%b::text[], ...)``). psycopg's list
dumper walks a list in Python, looking up and calling a dumper per element, and sets itself up
again for every parameter: 18 us for eleven one-element columns, 150 us for eleven columns of a
hundred (bench/README.md). Encoding the array whole takes a third of that. ``binary`` turns the
columns it recognises (every element a ``str``, ``bytes`` or ``float``, or ``None``; or every
element an ``int`` within 64 bits) into ``ArrayParam``s, which ``register`` teaches psycopg to
send as they are and ``pg_prepared`` sends itself; anything else is left to psycopg. The wire
format is the one ``array_recv`` reads: dimensions, a has-nulls flag, the element type, then the
length and lower bound of the one dimension, then each element as its byte length (-1 for NULL)
and its bytes.
"""

from __future__ import annotations

import struct
from typing import Any

_HEAD = struct.Struct("!iiIii")  # dimensions, has nulls, element type, length, lower bound
_LENGTH = struct.Struct("!i")
_FLOAT8 = struct.Struct("!id")  # an element's length (8) and its value
_INT8 = struct.Struct("!iq")
_NULL = _LENGTH.pack(-1)
_SHORT = [_LENGTH.pack(n) for n in range(1024)]  # the length prefixes of short elements, made once
TEXT, BYTEA, FLOAT8, INT8 = 25, 17, 701, 20  # element type oids
ARRAY_OF = {TEXT: 1009, BYTEA: 1001, FLOAT8: 1022, INT8: 1016}


class ArrayParam(bytes):
    """An encoded array; ``oid`` is the array type's."""

    oid = 0


class TextArray(ArrayParam):
    oid = ARRAY_OF[TEXT]


class ByteaArray(ArrayParam):
    oid = ARRAY_OF[BYTEA]


class Float8Array(ArrayParam):
    oid = ARRAY_OF[FLOAT8]


class Int8Array(ArrayParam):
    oid = ARRAY_OF[INT8]


_REGISTERED = False


def register() -> None:
    """psycopg sends an ``ArrayParam`` as it is (for connections made after this call)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import psycopg
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    for cls in (TextArray, ByteaArray, Float8Array, Int8Array):
        dumper = type(f"{cls.__name__}Dumper", (Dumper,), {
            "format": Format.BINARY, "oid": cls.oid, "dump": lambda self, obj: obj})
        psycopg.adapters.register_dumper(cls, dumper)
    _REGISTERED = True


def binary(params: list[Any]) -> list[Any]:
    """The parameters with the columns ``encode`` recognises encoded, the rest as they were."""
    return [encode(p) if type(p) is list else p for p in params]


def encode(values: list[Any]) -> Any:
    """``values`` as an ``ArrayParam``, or ``values`` itself when its elements are not all of
    one of the recognised types (or all NULL)."""
    kind = None
    for value in values:
        if value is not None:
            kind = type(value)
            break
    if kind is str:
        parts, nulls = _elements(values, str, str.encode)
        cls, element = TextArray, TEXT
    elif kind is bytes:
        parts, nulls = _elements(values, bytes, None)
        cls, element = ByteaArray, BYTEA
    elif kind is float:
        if not all(type(v) is float for v in values):
            return values
        pack = _FLOAT8.pack
        return Float8Array(_HEAD.pack(1, 0, FLOAT8, len(values), 1) + b"".join([pack(8, v) for v in values]))
    elif kind is int:
        if not all(type(v) is int for v in values):  # a bool is an int too: psycopg's
            return values
        try:
            body = b"".join([_INT8.pack(8, v) for v in values])
        except struct.error:  # beyond 64 bits: psycopg sends numeric
            return values
        return Int8Array(_HEAD.pack(1, 0, INT8, len(values), 1) + body)
    else:
        return values
    if parts is None:
        return values
    return cls(_HEAD.pack(1, nulls, element, len(values), 1) + b"".join(parts))


def _elements(values: list[Any], kind: type, to_bytes: Any) -> tuple[list[bytes] | None, int]:
    """Each element as its length and bytes (``to_bytes`` None: the element is its bytes); None
    when one is of another type. Called for every column of every group commit, so the length
    prefixes of short elements come from a table rather than a ``struct`` call each."""
    parts: list[bytes] = []
    append = parts.append
    pack = _LENGTH.pack
    short = _SHORT
    nulls = 0
    for value in values:
        if type(value) is kind:
            data = value if to_bytes is None else to_bytes(value)
            size = len(data)
            append(short[size] if size < 1024 else pack(size))
            append(data)
        elif value is None:
            append(_NULL)
            nulls = 1
        else:
            return None, 0
    return parts, nulls

