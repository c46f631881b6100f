"""A client config as the broker and ``zerorun clients create`` write it, read back without PyYAML.

Importing PyYAML is a tenth to a fifth of a short CLI run. The config written here is YAML any
reader takes (Ansible's, an operator's editor), in a form this module reads by hand: comments and
``key: 'text'`` or ``key: true`` lines. Anything else (an operator's own edit with lists or double
quotes) is left to PyYAML by the caller, and both readings agree (tests/unit/test_client_config_plain.py).
"""

from __future__ import annotations

from typing import Any, Mapping

TEXT_KEYS = ("endpoint", "broker_public_key", "client_key_file")
_FLAGS = {"true": True, "false": False}
_YAML_WORDS = {"y", "yes", "n", "no", "true", "false", "on", "off", "null", "~", "=", "<<"}
# A plain YAML scalar cannot start with an indicator. (Inside one, in block context, only ": ",
# " #" and a final ":" mean something, and no space is taken here.)
_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
# One that starts with a digit, a sign or a dot may be a number or a date: not if it has a
# character that none of YAML 1.1's integers, floats (.inf, .nan) and timestamps has.
_NUMBER_START = frozenset("+.0123456789")
_NUMBER_OR_DATE = frozenset("0123456789+-._:xXoObBabcdefABCDEFinfINFaAtTzZ \t")


def write(values: Mapping[str, str | bool], header: str = "") -> str:
    """``key: 'text'`` (YAML's single quotes, where ``''`` is the only escape) and ``key: true``
    lines: what ``read_plain`` reads, whatever a key's characters (a z85 key that starts with a
    digit or ``#`` was plain YAML to PyYAML's writer, and sent every CLI run to PyYAML). Text that
    is not printable ASCII (a path's) goes in double quotes with escapes, for PyYAML to read."""
    lines = [header] if header else []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key}: {'true' if value else 'false'}\n")
        elif value.isascii() and value.isprintable():
            lines.append(f"{key}: '{value.replace(chr(39), chr(39) * 2)}'\n")
        else:  # YAML's double quotes, every other character escaped: the file stays ASCII
            lines.append(f'{key}: "{_escaped(value)}"\n')
    return "".join(lines)


def _escaped(value: str) -> str:
    out = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= code < 127:
            out.append(char)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def read_plain(text: str) -> dict[str, Any] | None:
    """The lines ``write`` writes, and plain ``key: value`` lines that cannot be anything but text;
    None when anything is less plain (double quotes, lists, numbers, other keys): YAML reads that."""
    data: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(": ")
        value = value.strip()
        if key in data or not value:
            return None
        if key == "insecure":
            if value not in _FLAGS:
                return None
            data[key] = _FLAGS[value]
            continue
        if key not in TEXT_KEYS:
            return None
        if value[0] == "'":
            inner = value[1:-1]
            if (len(value) < 2 or value[-1] != "'" or "'" in inner.replace("''", "")
                    or not inner.isprintable()):
                return None
            value = inner.replace("''", "'")
        elif not _plain_text(value):
            return None
        data[key] = value
    return data


def _plain_text(value: str) -> bool:
    if (value[0] in _INDICATORS or value.lower() in _YAML_WORDS or value.endswith(":")
            or not (value.isascii() and value.isprintable()) or any(c in value for c in " '\"")):
        return False
    return value[0] not in _NUMBER_START or not _NUMBER_OR_DATE.issuperset(value)
