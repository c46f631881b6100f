"""What ``zerorun commands --target`` finds by index: the lookup terms of a command's targets,
written once with the command (``command_targets``) and pruned with it."""

from __future__ import annotations

from typing import Iterable

MAX_TERM = 200  # longer terms (a long list of instance ids written whole) are not indexed


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
