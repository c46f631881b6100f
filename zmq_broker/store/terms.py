"""What ``zerorun commands --target`` and ``--document`` find by index: the lookup terms of a
command's targets and its document (``command_targets``), pruned with it."""

from __future__ import annotations

from typing import Iterable

MAX_TERM = 200  # longer terms (a long list of instance ids written whole) are not indexed
DOCUMENT_TERM = "\x1fdocument:"  # no target text holds a control character: no target gives this term


def document_term(name: str) -> str:
    return DOCUMENT_TERM + name


def command_terms(targets: Iterable[str], document_name: str) -> list[str]:
    """Every term of a command: its targets' and its document's."""
    return [*target_terms(targets), document_term(document_name)]


def target_terms(targets: Iterable[str]) -> list[str]:
    """The terms of a command's target texts (``str(Target)``): each text whole, and each of its
    parts with and without its kind. ``tag:role=web,api`` gives ``tag:role=web,api``, ``tag:role``,
    ``role``, ``tag:role=web``, ``role=web``, ``tag:role=api`` and ``role=api``;
    ``instance:i-1,i-2`` gives ``instance:i-1``, ``i-1``, ``instance:i-2`` and ``i-2``."""
    terms: set[str] = set()
    for text in targets:
        terms.add(text)
        kind, colon, rest = text.partition(":")
        if not colon:
            continue
        if kind == "instance":
            for value in rest.split(","):
                terms.update((f"instance:{value}", value))
            continue
        key, equals, values = rest.partition("=")
        terms.update((f"{kind}:{key}", key))
        if equals:
            for value in values.split(","):
                terms.update((f"{kind}:{key}={value}", f"{key}={value}"))
    return sorted(t for t in terms if t and len(t) <= MAX_TERM)
