"""Several brokers, one fleet: what brokers sharing one PostgreSQL store tell each other.

Every broker of a cluster has a stable id (``broker.id`` in its state dir, or configured), holds
an advisory lock named after it for as long as it lives (its PostgreSQL session: the server frees
the lock the moment the broker dies) and a row in ``brokers`` that it refreshes every second.

- **Sessions.** An agent is connected to one broker at a time, its *holder*; ``agent_sessions``
  says which, and a broadcast tells every broker when an instance's session opens or closes.
- **Commands.** The broker that takes a send *owns* the command (``commands.owner``, and a lock
  ``cmd:<id>``, taken at its next tick, that settles who adopts it): its command book alone
  dispatches it, so rate control, canary, timeouts and cancel stay exact. It delivers an
  invocation to an instance held elsewhere by telling that holder (``Deliver`` event, after a
  ``CommandEvent`` with what the holder needs of the command; a command with secret values the
  holder reads from the store), which hands it to the agent.
  What the agent says back about a command owned elsewhere (acks, starts, results, refusals) the
  holder writes to ``relay`` (a run of a command's items of one kind to a row) and tells the
  owner, who applies it and deletes the rows in the commit that records what they changed:
  applying a row again changes nothing, and nothing is lost when either dies. Live output of a
  remote command goes to ``live_output`` for any broker's followers; completion is broadcast for
  any broker's waiters.
- **Failure.** A broker whose lock is free and whose row is stale is dead: the others forget its
  sessions (its agents reconnect elsewhere) and take over its active commands, one broker each, by
  taking the command's lock and then, in the store, its owner; the new owner rebuilds the command
  from the store. One whose row has not moved for ``UNRESPONSIVE_AFTER`` while its sessions hold
  its locks (frozen, or gone without closing its connections) has its sessions ended first
  (``end_sessions_of``: each of a broker's sessions holds the shared lock ``sessions:<id>``), as
  has one taken for dead, of whose sessions the server may have dropped only some. A broker that
  was only cut off from the server, or whose sessions were ended, finds, before it writes what it
  queued meanwhile, which of its commands another broker took (``fence_after_outage``): it leaves
  them and what it queued for them. A broker whose coordination session was re-established
  missed what was sent meanwhile, and one whose store was away could not act on what it was told:
  it re-reads what those events announce (relayed rows of its commands, where other brokers'
  agents are, which commands waited on here ended), on every tick until the store answers.

Events ride on LISTEN/NOTIFY, sent inside the group commit (delivered when the state they announce
is visible): a broadcast channel and one channel per broker. Nothing here polls on the hot path;
the one-second heartbeat and the two-second peer check are the only periodic queries.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import msgspec

from zerorun import protocol

from .errors import BrokerError
from .model import CommandRecord

log = logging.getLogger("zerorun.broker.cluster")

BROADCAST = "zerorun_cluster"
HEARTBEAT = 1.0  # seconds between a broker's row refreshes
PEER_CHECK = 2.0  # seconds between checks of who is alive
RELAYED_SWEEP = 60.0  # seconds between looks at what was delivered here for others and may have ended elsewhere
RELAYED_SWEEP_BATCH = 5_000  # invocations looked up per sweep, the least recently looked at first
DEAD_AFTER = 5.0  # a broker whose lock is free and whose row is older than this is dead
# A broker whose row has not moved for this long, watched without a break, while its sessions hold
# its locks, is unresponsive (frozen, or its machine gone without closing its connections: the
# server would keep its sessions, and its commands, for as long as its TCP timeouts take): its
# sessions are ended. More than the 15 s in which a broker notices a server that stopped answering
# (pg_connection's tcp_user_timeout), so that a broker cut off from the server notices first.
UNRESPONSIVE_AFTER = 20.0
RECONNECT_WITHIN = 6.0  # a live broker tries its server again within this (pg_connection's backoff, jitter)
PAYLOAD_LIMIT = 7000  # bytes of one NOTIFY payload (PostgreSQL allows 8000)
IDS_PER_EVENT = 100  # ids in one event at most
PART_BYTES = 6000  # and their bytes: with the event around them, any event fits a payload
STALLED_LIMIT = 10_000  # events kept to handle again after an outage of the store
TERMINAL = sorted(protocol.TERMINAL_STATUSES)


# -- events -------------------------------------------------------------------------------------


class SessionEvent(msgspec.Struct, tag="s", array_like=True):
    instance_id: str
    broker_id: str
    open: bool


class FleetEvent(msgspec.Struct, tag="f", array_like=True):
    instances: list[str] = []
    keys: list[str] = []


class DoneEvent(msgspec.Struct, tag="d", array_like=True):
    commands: list[str]


class OutputEvent(msgspec.Struct, tag="o", array_like=True):
    commands: list[str]


class RelayEvent(msgspec.Struct, tag="r", array_like=True):
    """Rows in ``relay`` wait for these commands' owners (each broker takes those it owns)."""

    commands: list[str]


class DeliverEvent(msgspec.Struct, tag="v", array_like=True):
    """To a holder: hand these invocations (id, instance) of a command to their agents."""

    command_id: str
    invocations: list[tuple[str, str]]


class CommandEvent(msgspec.Struct, tag="m", array_like=True):
    """To a holder, before the first ``DeliverEvent`` of a command in a commit: what it needs of
    the command (a ``DeliveredCommand``, msgpack), so that it need not read it from the store."""

    command: bytes


class DeliveredCommand(msgspec.Struct, array_like=True):
    """The part of another broker's command that its agents' holder delivers (``CommandRecord``'s
    names). Sent only for commands without secret values: a payload may rest on the server's disk
    in its notification queue after the command has completed and dropped its steps."""

    command_id: str
    owner: str
    document_name: str
    document_version: str
    document_sha256: str
    steps: list[protocol.Step]
    requested_at: float
    expires_at: float
    steps_bytes: int


