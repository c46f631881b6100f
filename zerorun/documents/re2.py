"""``allowedPattern`` in SSM's syntax and meaning (Go's RE2), checked with Python's ``re``.

amazon-ssm-agent checks every parameter value against ``allowedPattern`` with Go's ``regexp``
(``agent/framework/docparser/paramvalidator/allowedregexparamvalidator``), whose syntax is RE2's.
Python's ``re`` reads many patterns differently, silently: ``\\d``, ``\\w``, ``\\s`` and ``\\b``
are Unicode there (``^\\d+$`` takes ``"١٢٣"``), ``[[:alpha:]]`` is a set of the characters
``[:alph`` followed by ``]``, ``$`` also matches before a final newline, ``a{,3}`` is a
repetition (a literal in RE2), ``\\12`` a back-reference (octal in RE2); and it refuses ``\\z``,
``\\Q...\\E``, ``\\x{41}``, ``(?<name>...)``, ``(?U)`` and flags after the start, which RE2 takes.
Under ``(?i)`` Python folds wider than Go (its ``(?i)i`` takes the Turkish ı and İ), so no
Python flag is used for it: each letter and class is spelt out with Go's folding (ASCII letters,
k and the Kelvin sign, s and the long s; other letters by their one-character upper and lower
case, which approximates Go's orbits). So the pattern is translated, atom by atom, into a Python
pattern that means what RE2 means, and what RE2 refuses is refused here too (lookaround, back-references, atomic groups,
possessive quantifiers, ``\\Z``, repeat counts over 1000), so that a document means the same in
SSM and here. Unicode classes (``\\pL``, ``\\p{Greek}``) have no ``re`` equivalent: refused.

Whether the whole value must match stays Zerorun's rule (``re.fullmatch``), stricter than the
agent's ``MatchString`` (which finds the pattern anywhere unless it says ``^...$``).
"""

from __future__ import annotations

import functools
import re

MAX_REPEAT = 1000  # Go's regexp/syntax: "invalid repeat count" above it

Ranges = list[tuple[int, int]]  # code point ranges, both ends included


def _r(*spans: str) -> Ranges:
    return [(ord(span[0]), ord(span[-1])) for span in spans]


_PERL: dict[str, Ranges] = {  # RE2's Perl classes: ASCII only (Go's regexp/syntax perl_groups.go)
    "d": _r("09"), "s": _r("\t", "\n", "\f", "\r", " "), "w": _r("09", "AZ", "az", "_"),
}
_POSIX: dict[str, Ranges] = {  # RE2's [:name:] classes, ASCII only
    "alnum": _r("09", "AZ", "az"), "alpha": _r("AZ", "az"), "ascii": [(0, 0x7F)], "blank": _r("\t", " "),
    "cntrl": [(0, 0x1F), (0x7F, 0x7F)], "digit": _r("09"), "graph": _r("!~"), "lower": _r("az"),
    "print": _r(" ~"), "punct": _r("!/", ":@", "[`", "{~"), "space": _r("\t\r", " "), "upper": _r("AZ"),
    "word": _r("09", "AZ", "az", "_"), "xdigit": _r("09", "AF", "af"),
}
MAX_RUNE = 0x10FFFF
_KELVIN, _LONG_S = 0x212A, 0x17F  # in Go's case-fold orbits of k and s (unicode.SimpleFold)


def _complement(ranges: Ranges) -> Ranges:
    out, low = [], 0
    for lo, hi in sorted(ranges):
        if lo > low:
            out.append((low, lo - 1))
        low = max(low, hi + 1)
    if low <= MAX_RUNE:
        out.append((low, MAX_RUNE))
    return out


def _fold(ranges: Ranges) -> Ranges:
    """``ranges`` with the characters they match under ``(?i)``: RE2 folds ASCII letters to their
    other case, k to the Kelvin sign and s to the long s (and back); other characters by Python's
    one-character lower/upper case, in short ranges (an approximation of Go's orbits there)."""
    extra: set[int] = set()
    for lo, hi in ranges:
        for code in range(max(lo, 0x41), min(hi, 0x7A) + 1):
            char = chr(code)
            if char.isalpha():
                extra.add(ord(char.swapcase()))
                if char in "kK":
                    extra.add(_KELVIN)
                if char in "sS":
                    extra.add(_LONG_S)
        if lo <= _KELVIN <= hi:
            extra.update((0x4B, 0x6B))
        if lo <= _LONG_S <= hi:
            extra.update((0x53, 0x73))
        if hi >= 0x80 and hi - max(lo, 0x80) < 1024:
            for code in range(max(lo, 0x80), hi + 1):
                for other in (chr(code).lower(), chr(code).upper()):
                    if len(other) == 1 and ord(other) >= 0x80:
                        extra.add(ord(other))
    return ranges + [(code, code) for code in sorted(extra)]


def _class_text(ranges: Ranges, negated: bool = False) -> str:
    if not ranges:  # RE2 takes an empty class: it matches nothing (negated: anything)
        ranges, negated = [(0, MAX_RUNE)], not negated
    body = "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)
    return "[" + ("^" if negated else "") + body + "]"


