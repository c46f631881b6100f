"""The fleet index: every instance the broker knows, its tags, its facts, and target matching.

An instance's tags are the broker's (``TagRecord``: approved by an operator, or given at
enrolment); its agent only proposes (``handlers/tags.py``). The index keeps each instance
record's ``tags`` equal to its approved tags, whatever the record was written with, so every
reader (targets, scopes, views) sees the approved tags and nothing else.

Matching goes through an index of (tag key, value) -> instance ids, so its cost follows the
matches, not the fleet size; ``fact:`` targets filter what the others leave (or the whole fleet
when they stand alone). Only instances bound to their accepted key are ever matched (the
``bound_key`` lookup comes from the key registry; in insecure mode every instance is).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from zerorun import targets as targeting
from zerorun.identifiers import instance_id_problem
from zerorun.protocol import Facts, Target, TargetSpec

from .errors import BrokerError
from .model import InstanceRecord, TagRecord
from .store import Store

FACT_UPDATES_BURST = 3  # facts updates an instance may send at once (after a HELLO: its resolved FQDN)...
FACT_UPDATES_EVERY = 10.0  # ...then one per this many seconds (an honest agent checks once a minute)


class FleetIndex:
    def __init__(self, records: Iterable[InstanceRecord], bound_key: Callable[[str], str | None] | None,
                 tag_records: Iterable[TagRecord] = ()):
        """``bound_key(instance_id)``: the accepted key bound to that id; None: no key checks."""
        self._bound_key = bound_key
        self._records: dict[str, InstanceRecord] = {}
        self._tags: dict[str, TagRecord] = {r.instance_id: r for r in tag_records}
        self._facts: dict[str, dict[str, tuple[str, ...]]] = {}  # flattened, for fact: targets
        self._fact_budget: dict[str, tuple[float, float]] = {}  # instance id -> (updates allowed, at)
        self._by_tag: dict[tuple[str, str], set[str]] = {}
        self._by_tag_key: dict[str, set[str]] = {}
        self._folded: dict[str, str] = {}  # casefolded id -> id, to refuse look-alikes
        for rec in records:
            self.put(rec)

    @classmethod
    def from_store(cls, store: Store, bound_key: Callable[[str], str | None] | None) -> "FleetIndex":
        """The index as the store has it. Instances stored by a broker from before tags were the
        broker's keep the tags they had, now approved (written back here, once)."""
        fleet = cls(store.load_instances(), bound_key, store.load_tags())
        now = time.time()
        for instance_id, rec in fleet._records.items():
            if instance_id not in fleet._tags:
                adopted = TagRecord(instance_id, dict(rec.tags), updated_at=now, updated_by="adopted at upgrade")
                fleet._tags[instance_id] = adopted
                store.put_tags(adopted)
        return fleet

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def get(self, instance_id: str) -> InstanceRecord | None:
        return self._records.get(instance_id)

    def put(self, rec: InstanceRecord) -> None:
        """Adds or replaces an instance's record, re-indexing its tags (its approved tags, when
        the broker has a tag record for it) and its facts."""
        approved = self._tags.get(rec.instance_id)
        if approved is not None:
            rec.tags = dict(approved.tags)
        self._unindex(rec.instance_id)
        self._records[rec.instance_id] = rec
        self._folded.setdefault(rec.instance_id.casefold(), rec.instance_id)
        self._index(rec)
        self._facts[rec.instance_id] = targeting.flat_facts(rec.facts)

    def _unindex(self, instance_id: str) -> None:
        old = self._records.get(instance_id)
        if old is not None:
            for key, value in old.tags.items():
                self._by_tag.get((key, value), set()).discard(instance_id)
                self._by_tag_key.get(key, set()).discard(instance_id)

    def _index(self, rec: InstanceRecord) -> None:
        for key, value in rec.tags.items():
            self._by_tag.setdefault((key, value), set()).add(rec.instance_id)
            self._by_tag_key.setdefault(key, set()).add(rec.instance_id)

    # -- tags the broker owns ---------------------------------------------------------------------

    def tag_record(self, instance_id: str) -> TagRecord | None:
        return self._tags.get(instance_id)

    def set_tags(self, tags: TagRecord) -> None:
        """An instance's tag record changed (here, or on another broker): its record and the
        index follow its approved tags."""
        self._tags[tags.instance_id] = tags
        rec = self._records.get(tags.instance_id)
        if rec is not None and rec.tags != tags.tags:
            self._unindex(rec.instance_id)
            rec.tags = dict(tags.tags)
            self._index(rec)

    def pending_tags(self, instance_id: str) -> dict[str, str] | None:
        tags = self._tags.get(instance_id)
        return None if tags is None else tags.proposed

    def set_facts(self, instance_id: str, facts: Facts | None, now: float | None = None) -> bool:
        """New facts from an instance's agent; False when they did not change, or when it sends
        them more often than an honest agent would (each change is a store write)."""
        rec = self._records.get(instance_id)
        if rec is None or rec.facts == facts:
            return False
        now = time.monotonic() if now is None else now
        allowed, at = self._fact_budget.get(instance_id, (float(FACT_UPDATES_BURST), now))
        allowed = min(float(FACT_UPDATES_BURST), allowed + (now - at) / FACT_UPDATES_EVERY)
        if allowed < 1.0:
            self._fact_budget[instance_id] = (allowed, now)
            return False
        self._fact_budget[instance_id] = (allowed - 1.0, now)
        rec.facts = facts
        self._facts[instance_id] = targeting.flat_facts(facts)
        return True

    # -- targets ----------------------------------------------------------------------------------

    def lookalike(self, instance_id: str) -> str | None:
        """A known instance whose id differs from this one only by case."""
        known = self._folded.get(instance_id.casefold())
        return known if known is not None and known != instance_id else None

    def id_problem(self, instance_id: str) -> str | None:
        """Why an agent may not be known by this id (a HELLO's, a key added for it), or None: the
        rule of ``identifiers.instance_id_problem``, and no known instance differing only by case."""
        problem = instance_id_problem(instance_id)
        like = None if problem else self.lookalike(instance_id)
        if like is not None:
            problem = f"instance id {instance_id!r} differs from the known instance {like!r} only by case"
        return problem

    def is_registered(self, rec: InstanceRecord) -> bool:
        return self._bound_key is None or self._bound_key(rec.instance_id) == rec.public_key

    def matching(self, specs: Iterable[TargetSpec]) -> list[InstanceRecord]:
        """Registered instances matching every target (all of them for no target), by id."""
        return self.matching_targets(parse_targets(specs))

    def matching_targets(self, parsed: list[Target]) -> list[InstanceRecord]:
        """``matching`` of targets already checked (``parse_targets``)."""
        candidates: set[str] | None = None
        for target in parsed:
            if target.kind == "fact":
                continue  # no index: checked on what the other targets leave
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
            if self.is_registered(rec) and targeting.match_all(parsed, instance_id, rec.tags,
                                                               self._facts.get(instance_id)):
                out.append(rec)
        return out


def parse_targets(specs: Iterable[TargetSpec]) -> list[Target]:
    try:
        return targeting.parse_targets(specs)
    except targeting.TargetError as exc:
        raise BrokerError("InvalidTarget", str(exc)) from None
