"""``allowedPattern`` in SSM's syntax and meaning (Go's RE2), checked with Python's ``re``.

amazon-ssm-agent checks every parameter value against ``allowedPattern`` with Go's ``regexp``
(``agent/framework/docparser/paramvalidator/allowedregexparamvalidator``), whose syntax is RE2's.
Python's ``re`` reads many patterns differently, silently: ``\\d``, ``\\w``, ``\\s`` and ``\\b``
are Unicode there (``^\\d+$`` takes ``"١٢٣"``), ``[[:alpha:]]`` is a set of the characters
``[:alph`` followed by ``]``, ``$`` also matches before a final newline, ``a{,3}`` is a
repetition (a literal in RE2), ``\\12`` a back-reference (octal in RE2); and it refuses ``\\z``,
``\\Q...\\E``, ``\\x{41}``, ``(?<name>...)``, ``(?U)`` and flags after the start, which RE2 takes.
So the pattern is translated, atom by atom, into a Python pattern that means what RE2 means,
and what RE2 refuses is refused here too (lookaround, back-references, atomic groups,
possessive quantifiers, ``\\Z``, repeat counts over 1000), so that a document means the same in
SSM and here. Unicode classes (``\\pL``, ``\\p{Greek}``) have no ``re`` equivalent: refused.

Whether the whole value must match stays Zerorun's rule (``re.fullmatch``), stricter than the
agent's ``MatchString`` (which finds the pattern anywhere unless it says ``^...$``).
"""

from __future__ import annotations

import functools
import re

MAX_REPEAT = 1000  # Go's regexp/syntax: "invalid repeat count" above it

