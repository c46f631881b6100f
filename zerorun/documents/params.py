"""Parameter values: coercion from the forms callers send, SSM's constraints, redaction.

Accepted input forms (CLI strings, Ansible typed YAML, SSM-style lists of strings):

* String: a str, or a one-item list of str; never holding NUL (every step has every parameter
  in its environment, which cannot hold one).
* Integer: an int, or a decimal string (``"42"``, ``"-3"``); a bool is not an int. It must fit
  in 64 bits (signed), as must every integer inside a StringMap: commands, their results and the
  audit log are stored as msgpack, which holds no larger integer.
* Boolean: a bool, or ``"true"``/``"false"`` in any case.
* StringList: a list of str, or one str (a one-item list). Like SSM, items must already be
  strings: an int or bool item is rejected (quote it), so ``[1, true]`` never turns silently into
  ``["1", "True"]``.
* StringMap: a dict with str keys, or a JSON object string.
* MapList: a list of such maps (each a dict or a JSON object string), or a JSON array string.
  SSM declares it for Command documents too (amazon-ssm-agent's paramvalidator reads it as a
  list whose items it checks as their JSON).

A null value (``None``) counts as not given: the default applies, or the parameter is missing.
That is how amazon-ssm-agent treats a null in ``aws:runDocument``'s documentParameters ("drop nil
parameter, and let it pick up default value").

Constraints follow SSM: ``allowedValues`` and ``allowedPattern`` (RE2 syntax and meaning, as
amazon-ssm-agent's Go ``regexp`` reads it: ``patterns.py``; a full match) apply to a String
and to every StringList item; ``minChars``/``maxChars`` to a String and to every item;
``minItems``/``maxItems`` to a StringList. A StringMap is held to all of them as amazon-ssm-agent
holds it: ``minItems``/``maxItems`` count its keys, the others apply to its JSON as Go writes it
(compact, keys sorted; an allowed value written as a map is compared as that JSON too); a MapList
likewise, its number of maps and each map's JSON. Messages name the parameter, the rule and the value,
the value shown as ``***`` for secret parameters.
"""

from __future__ import annotations

import json
import re
from typing import Any

from zerorun.documents.model import Document, ParameterError, ParameterSpec
from zerorun.documents.gojson import go_json, has_lone_surrogate
from zerorun.documents.patterns import full_match
from zerorun.documents.templating import has_param_store_ref

REDACTED = "***"
ENV_PREFIX = "ZERORUN_PARAM_"
INTEGER_MIN, INTEGER_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_DEPTH = 64  # a StringMap's nesting, as a document's (loader.MAX_DEPTH)


def _show(spec: ParameterSpec, value: Any) -> str:
    return REDACTED if spec.secret else repr(value)


def _fail(spec: ParameterSpec, rule: str, value: Any) -> ParameterError:
    return ParameterError(f"parameter {spec.name!r} ({spec.type}): {rule}; got {_show(spec, value)}")