class CancelEvent(msgspec.Struct, tag="x", array_like=True):
    """To a holder: cancel these invocations (id, instance) on their agents."""

    invocations: list[tuple[str, str]]


Event = Union[SessionEvent, FleetEvent, DoneEvent, OutputEvent, RelayEvent, DeliverEvent, CommandEvent, CancelEvent]
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[Event])


class RelayedAck(msgspec.Struct, array_like=True):
    invocation_ids: list[str]
    at: float = 0.0


class Undelivered(msgspec.Struct, array_like=True):
    """An invocation the broker holding the agent's session could not deliver for its owner."""

    invocation_id: str
    why: str


_enc = msgspec.msgpack.Encoder()
_INSERT_RELAY = ("INSERT INTO relay (command_id, kind, instance_id, body) "
                 "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bytea[])")
_INSERT_LIVE = ("INSERT INTO live_output (command_id, invocation_id, stream, data) "
                "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])")
_dec_result = msgspec.msgpack.Decoder(protocol.InvocationResult)
_dec_ack = msgspec.msgpack.Decoder(RelayedAck)
_dec_refusal = msgspec.msgpack.Decoder(protocol.Refusal)
_dec_undelivered = msgspec.msgpack.Decoder(Undelivered)
_dec_instances = msgspec.msgpack.Decoder(list[str])
_dec_delivered = msgspec.msgpack.Decoder(DeliveredCommand)
_dec_results = msgspec.msgpack.Decoder(list[tuple[str, protocol.InvocationResult]])
_dec_items = msgspec.msgpack.Decoder(list[tuple[str, msgspec.Raw]])
RUN = "*"  # a relay row's kind ending in it holds a run of that kind's items: [[instance id, body], ...]
DESCRIBE_LIMIT = 4000  # bytes of a DeliveredCommand sent to holders (base64 in a payload); larger ones are read


@dataclass
class RelayedItem:
    """Something an agent said about a command this broker owns, via the instance's holder."""

    seq: int
    command_id: str
    kind: str  # ack | started | result | refuse | undeliverable | cancel
    instance_id: str
    body: bytes
    decoded: Any = None  # a result decoded with the others of its row (``relayed_items``)

    def ack(self) -> RelayedAck:
        return _dec_ack.decode(self.body)

    def result(self) -> protocol.InvocationResult:
        return self.decoded if self.decoded is not None else _dec_result.decode(self.body)

    def refusal(self) -> protocol.Refusal:
        return _dec_refusal.decode(self.body)

    def undelivered(self) -> Undelivered:
        return _dec_undelivered.decode(self.body)

    def instances(self) -> list[str]:
        return _dec_instances.decode(self.body)


@dataclass
class Peer:
    broker_id: str
    agent_endpoint: str
    client_endpoint: str
    started_at: float
    seen_at: float
    alive: bool = True


def _lock_pair(name: str) -> tuple[int, int]:
    """(classid, objid) of the advisory lock ``name`` as ``pg_locks`` shows it."""
    from .store.pg_coordination import lock_key

    key = lock_key(name) & 0xFFFFFFFFFFFFFFFF
    return key >> 32, key & 0xFFFFFFFF


@functools.lru_cache(maxsize=256)
def channel_of(broker_id: str) -> str:
    """A broker's own NOTIFY channel (told once per remote delivery: cached)."""
    return "zerorun_b_" + hashlib.sha256(broker_id.encode()).hexdigest()[:20]


def stable_id(state_dir: Path, configured: str = "") -> str:
    """The broker's id: configured, else made once and kept in its state dir."""
    if configured:
        return configured
    path = state_dir / "broker.id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = f"{os.uname().nodename.split('.')[0]}-{uuid.uuid4().hex[:8]}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value


