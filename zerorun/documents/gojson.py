"""Values as text, the way amazon-ssm-agent writes them: Go's ``json.Marshal``.

SSM substitutes a non-string parameter value into a longer string as its compact JSON, and
Zerorun exports StringList/StringMap parameters in the environment the same way. Go's encoder
differs from Python's ``json.dumps`` in three ways that show in a script: map keys are sorted,
``<``, ``>``, ``&``, U+2028 and U+2029 are escaped as ``\\u`` sequences, and floats are written
in the shortest form without a trailing ``.0`` (``1`` not ``1.0``, ``1e-7`` not ``1e-07``,
``10000000000000000`` not ``1e+16``).
"""

from __future__ import annotations

import decimal
import json
import math
from typing import Any

_HTML_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                            "\u2028": "\\u2028", "\u2029": "\\u2029"})


def go_float(value: float) -> str:
    """A float as Go's encoding/json writes it (its ``floatEncoder``)."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {value!r}")
    magnitude = abs(value)
    text = repr(value)  # shortest round-trip digits, as Go's strconv with precision -1; repr
    # uses an exponent below 1e-4 and from 1e16, so it has one wherever Go wants one
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        mantissa, exponent = text.split("e")
        sign, digits = exponent[0], exponent[1:].lstrip("0") or "0"
        return f"{mantissa}e{sign}{digits.zfill(2) if sign == '+' else digits}"
    text = format(decimal.Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _encode(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    if isinstance(value, dict):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _encode(v) for k, v in items) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (what JSON's ``\\ud800`` decodes to),
    which UTF-8, and so msgpack, cannot hold."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def go_json(value: Any) -> str:
    """Compact JSON exactly as Go's ``json.Marshal`` writes it. Raises ValueError for NaN/Inf."""
    return _encode(value).translate(_HTML_SAFE)


def to_text(value: Any) -> str:
    """A rendered value as text: strings as they are, ``None`` as nothing, the rest as Go JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return go_json(value)
