"""Target expressions, as in SSM: ``tag:KEY=V1,V2`` (values OR-ed), ``tag:KEY`` (key present),
``instance:ID[,ID]``. Several targets are AND-ed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    kind: str  # "tag" | "instance"
    key: str = ""
    values: tuple[str, ...] = ()  # empty for "tag:KEY" (key present)

    def matches(self, instance_id: str, tags: Mapping[str, str]) -> bool:
        if self.kind == "instance":
            return instance_id in self.values
        if self.key not in tags:
            return False
        return not self.values or tags[self.key] in self.values

    def __str__(self) -> str:
        if self.kind == "instance":
            return "instance:" + ",".join(self.values)
        return f"tag:{self.key}" + ("=" + ",".join(self.values) if self.values else "")


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


def parse_targets(texts: Iterable[str]) -> list[Target]:
    return [parse_target(t) for t in texts]


def match_all(targets: list[Target], instance_id: str, tags: Mapping[str, str]) -> bool:
    return all(t.matches(instance_id, tags) for t in targets)
