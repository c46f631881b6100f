"""``allowedPattern`` as SSM reads it: RE2, through the RE2 library's own binding (google-re2).

amazon-ssm-agent checks every parameter value against ``allowedPattern`` with Go's ``regexp``
(``agent/framework/docparser/paramvalidator/allowedregexparamvalidator``), whose syntax and
meaning are RE2's. Python's ``re`` reads many patterns otherwise, silently: ``\\d``, ``\\w``,
``\\s`` and ``\\b`` are Unicode there (``^\\d+$`` takes ``"١٢٣"``), ``[[:alpha:]]`` is the set
``[:alph`` followed by ``]``, ``a{,3}`` a repetition (a literal in RE2), ``\\12`` a back-reference
(octal in RE2), ``(?i)`` folds wider than Go; it refuses ``\\z``, ``\\Q...\\E``, ``\\x{41}``,
``\\pL`` and ``(?U)``, and takes lookaround and back-references, which SSM's agent cannot compile.
RE2 itself means what SSM means, refuses what SSM refuses, and matches in linear time.

Whether the whole value must match stays Zerorun's rule (``fullmatch``), stricter than the
agent's ``MatchString`` (which finds the pattern anywhere unless it says ``^...$``).
"""

from __future__ import annotations

import functools
from typing import Any


class PatternError(ValueError):
    """The pattern is not RE2 syntax. ``str()``: one line."""


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> Any:
    """The compiled pattern (its ``fullmatch(text)`` is None when ``text`` does not match)."""
    import re2  # google-re2: imported by the first document that has a pattern

    options = re2.Options()
    options.log_errors = False  # a refused pattern is the caller's one-line error, not RE2's log
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(f"{reason} (allowedPattern is RE2 syntax, as in SSM)") from None


def full_match(pattern: str, text: str) -> bool:
    """Whether ``text`` as a whole matches ``pattern`` (compiled once). Text that is not Unicode
    (a lone surrogate: bytes that were not UTF-8, as Python decodes them) matches nothing."""
    try:
        return compile_pattern(pattern).fullmatch(text) is not None
    except UnicodeEncodeError:
        return False
