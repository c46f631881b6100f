"""Target expressions, as in SSM: ``tag:KEY=V1,V2`` (values OR-ed), ``tag:KEY`` (key present),
``instance:ID[,ID]``. Several targets are AND-ed.

Text is parsed once, where it is typed (the CLI, the plugins, the client library); the wire
carries ``protocol.Target`` structures.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .identifiers import instance_id_problem, tag_problem
from .protocol import Target, TargetSpec

__all__ = ["Target", "TargetError", "match_all", "matches", "parse_target", "parse_targets", "to_target"]


class TargetError(ValueError):
    pass


def parse_target(text: str) -> Target:
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise TargetError(f"invalid target {text!r}: expected tag:KEY=VALUE, tag:KEY or instance:ID")
    if kind in ("instance", "instanceids", "instance_id", "instanceid"):
        ids = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not ids:
            raise TargetError(f"invalid target {text!r}: no instance id")
        return Target("instance", values=ids)
    if kind == "tag":
        key, eq, values = rest.partition("=")
        key = key.strip()
        if not key:
            raise TargetError(f"invalid target {text!r}: empty tag key")
        vals = tuple(v.strip() for v in values.split(",")) if eq else ()
        if eq and not all(vals):
            raise TargetError(f"invalid target {text!r}: empty tag value")
        return Target("tag", key, vals)
    raise TargetError(f"invalid target {text!r}: unknown kind {kind!r} (use tag: or instance:)")


def to_target(spec: TargetSpec) -> Target:
    """A wire target (typed, or text from an older client) as a checked ``Target``: instance ids
    and tags from their alphabets (``identifiers``), so a target can never smuggle a separator
    or a control character."""
    target = parse_target(spec) if isinstance(spec, str) else spec
    if target.kind == "instance":
        if not target.values:
            raise TargetError("invalid target: no instance id")
        for instance_id in target.values:
            problem = instance_id_problem(instance_id)
            if problem:
                raise TargetError(f"invalid target: {problem}")
    else:
        for value in target.values or (None,):
            problem = tag_problem(target.key, value)
            if problem:
                raise TargetError(f"invalid target: {problem}")
    return target


def parse_targets(specs: Iterable[TargetSpec]) -> list[Target]:
    return [to_target(s) for s in specs]


def matches(target: Target, instance_id: str, tags: Mapping[str, str]) -> bool:
    if target.kind == "instance":
        return instance_id in target.values
    if target.key not in tags:
        return False
    return not target.values or tags[target.key] in target.values


def match_all(targets: list[Target], instance_id: str, tags: Mapping[str, str]) -> bool:
    return all(matches(t, instance_id, tags) for t in targets)
