"""Who may talk to the broker: agent and client keys, their states, and the ZAP decisions.

An agent key is pending until accepted (by an operator, by ``--auto-accept``, or by an enrolment
token its agent presents: ``enrol``); a pending key carries the tags its agent proposes, shown to
the operator who decides. Once an instance id is bound to an accepted key, any other key claiming
that id is denied (like SSH's changed host key) and never silently replaces it; ``replace`` is the
one-step way out for a rebuilt instance. Client keys are accepted or nothing:
an unknown client key fails the CURVE handshake. A client name belongs to exactly one key (roles
are given to names), and no key but the broker's own admin key is ever called ``admin``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from zerorun import keys as keyfiles
from zerorun import protocol
from zerorun.identifiers import client_name_problem
from zerorun.protocol import KEY_ACCEPTED, KEY_DENIED, KEY_PENDING, KEY_REJECTED, KeyView

from .errors import BrokerError
from .model import KeyRecord, TagRecord
from .store import Store

log = logging.getLogger("zerorun.broker.keys")


@dataclass
class HelloVerdict:
    state: str  # accepted | pending | denied
    message: str = ""
    newly_accepted: bool = False  # accepted by this HELLO (--auto-accept, an enrolment token)


class KeyRegistry:
    def __init__(self, store: Store, auto_accept: bool = False, max_pending: int = 1000):
        self.store = store
        self.auto_accept = auto_accept
        self.max_pending = max_pending
        self.by_key: dict[str, KeyRecord] = {r.public_key: r for r in store.load_keys()}
        self.bound: dict[str, str] = {}  # instance id -> accepted agent public key
        self.admin_key = ""  # the broker's own admin client key (ensure_admin)
        self.broker_key = ""  # the broker's own public key: never a client's or an agent's
        self.on_change: Callable[[str], None] | None = None  # told of every key written (several brokers)
        for rec in self.by_key.values():
            if rec.kind == "agent" and rec.state == KEY_ACCEPTED:
                self.bound[rec.name] = rec.public_key

    # -- ZAP ----------------------------------------------------------------------------------

    def zap_allows(self, domain: str, public_key: str) -> tuple[bool, str]:
        rec = self.by_key.get(public_key)
        if domain == "clients":
            if rec is not None and rec.kind == "client" and rec.state == KEY_ACCEPTED:
                return True, "OK"
            return False, "client key not authorised"
        if domain == "agents":
            if rec is None:
                if self.pending_count() >= self.max_pending:
                    return False, "too many pending agent keys"
                return True, "OK"
            if rec.kind != "agent":
                return False, "not an agent key"
            if rec.state == KEY_REJECTED:
                return False, "agent key rejected"
            return True, "OK"
        return False, "unknown ZAP domain"

    def pending_count(self) -> int:
        return sum(1 for r in self.by_key.values() if r.state == KEY_PENDING)

    # -- agent HELLO ----------------------------------------------------------------------------

    def on_hello(self, public_key: str, instance_id: str, proposed_tags: Mapping[str, str] | None = None) -> HelloVerdict:
        """``proposed_tags``: what the agent offers as its tags, kept with a pending key for
        the operator who accepts it."""
        now = time.time()
        rec = self.by_key.get(public_key)
        owner = self.bound.get(instance_id)
        tags = dict(proposed_tags or {})
        if rec is None:
            if owner is not None:
                self._deny_claim(public_key, instance_id, owner, now)
                return HelloVerdict(KEY_DENIED, self._bound_message(instance_id, owner, public_key))
            state = KEY_ACCEPTED if self.auto_accept else KEY_PENDING
            if state == KEY_PENDING and self.pending_count() >= self.max_pending:
                # checked at the handshake too, but connections made together all pass that
                # check before their HELLOs arrive
                log.warning("refused agent key %s for %s: too many pending agent keys (%d)",
                            keyfiles.fingerprint(public_key), instance_id, self.max_pending)
                return HelloVerdict(KEY_DENIED, "too many pending agent keys on the broker; an operator "
                                                "must accept or reject some (zerorun keys list)")
            self._put(KeyRecord(public_key, "agent", instance_id, state, now, now,
                                tags=tags if state == KEY_PENDING else {}))
            if state == KEY_ACCEPTED:
                self.bound[instance_id] = public_key
                log.warning("auto-accepted agent key %s for %s (--auto-accept is for demos and tests)",
                            keyfiles.fingerprint(public_key), instance_id)
                return HelloVerdict(KEY_ACCEPTED, newly_accepted=True)
            log.info("new agent key %s for %s is pending (zerorun keys accept %s)",
                     keyfiles.fingerprint(public_key), instance_id, instance_id)
            return HelloVerdict(KEY_PENDING, self._pending_message(instance_id))
        if rec.kind != "agent":
            return HelloVerdict(KEY_DENIED, "this key is not an agent key")
        if rec.state == KEY_ACCEPTED:
            if rec.name != instance_id:
                log.warning("DENIED key %s: bound to %s, claimed %s", keyfiles.fingerprint(public_key),
                            rec.name, instance_id)
                return HelloVerdict(KEY_DENIED, f"this key is bound to instance {rec.name!r};"
                                                f" it cannot claim {instance_id!r}")
            return HelloVerdict(KEY_ACCEPTED)
        if rec.state == KEY_PENDING:
            if owner is not None:
                rec.state, rec.updated_at, rec.name = KEY_DENIED, now, instance_id
                self._put(rec)
                return HelloVerdict(KEY_DENIED, self._bound_message(instance_id, owner, public_key))
            if rec.name != instance_id or rec.tags != tags:
                # What an operator accepts is what `keys list` showed: a pending key's first claim
                # (its instance id and proposed tags) stands until the key is decided, or it could
                # swap in other tags, or another id, between the look and the accept.
                shown = ",".join(f"{k}={v}" for k, v in sorted(rec.tags.items())) or "none"
                log.warning("pending agent key %s now claims %s with tags %s; it stays pending as %s with tags %s "
                            "(zerorun keys delete %s lets it claim anew)", keyfiles.fingerprint(public_key),
                            instance_id, ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "none",
                            rec.name, shown, rec.name)
                return HelloVerdict(KEY_PENDING, (
                    f"this key is pending as {rec.name!r} with tags {shown}, as first claimed; an operator decides "
                    f"on that (zerorun keys accept {rec.name}), or deletes it (zerorun keys delete {rec.name}) "
                    "so that the key may claim anew"))
            return HelloVerdict(KEY_PENDING, self._pending_message(instance_id))
        if rec.state == KEY_DENIED:
            return HelloVerdict(KEY_DENIED, rec.note or "this key is denied")
        return HelloVerdict(KEY_DENIED, "this key is rejected")

    def _deny_claim(self, public_key: str, instance_id: str, owner: str, now: float) -> None:
        self._put(KeyRecord(public_key, "agent", instance_id, KEY_DENIED, now, now,
                            note="instance id already bound to another key"))
        log.warning("DENIED agent key %s: instance id %s is bound to key %s",
                    keyfiles.fingerprint(public_key), instance_id, keyfiles.fingerprint(owner))

    def may_enrol(self, public_key: str) -> bool:
        """Whether an enrolment token can still do anything for this key: an unknown key, or an
        agent key pending a decision."""
        rec = self.by_key.get(public_key)
        return rec is None or (rec.kind == "agent" and rec.state == KEY_PENDING)

    def claim_problem(self, public_key: str, instance_id: str) -> HelloVerdict | None:
        """A denial when another accepted key holds this instance id (checked before a token's
        use is taken); None when the id is free for this key."""
        owner = self.bound.get(instance_id)
        if owner is None or owner == public_key:
            return None
        rec = self.by_key.get(public_key)
        if rec is None:
            self._deny_claim(public_key, instance_id, owner, time.time())
        elif rec.state == KEY_PENDING:
            rec.state, rec.updated_at, rec.name = KEY_DENIED, time.time(), instance_id
            self._put(rec)
        return HelloVerdict(KEY_DENIED, self._bound_message(instance_id, owner, public_key))

    def enrol(self, public_key: str, instance_id: str, note: str) -> KeyRecord:
        """Accepts an unknown or pending agent key for this (free) instance id: an enrolment
        token vouched for it."""
        now = time.time()
        rec = self.by_key.get(public_key)
        first_seen = rec.first_seen if rec is not None else now
        rec = KeyRecord(public_key, "agent", instance_id, KEY_ACCEPTED, first_seen, now, note=note)
        self.bound[instance_id] = public_key
        self._put(rec)
        log.info("enrolled agent key %s for %s (%s)", keyfiles.fingerprint(public_key), instance_id, note)
        return rec

    @staticmethod
    def _pending_message(instance_id: str) -> str:
        return f"key awaiting acceptance: run `zerorun keys accept {instance_id}` on the broker side"

    @staticmethod
    def _bound_message(instance_id: str, owner: str, new: str = "") -> str:
        new_print = keyfiles.fingerprint(new) if new else "NEW-KEY-FINGERPRINT"
        return (f"instance id {instance_id!r} is bound to another key ({keyfiles.fingerprint(owner)});"
                f" if this instance was rebuilt, run `zerorun keys replace {instance_id} {new_print}`")

    # -- operator actions -----------------------------------------------------------------------

    def _put(self, rec: KeyRecord) -> None:
        self.by_key[rec.public_key] = rec
        self.store.put_key(rec)
        if self.on_change is not None:
            self.on_change(rec.public_key)

    def refresh(self, public_keys: list[str], records: list[KeyRecord]) -> list[str]:
        """Takes these keys as another broker left them in the store (absent: deleted); returns
        the keys that became accepted here."""
        fresh = {r.public_key: r for r in records}
        accepted = []
        for public_key in public_keys:
            old, new = self.by_key.get(public_key), fresh.get(public_key)
            if old is not None and old.kind == "agent" and self.bound.get(old.name) == public_key:
                del self.bound[old.name]
            if new is None:
                self.by_key.pop(public_key, None)
                continue
            self.by_key[public_key] = new
            if new.kind == "agent" and new.state == KEY_ACCEPTED:
                self.bound[new.name] = public_key
            if new.state == KEY_ACCEPTED and (old is None or old.state != KEY_ACCEPTED):
                accepted.append(public_key)
        return accepted

    def find(self, name: str, states: tuple[str, ...] | None = None) -> KeyRecord:
        """A key by instance id / client name or by fingerprint (prefix allowed)."""
        candidates = [r for r in self.by_key.values()
                      if (r.name == name or keyfiles.fingerprint(r.public_key).startswith(name)
                          or keyfiles.fingerprint(r.public_key)[7:].startswith(name))
                      and (states is None or r.state in states)]
        if not candidates:
            wanted = f" in state {'/'.join(states)}" if states else ""
            raise BrokerError("NotFound", f"no key{wanted} matches {name!r}")
        if len(candidates) > 1:
            # prefer the key waiting for a decision when a name has several
            pending = [r for r in candidates if r.state == KEY_PENDING]
            if len(pending) == 1:
                return pending[0]
            prints = ", ".join(f"{keyfiles.fingerprint(r.public_key)} ({r.state})" for r in candidates)
            hint = ""
            accepted = [r for r in candidates if r.state == KEY_ACCEPTED]
            others = [r for r in candidates if r.state != KEY_ACCEPTED]
            if len(accepted) == 1 and len(others) == 1:
                hint = (f"; to put the {others[0].state} key in the accepted one's place, run `zerorun keys replace "
                        f"{accepted[0].name} {keyfiles.fingerprint(others[0].public_key)}`")
            raise BrokerError("Ambiguous", f"{name!r} matches several keys ({prints}); give a fingerprint "
                                           f"instead of the name{hint}")
        return candidates[0]

    def accept(self, name: str) -> KeyRecord:
        rec = self.find(name, (KEY_PENDING, KEY_DENIED, KEY_REJECTED, KEY_ACCEPTED))
        if rec.state == KEY_ACCEPTED:
            return rec
        if rec.kind == "agent":
            owner = self.bound.get(rec.name)
            if owner is not None and owner != rec.public_key:
                raise BrokerError("Conflict", self._bound_message(rec.name, owner, rec.public_key))
            self.bound[rec.name] = rec.public_key
        rec.state, rec.updated_at, rec.note = KEY_ACCEPTED, time.time(), ""
        self._put(rec)  # keeps its proposed tags: the caller makes them the instance's (handlers/tags.py)
        log.info("accepted %s key %s for %s", rec.kind, keyfiles.fingerprint(rec.public_key), rec.name)
        return rec

    def add(self, kind: str, name: str, public_key: str) -> KeyRecord:
        """Pre-authorises a known key (the agent role registers instances this way)."""
        if kind not in ("agent", "client"):
            raise BrokerError("BadRequest", "kind must be agent or client")
        if not name or len(name) > 128:
            raise BrokerError("BadRequest",
                              "a key needs a name (instance id or client name) of at most 128 characters")
        try:
            keyfiles.parse_public_key(public_key)
        except keyfiles.KeyFileError as exc:
            raise BrokerError("BadRequest", str(exc)) from None
        self._not_the_brokers(public_key)
        rec = self.by_key.get(public_key)
        if rec is not None and (rec.kind != kind or rec.name != name):
            raise BrokerError("Conflict", f"this key is already registered as {rec.kind} {rec.name!r}")
        if kind == "client":
            self._check_client_name(name, public_key)
        if rec is not None and rec.state == KEY_ACCEPTED:
            return rec
        if rec is not None and rec.state in (KEY_REJECTED, KEY_DENIED):
            raise BrokerError("Conflict", f"this key was {rec.state} by an operator; delete it first "
                              f"(zerorun keys delete {keyfiles.fingerprint(public_key)}) to register it again")
        if kind == "agent":
            owner = self.bound.get(name)
            if owner is not None and owner != public_key:
                raise BrokerError("Conflict", self._bound_message(name, owner, public_key))
            self.bound[name] = public_key
        now = time.time()
        rec = KeyRecord(public_key, kind, name, KEY_ACCEPTED, rec.first_seen if rec else now, now,
                        note="pre-authorised")
        self._put(rec)
        log.info("added %s key %s for %s", kind, keyfiles.fingerprint(public_key), name)
        return rec

    def _not_the_brokers(self, public_key: str) -> None:
        """A client or agent key that is the broker's own (``broker.key`` copied for the client's
        key file) means its secret key is out of the state dir, or a mistake: neither is a key."""
        if public_key and public_key == self.broker_key:
            raise BrokerError("Forbidden", "that is the broker's own public key (broker.key), not a client's or an "
                                           "agent's: give the public key of the client's or agent's own keypair")

    def _check_client_name(self, name: str, public_key: str) -> None:
        if problem := client_name_problem(name):  # a newline or an escape in it went into logs and listings
            raise BrokerError("BadRequest", problem)
        if name == "admin" or public_key == self.admin_key:
            raise BrokerError("Forbidden", "'admin' is the broker's own admin key; give this client another name")
        taken = next((r for r in self.by_key.values() if r.kind == "client" and r.name == name
                      and r.public_key != public_key), None)
        if taken is not None:
            raise BrokerError("Conflict", f"client name {name!r} belongs to key {keyfiles.fingerprint(taken.public_key)}"
                                          f" ({taken.state}); to give the name a new key, run `zerorun keys replace "
                                          f"{name} NEW-PUBLIC-KEY`")

    def replace(self, name: str, replacement: str) -> tuple[KeyRecord, KeyRecord]:
        """Puts another key in the place of the accepted key named ``name`` (a rebuilt instance,
        a rotated client key): ``replacement`` is a known key's fingerprint (e.g. the denied key of
        the rebuilt instance) or a z85 public key. The old key is deleted. (old, new)."""
        old = self.find(name, (KEY_ACCEPTED,))
        if old.public_key == self.admin_key:
            raise BrokerError("Forbidden", "the broker's own admin key cannot be replaced")
        try:
            new_key = keyfiles.parse_public_key(replacement).decode()
        except keyfiles.KeyFileError:
            new_key = ""
        self._not_the_brokers(new_key)
        new = self.by_key.get(new_key) if new_key else None
        if new is None and not new_key:
            matches = [r for r in self.by_key.values()
                       if keyfiles.fingerprint(r.public_key).startswith(replacement)
                       or keyfiles.fingerprint(r.public_key)[7:].startswith(replacement)]
            if len(matches) != 1:
                raise BrokerError("NotFound" if not matches else "Ambiguous",
                                  f"{replacement!r} is neither a public key nor the fingerprint of exactly one "
                                  f"known key (zerorun keys list shows them)")
            new = matches[0]
        if new is not None and (new.kind != old.kind or new.public_key == old.public_key
                                or (new.name != old.name and new.state == KEY_ACCEPTED)):
            raise BrokerError("Conflict", f"key {keyfiles.fingerprint(new.public_key)} is the {new.kind} key "
                                          f"{new.name!r} ({new.state}); it cannot replace {old.kind} {old.name!r}")
        now = time.time()
        if new is None:
            new = KeyRecord(new_key, old.kind, old.name, KEY_ACCEPTED, now, now, note="replacement")
        new.name, new.state, new.updated_at, new.note = old.name, KEY_ACCEPTED, now, \
            f"replaced {keyfiles.fingerprint(old.public_key)}"
        del self.by_key[old.public_key]
        self.store.delete_key(old.public_key)
        if self.on_change is not None:
            self.on_change(old.public_key)
        if old.kind == "agent":
            self.bound[old.name] = new.public_key
        self._put(new)
        log.warning("replaced %s key %s of %s by %s", old.kind, keyfiles.fingerprint(old.public_key), old.name,
                    keyfiles.fingerprint(new.public_key))
        return old, new

    def is_accepted_client(self, public_key: str) -> bool:
        rec = self.by_key.get(public_key)
        return rec is not None and rec.kind == "client" and rec.state == KEY_ACCEPTED

    def reject(self, name: str, note: str = "") -> KeyRecord:
        rec = self.find(name)
        if rec.public_key == self.admin_key:
            raise BrokerError("Forbidden", "the broker's own admin key cannot be rejected")
        if rec.kind == "agent" and self.bound.get(rec.name) == rec.public_key:
            del self.bound[rec.name]
        rec.state, rec.updated_at, rec.note = KEY_REJECTED, time.time(), note
        self._put(rec)
        log.info("rejected %s key %s (%s)", rec.kind, keyfiles.fingerprint(rec.public_key), rec.name)
        return rec

    def delete(self, name: str) -> KeyRecord:
        rec = self.find(name)
        if rec.public_key == self.admin_key:
            raise BrokerError("Forbidden", "the broker's own admin key cannot be deleted")
        if rec.kind == "agent" and self.bound.get(rec.name) == rec.public_key:
            del self.bound[rec.name]
        del self.by_key[rec.public_key]
        self.store.delete_key(rec.public_key)
        if self.on_change is not None:
            self.on_change(rec.public_key)
        log.info("deleted %s key %s (%s)", rec.kind, keyfiles.fingerprint(rec.public_key), rec.name)
        return rec

    def ensure_admin(self, public_key: str) -> None:
        """The broker's own admin key: the one client key with every permission."""
        self.admin_key = public_key
        rec = self.by_key.get(public_key)
        if rec is None or rec.state != KEY_ACCEPTED or rec.kind != "client":
            now = time.time()
            self._put(KeyRecord(public_key, "client", "admin", KEY_ACCEPTED, now, now))

    def client_name(self, public_key: str) -> str:
        rec = self.by_key.get(public_key)
        return rec.name if rec is not None else "unknown"

    @staticmethod
    def view(rec: KeyRecord, tags_of: Callable[[str], TagRecord | None] | None = None) -> KeyView:
        """``tags_of``: an instance's tag record, to show an accepted agent key's approved tags and
        any change its agent proposes (a pending key shows what its agent proposes)."""
        tags: dict[str, str] = {}
        proposed = None
        if rec.kind == "agent":
            if rec.state == KEY_PENDING:
                proposed = dict(rec.tags)
            elif rec.state == KEY_ACCEPTED and tags_of is not None:
                found = tags_of(rec.name)
                if found is not None:
                    tags, proposed = dict(found.tags), found.proposed
        return protocol.KeyView(kind=rec.kind, name=rec.name, state=rec.state,
                                fingerprint=keyfiles.fingerprint(rec.public_key),
                                public_key=rec.public_key, first_seen=rec.first_seen,
                                updated_at=rec.updated_at, tags=tags, proposed_tags=proposed)

    def views(self, tags_of: Callable[[str], TagRecord | None] | None = None) -> list[KeyView]:
        return [self.view(r, tags_of) for r in sorted(self.by_key.values(), key=lambda r: (r.kind, r.name))]
