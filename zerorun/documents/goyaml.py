"""YAML read the way amazon-ssm-agent reads it: plain scalars resolved by gopkg.in/yaml.v2.

The agent reads a YAML document it runs itself (``aws:runDocument``'s documents, and
``documentParameters`` given as text: ``plugins/rundocument/execdoc.go`` ``ParseDocument``,
``rundocument.go`` ``prepareDocumentForExecution``) with yaml.v2 v2.4.0, whose ``resolve.go``
decides what an unquoted scalar is. PyYAML follows YAML 1.1 instead, and the two disagree:

* ``12:30:00`` is a string in yaml.v2 ("base 60 floats are a bad idea ... purposefully
  unsupported"); PyYAML read it as the integer 45000.
* A timestamp (``2024-01-02``) decoded into an untyped value stays the string as written in
  yaml.v2 (``decode.go``: "for backward compatibility reasons we set it as a string");
  PyYAML made a ``date`` of it.
* Integers are Go's ``strconv.ParseInt(text, 0, 64)`` once ``_`` are removed (``0x1F``,
  ``0o17``, ``017``, ``0b101``); a number beyond 64 bits, and ``09`` (no octal), is then a
  float if it looks like one. Floats need no ``.`` (``1e3``). ``=`` is a string (PyYAML
  raised: it has no constructor for YAML 1.1's ``!!value``).

Mapping keys written plain are text as written (``on:`` is the key ``on``), as in SSM's
string-keyed maps and field names.

One difference is kept on purpose: yaml.v2 also reads ``y``/``Y``/``n``/``N`` as booleans
(``yes``/``no``/``on``/``off``/``true``/``false`` are booleans in both). SSM reads them so only
where a field is untyped (step inputs, defaults); in its typed string fields (``allowedValues``,
names) they stay text, as here everywhere: a document SSM reads as text never breaks here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_BASE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it

STR, INT, FLOAT, BOOL, NULL = (f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null"))
MERGE = "tag:yaml.org,2002:merge"
TIMESTAMP = "tag:yaml.org,2002:timestamp"

_BOOLS = {text: value for value, words in ((True, ("yes", "true", "on")), (False, ("no", "false", "off")))
          for word in words for text in (word, word.capitalize(), word.upper())}
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_SPECIAL_FLOATS = {text: value for value, words in ((math.nan, (".nan",)), (math.inf, (".inf", "+.inf")),
                                                    (-math.inf, ("-.inf",)))
                   for word in words for text in (word, word.replace("inf", "Inf").replace("nan", "NaN"),
                                                  word.upper())}
_HINTED = frozenset("+-0123456789.yYnNtTfFoO~")  # yaml.v2's resolveTable: other first characters are text
_GO_INT = re.compile(r"([-+]?)(?:0[xX]([0-9a-fA-F]+)|0[oO]([0-7]+)|0[bB]([01]+)|0([0-7]*)|([1-9][0-9]*))")
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # yaml.v2's yamlStyleFloat
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")  # what Go's ParseFloat takes that starts with "."
_TIMESTAMP = re.compile(r"[0-9]{4}-")  # yaml.v2 tries a timestamp only then (and keeps it as text)
_INT64 = 1 << 63


def _go_int(plain: str) -> int | None:
    """``strconv.ParseInt(plain, 0, 64)``, then ``ParseUint`` (no sign) as yaml.v2 tries them."""
    match = _GO_INT.fullmatch(plain)
    if match is None:
        return None
    sign, hex_digits, oct_digits, bin_digits, zero_oct, decimal = match.groups()
    if hex_digits is not None:
        value = int(hex_digits, 16)
    elif oct_digits is not None:
        value = int(oct_digits, 8)
    elif bin_digits is not None:
        value = int(bin_digits, 2)
    elif zero_oct is not None:
        value = int(zero_oct or "0", 8)
    else:
        value = int(decimal)
    if sign == "-":
        value = -value
    if -_INT64 <= value < _INT64 or (not sign and value < 1 << 64):
        return value
    return None


def _go_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # Go's ParseFloat: out of range is an error


def resolve_plain(text: str) -> str:
    """The tag yaml.v2's ``resolve`` gives the unquoted scalar ``text`` (timestamps: str)."""
    if text and text[0] not in _HINTED:
        return MERGE if text == "<<" else STR
    if text in _NULLS:
        return NULL
    if text in _BOOLS:
        return BOOL
    if text in _SPECIAL_FLOATS:
        return FLOAT
    if text[0] == ".":
        return FLOAT if _DOT_FLOAT.fullmatch(text) else STR
    if text[0] not in "+-0123456789":
        return STR
    if _TIMESTAMP.match(text):
        return STR  # a timestamp (or not): text as written either way
    plain = text.replace("_", "")
    if _go_int(plain) is not None:
        return INT
    if _GO_FLOAT.fullmatch(plain) and _go_float(plain) is not None:
        return FLOAT
    return STR


class GoYamlLoader(_BASE):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader with yaml.v2's plain scalars (see the module's doc)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            return resolve_plain(value)
        return super().resolve(kind, value, implicit)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """Plain keys are text as written: SSM decodes them into string-keyed maps and field
        names (a parameter named ``on`` is ``on``; PyYAML made the key ``True``)."""
        node.value = [(yaml.ScalarNode(STR, key.value, key.start_mark, key.end_mark)
                       if isinstance(key, yaml.ScalarNode) and not key.style and key.tag != MERGE else key,
                       value) for key, value in node.value]
        return super().construct_mapping(node, deep=deep)

    def construct_go_int(self, node: Any) -> Any:
        text = self.construct_scalar(node)
        value = _go_int(text.replace("_", ""))
        if value is not None:
            return value
        value = _go_float(text.replace("_", "")) if _GO_FLOAT.fullmatch(text.replace("_", "")) else None
        if value is None:
            raise yaml.constructor.ConstructorError(None, None, f"cannot decode {text!r} as an integer",
                                                    node.start_mark)
        return value

    def construct_go_float(self, node: Any) -> Any:
        text = self.construct_scalar(node)
        if text in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[text]
        value = _go_float(text.replace("_", "") if text[:1] != "." else text)
        if value is None:
            raise yaml.constructor.ConstructorError(None, None, f"cannot decode {text!r} as a float",
                                                    node.start_mark)
        return value

    def construct_as_written(self, node: Any) -> Any:
        return self.construct_scalar(node)


GoYamlLoader.add_constructor(INT, GoYamlLoader.construct_go_int)
GoYamlLoader.add_constructor(FLOAT, GoYamlLoader.construct_go_float)
GoYamlLoader.add_constructor(TIMESTAMP, GoYamlLoader.construct_as_written)


def load(text: str) -> Any:
    return yaml.load(text, Loader=GoYamlLoader)
