"""``allowedPattern`` means what it means to SSM's agent: Go's RE2 syntax and ASCII classes
(amazon-ssm-agent ``agent/framework/docparser/paramvalidator/allowedregexparamvalidator``), not
Python's ``re``. Zerorun keeps its own rule that the whole value must match."""

from __future__ import annotations

import json

import pytest

from zerorun.documents import DocumentError, ParameterError, coerce_parameters, load_document


def _doc(pattern: str):
    return load_document(f"""
schemaVersion: "2.2"
parameters:
  p: {{type: String, allowedPattern: {json.dumps(pattern)}}}
mainSteps:
  - action: aws:runShellScript
    name: one
    inputs: {{runCommand: ["echo {{{{ p }}}}"]}}
""")


def _accepts(pattern: str, value: str) -> bool:
    doc = _doc(pattern)
    try:
        coerce_parameters(doc, {"p": value})
    except ParameterError as exc:
        assert "allowedPattern" in str(exc)
        return False
    return True


def _check(cases):
    assert [(p, v, _accepts(p, v)) for p, v, _ in cases] == cases


def test_perl_classes_and_word_boundaries_are_ascii():
    """Python's \\d \\w \\s \\b are Unicode: ``^\\d+$`` took Arabic-Indic digits."""
    _check([
        (r"^\d+$", "123", True), (r"^\d+$", "\u0661\u0662\u0663", False), (r"^\d+$", "\uff11", False),
        (r"^\w+$", "a_9", True), (r"^\w+$", "h\u00e9llo", False),
        (r"^\s*$", " \t\r\n", True), (r"^\s*$", "\u2003", False), (r"^\s*$", "\x0b", False),
        (r"^\s*$", "\x1c", False), (r"^[\D]+$", "x-", True), (r"^[\D]+$", "x1", False),
        (r"^[^\W]+$", "\u00e9", False), (r"^x\b.*$", "x y", True), (r"^x\b.*$", "x\u00e9", True),
    ])


def test_posix_classes():
    """Python read ``[[:alpha:]]`` as the set ``[:alph`` followed by ``]``."""
    _check([
        (r"^[[:alpha:]]+$", "abc", True), (r"^[[:alpha:]]+$", ":]", False),
        (r"^[[:^digit:]]+$", "ab", True), (r"^[[:^digit:]]+$", "a1", False), (r"^[[:xdigit:]]+$", "0fA", True),
    ])


def test_re2_syntax_that_python_refused():
    _check([
        (r"^[a-z]+\z", "abc", True), (r"^\QA.B\E$", "A.B", True), (r"^\QA.B\E$", "AxB", False),
        (r"^\x{41}+$", "AA", True), (r"^(?<n>a)$", "a", True), (r"(?U)^(a+)(a*)$", "aaa", True),
        # a flag after the start holds to the end of its group, across |
        (r"a(?i)b|c", "C", True), (r"a(?i)b|c", "aB", True), (r"(a(?i)b)c", "aBc", True), (r"(a(?i)b)c", "aBC", False),
    ])


def test_case_insensitive_matching_folds_as_go_does():
    """Python's ``(?i)`` also takes the Turkish ı and İ for ``i`` (``(?i)^[a-z]+$`` took them),
    and under it a negated class written out (``\\W``) took ``k`` through the Kelvin sign;
    Go folds ASCII letters to their other case, k to the Kelvin sign and s to the long s."""
    _check([
        (r"(?i)^[a-z]+$", "AbC", True), (r"(?i)^[a-z]+$", "\u0131", False), (r"(?i)^[a-z]+$", "\u0130", False),
        (r"(?i)^[a-z]+$", "\u212a\u017f", True), (r"(?i)^i$", "\u0131", False),
        (r"(?i)^\W$", "k", False), (r"(?i)^[\W]$", "s", False), (r"^\W$", "\u212a", True),
        (r"(?i)^[[:^lower:]]$", "A", False), (r"(?i)^[[:upper:]]$", "a", True), (r"(?i)^\QaB\E$", "Ab", True),
    ])


def test_characters_that_python_read_otherwise():
    _check([
        (r"^a{,3}$", "a{,3}", True), (r"^a{,3}$", "aa", False),  # a literal in RE2, a repetition in Python
        (r"^\12$", "\n", True),  # octal in RE2, a back-reference in Python
        (r"^[0-9]+$", "12", True), (r"^[a-z]+$", "abc\n", False),
    ])


def test_unicode_classes_are_go_s():
    """Python's ``re`` has no ``\\p{..}``; RE2 and Go have Unicode's categories and scripts."""
    _check([
        (r"^\pL+$", "h\u00e9llo", True), (r"^\pL+$", "a1", False), (r"^\p{Greek}+$", "\u03b1\u03b2", True),
        (r"^\p{Greek}+$", "ab", False), (r"^\PN+$", "ab", True),
    ])


def test_a_value_that_is_not_unicode_matches_nothing():
    """A lone surrogate (bytes that were not UTF-8 on a command line) cannot be RE2's text."""
    assert not _accepts(r"^.*$", "a\udcff")


# RE2's own reasons, as Go's regexp gives them
@pytest.mark.parametrize("pattern,problem", [
    (r"^(?=a)a$", "invalid perl operator: (?="), (r"^(?!a).$", "invalid perl operator: (?!"),
    (r"^(?<=a)b$", "invalid perl operator: (?<="), (r"^(a)\1$", "invalid escape sequence: \\1"),
    (r"^(?P<n>a)(?P=n)$", "invalid perl operator"), (r"^(?>a)$", "invalid perl operator: (?>"),
    (r"^a++$", "bad repetition operator: ++"), (r"^a{1001}$", "invalid repetition size: {1001}"),
    (r"^[a-z]+\Z", "invalid escape sequence: \\Z"), (r"^\N{DIGIT ONE}$", "invalid escape sequence: \\N"),
    (r"^(?#c)a$", "invalid perl operator: (?#"), (r"^[[:nope:]]$", "invalid character class range: [:nope:]"),
])
def test_what_re2_refuses_is_an_invalid_document(pattern, problem):
    with pytest.raises(DocumentError, match="invalid allowedPattern") as err:
        _doc(pattern)
    assert problem in str(err.value) and "RE2" in str(err.value) and "\n" not in str(err.value)
