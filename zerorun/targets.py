"""Target expressions, as in SSM: ``tag:KEY=V1,V2`` (values OR-ed), ``tag:KEY`` (key present),
``tag:KEY=`` (the key's value is empty),
``instance:ID[,ID]``; and ``fact:NAME=V1,V2`` / ``fact:NAME`` on what agents report about their
machines (``fact:os.id=ubuntu,debian``, ``fact:arch=x86_64``). Several targets are AND-ed.

Text is parsed once, where it is typed (the CLI, the plugins, the client library); the wire
carries ``protocol.Target`` structures.

Tags belong to the broker (an operator sets or approves them); facts are the agent's own claims,
fine for choosing where to run something, never for deciding who may (policy scopes refuse them).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from .identifiers import instance_id_problem, printable, tag_problem
from .protocol import Facts, Target, TargetSpec

__all__ = ["FACT_NAMES", "Target", "TargetError", "flat_facts", "match_all", "matches", "parse_target",
           "parse_targets", "to_target"]

FACT_NAMES = ("os.id", "os.version", "os.name", "os.like", "kernel", "arch", "hostname", "fqdn", "ip", "cpus",
              "memory_mb", "boot_time", "agent_version", "python_version")
"""The names ``fact:`` targets may use: the fields of ``protocol.Facts``, ``os.*`` for its ``os``."""

_FACT_VALUE = re.compile(r"[\w .:/=+\-@]{1,256}")  # the tag alphabet (no commas: they separate values)

FlatFacts = Mapping[str, tuple[str, ...]]


class TargetError(ValueError):
    pass


def parse_target(text: str) -> Target:
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise TargetError(f"invalid target {text!r}: expected tag:KEY=VALUE, tag:KEY, fact:NAME=VALUE or instance:ID")
    if kind in ("instance", "instanceids", "instance_id", "instanceid"):
        ids = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not ids:
            raise TargetError(f"invalid target {text!r}: no instance id")
        return Target("instance", values=ids)
    if kind in ("tag", "fact"):
        key, eq, values = rest.partition("=")
        key = key.strip()
        if not key:
            raise TargetError(f"invalid target {text!r}: empty {kind} {'key' if kind == 'tag' else 'name'}")
        vals = tuple(v.strip() for v in values.split(",")) if eq else ()
        if kind == "fact" and eq and not all(vals):
            raise TargetError(f"invalid target {text!r}: empty fact value")
        problem = _empty_value_problem(key, vals) if kind == "tag" else None
        if problem:
            raise TargetError(f"invalid target {text!r}: {problem}")
        return Target(kind, key, vals)
    raise TargetError(f"invalid target {text!r}: unknown kind {kind!r} (use tag:, fact: or instance:)")


def _empty_value_problem(key: str, values: tuple[str, ...]) -> str | None:
    """An empty tag value is a value (EC2 tags may have one; ``zerorun tags set ID KEY=`` stores
    it), targeted alone: ``tag:KEY=``. Within a list (``tag:KEY=web,``, ``tag:KEY=,web``) it is
    refused as the typo it usually is: a stray comma would also reach every empty-valued instance."""
    if len(values) > 1 and "" in values:
        return (f"empty value in the value list of tag {key!r}: a list may not hold an empty value "
                f"(tag:{key}= alone targets the empty value)")
    return None


def to_target(spec: TargetSpec) -> Target:
    """A wire target (typed, or text from an older client) as a checked ``Target``: instance ids,
    tags and fact values from their alphabets (``identifiers``), so a target can never smuggle a
    separator or a control character."""
    target = parse_target(spec) if isinstance(spec, str) else spec
    if target.kind == "instance":
        if not target.values:
            raise TargetError("invalid target: no instance id")
        for instance_id in target.values:
            problem = instance_id_problem(instance_id)
            if problem:
                raise TargetError(f"invalid target: {problem}")
    elif target.kind == "fact":
        if target.key not in FACT_NAMES:
            raise TargetError(f"invalid target: unknown fact {printable(target.key)} (facts: {', '.join(FACT_NAMES)})")
        for value in target.values:
            if not _FACT_VALUE.fullmatch(value):
                raise TargetError(f"invalid target: fact value {printable(value)}: 1-256 letters, digits, spaces "
                                  "or _ . : / = + - @")
    else:
        problem = _empty_value_problem(target.key, target.values)
        if problem:
            raise TargetError(f"invalid target: {problem}")
        for value in target.values or (None,):
            problem = tag_problem(target.key, value)
            if problem:
                raise TargetError(f"invalid target: {problem}")
    return target


def parse_targets(specs: Iterable[TargetSpec]) -> list[Target]:
    return [to_target(s) for s in specs]


def flat_facts(facts: Facts | None) -> dict[str, tuple[str, ...]]:
    """Facts as ``fact:`` targets see them: each name's values as text (a list fact has
    several; an empty one has none)."""
    if facts is None:
        return {}
    out: dict[str, tuple[str, ...]] = {}
    os_ = facts.os
    for name, value in (("os.id", os_.id), ("os.version", os_.version), ("os.name", os_.name),
                        ("kernel", facts.kernel), ("arch", facts.arch), ("hostname", facts.hostname),
                        ("fqdn", facts.fqdn), ("agent_version", facts.agent_version),
                        ("python_version", facts.python_version)):
        if value:
            out[name] = (value,)
    if os_.like:
        out["os.like"] = tuple(os_.like)
    if facts.ip:
        out["ip"] = tuple(facts.ip)
    for name, number in (("cpus", facts.cpus), ("memory_mb", facts.memory_mb), ("boot_time", int(facts.boot_time))):
        if number:
            out[name] = (str(number),)
    return out


def matches(target: Target, instance_id: str, tags: Mapping[str, str], facts: FlatFacts | None = None) -> bool:
    if target.kind == "instance":
        return instance_id in target.values
    if target.kind == "fact":
        have = (facts or {}).get(target.key, ())
        return bool(have) and (not target.values or any(v in target.values for v in have))
    if target.key not in tags:
        return False
    return not target.values or tags[target.key] in target.values


def match_all(targets: list[Target], instance_id: str, tags: Mapping[str, str], facts: FlatFacts | None = None) -> bool:
    return all(matches(t, instance_id, tags, facts) for t in targets)