_SIMPLE_ESCAPES = {"a": 7, "f": 12, "t": 9, "n": 10, "r": 13, "v": 11}
_WORD = "[0-9A-Za-z_]"
_BOUNDARY = f"(?:(?<={_WORD})(?!{_WORD})|(?<!{_WORD})(?={_WORD}))"
_NOT_BOUNDARY = f"(?:(?<={_WORD})(?={_WORD})|(?<!{_WORD})(?!{_WORD}))"
_REPEAT_RE = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


class PatternError(ValueError):
    """The pattern is not RE2 syntax, or uses what cannot be checked here. ``str()``: one line."""


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

    def atom(self, text: str) -> None:
        self.out.append(text)
        self.can_repeat, self.repeated = True, False

    def literal(self, code: int) -> None:
        """One character, matched as RE2 matches it: under ``(?i)`` with Go's case folding, spelt
        out as a class (Python's own folding is wider: its ``(?i)i`` takes the Turkish ı and İ)."""
        if self.flags[-1][0]:
            ranges = _fold([(code, code)])
            if len(ranges) > 1:
                self.atom(_class_text(ranges))
                return
        self.atom(re.escape(chr(code)) if 0x20 < code < 0x7F else f"\\U{code:08x}")

    def group_class(self, ranges: Ranges, negated: bool) -> Ranges:
        """A Perl or POSIX class as RE2 appends it: folded under ``(?i)``, then negated."""
        if self.flags[-1][0]:
            ranges = _fold(ranges)
        return _complement(ranges) if negated else ranges

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
                self.atom("(?m:^)" if self.flags[-1][1] else "\\A")
                self.can_repeat = False
            elif c == "$":
                self.atom("(?m:$)" if self.flags[-1][1] else "\\Z")
                self.can_repeat = False
            elif c == ".":
                self.atom("(?s:.)" if self.flags[-1][2] else "[^\\n]")
            else:
                self.literal(ord(c))
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
        if c.lower() in _PERL:
            self.atom(_class_text(self.group_class(_PERL[c.lower()], c.isupper())))
        elif c in "bBAz":
            self.atom({"b": _BOUNDARY, "B": _NOT_BOUNDARY, "A": "\\A", "z": "\\Z"}[c])
            self.can_repeat = False
        elif c == "Q":
            end = src.find("\\E", self.pos)
            literal = src[self.pos:] if end < 0 else src[self.pos:end]
            self.pos = len(src) if end < 0 else end + 2
            for char in literal:  # each its own atom, as RE2 reads them: \Qab\E* repeats the b
                self.literal(ord(char))
        elif c in "pP":
            raise self.fail(f"Unicode classes (\\{c}...) cannot be checked here: use ASCII ranges")
        else:
            self.literal(self.char_escape(c))

    def char_escape(self, c: str) -> int:
        """The character an escape (outside or inside a class) stands for."""
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
            return int(digits, 8)
        if c == "x":
            match = re.compile(r"\{([0-9A-Fa-f]{1,8})\}|([0-9A-Fa-f]{2})").match(src, self.pos)
            if match is None or int(match.group(1) or match.group(2), 16) > 0x10FFFF:
                raise self.fail("invalid escape sequence \\x")
            self.pos = match.end()
            return int(match.group(1) or match.group(2), 16)
        if c.isascii() and not c.isalnum():  # RE2: any ASCII punctuation may be escaped
            return ord(c)
        raise self.fail(f"invalid escape sequence \\{c}" + (" (RE2 has \\z, not \\Z)" if c == "Z" else ""))

    def char_class(self) -> str:
        src = self.src
        start = self.pos - 1
        negated = src.startswith("^", self.pos)
        if negated:
            self.pos += 1
        items: Ranges = []
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
                    items.extend(self.group_class(_POSIX[bare], bare != name))
                    continue
                if end >= 0 and re.fullmatch(r"\^?[a-z]+", name):
                    raise self.fail(f"invalid character class range [:{name}:]")
            if c == "\\" and self.pos + 1 < len(src) and src[self.pos + 1].lower() in _PERL:
                e = src[self.pos + 1]
                self.pos += 2
                items.extend(self.group_class(_PERL[e.lower()], e.isupper()))
                continue
            low = self.class_char()
            if src.startswith("-", self.pos) and not src.startswith("-]", self.pos):
                self.pos += 1
                if self.pos >= len(src):
                    continue  # missing ], reported above
                high = self.class_char()
                if high < low:
                    raise self.fail("invalid character class range")
                span = [(low, high)]
            else:
                span = [(low, low)]
            items.extend(_fold(span) if self.flags[-1][0] else span)
        return _class_text(items, negated)

    def class_char(self) -> int:
        """One character in a class."""
        src = self.src
        c = src[self.pos]
        self.pos += 1
        if c != "\\":
            return ord(c)
        if self.pos >= len(src):
            raise self.fail("trailing backslash")
        e = src[self.pos]
        self.pos += 1
        if e in "pP":
            raise self.fail(f"Unicode classes (\\{e}...) cannot be checked here: use ASCII ranges")
        return self.char_escape(e)


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