def _to_string(spec: ParameterSpec, value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise _fail(spec, "expected a string (quote numbers and booleans)", value)
    if "\x00" in value:  # every step has it in its environment (ZERORUN_PARAM_<name>)
        raise _fail(spec, "a NUL character cannot be passed: no environment variable can hold one", value)
    return value


def _to_integer(spec: ParameterSpec, value: Any) -> int:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        raise _fail(spec, "expected an integer, not a boolean", value)
    number = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        digits = value.strip().lstrip("+-").lstrip("0")
        number = int(value) if len(digits) <= 19 else INTEGER_MAX + 1  # int() refuses 4,300 digits
    if number is None:
        raise _fail(spec, "expected an integer", value)
    if not INTEGER_MIN <= number <= INTEGER_MAX:
        raise _fail(spec, "out of range (a 64-bit signed integer)", value)
    return number


def _to_boolean(spec: ParameterSpec, value: Any) -> bool:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _fail(spec, "expected a boolean (true or false)", value)


def _to_string_list(spec: ParameterSpec, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(spec, "expected a list of strings", value)
    for item in value:
        if not isinstance(item, str):
            raise _fail(spec, "every item must be a string (quote numbers and booleans)", value)
    return list(value)


def _from_json(spec: ParameterSpec, text: str, expected: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _fail(spec, f"nested more than {MAX_DEPTH} levels deep", "...") from None
    except ValueError:
        raise _fail(spec, f"expected {expected}", text) from None


def _to_string_map(spec: ParameterSpec, value: Any) -> dict[str, Any]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        value = _from_json(spec, value, "a map or a JSON object string")
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(spec, "expected a map with string keys", value)
    if _deeper_than(value, MAX_DEPTH):  # as deep as a document may be: writing it as JSON recurses
        raise _fail(spec, f"nested more than {MAX_DEPTH} levels deep", "...")
    if _holds_lone_surrogate(value):  # from JSON text's \ud800: no UTF-8 (no msgpack) holds it
        raise _fail(spec, "a lone surrogate (\\ud800-\\udfff) is not text", value)
    try:
        go_json(value)
    except ValueError:
        raise _fail(spec, "NaN and Infinity are not JSON values", value) from None
    if not _integers_fit(value):
        raise _fail(spec, "an integer in it is out of range (a 64-bit signed integer)", value)
    return dict(value)


def _to_map_list(spec: ParameterSpec, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0].lstrip().startswith("["):
        value = value[0]
    if isinstance(value, str):
        value = _from_json(spec, value, "a list of maps or a JSON array string")
    if not isinstance(value, (list, tuple)):
        raise _fail(spec, "expected a list of maps or a JSON array string", value)
    if not all(isinstance(item, (dict, str)) for item in value):
        raise _fail(spec, "every item must be a map (or a JSON object string)", value)
    # each item as a StringMap is (a map or a JSON object string), held to the same checks
    return [_to_string_map(spec, item) for item in value]


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether maps and lists nest more than ``limit`` levels deep in ``value``."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (a map or list, any depth; keys too) cannot be UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and has_lone_surrogate(item):
            return True
    return False


def _integers_fit(value: Any) -> bool:
    """Every integer inside ``value`` (a map or list, any depth) fits in 64 bits (signed)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and not INTEGER_MIN <= item <= INTEGER_MAX:
            return False
    return True


_CONVERTERS = {"String": _to_string, "Integer": _to_integer, "Boolean": _to_boolean,
               "StringList": _to_string_list, "StringMap": _to_string_map, "MapList": _to_map_list}


def _allowed(spec: ParameterSpec) -> tuple[frozenset[Any], tuple[Any, ...]]:
    """``allowedValues`` for lookups (a list of many items against many values was quadratic):
    the hashable ones as a set, and the rest (a map written there), compared in turn."""
    hashable, rest = set(), []
    for value in spec.allowed_values:
        try:
            hashable.add(value)
        except TypeError:
            rest.append(value)
    return frozenset(hashable), tuple(rest)


def _check_scalar(spec: ParameterSpec, item: Any, whole: Any,
                  allowed: tuple[frozenset[Any], tuple[Any, ...]] | None = None) -> None:
    """allowedValues / allowedPattern / min-maxChars on one String, Integer or list item
    (``allowed``: ``_allowed(spec)``, made once for all the items of a list)."""
    if spec.allowed_values:
        known, rest = allowed or _allowed(spec)
        if item not in known and item not in rest:
            lenient = (spec.bool_allowed_values and isinstance(item, str)
                       and item.lower() in {str(v).lower() for v in spec.allowed_values})
            if not lenient:
                shown = ", ".join(repr(v) for v in spec.allowed_values[:10])
                more = f", ... ({len(spec.allowed_values)} in all)" if len(spec.allowed_values) > 10 else ""
                raise _fail(spec, f"value not in allowedValues [{shown}{more}]", whole)
    text = str(item)
    if spec.allowed_pattern and not full_match(spec.allowed_pattern, text):
        raise _fail(spec, f"value does not match allowedPattern {spec.allowed_pattern!r}", whole)
    if spec.min_chars is not None and len(text) < spec.min_chars:
        raise _fail(spec, f"shorter than minChars {spec.min_chars}", whole)
    if spec.max_chars is not None and len(text) > spec.max_chars:
        raise _fail(spec, f"longer than maxChars {spec.max_chars}", whole)
    if isinstance(item, str) and has_param_store_ref(item):
        raise _fail(spec, "Parameter Store references are not supported", whole)


def convert_value(spec: ParameterSpec, value: Any) -> Any:
    """One value converted to its declared type, its constraints unchecked."""
    if value is None:
        raise ParameterError(f"parameter {spec.name!r} ({spec.type}): a value is required, not null")
    return _CONVERTERS[spec.type](spec, value)


def coerce_value(spec: ParameterSpec, value: Any) -> Any:
    """One value converted to its declared type and checked against every constraint."""
    result = convert_value(spec, value)
    if spec.type == "StringList":
        if spec.min_items is not None and len(result) < spec.min_items:
            raise _fail(spec, f"fewer than minItems {spec.min_items} items", value)
        if spec.max_items is not None and len(result) > spec.max_items:
            raise _fail(spec, f"more than maxItems {spec.max_items} items", value)
        allowed = _allowed(spec) if spec.allowed_values else None
        for item in result:
            _check_scalar(spec, item, value, allowed)
    elif spec.type in ("String", "Integer"):
        _check_scalar(spec, result, value)
    elif spec.type == "StringMap":  # as SSM: its number of keys, and its JSON as Go writes it
        if spec.min_items is not None and len(result) < spec.min_items:
            raise _fail(spec, f"fewer than minItems {spec.min_items} keys", value)
        if spec.max_items is not None and len(result) > spec.max_items:
            raise _fail(spec, f"more than maxItems {spec.max_items} keys", value)
        text = go_json(result)
        if spec.allowed_values or spec.allowed_pattern or spec.min_chars is not None or spec.max_chars is not None:
            _check_scalar(spec, text, value)
        # amazon-ssm-agent resolves {{ssm:...}} anywhere in a step's inputs once the parameters are
        # in (docparser.replaceValidatedPluginParameters): a map's keys and values too
        if has_param_store_ref(text):
            raise _fail(spec, "Parameter Store references are not supported", value)
    elif spec.type == "MapList":  # as amazon-ssm-agent's paramvalidator: its length, each map's JSON
        if spec.min_items is not None and len(result) < spec.min_items:
            raise _fail(spec, f"fewer than minItems {spec.min_items} maps", value)
        if spec.max_items is not None and len(result) > spec.max_items:
            raise _fail(spec, f"more than maxItems {spec.max_items} maps", value)
        if spec.allowed_values or spec.allowed_pattern or spec.min_chars is not None or spec.max_chars is not None:
            allowed = _allowed(spec) if spec.allowed_values else None
            for item in result:
                _check_scalar(spec, go_json(item), value, allowed)
        if has_param_store_ref(go_json(result)):
            raise _fail(spec, "Parameter Store references are not supported", value)
    return result


def _scalars_as_text(spec: ParameterSpec, value: Any) -> Any:
    """A number or boolean given for a String (or as a StringList item) by another document's
    documentParameters, as the text amazon-ssm-agent would substitute for it (``5``, ``true``)."""
    def text(item: Any) -> Any:
        if not isinstance(item, (bool, int, float)):
            return item
        try:
            return go_json(item)
        except ValueError:  # NaN or infinity: no JSON text; refused as not a string below
            return item

    if spec.type == "String":
        return text(value)
    if spec.type == "StringList" and isinstance(value, list):
        return [text(item) for item in value]
    return value


def coerce_parameters(doc: Document, parameters: dict[str, Any], *,
                      from_document: bool = False) -> dict[str, Any]:
    """Every declared parameter's validated value (given or default), in document order.

    ``from_document``: the values come from an ``aws:runDocument`` step's documentParameters
    (parsed JSON/YAML), where numbers and booleans for String parameters are text to SSM.
    """
    parameters = {name: value for name, value in (parameters or {}).items() if value is not None}
    unknown = [name for name in parameters if name not in doc.parameters]
    if unknown:
        declared = ", ".join(doc.parameters) or "none"
        raise ParameterError(f"unknown parameter {unknown[0]!r} (declared: {declared})")
    values: dict[str, Any] = {}
    for name, spec in doc.parameters.items():
        if name in parameters:
            given = _scalars_as_text(spec, parameters[name]) if from_document else parameters[name]
            values[name] = coerce_value(spec, given)
        elif spec.required:
            raise ParameterError(f"parameter {name!r} ({spec.type}) is required and has no default")
        else:
            values[name] = spec.default
    return values


def redact(doc: Document, parameters: dict[str, Any]) -> dict[str, Any]:
    """The same dict with the values of secret parameters replaced by ``***``."""
    return {name: REDACTED if name in doc.parameters and doc.parameters[name].secret else value
            for name, value in parameters.items()}


def env_value(value: Any) -> str:
    """How a value is exported in ``ZERORUN_PARAM_<name>``.

    String as-is; Integer in decimal; Boolean ``true``/``false``; StringList, StringMap and MapList as
    compact JSON (items may contain newlines, so joining with newlines would be ambiguous).
    """
    if isinstance(value, str):
        return value
    return go_json(value)


MAX_ENV_STRING = 131071
"""The longest ``NAME=value`` Linux passes to a program (MAX_ARG_STRLEN: 128 KiB with its NUL); one
longer makes every step fail to start ("Argument list too long")."""
MAX_ENV_TOTAL = 1 << 20
"""What the parameters may take of a step's environment: Linux gives a program at most ARG_MAX of
arguments and environment together (2 MiB with the usual 8 MiB stack), the agent's own included."""


def parameter_env(doc: Document, values: dict[str, Any]) -> dict[str, str]:
    """The environment every step gets: ``ZERORUN_PARAM_<name>``, plus SSM's ``SSM_<name>``
    for ``interpolationType: ENV_VAR`` parameters so documents written for SSM keep working.

    A value too long for one variable is left out (SSM exports none; the script text has it), and
    so are the largest others while the parameters would take more than ``MAX_ENV_TOTAL``, unless
    the document reads a value from there (``ENV_VAR``): ParameterError, naming the sizes."""
    env: dict[str, str] = {}
    optional: list[tuple[int, str]] = []  # (size, variable) of what may be left out
    total = 0
    for name, value in values.items():
        text = env_value(value)
        env_var = doc.parameters[name].interpolation_type == "ENV_VAR"
        size = len(ENV_PREFIX + name) + 1 + len(text.encode("utf-8"))
        if size > MAX_ENV_STRING:
            if env_var:
                raise ParameterError(f"parameter {name!r}: interpolationType ENV_VAR passes it in an environment "
                                     f"variable, which holds at most {MAX_ENV_STRING} bytes; this one would be {size}")
            continue
        env[ENV_PREFIX + name] = text
        total += size
        if env_var:
            env["SSM_" + name] = text
            total += size
        else:
            optional.append((size, ENV_PREFIX + name))
    for size, variable in sorted(optional, reverse=True):
        if total <= MAX_ENV_TOTAL:
            break
        del env[variable]
        total -= size
    if total > MAX_ENV_TOTAL:
        raise ParameterError(f"the parameters with interpolationType ENV_VAR take {total} bytes of the "
                             f"environment, more than the {MAX_ENV_TOTAL} a step's may hold")
    return env
