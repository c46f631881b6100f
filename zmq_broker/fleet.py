"""The fleet index: every instance the broker knows, its tags, and target matching.

Matching goes through an index of (tag key, value) -> instance ids, so its cost follows the
matches, not the fleet size. Only instances bound to their accepted key are ever matched (the
``bound_key`` lookup comes from the key registry; in insecure mode every instance is).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from zerorun import targets as targeting
from zerorun.protocol import Target, TargetSpec

from .errors import BrokerError
from .model import InstanceRecord


class FleetIndex:
    def __init__(self, records: Iterable[InstanceRecord], bound_key: Callable[[str], str | None] | None):
        """``bound_key(instance_id)``: the accepted key bound to that id; None: no key checks."""
        self._bound_key = bound_key
        self._records: dict[str, InstanceRecord] = {}
        self._by_tag: dict[tuple[str, str], set[str]] = {}
        self._by_tag_key: dict[str, set[str]] = {}
        self._folded: dict[str, str] = {}  # casefolded id -> id, to refuse look-alikes
        for rec in records:
            self.put(rec)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def get(self, instance_id: str) -> InstanceRecord | None:
        return self._records.get(instance_id)

    def put(self, rec: InstanceRecord) -> None:
        """Adds or replaces an instance's record, re-indexing its tags."""
        old = self._records.get(rec.instance_id)
        if old is not None:
            for key, value in old.tags.items():
                self._by_tag.get((key, value), set()).discard(rec.instance_id)
                self._by_tag_key.get(key, set()).discard(rec.instance_id)
        self._records[rec.instance_id] = rec
        self._folded.setdefault(rec.instance_id.casefold(), rec.instance_id)
        for key, value in rec.tags.items():
            self._by_tag.setdefault((key, value), set()).add(rec.instance_id)
            self._by_tag_key.setdefault(key, set()).add(rec.instance_id)

    def lookalike(self, instance_id: str) -> str | None:
        """A known instance whose id differs from this one only by case."""
        known = self._folded.get(instance_id.casefold())
        return known if known is not None and known != instance_id else None

    def is_registered(self, rec: InstanceRecord) -> bool:
        return self._bound_key is None or self._bound_key(rec.instance_id) == rec.public_key

    def matching(self, specs: Iterable[TargetSpec]) -> list[InstanceRecord]:
        """Registered instances matching every target (all of them for no target), by id."""
        parsed = parse_targets(specs)
        candidates: set[str] | None = None
        for target in parsed:
            if target.kind == "instance":
                ids = {i for i in target.values if i in self._records}
            elif target.values:
                ids = set().union(*(self._by_tag.get((target.key, v), ()) for v in target.values))
            else:
                ids = set(self._by_tag_key.get(target.key, ()))
            candidates = ids if candidates is None else candidates & ids
        out = []
        for instance_id in sorted(self._records if candidates is None else candidates):
            rec = self._records[instance_id]
            if self.is_registered(rec) and targeting.match_all(parsed, instance_id, rec.tags):
                out.append(rec)
        return out


def parse_targets(specs: Iterable[TargetSpec]) -> list[Target]:
    try:
        return targeting.parse_targets(specs)
    except targeting.TargetError as exc:
        raise BrokerError("InvalidTarget", str(exc)) from None