class Cluster:
    def __init__(self, store: Any, broker_id: str, agent_endpoint: str, client_endpoint: str):
        self.store = store
        self.id = broker_id
        self.channel = channel_of(broker_id)
        self.agent_endpoint, self.client_endpoint = agent_endpoint, client_endpoint
        self.coord = store.coordination()
        if not self.coord.try_lock(f"broker:{broker_id}"):
            raise BrokerError("BrokerIdInUse", f"another broker with id {broker_id!r} is running on this store; "
                                               "give each broker its own state dir (or --broker-id)")
        store.mark_sessions(f"sessions:{broker_id}")  # for ``end_sessions_of``
        self.coord.listen(BROADCAST)
        self.coord.listen(self.channel)
        self._generation = self.coord.generation
        self.missed_notifications = False  # events lost or not acted on: the broker re-reads (``resync``)
        self.stalled: deque[Event] = deque()  # events to handle again once the store is back
        self.started_at = time.time()
        self._write_row(self.started_at)
        self.peers: dict[str, Peer] = {}
        self.remote: dict[str, str] = {}  # instance id -> the other broker holding its session
        # invocation id -> (command, instance), delivered here for others: what an agent says of
        # one is taken only from the instance it was delivered to
        self.relayed: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.attempts: dict[str, int] = {}  # of those, deliveries sent and not yet acknowledged
        self._commands: OrderedDict[str, CommandRecord | DeliveredCommand] = OrderedDict()  # others', as delivered
        self._described: OrderedDict[str, bytes] = OrderedDict()  # own commands as holders are told of them
        self._told: set[tuple[str, str]] = set()  # (holder, command) told of in this iteration
        self._out: dict[str, list[Event]] = {}
        self._forget_live: list[str] = []
        self._live_commands: set[str] = set()  # own commands whose live output may be in the store
        self._live_done: list[str] = []  # of those, finished this iteration (their last results forget theirs)
        self._relay_rows: list[tuple[str, str, str, bytes]] = []  # this iteration's, one INSERT in all
        self._relay_announced: set[str] = set()  # commands of those rows, told of (one RelayEvent each)
        self._applied: set[int] = set()  # seqs of relayed rows applied in this iteration, one DELETE in all
        self._live_rows: list[tuple[str, str, str, str]] = []
        self._sessions: dict[str, str | None] = {}  # this iteration's session changes: key, or None (closed)
        self._unlocked: set[str] = set()  # own commands whose lock is taken at the next tick (``fence``)
        self._unlock_later: list[str] = []  # locks of completed commands, released at the next tick
        self._next_heartbeat = self._next_peer_check = 0.0
        self._next_relayed_sweep = time.monotonic() + RELAYED_SWEEP
        self._grace_until = time.monotonic() + DEAD_AFTER  # a fresh view of the cluster before judging it
        self._mourned: set[str] = set()  # brokers already known dead
        self._moved: dict[str, tuple[float, float]] = {}  # peer -> (its row's seen_at, when we first saw it)
        self._last_look = 0.0  # monotonic time of the last look at the cluster
        self.unresponsive: list[str] = []  # found by the last look: holding their locks, not writing
        self.stats: dict[str, int] = {"notifications_in": 0, "notifications_out": 0, "relayed_in": 0,
                                      "relayed_out": 0, "commands_adopted": 0, "commands_lost": 0,
                                      "stalled_dropped": 0, "peers_ended": 0}
        self.refresh_peers()
        self.reread_sessions(lambda instance_id: False)
        log.info("broker %s joined a cluster of %d live broker(s)", self.id, sum(p.alive for p in self.peers.values()))

    def _write_row(self, now: float) -> None:
        self.store.query("INSERT INTO brokers VALUES (%s, %s, %s, %s, %s) ON CONFLICT (broker_id) DO UPDATE SET "
                         "agent_endpoint = EXCLUDED.agent_endpoint, client_endpoint = EXCLUDED.client_endpoint, "
                         "started_at = EXCLUDED.started_at, seen_at = EXCLUDED.seen_at RETURNING 1",
                         (self.id, self.agent_endpoint, self.client_endpoint, self.started_at, now))

    def fileno(self) -> int:
        return self.coord.fileno()

    # -- events in and out ----------------------------------------------------------------------

    def drain(self) -> list[Event]:
        events: list[Event] = []
        for _channel, payload in self.coord.drain():
            self.stats["notifications_in"] += 1
            try:
                events.extend(_decode.decode(payload))
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("ignored a cluster notification that does not decode")
        return events

    def stall(self, event: Event) -> None:
        """An event not acted on because the store was away: handled again by ``resync``, at the
        next tick that finds the store back (a delivery waits there, not lost until its timeout)."""
        if len(self.stalled) >= STALLED_LIMIT:  # the re-reads still cover relayed rows, sessions, waiters
            self.stalled.popleft()
            self.stats["stalled_dropped"] += 1
        self.stalled.append(event)
        self.missed_notifications = True

    def broadcast(self, event: Event) -> None:
        self._out.setdefault(BROADCAST, []).append(event)

    def tell(self, broker_id: str, event: Event) -> None:
        self._out.setdefault(channel_of(broker_id), []).append(event)

    def flush(self) -> None:
        """Queues this iteration's rows and events (as NOTIFYs) for the coming group commit: the
        rows of a kind as one statement, so that the flush's text repeats (prepared once) whatever
        the number of rows."""
        if self._relay_rows:
            self.store.queue_write(_INSERT_RELAY, [list(column) for column in zip(*relay_rows(self._relay_rows))])
            self._relay_rows = []
            self._relay_announced.clear()
        if self._applied:
            self.store.queue_write("DELETE FROM relay WHERE seq = ANY(%b::bigint[])", [list(self._applied)])
            self._applied = set()
        if self._live_rows:
            self.store.queue_write(_INSERT_LIVE, [list(column) for column in zip(*self._live_rows)])
            self._live_rows = []
        if self._live_done:
            self._live_commands.difference_update(self._live_done)
            self._live_done = []
        if self._forget_live:  # its own statement, after the rows this commit may add
            self.store.queue_write("DELETE FROM live_output WHERE invocation_id = ANY(%b::text[])",
                                   [self._forget_live], after=True)
            self._forget_live = []
        if self._sessions:  # one row change per instance: a statement may not touch a row twice
            opened = {i: k for i, k in self._sessions.items() if k is not None}
            closed = [i for i, k in self._sessions.items() if k is None]
            self._sessions = {}
            if closed:
                self.store.queue_write("DELETE FROM agent_sessions WHERE instance_id = ANY(%b::text[]) AND "
                                       "broker_id = %s", [closed, self.id])
            if opened:
                now = time.time()
                self.store.queue_write(
                    "INSERT INTO agent_sessions SELECT i, %s, k, %s FROM unnest(%b::text[], %b::text[]) AS s(i, k) "
                    "ON CONFLICT (instance_id) DO UPDATE SET broker_id = EXCLUDED.broker_id, "
                    "public_key = EXCLUDED.public_key, since = EXCLUDED.since",
                    [self.id, now, list(opened), list(opened.values())], after=True)
        out, self._out = self._out, {}
        self._told.clear()
        for channel, events in out.items():
            batch: list[bytes] = []  # encoded events: a payload is their JSON list
            size = 2
            for event in _merged(events):
                encoded = _encode(event)
                if batch and size + len(encoded) + 1 > PAYLOAD_LIMIT:
                    self._notify(channel, batch)
                    batch, size = [], 2
                batch.append(encoded)
                size += len(encoded) + 1
            if batch:
                self._notify(channel, batch)

    def _notify(self, channel: str, encoded: list[bytes]) -> None:
        self.store.notify(channel, _payload(encoded))
        self.stats["notifications_out"] += 1

    # -- sessions -------------------------------------------------------------------------------

    def session_opened(self, instance_id: str, public_key: str) -> None:
        self.remote.pop(instance_id, None)
        self._sessions[instance_id] = public_key
        self.broadcast(SessionEvent(instance_id, self.id, True))

    def session_closed(self, instance_id: str) -> None:
        self._sessions[instance_id] = None
        self.broadcast(SessionEvent(instance_id, self.id, False))

    def holder(self, instance_id: str) -> str | None:
        """The live broker holding this instance's session, if not this one."""
        holder = self.remote.get(instance_id)
        if holder is None:
            return None
        peer = self.peers.get(holder)
        return holder if peer is not None and peer.alive else None

    def apply_session(self, event: SessionEvent) -> bool:
        """A session event from another broker; True when the instance is now held there."""
        if event.broker_id == self.id:
            return False
        peer = self.peers.get(event.broker_id)
        if peer is None:  # it just spoke: alive, whatever the last look said
            now = time.time()
            self.peers[event.broker_id] = Peer(event.broker_id, "", "", now, now)
        elif not peer.alive:  # e.g. back after it was cut off from the server long enough to be judged dead
            peer.alive, peer.seen_at = True, time.time()
        if event.open:
            self.remote[event.instance_id] = event.broker_id
            return True
        if self.remote.get(event.instance_id) == event.broker_id:
            del self.remote[event.instance_id]
        return False

    def reread_sessions(self, held_here: Callable[[str], bool]) -> list[str]:
        """Where other brokers' agents are, as the store says (at start, and after missed
        notifications: ``SessionEvent``s among them); the instances whose holder changed. An
        instance held here stays here: its own session's row may still wait in the queued writes."""
        now_remote = {}
        for instance_id, holder in self.store.query(
                "SELECT instance_id, broker_id FROM agent_sessions WHERE broker_id <> %s", (self.id,)):
            peer = self.peers.get(holder)
            if peer is not None and peer.alive and not held_here(instance_id):
                now_remote[instance_id] = holder
        changed = [i for i, holder in now_remote.items() if self.remote.get(i) != holder]
        self.remote = now_remote
        return changed

    def completed(self, command_ids: list[str]) -> list[str]:
        """Those of the commands that have completed (after missed ``DoneEvent``s)."""
        if not command_ids:
            return []
        return [r[0] for r in self.store.query(
            "SELECT command_id FROM commands WHERE command_id = ANY(%b::text[]) AND status = ANY(%b::text[])",
            (command_ids, TERMINAL))]

    # -- delivering for others, relaying to owners ------------------------------------------------

    def deliver_through(self, holder: str, rec: CommandRecord, invocation_id: str, instance_id: str) -> None:
        """Has the broker holding an instance's session deliver one of this broker's invocations;
        the first of a command in an iteration tells that holder what it needs of the command."""
        if (holder, rec.command_id) not in self._told:
            self._told.add((holder, rec.command_id))
            described = self._description(rec)
            if described:
                self.tell(holder, CommandEvent(described))
        events = self._out.setdefault(channel_of(holder), [])
        last = events[-1] if events else None
        if type(last) is DeliverEvent and last.command_id == rec.command_id:  # as ``_merged`` would fold them
            last.invocations.append((invocation_id, instance_id))
        else:
            events.append(DeliverEvent(rec.command_id, [(invocation_id, instance_id)]))

    def _description(self, rec: CommandRecord) -> bytes:
        """A command as holders are told of it: b"" when it has secret values or is large."""
        described = self._described.get(rec.command_id)
        if described is None:
            described = b""
            if rec.steps == rec.display_steps:
                described = _enc.encode(DeliveredCommand(
                    rec.command_id, rec.owner, rec.document_name, rec.document_version, rec.document_sha256,
                    rec.steps, rec.requested_at, rec.expires_at, rec.steps_bytes))
                if len(described) > DESCRIBE_LIMIT:
                    described = b""
            self._described[rec.command_id] = described
            if len(self._described) > 256:
                self._described.popitem(last=False)
        return described

    def described(self, event: CommandEvent) -> None:
        """Another broker's command, as it delivers it through this one (see ``command``)."""
        try:
            rec = _dec_delivered.decode(event.command)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignored a command description that does not decode")
            return
        if rec.command_id not in self._commands:
            self._remember(rec)

    def command(self, command_id: str) -> CommandRecord | DeliveredCommand | None:
        """Another broker's command, as it is delivered (cached: its steps do not change)."""
        rec = self._commands.get(command_id)
        if rec is None:
            rec = self.store.get_command(command_id)
            if rec is None:
                return None
            self._remember(rec)
        return rec

    def _remember(self, rec: CommandRecord | DeliveredCommand) -> None:
        self._commands[rec.command_id] = rec
        if len(self._commands) > 512:
            self._commands.popitem(last=False)

    def delivered_for(self, invocation_id: str, command_id: str, instance_id: str) -> None:
        self.relayed[invocation_id] = (command_id, instance_id)
        if len(self.relayed) > 200_000:
            self.attempts.pop(self.relayed.popitem(last=False)[0], None)

    def sent_for_others(self, invocation_ids: list[str]) -> None:
        """Deliveries for other owners that left this broker: counted against the agent's limit
        (``MAX_DELIVERIES``) here, where they are sent, as the owner counts its own."""
        relayed, attempts = self.relayed, self.attempts
        for iid in invocation_ids:
            if iid in relayed:
                attempts[iid] = attempts.get(iid, 0) + 1

    def relay_acks(self, owner: str, command_id: str, instance_id: str, invocation_ids: list[str], at: float) -> None:
        """The agent holds these invocations of another owner: that owner learns they were
        delivered, and this broker stops counting its deliveries of them."""
        self.relay(owner, command_id, "ack", instance_id, RelayedAck(invocation_ids, at))
        for iid in invocation_ids:
            self.attempts.pop(iid, None)

    def forget_delivery(self, invocation_id: str) -> None:
        """The agent acknowledged, answered or refused an invocation delivered for another owner."""
        self.relayed.pop(invocation_id, None)
        self.attempts.pop(invocation_id, None)

    def sweep_relayed(self) -> int:
        """Forgets invocations delivered here for another owner that ended without their result
        passing through this broker (the agent moved to another broker; the owner timed them out or
        found them lost), or whose rows are gone (pruned): the store says so. Without this they
        stayed until the bound of ``relayed``, and the loop was never quiet again
        (``Broker._quiet``). Those still running go to the end of the line; returns how many were
        forgotten."""
        looked = list(itertools.islice(self.relayed, RELAYED_SWEEP_BATCH))
        if not looked:
            return 0
        running = {iid for (iid,) in self.store.query(
            "SELECT invocation_id FROM invocations WHERE invocation_id = ANY(%b::text[]) AND status <> ALL(%b::text[])",
            (looked, TERMINAL))}
        for iid in looked:
            if iid in running:
                self.relayed.move_to_end(iid)
            else:
                self.forget_delivery(iid)
        return len(looked) - len(running)

    def relayed_command(self, invocation_id: str, instance_id: str) -> str | None:
        """The command of an invocation delivered here for another owner, if to this instance."""
        entry = self.relayed.get(invocation_id)
        return entry[0] if entry is not None and entry[1] == instance_id else None

    def owner_of(self, invocation_id: str, instance_id: str) -> tuple[str, str] | None:
        """(command id, owner) of an invocation addressed to this instance that another broker
        owns; None when it is not so (unknown, another instance's, or this broker's own)."""
        command_id = self.relayed_command(invocation_id, instance_id)
        if command_id is None:
            rows = self.store.query("SELECT command_id, instance_id FROM invocations WHERE invocation_id = %s",
                                    (invocation_id,))
            if not rows or rows[0][1] != instance_id:
                return None
            command_id = rows[0][0]
        rec = self.command(command_id)
        if rec is None or rec.owner == self.id:
            return None
        return command_id, rec.owner

    def owners_of(self, invocation_ids: list[str], instance_id: str) -> dict[str, tuple[str, str]]:
        """``owner_of`` for many invocations (those it finds), with one query of the store per
        thousand of them instead of one each: an agent's message may name thousands, made up."""
        commands: dict[str, str] = {}
        asked: list[str] = []
        for iid in dict.fromkeys(invocation_ids):
            command_id = self.relayed_command(iid, instance_id)
            if command_id is None:
                asked.append(iid)
            else:
                commands[iid] = command_id
        for i in range(0, len(asked), 1000):
            commands.update(self.store.query(
                "SELECT invocation_id, command_id FROM invocations WHERE invocation_id = ANY(%b::text[]) "
                "AND instance_id = %s", (asked[i:i + 1000], instance_id)))
        out: dict[str, tuple[str, str]] = {}
        for iid, command_id in commands.items():
            rec = self.command(command_id)
            if rec is not None and rec.owner != self.id:
                out[iid] = (command_id, rec.owner)
        return out

    def relay(self, owner: str, command_id: str, kind: str, instance_id: str, body: Any) -> None:
        """Something for a command's owner, through the store. Announced to every broker, not to
        the owner this broker last knew: the owner may have died and another adopted the command."""
        self._relay_rows.append((command_id, kind, instance_id, _enc.encode(body)))
        if command_id not in self._relay_announced:
            self._relay_announced.add(command_id)
            self.broadcast(RelayEvent([command_id]))
        self.stats["relayed_out"] += 1

    def relayed_items(self, command_ids: list[str]) -> list[RelayedItem]:
        rows = self.store.query("SELECT seq, command_id, kind, instance_id, body FROM relay WHERE command_id = "
                                "ANY(%b::text[]) ORDER BY seq", (command_ids,))
        items = relayed_items(rows)
        self.stats["relayed_in"] += len(items)
        return items

    def applied(self, items: list[RelayedItem]) -> None:
        """Relayed rows applied here leave the store with the iteration's commit, in one statement
        (a statement per drained event made the commit's text differ from one commit to the next)."""
        self._applied.update(i.seq for i in items)  # a run's items share their row's

    def live_output(self, command_id: str, invocation_id: str, stream: str, data: str) -> None:
        self._live_rows.append((command_id, invocation_id, stream, data))

    def live_text(self, command_id: str) -> dict[tuple[str, str], str]:
        """(invocation id, stream) -> the live output other brokers' agents sent for a command."""
        out: dict[tuple[str, str], list[str]] = {}
        for invocation_id, stream, data in self.store.query(
                "SELECT invocation_id, stream, data FROM live_output WHERE command_id = %s ORDER BY seq",
                (command_id,)):
            out.setdefault((invocation_id, stream), []).append(data)
        return {k: "".join(v) for k, v in out.items()}

    def live_seen(self, command_ids: Iterable[str]) -> None:
        """Own commands with live output in the store (written here, or by the holders of their
        agents: their OutputEvents come before the results they relay)."""
        self._live_commands.update(command_ids)

    def forget_live(self, invocation_id: str, command_id: str | None = None) -> None:
        """A finished invocation's live output goes from the store; only where there can be some
        (``command_id`` None: unknown, so it goes in any case): the delete is a statement of its own
        in the group commit, which otherwise is a single one."""
        if command_id is None or command_id in self._live_commands:
            self._forget_live.append(invocation_id)

    # -- owning commands --------------------------------------------------------------------------

    def own(self, command_id: str) -> bool:
        """Takes a command's lock now (to adopt it, or to load it at start); while the store is
        away, at the next tick that reaches it (``fence``)."""
        try:
            return self.coord.try_lock(f"cmd:{command_id}")
        except BrokerError:
            self._unlocked.add(command_id)
            return True

    def own_created(self, command_id: str) -> None:
        """A command this broker has just created is its own by the owner column alone while this
        broker lives; its lock only settles who adopts it if the broker dies (no other broker
        tries to take it before). So the lock is taken at the next tick, with every other one
        created meanwhile, in one query (``fence``), not with a query per command in the request
        path; a command that completes before then never takes it."""
        self._unlocked.add(command_id)

    def disown(self, command_id: str, at_once: bool = True) -> None:
        """Releases a command's lock; a completed command's (``at_once`` False) goes at the next
        tick, with the others' in one query (nobody waits for the lock of a completed command)."""
        self._unlocked.discard(command_id)
        if command_id in self._live_commands:  # at the iteration's end: the result completing it comes after
            self._live_done.append(command_id)
        name = f"cmd:{command_id}"
        if not at_once:
            if self.coord.holds(name):
                self._unlock_later.append(name)
            return
        try:
            self.coord.unlock(name)
        except BrokerError:
            pass  # the session is gone, and the lock with it

    owned: Any = staticmethod(lambda: ())  # set by the broker: the ids of the commands it owns

    def take_over(self, command_ids: list[str], dead: list[str]) -> set[str]:
        """Makes this broker the owner of dead brokers' commands whose locks it took, in the store
        at once (not with the next commit): a broker cut off from the server and judged dead finds
        there, when it is back, which of its commands are no longer its own (``fence_after_outage``)."""
        if not command_ids:
            return set()
        return {r[0] for r in self.store.query(
            "UPDATE commands SET owner = %s WHERE command_id = ANY(%b::text[]) AND owner = ANY(%b::text[]) "
            "RETURNING command_id", (self.id, command_ids, dead))}

    def active_commands_of(self, owners: list[str]) -> list[str]:
        rows = self.store.query("SELECT command_id FROM commands WHERE owner = ANY(%b::text[]) AND "
                                "status <> ALL(%b::text[])", (owners, TERMINAL))
        return [r[0] for r in rows]

    # -- who is alive -----------------------------------------------------------------------------

    def refresh_peers(self) -> list[str]:
        """Re-reads the cluster; the ids of brokers found dead since the last look (and, in
        ``unresponsive``, those that hold their locks without writing)."""
        held = {(int(c), int(o)) for c, o in self.store.query(
            "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted")}
        now, now_mono = time.time(), time.monotonic()
        watched = now_mono - self._last_look < 3 * PEER_CHECK  # no break in our own view (a stall here or of the server)
        self._last_look = now_mono
        newly_dead = []
        seen = {}
        self.unresponsive = []
        for broker_id, agent_ep, client_ep, started_at, seen_at in self.store.query(
                "SELECT broker_id, agent_endpoint, client_endpoint, started_at, seen_at FROM brokers"):
            locked = _lock_pair(f"broker:{broker_id}") in held
            alive = broker_id == self.id or locked or now - seen_at < DEAD_AFTER
            previous = self.peers.get(broker_id)
            if previous is not None and previous.alive and not alive:
                newly_dead.append(broker_id)
            seen[broker_id] = Peer(broker_id, agent_ep, client_ep, started_at, seen_at, alive)
            moved = self._moved.get(broker_id)
            if moved is None or moved[0] != seen_at or not watched:
                self._moved[broker_id] = (seen_at, now_mono)
            elif locked and broker_id != self.id and now_mono - moved[1] >= UNRESPONSIVE_AFTER:
                self.unresponsive.append(broker_id)
        self.peers = seen
        for gone in set(self._moved) - set(seen):
            del self._moved[gone]
        return newly_dead

    def end_sessions_of(self, broker_ids: list[str]) -> int:
        """Ends the server sessions of unresponsive brokers (those holding their locks), so that
        their commands are taken over at the next look. One that comes back finds its sessions
        gone and, before it writes anything, which of its commands another broker took
        (``fence_after_outage``). How many sessions were ended."""
        for b in broker_ids:
            self._moved.pop(b, None)  # watched afresh: once per UNRESPONSIVE_AFTER at most
        ended = self._end_sessions(broker_ids)
        if ended >= 0:
            log.warning("broker(s) %s have not written for %.0fs while holding their sessions (frozen, or their "
                        "machine gone without closing its connections): ended %d session(s), their commands are "
                        "taken over", ", ".join(broker_ids), UNRESPONSIVE_AFTER, ended)
            self.stats["peers_ended"] += len(broker_ids)
        return ended

    def _end_sessions(self, broker_ids: list[str]) -> int:
        """Ends every server session of these brokers, found by the shared lock each of them holds
        (``sessions:<id>``, and the coordination session's ``broker:<id>``): one role may end its
        own sessions. How many; -1 when the server refused (logged)."""
        import psycopg

        wanted = {_lock_pair(f"{kind}:{b}") for b in broker_ids for kind in ("broker", "sessions")}
        try:
            pids = sorted({int(pid) for classid, objid, pid in self.store.query(
                "SELECT classid, objid, pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted "
                "AND pid IS NOT NULL AND pid <> pg_backend_pid()") if (int(classid), int(objid)) in wanted})
            return sum(bool(r[0]) for r in self.store.query(
                "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))) if pids else 0
        except psycopg.Error as exc:  # e.g. brokers that log in as different roles
            log.error("the sessions of broker(s) %s could not be ended (%s): they stay until the server drops them",
                      ", ".join(broker_ids), " ".join(str(exc).split()))
            return -1

    def tick(self, now_mono: float) -> list[str]:
        """Heartbeat and peer check; returns brokers that died (their commands may be adopted).
        Call ``fence`` first."""
        if now_mono >= self._next_relayed_sweep:
            self._next_relayed_sweep = now_mono + RELAYED_SWEEP
            try:
                self.sweep_relayed()
            except BrokerError:  # the store is away: the next sweep
                pass
        if now_mono >= self._next_heartbeat:
            self._next_heartbeat = now_mono + HEARTBEAT
            self.store.queue_write("UPDATE brokers SET seen_at = %s WHERE broker_id = %s", [time.time(), self.id])
        if now_mono < self._next_peer_check:
            return []
        self._next_peer_check = now_mono + PEER_CHECK
        dead = self.refresh_peers()
        if now_mono < self._grace_until:
            return []
        if self.unresponsive:
            self.end_sessions_of(self.unresponsive)  # their locks go: taken for dead at the next look
        dead += [p.broker_id for p in self.peers.values() if not p.alive and p.broker_id != self.id]
        dead = sorted(set(dead))
        newly = [b for b in dead if b not in self._mourned]
        self._mourned = set(dead)
        if newly:
            log.warning("broker(s) %s stopped answering: their agents reconnect elsewhere, their commands are "
                        "taken over", ", ".join(newly))
            for instance_id in [i for i, b in self.remote.items() if b in newly]:
                del self.remote[instance_id]
            self.store.queue_write("DELETE FROM agent_sessions WHERE broker_id = ANY(%b::text[])", [newly])
            # a session of theirs the server still keeps (the store's, when only the coordination
            # session was dropped) ends before their commands are adopted: back, they look first
            if self._end_sessions(newly) > 0:
                log.info("ended what was left of the sessions of broker(s) %s", ", ".join(newly))
        return dead

    # -- fencing: what a broker cut off from the server lost meanwhile ------------------------------

    def fence(self, now_mono: float) -> list[str]:
        """The commands this broker has lost to another: locks are taken again after the
        coordination session was re-established (or after the store, when a command was created
        while it was away), and one held elsewhere was adopted while this broker was cut off from
        the server long enough to be judged dead. Raises ``BrokerError`` while the server is away."""
        if self.coord.generation != self._generation:  # our session was re-established: locks are gone
            self._generation = self.coord.generation
            self.missed_notifications = True  # and NOTIFYs sent while it was away: re-read what they announce
            if not self.coord.try_lock(f"broker:{self.id}"):
                log.error("another broker took this broker's id %r while the store was away", self.id)
            # the others lost theirs too (a restart of the server), and each comes back when its
            # own backoff lets it: none is judged dead before it has had its chance
            self._grace_until = now_mono + DEAD_AFTER + RECONNECT_WITHIN
            self._unlocked.update(self.owned())
        if self._unlock_later:
            unlocking, self._unlock_later = self._unlock_later, []
            try:
                self.coord.unlock_many(unlocking)
            except BrokerError:
                pass  # the session is gone, and the locks with it
        if not self._unlocked:
            return []
        relocked = list(self._unlocked)
        held = self.coord.try_locks([f"cmd:{cid}" for cid in relocked])
        lost = [cid for cid in relocked if f"cmd:{cid}" not in held]
        self._unlocked.difference_update(relocked)  # only now: a call that raised is made again, whole
        return lost

    def fence_after_outage(self, now_mono: float, online: Iterable[str]) -> tuple[set[str], list[str]]:
        """After an outage of the store, before anything queued meanwhile is written: the commands
        lost to another broker (by their locks, ``fence``, or by the store: one with writes queued
        here that another owns now, e.g. completed here meanwhile, or finished by its adopter),
        and of the instances whose agents are ``online`` here, those whose sessions the store no
        longer says this broker holds (others judged it dead and forgot them). Raises
        ``BrokerError`` while the server is away."""
        mine = sorted(set(self.owned()) | self.store.queued_commands())
        lost = {r[0] for r in self.store.query(
            "SELECT command_id FROM commands WHERE command_id = ANY(%b::text[]) AND owner NOT IN ('', %s)",
            (mine, self.id))} if mine else set()
        recorded = {r[0] for r in self.store.query("SELECT instance_id FROM agent_sessions WHERE broker_id = %s",
                                                   (self.id,))}
        self.coord.try_lock(f"broker:{self.id}")  # reaches the server: a new session shows in ``generation``
        lost.update(self.fence(now_mono))  # last: nothing after it raises (what it found is not lost)
        return lost, [i for i in online if i not in recorded and i not in self._sessions]

    def forget_commands(self, command_ids: set[str], open_invocations: dict[str, str]) -> dict[str, str]:
        """Commands another broker owns now (``open_invocations``: theirs that were open here):
        nothing this broker queued for them is written or sent, rows or events (a delivery sent
        through another broker would run beside the new owner's, beyond the command's
        concurrency). Returns their invocations that had something queued (id -> instance)."""
        for command_id in command_ids:
            self.disown(command_id)
            self._described.pop(command_id, None)
        records, dropped = self.store.forget_queued(command_ids)
        self._cancels_to_adopter(records, dropped)
        invocations = {**open_invocations, **{inv.invocation_id: inv.instance_id for inv in dropped}}
        for channel, events in self._out.items():
            self._out[channel] = _without(events, command_ids, invocations)

        def rewrite(payload: str) -> str | None:
            kept = _without(_decode.decode(payload), command_ids, invocations)
            return _payload([_encode(e) for e in kept]) if kept else None

        self.store.rewrite_notices(rewrite)
        self.stats["commands_lost"] += len(command_ids)
        return invocations

    def _cancels_to_adopter(self, commands: list[CommandRecord], invocations: list[protocol.InvocationView]) -> None:
        """A cancel this broker accepted while it was cut off from the server (what it queued says
        so: the command's cancel requested, invocations cancelled or cancelling) goes to the
        broker that took the command over, as a non-owner's cancel does."""
        whole = {rec.command_id for rec in commands if rec.cancel_requested}
        instances: dict[str, list[str]] = {}
        for inv in invocations:
            if inv.command_id not in whole and inv.status in (protocol.CANCELLING, protocol.CANCELLED):
                instances.setdefault(inv.command_id, []).append(inv.instance_id)
        for command_id in sorted(whole):
            self.relay("", command_id, "cancel", "", [])
        for command_id, ids in sorted(instances.items()):
            self.relay("", command_id, "cancel", "", sorted(ids))

    def leave(self) -> None:
        """A clean stop: the row goes, the session's locks with it."""
        try:
            self.store.queue_write("DELETE FROM brokers WHERE broker_id = %s", [self.id])
            self.store.queue_write("DELETE FROM agent_sessions WHERE broker_id = %s", [self.id])
        except BrokerError:
            pass

    def status(self) -> list[dict[str, Any]]:
        return [{"broker_id": p.broker_id, "agent_endpoint": p.agent_endpoint, "client_endpoint": p.client_endpoint,
                 "started_at": p.started_at, "seen_at": p.seen_at, "alive": p.alive, "self": p.broker_id == self.id}
                for p in sorted(self.peers.values(), key=lambda p: p.broker_id)]


def relay_rows(items: list[tuple[str, str, str, bytes]]) -> list[tuple[str, str, str, bytes]]:
    """An iteration's relayed items (command, kind, instance, body) as ``relay`` rows: a command's
    consecutive items of one kind in one row (kind + RUN), so that an owner reads, and the
    server writes and deletes, a row per run instead of one per agent's message (about twenty
    results of a 100-instance command in a holder's iteration). A command's items keep their
    order (a cancel stays between the results before and after it); a run of one is a plain row."""
    runs: dict[str, list[tuple[str, list[tuple[str, bytes]]]]] = {}
    for command_id, kind, instance_id, body in items:
        command_runs = runs.setdefault(command_id, [])
        if command_runs and command_runs[-1][0] == kind:
            command_runs[-1][1].append((instance_id, body))
        else:
            command_runs.append((kind, [(instance_id, body)]))
    rows = []
    for command_id, command_runs in runs.items():
        for kind, run in command_runs:
            if len(run) == 1:
                rows.append((command_id, kind, run[0][0], run[0][1]))
            else:
                rows.append((command_id, kind + RUN, "", _enc.encode([(i, msgspec.Raw(b)) for i, b in run])))
    return rows


def relayed_items(rows: Iterable[tuple[Any, ...]]) -> list[RelayedItem]:
    """``relay`` rows (seq, command, kind, instance, body) as the items they hold, in order; the
    items of a run share its row's seq (applying it deletes the row)."""
    items = []
    for seq, command_id, kind, instance_id, body in rows:
        seq = int(seq)
        if not kind.endswith(RUN):
            items.append(RelayedItem(seq, command_id, kind, instance_id, bytes(body)))
            continue
        kind = kind[:-len(RUN)]
        try:
            if kind == "result":  # decoded at once: the common run
                items.extend(RelayedItem(seq, command_id, kind, i, b"", r) for i, r in _dec_results.decode(body))
            else:
                items.extend(RelayedItem(seq, command_id, kind, i, bytes(b)) for i, b in _dec_items.decode(body))
        except (msgspec.DecodeError, msgspec.ValidationError):  # deleted with the rest (kind "": nothing to apply)
            log.warning("dropped a relayed row of command %s that does not decode", command_id)
            items.append(RelayedItem(seq, command_id, "", instance_id, b""))
    return items


def _payload(encoded: list[bytes]) -> str:
    """A NOTIFY's payload: the JSON list of these encoded events (``_decode`` reads it)."""
    return "[" + b",".join(encoded).decode() + "]"


def _without(events: list[Event], command_ids: set[str], invocation_ids: Iterable[str]) -> list[Event]:
    """``events`` without what they say of these commands' dispatch: deliveries, descriptions,
    cancels and completions (``Cluster.forget_commands``)."""
    invocation_ids = set(invocation_ids)
    kept: list[Event] = []
    for event in events:
        if isinstance(event, DeliverEvent) and event.command_id in command_ids:
            continue
        if isinstance(event, CommandEvent) and _dec_delivered.decode(event.command).command_id in command_ids:
            continue
        if isinstance(event, DoneEvent):
            event = DoneEvent([cid for cid in event.commands if cid not in command_ids])
            if not event.commands:
                continue
        elif isinstance(event, CancelEvent):
            event = CancelEvent([pair for pair in event.invocations if pair[0] not in invocation_ids])
            if not event.invocations:
                continue
        kept.append(event)
    return kept


def _merged(events: list[Event]) -> list[Event]:
    """Events of one kind that list ids folded together (a loop iteration may produce many), in
    events of at most IDS_PER_EVENT ids each."""
    commands: dict[type, list[str]] = {}
    instances: list[str] = []
    keys: list[str] = []
    out: list[Event] = []
    for event in events:
        if isinstance(event, (DoneEvent, OutputEvent, RelayEvent)):
            commands.setdefault(type(event), []).extend(event.commands)
        elif isinstance(event, FleetEvent):
            instances.extend(event.instances)
            keys.extend(event.keys)
        elif isinstance(event, DeliverEvent):  # a command's in a row: one event (the book dispatches so)
            last = out[-1] if out else None
            if isinstance(last, DeliverEvent) and last.command_id == event.command_id:
                last.invocations.extend(event.invocations)
            else:
                out.append(DeliverEvent(event.command_id, list(event.invocations)))
        elif isinstance(event, CancelEvent):
            out.extend(CancelEvent(part) for part in _pair_parts(event.invocations))
        else:
            out.append(event)
    out = [part for event in out for part in
           ([DeliverEvent(event.command_id, p) for p in _pair_parts(event.invocations)]
            if isinstance(event, DeliverEvent) else [event])]
    for kind, ids in commands.items():
        out.extend(kind(part) for part in _id_parts(list(dict.fromkeys(ids))))
    out.extend(FleetEvent(instances=part) for part in _id_parts(list(dict.fromkeys(instances))))
    out.extend(FleetEvent(keys=part) for part in _id_parts(list(dict.fromkeys(keys))))
    return out


def _id_parts(ids: list[str]) -> list[list[str]]:
    return _parts(ids, [len(i) + 3 for i in ids])


def _pair_parts(pairs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    return _parts(pairs, [len(a) + len(b) + 9 for a, b in pairs])


def _parts(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    """``items`` in runs of at most IDS_PER_EVENT, and of PART_BYTES in a payload (``sizes``: each
    item's, about): instance ids may be 128 characters long, and a payload that does not fit
    fails the commit."""
    if len(items) <= IDS_PER_EVENT and sum(sizes) <= PART_BYTES:
        return [items] if items else []
    parts: list[list[Any]] = []
    part: list[Any] = []
    size = 0
    for item, n in zip(items, sizes):
        if part and (len(part) >= IDS_PER_EVENT or size + n > PART_BYTES):
            parts.append(part)
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        parts.append(part)
    return parts
