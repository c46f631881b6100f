"""Redaction of rendered steps: what the broker shows instead of what it delivers.

The broker keeps the real steps (an agent needs the secret) and shows ``redact_steps(...)``:
every form in which a secret parameter's value can appear in rendered text is replaced by
``***``: the text itself, its shell-quoted form (``| quote``), its JSON string escaping, and for
a StringList/StringMap the compact JSON of the whole value plus each item or map value.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import msgspec

from zerorun import protocol
from zerorun.documents.model import Document
from zerorun.documents.params import ENV_PREFIX, REDACTED, coerce_parameters
from zerorun.documents.templating import go_json, to_text


def _forms(value: Any) -> set[str]:
    """Every text form of ``value`` that rendering can produce."""
    if isinstance(value, dict):
        forms = {to_text(value)}
        for item in value.values():
            forms |= _forms(item)
        return forms
    if isinstance(value, (list, tuple)):
        forms = {to_text(list(value))}
        for item in value:
            forms |= _forms(item)
        return forms
    text = to_text(value)
    return {text, shlex.quote(text), go_json(text)[1:-1]}


def _secret_pattern(doc: Document, parameters: dict[str, Any]) -> re.Pattern[str] | None:
    values = coerce_parameters(doc, parameters)
    forms: set[str] = set()
    for name, value in values.items():
        if doc.parameters[name].secret:
            forms |= _forms(value)
    forms.discard("")
    if not forms:
        return None
    # Longest first: at each position the whole JSON of a list wins over one of its items.
    return re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))


def redact_steps(doc: Document, parameters: dict[str, Any],
                 steps: list[protocol.Step]) -> list[protocol.Step]:
    """Copies of ``steps`` (as rendered from ``doc`` with ``parameters``) with every secret
    parameter's value replaced by ``***`` in the script, interpreter, working directory, env
    values and precondition operands. ``steps`` themselves are left untouched."""
    pattern = _secret_pattern(doc, parameters)
    secret_vars = {prefix + name for name, spec in doc.parameters.items() if spec.secret
                   for prefix in (ENV_PREFIX, "SSM_")}

    def sub(text: str) -> str:
        return pattern.sub(REDACTED, text) if pattern is not None and text else text

    redacted = []
    for step in steps:
        precondition = step.precondition
        if precondition is not None:
            precondition = msgspec.structs.replace(
                precondition, operands=[sub(v) for v in precondition.operands])
        env = {k: REDACTED if k in secret_vars else sub(v) for k, v in step.env.items()}
        redacted.append(msgspec.structs.replace(
            step, script=sub(step.script), interpreter=[sub(v) for v in step.interpreter],
            working_directory=sub(step.working_directory), env=env, precondition=precondition))
    return redacted
