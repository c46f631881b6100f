"""Agent sessions: which connection currently speaks for which instance, its liveness, and
what is queued for it (deliveries, result acks, cancels) until the loop's next send.

A session is keyed by the agent's authenticated public key (the ZAP User-Id of its frames) and
bound to the connection its HELLO came on: its routing id and its file descriptor (the source
descriptor of the HELLO frame). A message counts only if it arrives on that connection; when the
connection closes (the transport's socket monitor says so at once) the session ends before
anything more is sent to its routing id. A peer may choose its own routing id, so a stale routing
id could otherwise be claimed by another connection and receive this instance's traffic.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from zerorun import protocol
from zerorun.protocol import CONNECTION_LOST, INACTIVE, ONLINE

log = logging.getLogger("zerorun.broker.sessions")

LIVENESS = 3  # heartbeat intervals without a message before an agent is ConnectionLost
CLOSED = -2  # the fd of a session whose connection closed: no message matches it again
RESULT_ACK_DELAY = 0.25  # seconds a ResultAck may wait to ride on the session's next Deliver
MAX_HELD_ACKS = 500


@dataclass(eq=False)  # identity hash: sessions live in sets
class Session:
    """A connected agent: its authenticated key, instance and current routing id."""

    public_key: str
    instance_id: str
    routing_id: bytes
    last_seen: float
    fd: int = -1  # the connection's file descriptor
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES  # what the agent said it accepts
    online: bool = True
    last_pong: float = 0.0
    interval: float = 5.0  # heartbeat interval this agent was last told
    lost_after: float = 15.0  # silence that makes it ConnectionLost (covers the previous interval too)
    outbox: list[protocol.Invocation] = field(default_factory=list)
    outbox_sizes: list[int] = field(default_factory=list)  # bytes of each, roughly
    acks: list[str] = field(default_factory=list)
    acks_since: float = 0.0  # when the oldest of ``acks`` was stored
    ack_due: float = 0.0  # when its place in ``SessionTable.held`` comes due (0: it has none)
    cancels: list[str] = field(default_factory=list)


class SessionTable:
    def __init__(self, heartbeat_interval: float, max_heartbeats_per_second: float):
        self.heartbeat_interval = heartbeat_interval
        self.max_heartbeats_per_second = max_heartbeats_per_second
        self.by_key: dict[str, Session] = {}
        self.by_instance: dict[str, Session] = {}
        self.pending_rids: dict[str, tuple[bytes, int]] = {}  # pending key -> connection, to nudge on accept
        self.by_fd: dict[int, Session] = {}
        self.dirty: set[Session] = set()  # sessions with queued deliveries, acks, cancels
        self.held: list[tuple[float, int, Session]] = []  # a heap of (when due, n, session) holding result acks
        self._held_n = itertools.count()

    def __len__(self) -> int:
        return len(self.by_key)

    def online_count(self) -> int:
        return sum(1 for s in self.by_key.values() if s.online)

    def find(self, key: str | None, routing_id: bytes, fd: int) -> Session | None:
        """The session this message belongs to: by authenticated key (insecure mode has no keys:
        by connection), and only on the connection its HELLO came from."""
        session = self.by_fd.get(fd) if key is None else self.by_key.get(key)
        if session is None or session.routing_id != routing_id or session.fd != fd:
            return None
        return session

    def open(self, key: str, instance_id: str, routing_id: bytes, fd: int, now: float) -> Session:
        """A session after a HELLO that was accepted; replaces any other for the instance."""
        old = self.by_instance.get(instance_id)
        if old is not None and old.public_key != key:
            self.by_key.pop(old.public_key, None)
        interval = self.fleet_heartbeat_interval(extra=1)
        session = Session(key, instance_id, routing_id, now, fd=fd, interval=interval,
                          lost_after=interval * LIVENESS)
        self.by_key[key] = session
        self.by_instance[instance_id] = session
        self.by_fd[fd] = session
        self.pending_rids.pop(key, None)
        return session

    def connection_closed(self, fd: int) -> Session | None:
        """The current, online session whose connection this was, now ended (None if none).
        Messages still queued from that connection are not this session's any more."""
        session = self.by_fd.pop(fd, None)
        if session is None:
            return None
        session.fd = CLOSED
        if self.by_key.get(session.public_key) is not session or not session.online:
            return None
        session.online = False
        return session

    def drop_key(self, key: str) -> Session | None:
        """Forgets the session of a key that was rejected or deleted."""
        session = self.by_key.pop(key, None)
        if session is not None:
            if self.by_instance.get(session.instance_id) is session:
                del self.by_instance[session.instance_id]
            if self.by_fd.get(session.fd) is session:
                del self.by_fd[session.fd]
        return session

    def is_online(self, instance_id: str) -> bool:
        session = self.by_instance.get(instance_id)
        return session is not None and session.online

    def ping_status(self, instance_id: str, known: bool) -> str:
        session = self.by_instance.get(instance_id)
        if session is None:
            return CONNECTION_LOST if known else INACTIVE
        return ONLINE if session.online else CONNECTION_LOST

    def fleet_heartbeat_interval(self, extra: int = 0) -> float:
        """The configured interval, lengthened so that the whole fleet sends at most
        ``max_heartbeats_per_second`` (as Nomad scales its heartbeat TTL): idle cost stays flat
        as the fleet grows, and an agent that froze is noticed after LIVENESS of these intervals."""
        base = self.heartbeat_interval
        cap = self.max_heartbeats_per_second
        if cap <= 0:
            return base
        needed = (len(self.by_key) + extra) / cap
        if needed <= base:
            return base
        return float(math.ceil(needed / base) * base)  # steps of the base: no churn per agent

    def heartbeat_reply(self, session: Session) -> protocol.Pong | None:
        """The Pong a heartbeat earns, if any: the agent needs to hear from us once per few
        intervals, not once per heartbeat; at once when the fleet's size changed its interval."""
        interval = self.fleet_heartbeat_interval()
        if interval != session.interval:
            session.lost_after = max(session.interval, interval) * LIVENESS
            session.interval = interval
            session.last_pong = session.last_seen
            return protocol.Pong(time.time(), interval)
        if session.last_seen - session.last_pong > interval * 1.5:
            session.last_pong = session.last_seen
            session.lost_after = interval * LIVENESS
            return protocol.Pong(time.time())
        return None

    def silent(self, now: float) -> list[Session]:
        """Online sessions that have been quiet past their liveness window."""
        return [s for s in self.by_key.values() if s.online and now - s.last_seen > s.lost_after]

    # -- what is queued for each agent --------------------------------------------------------

    def queue_delivery(self, instance_id: str, invocation: protocol.Invocation, size: int) -> None:
        session = self.by_instance[instance_id]
        session.outbox.append(invocation)
        session.outbox_sizes.append(size)
        self.dirty.add(session)

    def queue_cancel(self, instance_id: str, invocation_id: str) -> None:
        session = self.by_instance.get(instance_id)
        if session is not None and session.online:
            session.cancels.append(invocation_id)
            self.dirty.add(session)

    def queue_result_ack(self, session: Session, invocation_id: str, now: float) -> None:
        if not session.acks:
            session.acks_since = now
        session.acks.append(invocation_id)
        self.dirty.add(session)

    def withdraw(self, invocation_ids: dict[str, str]) -> None:
        """Takes back what is queued and not yet sent about these invocations (id -> instance):
        deliveries, cancels, result acks (an agent whose result was not written keeps it)."""
        for instance_id in set(invocation_ids.values()):
            session = self.by_instance.get(instance_id)
            if session is None:
                continue
            kept = [(inv, size) for inv, size in zip(session.outbox, session.outbox_sizes)
                    if inv.invocation_id not in invocation_ids]
            session.outbox, session.outbox_sizes = [inv for inv, _ in kept], [size for _, size in kept]
            session.cancels = [iid for iid in session.cancels if iid not in invocation_ids]
            session.acks = [iid for iid in session.acks if iid not in invocation_ids]

    def flush(self, send: Callable[[bytes, Any, int], None], now: float,
              sent: Callable[[list[str]], None] | None = None) -> int:
        """Hands every dirty session's queue to ``send(routing_id, message, fd)``; returns the
        invocations delivered. What was queued for a session that is no longer online is dropped:
        the command book delivers it again (and the agent resends its results) after the next HELLO.

        A ResultAck rides on the next Deliver when one follows soon (back-to-back commands: one
        message fewer per invocation); alone once it has waited RESULT_ACK_DELAY. Sessions holding
        acks wait in ``held`` by when they come due, so an iteration looks only at those due (not
        at every agent that had a result in the last RESULT_ACK_DELAY)."""
        delivered = 0
        dirty, self.dirty = self.dirty, set()
        for session in dirty:
            if not session.online:
                session.outbox, session.outbox_sizes, session.acks, session.cancels = [], [], [], []
                continue
            if session.outbox:
                for batch in _batches(session.outbox, session.outbox_sizes, session.max_message_bytes // 2):
                    send(session.routing_id, protocol.Deliver(batch, session.acks), session.fd)
                    session.acks = []
                if sent is not None:
                    sent([inv.invocation_id for inv in session.outbox])
                delivered += len(session.outbox)
                session.outbox, session.outbox_sizes = [], []
            elif session.acks:
                if now - session.acks_since >= RESULT_ACK_DELAY or len(session.acks) >= MAX_HELD_ACKS:
                    send(session.routing_id, protocol.ResultAck(session.acks), session.fd)
                    session.acks = []
                elif not session.ack_due:
                    self._hold(session)
            if session.cancels:
                send(session.routing_id, protocol.Cancel(session.cancels), session.fd)
                session.cancels = []
        held = self.held
        while held and held[0][0] <= now:
            session = heapq.heappop(held)[2]
            session.ack_due = 0.0
            if not session.acks:
                continue  # they rode on a Deliver meanwhile
            if not session.online:
                session.acks = []
            elif now - session.acks_since >= RESULT_ACK_DELAY:
                send(session.routing_id, protocol.ResultAck(session.acks), session.fd)
                session.acks = []
            else:  # sent with a Deliver, then others came: they wait their own time
                self._hold(session)
        return delivered

    def _hold(self, session: Session) -> None:
        """The session's result acks wait (in ``held``) until RESULT_ACK_DELAY after the oldest."""
        session.ack_due = session.acks_since + RESULT_ACK_DELAY
        heapq.heappush(self.held, (session.ack_due, next(self._held_n), session))

    def sessions(self) -> Iterable[Session]:
        return self.by_key.values()


DELIVERY_OVERHEAD = 1024  # bytes an invocation's ids and names add to its rendered steps, at most


def _batches(invocations: list[protocol.Invocation], sizes: list[int], budget: int) -> Iterator[list[protocol.Invocation]]:
    """Deliveries in messages of at most ``budget`` bytes each (one invocation more if alone)."""
    if sum(sizes) <= budget:
        yield invocations
        return
    batch: list[protocol.Invocation] = []
    used = 0
    for invocation, size in zip(invocations, sizes):
        if batch and used + size > budget:
            yield batch
            batch, used = [], 0
        batch.append(invocation)
        used += size
    if batch:
        yield batch
