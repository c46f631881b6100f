"""The two template languages of documents, and which one a document uses.

* ``ssm``: amazon-ssm-agent's substitution (``ssm_substitution``): declared ``{{ name }}`` tokens
  are replaced, every other character runs as written. The language of every SSM document.
* ``jinja``: sandboxed Jinja2 (``jinja_language``) with undefined names as errors, the ``quote``
  filter and blocks. Zerorun's own language, for documents that ask for it.

Which one (``language_of``): the top-level key ``templating: ssm`` or ``templating: jinja`` when
the document has it; otherwise ``jinja`` when any step uses the Zerorun-only ``runScript`` action
(such a document cannot be an SSM document), otherwise ``ssm``.

Both languages share ``interpolationType: ENV_VAR`` (the script text gets a quoted variable
reference, ``EnvRef``) and print non-string values inside longer strings as Go JSON.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from typing import Any

from zerorun.documents.gojson import to_text

SSM = "ssm"
JINJA = "jinja"
LANGUAGES = (SSM, JINJA)
DESCRIPTIONS = {SSM: "SSM substitution", JINJA: "Jinja2"}

_PARAM_STORE_RE = re.compile(r"\{\{\s*(ssm|ssm-secure|resolve)\s*:", re.IGNORECASE)


class EnvRef(str):
    """The rendering of an ``interpolationType: ENV_VAR`` parameter: a shell variable reference,
    already double-quoted, that the ``quote`` filter passes through unchanged."""


def language_of(marker: Any, actions: Iterable[str]) -> str:
    """The document's template language from its ``templating`` key (None: absent) and actions.
    Raises ValueError with a one-line message for a marker that names no language."""
    if marker is not None:
        if marker not in LANGUAGES:
            raise ValueError(f"templating must be {' or '.join(LANGUAGES)}, got {marker!r}")
        return str(marker)
    return JINJA if "runScript" in set(actions) else SSM


def has_param_store_ref(text: str) -> bool:
    return bool(_PARAM_STORE_RE.search(text))


def quote(value: Any) -> str:
    """``{{ x | quote }}``: shell-quote a value; a list becomes its quoted items joined by spaces."""
    if isinstance(value, EnvRef):
        return value
    if isinstance(value, (list, tuple)):
        return " ".join(quote(item) for item in value)
    return shlex.quote(to_text(value))


def check_template(language: str, text: str, declared: set[str]) -> str | None:
    """What is wrong with one document string in ``language``, or None."""
    if language == JINJA:
        from zerorun.documents.jinja_language import check_template as check_jinja

        return check_jinja(text, declared)
    from zerorun.documents.ssm_substitution import jinja_syntax

    snippet = jinja_syntax(text, declared)
    if snippet is None:
        return None
    return (f"{snippet} is Jinja syntax, but this document uses SSM substitution, which would run it "
            f"as written: add 'templating: jinja' at the top of the document to render it with Jinja")


class Templates:
    """Renders a document's strings in its language with one set of values (``context``)."""

    def __init__(self, language: str, context: dict[str, Any]):
        self.language = language
        if language == JINJA:
            from zerorun.documents.jinja_language import render_value

            self._render_string = lambda text: render_value(text, context)
        else:
            from zerorun.documents.ssm_substitution import SsmSubstitution

            self._render_string = SsmSubstitution(context).replace

    def render(self, value: Any) -> Any:
        """A string, or every string inside lists and map values; anything else as it is.
        Jinja errors propagate (the caller names the step)."""
        if isinstance(value, str):
            return self._render_string(value)
        if isinstance(value, list):
            return [self.render(item) for item in value]
        if isinstance(value, dict):
            return {key: self.render(item) for key, item in value.items()}
        return value
