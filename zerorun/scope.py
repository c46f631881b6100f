"""A role's target scope, evaluated against the instances a request reaches, never its text.

Patterns use the target syntax with shell wildcards (``fnmatch``, case-sensitive):

- ``tag:KEY=V1,V2`` - the instance has tag KEY (a pattern) with a value matching one of the
  value patterns, e.g. ``tag:env=dev*``; ``tag:KEY=`` - the tag's value is empty;
- ``tag:KEY`` - the instance has a tag whose key matches KEY;
- ``instance:ID1,ID2`` - the instance id matches one of the patterns, e.g. ``instance:web-*``;
- ``*`` - every instance.

An instance is in scope when any pattern matches it. A request is allowed only when every
instance it reaches is in scope, so ``-t tag:env=dev,prod`` against ``tag:env=dev*`` is refused
because it reaches an ``env=prod`` instance, while ``-t instance:web-1`` against
``tag:role=web`` is allowed when web-1 carries role=web. Facts an agent reports about itself are
not part of a scope: an instance could lie about them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping


class ScopeError(ValueError):
    pass


@dataclass(frozen=True)
class ScopePattern:
    kind: str  # any | tag | instance
    key: str = ""
    values: tuple[str, ...] = ()

    def matches(self, instance_id: str, tags: Mapping[str, str]) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "instance":
            return any(fnmatch.fnmatchcase(instance_id, p) for p in self.values)
        for key, value in tags.items():
            if fnmatch.fnmatchcase(key, self.key) and (
                    not self.values or any(fnmatch.fnmatchcase(value, p) for p in self.values)):
                return True
        return False

    def __str__(self) -> str:
        if self.kind == "any":
            return "*"
        if self.kind == "instance":
            return "instance:" + ",".join(self.values)
        return f"tag:{self.key}" + ("=" + ",".join(self.values) if self.values else "")


def parse_pattern(text: str) -> ScopePattern:
    text = str(text).strip()
    if text == "*":
        return ScopePattern("any")
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not rest.strip():
        raise ScopeError(f"target pattern {text!r}: expected tag:KEY=VALUE, tag:KEY, instance:ID or *")
    if kind == "instance":
        ids = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not ids:
            raise ScopeError(f"target pattern {text!r}: no instance id")
        return ScopePattern("instance", values=ids)
    if kind == "tag":
        key, eq, values = rest.partition("=")
        vals = tuple(v.strip() for v in values.split(",")) if eq else ()
        if not key.strip():
            raise ScopeError(f"target pattern {text!r}: empty tag key")
        if len(vals) > 1 and "" in vals:  # as in targets: tag:KEY= alone is the empty value
            raise ScopeError(f"target pattern {text!r}: empty value in a list of values "
                             f"(tag:{key.strip()}= alone means the empty value)")
        return ScopePattern("tag", key.strip(), vals)
    if kind == "fact":
        raise ScopeError(f"target pattern {text!r}: a scope may not use facts (an instance reports its own "
                         "facts and could lie about them); use tag: or instance:")
    raise ScopeError(f"target pattern {text!r}: unknown kind {kind!r} (use tag:, instance: or *)")


@dataclass(frozen=True)
class Scope:
    patterns: tuple[ScopePattern, ...] = ()
    everything: bool = True  # no restriction at all

    @classmethod
    def parse(cls, texts: Iterable[str] | None, *, empty_means_everything: bool = True) -> "Scope":
        patterns = tuple(parse_pattern(t) for t in (texts or ()))
        everything = any(p.kind == "any" for p in patterns) or (not patterns and empty_means_everything)
        return cls(patterns, everything)

    def contains(self, instance_id: str, tags: Mapping[str, str]) -> bool:
        return self.everything or any(p.matches(instance_id, tags) for p in self.patterns)

    def outside(self, instances: Iterable[tuple[str, Mapping[str, str]]]) -> list[str]:
        """The ids of the instances that are not in this scope, in the given order."""
        if self.everything:
            return []
        return [i for i, tags in instances if not self.contains(i, tags)]

    def __str__(self) -> str:
        return "*" if self.everything else ", ".join(map(str, self.patterns))
