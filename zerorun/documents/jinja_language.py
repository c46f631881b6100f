"""Sandboxed Jinja2 for Zerorun-native documents (``templating: jinja``, or a ``runScript`` step).

Why these settings:

* ``SandboxedEnvironment`` + ``StrictUndefined``: a document cannot reach Python internals, and a
  misspelt name is an error instead of silently rendering as an empty string.
* Comment delimiters are moved to ``\\x00{#`` / ``#}\\x00`` (NUL never occurs in a shell script),
  because bash's ``${#array[@]}`` contains Jinja's default comment start ``{#``. Line statements
  and line comments stay off (``#`` starts shell comments). Blocks (``{% if %}``) stay available.
* ``finalize`` prints values the way amazon-ssm-agent does when a parameter sits inside a longer
  string: strings as-is, everything else (StringList, StringMap, Integer, Boolean) as compact
  JSON, as Go's ``json.Marshal`` writes it (``["a","b"]``, ``true``, ``42``).
* A string that is exactly ``{{ name }}`` (SSM's single-parameter form) yields the value itself,
  not text, so ``runCommand: "{{ commands }}"`` becomes the list of commands.

Strings without ``{{``/``{%`` never go through Jinja: they come out byte for byte.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from zerorun.documents.gojson import to_text

RESERVED_NAMES = frozenset({"true", "false", "none", "True", "False", "None", "self", "loop"})
"""Names a parameter of a Jinja document cannot have: Jinja's literals (``{{ none }}`` inside a
longer string is None, never the parameter) and the objects it defines itself (``self``, and
``loop`` inside a for block)."""

_SINGLE_PARAM_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def is_templated(text: str) -> bool:
    return "{{" in text or "{%" in text


def single_param(text: str) -> str | None:
    """The parameter name when ``text`` is exactly ``{{ name }}`` (spaces allowed), else None."""
    match = _SINGLE_PARAM_RE.fullmatch(text)
    return match.group(1) if match else None


@lru_cache(maxsize=1)
def environment() -> Any:
    """The one shared sandboxed environment (jinja2 imported lazily: import cost)."""
    from jinja2 import StrictUndefined, Undefined
    from jinja2.sandbox import SandboxedEnvironment

    from zerorun.documents.templating import quote

    def finalize(value: Any) -> str:
        if isinstance(value, Undefined):
            return str(value)  # StrictUndefined raises, naming the missing name
        return to_text(value)

    env = SandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        comment_start_string="\x00{#",
        comment_end_string="#}\x00",
        line_statement_prefix=None,
        line_comment_prefix=None,
        keep_trailing_newline=True,
        finalize=finalize,
    )
    env.filters["quote"] = quote
    return env


def check_template(text: str, declared: set[str]) -> str | None:
    """An error message if ``text`` is not valid Jinja or uses an undeclared name, else None."""
    if not is_templated(text):
        return None
    from jinja2 import TemplateSyntaxError, meta

    env = environment()
    try:
        ast = env.parse(text)
    except TemplateSyntaxError as exc:
        return (f"template syntax error at line {exc.lineno}: {exc.message} (this document uses "
                f"Jinja; write a literal {{{{ as {{{{ '{{{{' }}}}, or use SSM substitution with "
                f"templating: ssm)")
    unknown = sorted(meta.find_undeclared_variables(ast) - declared - set(env.globals))
    if unknown:
        return "uses undeclared parameter " + ", ".join(repr(n) for n in unknown)
    return None


def render_value(text: str, context: dict[str, Any]) -> Any:
    """Render one document string: the raw value for ``{{ name }}``, otherwise text.

    Raises jinja2 errors (UndefinedError, SecurityError, ...) to the caller, which names the step.
    """
    if not is_templated(text):
        return text
    name = single_param(text)
    if name is not None and name in context:
        return context[name]
    return environment().from_string(text).render(context)
