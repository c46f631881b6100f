"""Redaction of rendered steps: what the broker shows instead of what it delivers.

The broker keeps the real steps (an agent needs the secret) and shows ``redact_steps(...)``:
every form in which a secret parameter's value can appear in rendered text is replaced by
``***``: the text itself, its shell-quoted form (``| quote``), its JSON string escapings, and for
a StringList/StringMap the compact JSON of the whole value plus each item or map value.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from typing import Any

import msgspec

from zerorun import protocol
from zerorun.documents.model import Document
from zerorun.documents.gojson import go_json, to_text
from zerorun.documents.params import ENV_PREFIX, REDACTED, coerce_parameters


def _forms(value: Any) -> set[str]:
    """Every text form of ``value`` that rendering can produce, also after SSM substitution's
    ``$$`` -> ``$`` rule."""
    forms = _plain_forms(value)
    return forms | {form.replace("$$", "$") for form in forms}


def _plain_forms(value: Any) -> set[str]:
    if isinstance(value, dict):
        forms = {to_text(value)}
        for item in value.values():
            forms |= _plain_forms(item)
        return forms
    if isinstance(value, (list, tuple)):
        forms = {to_text(list(value))}
        for item in value:
            forms |= _plain_forms(item)
        return forms
    text = to_text(value)
    # JSON string escaping as Go writes it (values inside longer JSON) and as msgspec does (an
    # aws:downloadContent step's spec): they differ on < > & U+2028 U+2029
    return {text, shlex.quote(text), go_json(text)[1:-1], msgspec.json.encode(text).decode()[1:-1]}


def secret_pattern(secrets: Iterable[Any]) -> re.Pattern[str] | None:
    """One pattern matching every text form of every value in ``secrets`` (None: no secrets)."""
    forms: set[str] = set()
    for value in secrets:
        forms |= _forms(value)
    forms.discard("")
    if not forms:
        return None
    # Longest first: at each position the whole JSON of a list wins over one of its items.
    return re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))


def secret_values(doc: Document, values: dict[str, Any]) -> list[Any]:
    """The values of ``doc``'s secret parameters among ``values`` (validated values)."""
    return [value for name, value in values.items()
            if name in doc.parameters and doc.parameters[name].secret]


def secret_env_names(doc: Document) -> set[str]:
    """The environment variables that carry ``doc``'s secret parameters."""
    return {prefix + name for name, spec in doc.parameters.items() if spec.secret
            for prefix in (ENV_PREFIX, "SSM_")}


def redact_step(step: protocol.Step, pattern: re.Pattern[str] | None,
                secret_vars: set[str] | frozenset[str]) -> protocol.Step:
    """A copy of ``step`` with every match of ``pattern`` replaced by ``***`` in the script,
    interpreter, working directory, env values and precondition operands, and the variables
    ``secret_vars`` shown as ``***``."""
    def sub(text: str) -> str:
        return pattern.sub(REDACTED, text) if pattern is not None and text else text

    precondition = step.precondition
    if precondition is not None:
        precondition = msgspec.structs.replace(precondition, operands=[sub(v) for v in precondition.operands])
    env = {k: REDACTED if k in secret_vars else sub(v) for k, v in step.env.items()}
    return msgspec.structs.replace(
        step, script=sub(step.script), interpreter=[sub(v) for v in step.interpreter],
        working_directory=sub(step.working_directory), env=env, precondition=precondition)


def redact_steps(doc: Document, parameters: dict[str, Any],
                 steps: list[protocol.Step]) -> list[protocol.Step]:
    """Copies of ``steps`` (as rendered from ``doc`` with ``parameters``) with every secret
    parameter's value replaced by ``***``. ``steps`` themselves are left untouched. (A composite
    document's steps come redacted from ``render``, which knows every level's secrets.)"""
    pattern = secret_pattern(secret_values(doc, coerce_parameters(doc, parameters)))
    secret_vars = secret_env_names(doc)
    return [redact_step(step, pattern, secret_vars) for step in steps]