_PERL = {  # RE2's Perl classes: ASCII only (Go's regexp/syntax perl_groups.go)
    "d": "0-9",
    "s": "\\t\\n\\f\\r ",
    "w": "0-9A-Za-z_",
}
_POSIX = {  # RE2's [:name:] classes, ASCII only
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_SIMPLE_ESCAPES = {"a": "\\a", "f": "\\f", "t": "\\t", "n": "\\n", "r": "\\r", "v": "\\v"}
_WORD = "[0-9A-Za-z_]"
_BOUNDARY = f"(?:(?<={_WORD})(?!{_WORD})|(?<!{_WORD})(?={_WORD}))"
_NOT_BOUNDARY = f"(?:(?<={_WORD})(?={_WORD})|(?<!{_WORD})(?!{_WORD}))"
_REPEAT_RE = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


class PatternError(ValueError):
    """The pattern is not RE2 syntax, or uses what cannot be checked here. ``str()``: one line."""


def _complement(ranges: str) -> str:
    """The class content of every character not in ``ranges`` (a class content of ``_PERL`` or
    ``_POSIX``), as explicit ranges: ``[^...]`` cannot stand inside another class."""
    inside = set()
    for match in re.finditer(r"(\\x..|\\.|[^\\])(?:-(\\x..|\\.|[^\\]))?", ranges):
        low = _unescape(match.group(1))
        high = _unescape(match.group(2)) if match.group(2) else low
        inside.update(range(ord(low), ord(high) + 1))
    out, start = [], None
    for code in range(0, 0x80):
        if code not in inside and start is None:
            start = code
        elif code in inside and start is not None:
            out.append(f"\\x{start:02x}-\\x{code - 1:02x}")
            start = None
    out.append(f"\\x{start:02x}-\\U0010ffff" if start is not None else "\\x80-\\U0010ffff")
    return "".join(out)


def _unescape(text: str) -> str:
    if not text.startswith("\\"):
        return text
    return {"t": "\t", "n": "\n", "f": "\f", "r": "\r", "v": "\v"}.get(text[1], None) or (
        chr(int(text[2:4], 16)) if text[1] == "x" else text[1])


class _Translator:
    def __init__(self, pattern: str):
        self.src = pattern
        self.pos = 0
        self.out: list[str] = []
        # one frame per open group: (case-insensitive, multi-line, dot-all, ungreedy)
        self.flags: list[list[bool]] = [[False, False, False, False]]
        self.can_repeat = False  # the last thing emitted is an atom a quantifier may follow
        self.repeated = False  # ... and it already has one

    def fail(self, what: str) -> PatternError:
        return PatternError(f"{what} at position {self.pos} (allowedPattern is RE2 syntax, as in SSM)")

    def atom(self, text: str, foldable: bool = True) -> None:
        if foldable and self.flags[-1][0]:
            text = f"(?i:{text})"
        self.out.append(text)
        self.can_repeat, self.repeated = True, False

    def translate(self) -> str:
        src = self.src
        while self.pos < len(src):
            c = src[self.pos]
            self.pos += 1
            if c == "\\":
                self.escape()
            elif c == "[":
                self.atom(self.char_class())
            elif c == "(":
                self.group()
            elif c == ")":
                if len(self.flags) == 1:
                    raise self.fail("unexpected )")
                self.flags.pop()
                self.out.append(")")
                self.can_repeat, self.repeated = True, False
            elif c == "|":
                self.out.append("|")
                self.can_repeat = False
            elif c in "*+?":
                self.quantifier(c)
            elif c == "{" and _REPEAT_RE.match(src, self.pos - 1):
                match = _REPEAT_RE.match(src, self.pos - 1)
                assert match is not None
                self.pos = match.end()
                low = int(match.group(1))
                high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else -1)
                if low > MAX_REPEAT or high > MAX_REPEAT or (high != -1 and high < low):
                    raise self.fail(f"invalid repeat count {match.group(0)}")
                self.quantifier(match.group(0))
            elif c == "^":
                self.atom("(?m:^)" if self.flags[-1][1] else "\\A", foldable=False)
                self.can_repeat = False
            elif c == "$":
                self.atom("(?m:$)" if self.flags[-1][1] else "\\Z", foldable=False)
                self.can_repeat = False
            elif c == ".":
                self.atom("(?s:.)" if self.flags[-1][2] else "[^\\n]", foldable=False)
            else:
                self.atom(re.escape(c))
        if len(self.flags) != 1:
            raise self.fail("missing )")
        return "".join(self.out)

    def quantifier(self, text: str) -> None:
        if not self.can_repeat:
            raise self.fail(f"missing argument to repetition operator {text}")
        if self.repeated:
            raise self.fail(f"invalid nested repetition operator {text}")
        lazy = self.src.startswith("?", self.pos)
        if lazy:
            self.pos += 1
        if self.src.startswith(("+", "*"), self.pos) or (self.src.startswith("?", self.pos)):
            raise self.fail("invalid nested repetition operator (RE2 has no possessive quantifiers)")
        if self.flags[-1][3]:  # (?U): greedy and lazy swap
            lazy = not lazy
        self.out.append(text + ("?" if lazy else ""))
        self.repeated = True

    def group(self) -> None:
        src = self.src
        if not src.startswith("?", self.pos):
            self.flags.append(list(self.flags[-1]))
            self.out.append("(")
            self.can_repeat = False
            return
        self.pos += 1
        for prefix in ("P<", "<"):
            if src.startswith(prefix, self.pos) and not src.startswith(("<=", "<!"), self.pos):
                end = src.find(">", self.pos)
                name = src[self.pos + len(prefix):end] if end >= 0 else ""
                if not _NAME_RE.fullmatch(name):
                    raise self.fail("invalid named capture")
                self.pos = end + 1
                self.flags.append(list(self.flags[-1]))
                self.out.append(f"(?P<{name}>")
                self.can_repeat = False
                return
        match = re.compile(r"([imsU]*)(?:-([imsU]*))?([:)])").match(src, self.pos)
        if match is None or (match.group(2) is not None and not match.group(2)) or match.group(0) == ")":
            kinds = {"=": "lookahead", "!": "lookahead", "<": "lookbehind", ">": "atomic groups",
                     "#": "comments", "(": "conditionals", "P": "back-references"}
            kind = kinds.get(src[self.pos:self.pos + 1])
            raise self.fail(f"RE2 has no {kind}" if kind else "invalid or unsupported Perl syntax (?")
        self.pos = match.end()
        flags = list(self.flags[-1])
        for on, letters in ((True, match.group(1)), (False, match.group(2) or "")):
            for letter in letters:
                flags["imsU".index(letter)] = on
        if match.group(3) == ")":  # (?i): from here to the end of the enclosing group
            self.flags[-1] = flags
            return
        self.flags.append(flags)
        self.out.append("(?:")
        self.can_repeat = False

    def escape(self) -> None:
        src = self.src
        if self.pos >= len(src):
            raise self.fail("trailing backslash")
        c = src[self.pos]
        self.pos += 1
        if c in _PERL or c.lower() in _PERL:
            self.atom(f"[{_PERL[c]}]" if c in _PERL else f"[{_complement(_PERL[c.lower()])}]")
        elif c == "b":
            self.atom(_BOUNDARY, foldable=False)
            self.can_repeat = False
        elif c == "B":
            self.atom(_NOT_BOUNDARY, foldable=False)
            self.can_repeat = False
        elif c == "A":
            self.atom("\\A", foldable=False)
            self.can_repeat = False
        elif c == "z":
            self.atom("\\Z", foldable=False)
            self.can_repeat = False
        elif c == "Q":
            end = src.find("\\E", self.pos)
            literal = src[self.pos:] if end < 0 else src[self.pos:end]
            self.pos = len(src) if end < 0 else end + 2
            for char in literal:  # each its own atom, as RE2 reads them: \Qab\E* repeats the b
                self.atom(re.escape(char))
        elif c in "pP":
            raise self.fail(f"Unicode classes (\\{c}...) cannot be checked here: use ASCII ranges")
        else:
            self.atom(self.char_escape(c))

    def char_escape(self, c: str) -> str:
        """One escaped character (outside or inside a class) as Python text for it."""
        src = self.src
        if c in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[c]
        if c in "01234567":
            if c != "0" and not (self.pos < len(src) and src[self.pos] in "01234567"):
                raise self.fail(f"RE2 has no back-references (\\{c})")
            digits = c
            while len(digits) < 3 and self.pos < len(src) and src[self.pos] in "01234567":
                digits += src[self.pos]
                self.pos += 1
            return f"\\x{int(digits, 8):02x}"
        if c == "x":
            match = re.compile(r"\{([0-9A-Fa-f]{1,8})\}|([0-9A-Fa-f]{2})").match(src, self.pos)
            if match is None or int(match.group(1) or match.group(2), 16) > 0x10FFFF:
                raise self.fail("invalid escape sequence \\x")
            self.pos = match.end()
            return f"\\U{int(match.group(1) or match.group(2), 16):08x}"
        if c.isascii() and not c.isalnum():  # RE2: any ASCII punctuation may be escaped
            return re.escape(c)
        raise self.fail(f"invalid escape sequence \\{c}" + (" (RE2 has \\z, not \\Z)" if c == "Z" else ""))

    def char_class(self) -> str:
        src = self.src
        start = self.pos - 1
        negated = src.startswith("^", self.pos)
        if negated:
            self.pos += 1
        items: list[str] = []
        first = True
        while True:
            if self.pos >= len(src):
                self.pos = start
                raise self.fail("missing closing ]")
            c = src[self.pos]
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            if c == "[" and src.startswith("[:", self.pos):
                end = src.find(":]", self.pos + 2)
                name = src[self.pos + 2:end] if end >= 0 else ""
                bare = name.lstrip("^")
                if end >= 0 and bare in _POSIX:
                    self.pos = end + 2
                    items.append(_POSIX[bare] if bare == name else _complement(_POSIX[bare]))
                    continue
                if end >= 0 and re.fullmatch(r"\^?[a-z]+", name):
                    raise self.fail(f"invalid character class range [:{name}:]")
            if c == "\\" and self.pos + 1 < len(src) and src[self.pos + 1].lower() in _PERL:
                e = src[self.pos + 1]
                self.pos += 2
                items.append(_PERL[e] if e in _PERL else _complement(_PERL[e.lower()]))
                continue
            low = self.class_char()
            if src.startswith("-", self.pos) and not src.startswith("-]", self.pos):
                self.pos += 1
                if self.pos >= len(src):
                    continue  # missing ], reported above
                high = self.class_char()
                if high[1] < low[1]:
                    raise self.fail("invalid character class range")
                items.append(f"{low[0]}-{high[0]}")
            else:
                items.append(low[0])
        return "[" + ("^" if negated else "") + "".join(items) + "]"

    def class_char(self) -> tuple[str, int]:
        """One character in a class as (Python text, code point)."""
        src = self.src
        c = src[self.pos]
        self.pos += 1
        if c != "\\":
            return (re.escape(c) if c in "\\]^-[&~|" else c), ord(c)
        if self.pos >= len(src):
            raise self.fail("trailing backslash")
        e = src[self.pos]
        self.pos += 1
        if e in "pP":
            raise self.fail(f"Unicode classes (\\{e}...) cannot be checked here: use ASCII ranges")
        text = self.char_escape(e)
        return text, ord(_class_value(text))


def _class_value(text: str) -> str:
    """The character a translated escape stands for."""
    if text.startswith("\\U") or text.startswith("\\x"):
        return chr(int(text[2:], 16))
    if text.startswith("\\") and len(text) == 2:
        return {"a": "\a", "f": "\f", "t": "\t", "n": "\n", "r": "\r", "v": "\v"}.get(text[1], text[1])
    return text


def translate(pattern: str) -> str:
    """The Python ``re`` pattern that means what RE2 means by ``pattern`` (PatternError)."""
    return _Translator(pattern).translate()


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``pattern`` (RE2 syntax) compiled for ``re`` (PatternError, one line)."""
    text = translate(pattern)
    try:
        return re.compile(text)
    except re.error as exc:
        raise PatternError(f"{exc.msg} (allowedPattern is RE2 syntax, as in SSM)") from None
    except RecursionError:
        raise PatternError("nested too deeply") from None
