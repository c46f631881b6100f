"""SSM's own parameter substitution, rule for rule as amazon-ssm-agent does it.

Read from aws/amazon-ssm-agent ``agent/framework/docparser/parameters/parameters.go``
(``ReplaceParameters``, ``isSingleParameterString``, ``ReplaceParameter``, ``convertToString``)
at commit 1c217c89b42d (2024-10-21); its cases are pinned in
``tests/unit/documents/test_ssm_substitution.py``. The rules:

1. Only strings change. Maps are walked value by value (keys stay as written), lists item by
   item; numbers, booleans and nulls written in the document stay what they are.
2. A string that is exactly one declared parameter's token (``{{``, optional spaces, the name,
   optional spaces, ``}}``, nothing before or after, not even a newline) becomes the value
   itself: a StringList stays a list, a StringMap a map, an Integer a number.
3. In any other string, every declared parameter's token is replaced, left to right in one pass,
   by the value as text: a string as it is, anything else as compact JSON written like Go's
   ``json.Marshal``; in that text ``$$`` becomes ``$``. A substituted value is never scanned
   again: a value that reads ``{{ other }}`` stays as written.
4. Everything else is text that runs as written: ``{{ undeclared }}``, Go templates
   (``{{.Names}}``), ``${{ x }}``'s outer characters, mustache, ``{{ name | quote }}``.

"Spaces" are Go regexp's ``\\s``: space, tab, newline, carriage return and form feed.

Two deliberate extensions, both about names SSM never sees: the agent applies rule 2 only to
names of letters and digits (it drops any other parameter a command passes), while Zerorun's
names may also contain ``_`` and follow rule 2 too. Parameter Store references (``{{ssm:...}}``)
are refused when the document is loaded, as before.
"""

from __future__ import annotations

import re
from typing import Any

from zerorun.documents.gojson import go_json

_SPACE = "[\t\n\f\r ]*"  # Go's \s
_NAME = "[A-Za-z0-9_]+"
_SINGLE_RE = re.compile(r"\{\{" + _SPACE + "(" + _NAME + ")" + _SPACE + r"\}\}")
_JINJA_EXPRESSION_RE = re.compile(r"\{\{" + _SPACE + "(" + _NAME + ")" + _SPACE + r"[|.\[]")
_JINJA_BLOCK_RE = re.compile(r"\{%-?(.*?)-?%\}", re.DOTALL)
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def convert_to_string(value: Any) -> str:
    """``convertToString``: a string as it is, anything else as Go's ``json.Marshal`` (an
    unmarshalable value, NaN or infinity, as the empty string, after the agent's logged error)."""
    if isinstance(value, str):
        return value
    try:
        return go_json(value)
    except ValueError:
        return ""


class SsmSubstitution:
    """Substitution of one document's parameter values (``values``: name -> value)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values
        names = "|".join(re.escape(name) for name in sorted(values, key=len, reverse=True))
        self._token = re.compile(r"\{\{" + _SPACE + "(" + names + ")" + _SPACE + r"\}\}") if names else None
        self._texts: dict[str, str] = {}

    def single_parameter(self, text: str) -> str | None:
        """``isSingleParameterString``: the declared name when ``text`` is exactly its token."""
        match = _SINGLE_RE.fullmatch(text)
        return match.group(1) if match and match.group(1) in self.values else None

    def _text(self, name: str) -> str:
        text = self._texts.get(name)
        if text is None:
            text = self._texts[name] = convert_to_string(self.values[name]).replace("$$", "$")
        return text

    def replace_in_string(self, text: str) -> str:
        """``ReplaceParameter``: every declared token in ``text`` replaced by its value's text."""
        if self._token is None or "{{" not in text:
            return text
        return self._token.sub(lambda m: self._text(m.group(1)), text)

    def replace(self, value: Any) -> Any:
        """``ReplaceParameters``: the value with parameters substituted (a new object)."""
        if isinstance(value, str):
            name = self.single_parameter(value)
            if name is not None:
                return self.values[name]
            return self.replace_in_string(value)
        if isinstance(value, list):
            return [self.replace(item) for item in value]
        if isinstance(value, dict):
            return {key: self.replace(item) for key, item in value.items()}
        return value


def jinja_syntax(text: str, declared: set[str]) -> str | None:
    """The first Jinja construct in ``text`` that uses a declared parameter (``{{ name | quote }}``,
    ``{{ name.key }}``, ``{% if name %}``), else None.

    SSM substitution leaves such text as written, so a document that means Jinja but lacks its
    marker would run ``{{ name | quote }}`` literally. Refusing it names the fix instead.
    """
    if "{{" in text:
        for match in _JINJA_EXPRESSION_RE.finditer(text):
            if match.group(1) in declared:
                end = text.find("}}", match.end())
                return text[match.start():end + 2] if end >= 0 else text[match.start():match.end()]
    if "{%" in text:
        for match in _JINJA_BLOCK_RE.finditer(text):
            if any(word in declared for word in _WORD_RE.findall(match.group(1))):
                return match.group(0)
    return None
