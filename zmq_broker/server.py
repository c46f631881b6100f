"""The broker: two CURVE ROUTER sockets (agents, clients), a ZAP handler, one loop.

Each loop iteration drains a bounded batch from every ready socket, applies it to in-memory
state, commits the store once, then sends what the batch produced (one message per peer where
possible). Nothing a peer sends can crash the loop: frames are checked, bodies decoded against
the protocol's types, and every handler runs inside a guard that counts and logs failures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from zerorun import __version__, keys as keyfiles, protocol, targets as targeting
from zerorun.protocol import (
    CONNECTION_LOST, INACTIVE, KEY_ACCEPTED, KEY_DENIED, KEY_PENDING, ONLINE, HEADER, Reply)

from . import documents
from .docstore import DocumentStore, DocumentStoreError
from .commands import (
    DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ERRORS, CommandBook, RateError, parse_rate)
from .identity import KeyError_, KeyRegistry
from .interactive import InteractiveRelay
from .model import CommandRecord, InstanceRecord
from .output import LiveOutput
from .audit import AuditLog
from .policy import PolicyError, PolicyFile
from .store import Store
from .config import BrokerConfig

log = logging.getLogger("zerorun.broker")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
BATCH = 2000  # messages drained per socket per loop iteration
RESULT_ACK_DELAY = 0.25  # seconds a ResultAck may wait to ride on the session's next Deliver
QUIET_BATCH_MS = 50  # agent messages wait at most this long while nothing is in flight
LIVENESS = 3  # heartbeat intervals without a message before an agent is ConnectionLost


@dataclass(eq=False)  # identity hash: sessions live in sets
class Session:
    """A connected agent: its authenticated key, instance and current routing id."""

    public_key: str
    instance_id: str
    routing_id: bytes
    last_seen: float
    online: bool = True
    last_pong: float = 0.0
    interval: float = 5.0  # heartbeat interval this agent was last told
    lost_after: float = 15.0  # silence that makes it ConnectionLost (covers the previous interval too)
    outbox: list[protocol.Invocation] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    acks_since: float = 0.0  # when the oldest of ``acks`` was stored
    cancels: list[str] = field(default_factory=list)


@dataclass
class Waiter:
    routing_id: bytes
    rid: int
    command_id: str
    deadline: float
    include_output: bool = True
    follow: protocol.FollowOutput | None = None  # a follower of live output, not a waiter for the end
    instance_ids: list[str] | None = None  # only these invocations in the answer


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.stats: Counter[str] = Counter()
        self._stop = False
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        key_dir = state / "keys"
        key_dir.mkdir(exist_ok=True)
        os.chmod(key_dir, 0o700)
        self.public_key, self.secret_key = keyfiles.ensure_keypair(key_dir, "broker")
        admin_public, _ = keyfiles.ensure_keypair(key_dir, "admin")
        keyfiles.load_secret(key_dir / "broker.key_secret")  # refuses unsafe permissions
        self.store = Store(state / "broker.db")
        self.keys = KeyRegistry(self.store, auto_accept=config.auto_accept,
                                max_pending=config.max_pending_keys)
        self.keys.ensure_client("admin", admin_public.decode())
        self.documents = DocumentStore(self.store.db)
        try:
            self.policy = PolicyFile(config.policy_file or state / "policy.yaml")
        except PolicyError as exc:
            raise SystemExit(f"zerorun-broker: {exc}") from None
        self.audit = AuditLog(config.audit_file or state / "audit.jsonl")
        self.instances: dict[str, InstanceRecord] = {r.instance_id: r for r in self.store.load_instances()}
        self.tag_index: dict[tuple[str, str], set[str]] = {}  # (key, value) -> instance ids
        self.tag_keys: dict[str, set[str]] = {}  # key -> instance ids
        for rec in self.instances.values():
            self._index_tags(rec, None)
        self.sessions: dict[str, Session] = {}  # public key -> session
        self.by_instance: dict[str, Session] = {}
        self.pending_rids: dict[str, bytes] = {}  # pending agent key -> routing id, to nudge on accept
        self._dirty_sessions: set[Session] = set()  # sessions with queued deliveries, acks, cancels
        self.waiters: list[Waiter] = []
        self._next_liveness_scan = 0.0
        self.live = LiveOutput(config.max_output_bytes)
        self._replies: list[tuple[bytes, Reply]] = []
        self.interactive = InteractiveRelay(self)  # Exec / FileTransfer for the connection plugin
        self.book = CommandBook(self.store, self._queue_delivery, self._queue_cancel,
                                self._is_online, self._command_completed)
        self.book.load()
        self.store.flush()
        self._ctx = zmq.Context()
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        self.agents = self._router(config.agent_bind, b"agents")
        self.clients = self._router(config.client_bind, b"clients")
        self.agent_endpoint = self.agents.getsockopt_string(zmq.LAST_ENDPOINT)
        self.client_endpoint = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.metrics = None
        if config.metrics_bind:
            from .metrics import BrokerMetrics

            self.metrics = BrokerMetrics(config.metrics_bind)
            self.book.observer = lambda inv: self.metrics.observe_invocation(
                inv.requested_at, inv.delivered_at, inv.ended_at)
        self._write_client_config()
        if config.insecure:
            log.warning("INSECURE MODE: no CURVE encryption or authentication; any peer can connect")
        if config.auto_accept:
            log.warning("auto-accept is on: any new agent key is accepted on first HELLO")

    # -- set-up -----------------------------------------------------------------------------

    def _router(self, endpoint: str, domain: bytes) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # No ZMTP heartbeats on the broker's side: libzmq 4.3 cancels a heartbeat timer on
        # every message received, by a linear scan of all the I/O thread's timers (two per
        # peer), which made 5,000 idle agents cost a fifth of a core. Agents ping us (answered in
        # the I/O thread, no timer here); dead peers' TCP connections are reaped by the kernel's
        # keepalive, and instance liveness comes from the application heartbeats.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 15)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 4)
        if not self.config.insecure:
            sock.curve_server = True
            sock.curve_secretkey = self.secret_key
            sock.zap_domain = domain
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise SystemExit(f"zerorun-broker: cannot bind {endpoint}: {exc}") from None
        return sock

    def _advertised(self, endpoint: str) -> str:
        host = self.config.advertise_host
        if not host and ("0.0.0.0" in endpoint or "[::]" in endpoint or "*" in endpoint):
            host = "127.0.0.1"
        if host:
            port = endpoint.rsplit(":", 1)[1]
            return f"tcp://{host}:{port}"
        return endpoint

    def _write_client_config(self) -> None:
        state = self.config.state_dir
        (state / "broker.key").write_text((state / "keys" / "broker.key").read_text())
        lines = [
            "# Zerorun client configuration, written by zerorun-broker. Use: zerorun -c THIS_FILE",
            f"endpoint: {self._advertised(self.client_endpoint)}",
            f"broker_public_key: \"{self.public_key.decode()}\"",
            f"client_key_file: {state / 'keys' / 'admin.key_secret'}",
        ]
        if self.config.insecure:
            lines.append("insecure: true")
        path = state / "client.yaml"
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
        runtime = {"pid": os.getpid(), "agent_endpoint": self._advertised(self.agent_endpoint),
                   "client_endpoint": self._advertised(self.client_endpoint),
                   "broker_public_key": self.public_key.decode(), "version": __version__,
                   "metrics": self.metrics.address if self.metrics else ""}
        tmp = state / "broker.json.tmp"
        tmp.write_text(json.dumps(runtime, indent=2) + "\n")
        os.replace(tmp, state / "broker.json")

    # -- loop -------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stop = True

    _reload = False
    reload_hook: Any = None  # set by main: re-reads what the config file may change

    def request_reload(self, *_: Any) -> None:
        self._reload = True

    def _maybe_reload(self) -> None:
        force, self._reload = self._reload, False
        if self.policy.reload_if_changed(force=force):
            self.audit.write("policy.reload", path=str(self.policy.path))
        if force:
            if self.reload_hook is not None:
                self.reload_hook()
            log.info("SIGHUP: policy and log level reloaded")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        # Wait on the sockets' ZMQ_FDs with plain poll(2), never zmq_poll: zmq_poll reads
        # ZMQ_EVENTS, and with ROUTER_MANDATORY libzmq answers POLLOUT by walking every peer's
        # pipe (5,000 agents: most of the broker's idle CPU). The FDs are edge-style
        # notifications: the loop sleeps only when every drain ended on EAGAIN and nothing at all
        # was sent in the iteration (a send processes the socket's pending commands, which may
        # consume the edge of a message that arrived meanwhile: a lost wake-up).
        # While nothing is in flight, agent traffic (heartbeats) is taken in batches every
        # QUIET_BATCH_MS instead of one wake-up per message; clients still wake the loop at once.
        all_fds, client_fds = select.poll(), select.poll()
        for sock in (self._zap, self.agents, self.clients):
            all_fds.register(sock.getsockopt(zmq.FD), select.POLLIN)
        for sock in (self._zap, self.clients):
            client_fds.register(sock.getsockopt(zmq.FD), select.POLLIN)
        log.info("broker %s listening: agents %s, clients %s, state %s", __version__,
                 self.agent_endpoint, self.client_endpoint, self.config.state_dir)
        next_tick = 0.0
        next_prune = time.monotonic() + 5.0
        next_policy_check = time.monotonic() + 2.0
        next_snapshot = 0.0
        try:
            idle = False
            while not self._stop:
                if idle:
                    if self._quiet():
                        client_fds.poll(QUIET_BATCH_MS)
                    else:
                        all_fds.poll(200)
                sent = self.stats["messages_out"]  # a handler's send may eat another socket's edge
                more = (self._drain_zap() == BATCH) | (self._drain(self.agents, self._on_agent) == BATCH)
                more |= self._drain(self.clients, self._on_client) == BATCH
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + 0.25
                    self._guard("tick", self._tick)
                    if self._reload or now >= next_policy_check:
                        next_policy_check = now + 2.0
                        self._guard("policy reload", self._maybe_reload)
                if self.metrics is not None and now >= next_snapshot:
                    next_snapshot = now + 1.0
                    self._guard("metrics", self._publish_metrics)
                if now >= next_prune:
                    next_prune = now + 60.0
                    self._guard("prune", self._prune)
                self._commit_and_send()
                idle = not more and self.stats["messages_out"] == sent
        finally:
            log.info("broker stopping")
            self._commit_and_send()
            self.store.close()
            self.audit.close()
            if self.metrics is not None:
                self.metrics.close()
            for sock in (self.agents, self.clients, self._zap):
                sock.close(0)
            self._ctx.term()

    def _quiet(self) -> bool:
        """Nothing in flight that an agent's message would advance."""
        return not (self.book.active or self.waiters or self.interactive.pending
                    or self.interactive.transfers or self._dirty_sessions)

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("internal error while handling %s (the broker keeps serving)", what)
            return None

    def _drain(self, sock: zmq.Socket, handler: Any) -> int:
        """Handles up to BATCH waiting messages; returns how many."""
        for count in range(BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return count
            self._guard("message", handler, parts)
        return BATCH

    def _commit_and_send(self) -> None:
        """Group commit, then everything whose promise depends on it."""
        if self.store.dirty:
            self.store.flush()
            if self.metrics is not None:
                self.metrics.store_write.observe(self.store.last_flush_seconds)
        for routing_id, reply in self._replies:
            self._send(self.clients, routing_id, reply)
        self._replies.clear()
        dirty, self._dirty_sessions = self._dirty_sessions, set()
        now = time.monotonic()
        for session in dirty:
            # A ResultAck rides on the next Deliver when one follows soon (back-to-back commands:
            # one message fewer per invocation); alone once it has waited RESULT_ACK_DELAY.
            if session.outbox:
                self._send(self.agents, session.routing_id, protocol.Deliver(session.outbox, session.acks))
                self.stats["invocations_delivered"] += len(session.outbox)
                session.outbox, session.acks = [], []
            elif session.acks:
                if now - session.acks_since >= RESULT_ACK_DELAY or len(session.acks) >= 500:
                    self._send(self.agents, session.routing_id, protocol.ResultAck(session.acks))
                    session.acks = []
                else:
                    self._dirty_sessions.add(session)  # look again next iteration
            if session.cancels:
                self._send(self.agents, session.routing_id, protocol.Cancel(session.cancels))
                session.cancels = []

    def _send(self, sock: zmq.Socket, routing_id: bytes, message: Any) -> None:
        try:
            sock.send_multipart([routing_id, HEADER, protocol.encode(message)], zmq.NOBLOCK)  # copying small frames beats zero-copy (3x)
            self.stats["messages_out"] += 1
        except zmq.ZMQError as exc:  # peer gone or at its high-water mark: state stays queued
            self.stats["send_failures"] += 1
            log.debug("could not send to %r: %s", routing_id, exc)

    # -- ZAP ----------------------------------------------------------------------------------

    def _drain_zap(self) -> int:
        for count in range(BATCH):
            try:
                req = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return count
            version, request_id = (req + [b"", b""])[:2]
            status, text, user = b"400", b"malformed ZAP request", b""
            try:
                domain, mechanism = req[2].decode(), req[5]
                if version == b"1.0" and mechanism == b"CURVE" and len(req) >= 7 and len(req[6]) == 32:
                    public_key = zmq.utils.z85.encode(req[6]).decode()
                    allowed, reason = self.keys.zap_allows(domain, public_key)
                    if allowed:
                        status, text, user = b"200", b"OK", public_key.encode()
                        self.stats[f"zap_allowed_{domain}"] += 1
                    else:
                        text = reason.encode()
                        self.stats[f"zap_denied_{domain}"] += 1
                        log.info("refused %s connection from %s: %s", domain,
                                 keyfiles.fingerprint(public_key), reason)
            except Exception:
                log.exception("bad ZAP request")
            self._zap.send_multipart([b"1.0", request_id, status, text, user, b""])
        return BATCH

    # -- agents -------------------------------------------------------------------------------

    def _decode(self, parts: list[zmq.Frame], decoder: Any, kind: str) -> Any:
        if len(parts) != 3:
            self._reject(kind, "frame_count")
            return None
        header = parts[1].bytes
        if header != HEADER:
            reason = "protocol_version" if header[:3] == HEADER[:3] else "bad_header"
            self._reject(kind, reason)
            return None
        try:
            return decoder.decode(parts[2].buffer)
        except (protocol.DecodeError, protocol.ValidationError) as exc:
            self._reject(kind, "malformed_body", str(exc))
            return None

    def _reject(self, kind: str, reason: str, detail: str = "") -> None:
        self.stats[f"rejected_{kind}_{reason}"] += 1
        self.stats["rejected"] += 1
        log.warning("dropped %s message: %s%s", kind, reason, f" ({detail[:200]})" if detail else "")

    def _peer_key(self, parts: list[zmq.Frame]) -> str | None:
        if self.config.insecure:
            return None
        try:
            return parts[-1].get("User-Id")
        except zmq.ZMQError:
            return None

    def _on_agent(self, parts: list[zmq.Frame]) -> None:
        self.stats["messages_in"] += 1
        msg = self._decode(parts, protocol.agent_message_decoder, "agent")
        if msg is None:
            return
        routing_id = parts[0].bytes
        key = self._peer_key(parts)
        if isinstance(msg, protocol.Hello):
            self._on_hello(routing_id, key, msg)
            return
        if key is None:  # insecure mode: the session that HELLO bound to this routing id
            session = next((s for s in self.sessions.values() if s.routing_id == routing_id), None)
        else:
            session = self.sessions.get(key)
        if session is None or session.routing_id != routing_id:
            self._send(self.agents, routing_id, protocol.PleaseHello())
            return
        session.last_seen = time.monotonic()
        if not session.online:
            self._set_online(session, True)
        book = self.book
        if isinstance(msg, protocol.Heartbeat):
            # the agent needs to hear from us once per few intervals, not once per heartbeat;
            # at once when the fleet's size changed its interval
            interval = self.fleet_heartbeat_interval()
            if interval != session.interval:
                session.lost_after = max(session.interval, interval) * LIVENESS
                session.interval = interval
                session.last_pong = session.last_seen
                self._send(self.agents, routing_id, protocol.Pong(time.time(), interval))
            elif session.last_seen - session.last_pong > interval * 1.5:
                session.last_pong = session.last_seen
                session.lost_after = interval * LIVENESS
                self._send(self.agents, routing_id, protocol.Pong(time.time()))
        elif isinstance(msg, protocol.Ack):
            for iid in msg.invocation_ids:
                book.acked(session.instance_id, iid)
            for iid in msg.started:
                book.started(session.instance_id, iid, msg.at)
        elif isinstance(msg, protocol.Started):
            for iid in msg.invocation_ids:
                book.started(session.instance_id, iid, msg.at)
        elif isinstance(msg, protocol.Results):
            touched = set()
            for res in msg.results:
                inv = book.invocations.get(res.invocation_id)
                if inv is not None:
                    touched.add(inv.command_id)
                if inv is None and not self.store.invocation_belongs(res.invocation_id, session.instance_id):
                    self.stats["results_refused"] += 1
                    log.warning("refused a result from %s for invocation %s, which was never delivered to it",
                                session.instance_id, res.invocation_id[:64])
                    self.audit.write("agent.result_refused", instance_id=session.instance_id,
                                     invocation_id=res.invocation_id[:64])
                    continue
                if book.result(session.instance_id, res, self.config.max_output_bytes):
                    if not session.acks:
                        session.acks_since = time.monotonic()
                    session.acks.append(res.invocation_id)
                    self._dirty_sessions.add(session)
                    self.live.drop(res.invocation_id)
                else:
                    self.stats["results_refused"] += 1
                    self.audit.write("agent.result_refused", instance_id=session.instance_id,
                                     invocation_id=res.invocation_id[:64])
            self._wake_followers(touched)
        elif isinstance(msg, protocol.Refuse):
            for item in msg.items:
                book.refused(session.instance_id, item)
        elif isinstance(msg, protocol.Bye):
            log.info("agent %s said goodbye", session.instance_id)
            self._set_online(session, False)
        elif isinstance(msg, protocol.ExecDone):
            self.interactive.on_exec_done(session, msg)
        elif isinstance(msg, protocol.FileDone):
            self.interactive.on_file_done(session, msg)
        elif isinstance(msg, protocol.Output):
            touched = set()
            for chunk in msg.chunks:
                inv = book.invocations.get(chunk.invocation_id)
                if inv is None or inv.instance_id != session.instance_id:
                    continue  # not this agent's running invocation
                if self.live.append(chunk.invocation_id, chunk.stream, chunk.data):
                    touched.add(inv.command_id)
            self._wake_followers(touched)

    def _on_hello(self, routing_id: bytes, key: str | None, hello: protocol.Hello) -> None:
        instance_id = hello.instance_id.strip()
        if not instance_id or len(instance_id) > 128:
            self._send(self.agents, routing_id, protocol.Denied("invalid instance id"))
            return
        if key is None:
            key = "insecure:" + instance_id
            verdict_state, message = KEY_ACCEPTED, ""
        else:
            verdict = self.keys.on_hello(key, instance_id)
            verdict_state, message = verdict.state, verdict.message
        if verdict_state == KEY_PENDING:
            self.pending_rids[key] = routing_id
            self._send(self.agents, routing_id,
                       protocol.KeyPending(message, retry_after=self.config.heartbeat_interval))
            return
        if verdict_state == KEY_DENIED:
            self.stats["hello_denied"] += 1
            self._send(self.agents, routing_id, protocol.Denied(message))
            return
        self.pending_rids.pop(key, None)
        now = time.time()
        rec = self.instances.get(instance_id)
        if rec is None:
            rec = InstanceRecord(instance_id, key, first_seen=now)
            self.instances[instance_id] = rec
        old_tags = rec.tags
        rec.public_key, rec.tags, rec.hostname = key, dict(hello.tags), hello.hostname
        self._index_tags(rec, old_tags)
        rec.platform, rec.platform_version = hello.platform, hello.platform_version
        rec.agent_version, rec.last_seen = hello.agent_version, now
        self.store.put_instance(rec)
        old = self.by_instance.get(instance_id)
        if old is not None and old.public_key != key:
            self.sessions.pop(old.public_key, None)
        interval = self.fleet_heartbeat_interval(extra=1)
        session = Session(key, instance_id, routing_id, time.monotonic(), interval=interval,
                          lost_after=interval * LIVENESS)
        self.sessions[key] = session
        self.by_instance[instance_id] = session
        log.info("agent %s online (%s, tags %s)", instance_id, hello.hostname,
                 ",".join(f"{k}={v}" for k, v in sorted(hello.tags.items())) or "-")
        self._send(self.agents, routing_id,
                   protocol.Welcome(instance_id, interval, now))
        self.book.instance_online(instance_id)

    def fleet_heartbeat_interval(self, extra: int = 0) -> float:
        """The configured interval, lengthened so that the whole fleet sends at most
        ``max_heartbeats_per_second`` (as Nomad scales its heartbeat TTL): idle cost stays flat
        as the fleet grows, and an agent that froze is noticed after LIVENESS of these intervals."""
        base = self.config.heartbeat_interval
        cap = self.config.max_heartbeats_per_second
        if cap <= 0:
            return base
        needed = (len(self.sessions) + extra) / cap
        if needed <= base:
            return base
        return float(math.ceil(needed / base) * base)  # steps of the base: no churn per agent

    def _set_online(self, session: Session, online: bool) -> None:
        session.online = online
        log.info("agent %s %s", session.instance_id, ONLINE if online else CONNECTION_LOST)
        if online:
            self.book.instance_online(session.instance_id)

    def _is_online(self, instance_id: str) -> bool:
        session = self.by_instance.get(instance_id)
        return session is not None and session.online

    def _queue_delivery(self, inv: protocol.InvocationView, rec: CommandRecord) -> None:
        session = self.by_instance[inv.instance_id]
        self._dirty_sessions.add(session)
        session.outbox.append(protocol.Invocation(
            invocation_id=inv.invocation_id, command_id=rec.command_id, instance_id=inv.instance_id,
            document_name=rec.document_name, document_version=rec.document_version,
            document_sha256=rec.document_sha256, steps=rec.steps, issued_at=rec.requested_at,
            expires_at=rec.expires_at))

    def _queue_cancel(self, inv: protocol.InvocationView) -> None:
        session = self.by_instance.get(inv.instance_id)
        if session is not None and session.online:
            session.cancels.append(inv.invocation_id)
            self._dirty_sessions.add(session)

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_liveness_scan:  # once a second is precise enough, and cheap at scale
            self._next_liveness_scan = now + 1.0
            for session in list(self.sessions.values()):
                if session.online and now - session.last_seen > session.lost_after:
                    self._set_online(session, False)
        self.book.check_timeouts(time.time())
        if self.interactive.pending or self.interactive.transfers:
            self.interactive.sweep()
        if self.waiters:
            keep = []
            for waiter in self.waiters:
                if now >= waiter.deadline:
                    self._answer_waiter(waiter)
                else:
                    keep.append(waiter)
            self.waiters = keep

    def _publish_metrics(self) -> None:
        agents: Counter[str] = Counter(self._ping_status(i) for i in self.instances)
        rejected = {k[len("rejected_"):]: v for k, v in self.stats.items()
                    if k.startswith("rejected_")}
        rejected.update({k: v for k, v in self.stats.items()
                         if k.startswith("zap_denied_") or k in ("results_refused", "access_denied",
                                                                 "hello_denied")})
        self.metrics.publish({
            "taken_at": time.time(), "agents": dict(agents),
            "commands": dict(self.book.finished_commands), "invocations": dict(self.book.finished_invocations),
            "messages_in": self.stats["messages_in"], "messages_out": self.stats["messages_out"],
            "requests": self.stats["requests"], "rejected": rejected,
            "active_commands": len(self.book.active),
            "open_invocations": sum(a.open for a in self.book.active.values()),
            "queued_invocations": sum(len(a.queue) for a in self.book.active.values()),
            "waiters": len(self.waiters), "pending_keys": self.keys.pending_count()})

    def _prune(self) -> None:
        """Forgets finished commands past the retention, a bounded batch at a time."""
        if self.config.retention_days <= 0:
            return
        removed = self.store.prune(time.time() - self.config.retention_days * 86400, batch=500)
        if removed:
            log.info("pruned %d command(s) older than %g days", removed, self.config.retention_days)

    # -- clients ------------------------------------------------------------------------------

    def _on_client(self, parts: list[zmq.Frame]) -> None:
        self.stats["requests"] += 1
        msg = self._decode(parts, protocol.request_decoder, "client")
        if msg is None:
            if len(parts) == 3:  # answer with the request's own id when it has one: no client waits
                self._replies.append((parts[0].bytes, Reply(_lenient_rid(parts[2].bytes), False,
                                                            error=protocol.ErrorInfo(
                    "BadRequest", "malformed request or unsupported protocol version"))))
            return
        routing_id = parts[0].bytes
        key = self._peer_key(parts)
        handler, permission = self._operations[type(msg)]
        try:
            self._authorise(key, permission, msg)
            data = handler(self, msg, routing_id, key)
        except RequestError as exc:
            self._replies.append((routing_id, Reply(msg.rid, False, error=protocol.ErrorInfo(exc.code, str(exc)))))
            return
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("internal error handling %s", type(msg).__name__)
            self._replies.append((routing_id, Reply(msg.rid, False, error=protocol.ErrorInfo(
                "InternalError", "the broker failed to handle this request; see its log"))))
            return
        if data is not _DEFERRED:
            self._replies.append((routing_id, Reply(msg.rid, True, data=data)))

    def _authorise(self, key: str | None, permission: str, msg: Any) -> None:
        """Default deny: the key must still be accepted and its role must allow the operation
        (and, to run, the document and every target)."""
        if key is None:  # --insecure: no identities, no policy
            return
        if not self.keys.is_accepted_client(key):
            self.audit.write("access.denied", client=keyfiles.fingerprint(key), op=type(msg).__name__,
                             reason="key revoked")
            raise RequestError("AccessDenied", "this client key has been revoked")
        name = self.keys.client_name(key)
        document = targets = None
        if isinstance(msg, protocol.SendCommand):
            document = "$LOCAL" if msg.document_content else msg.document
            targets = list(msg.targets) + [f"instance:{i}" for i in msg.instance_ids]
        elif isinstance(msg, (protocol.Exec, protocol.FileTransfer)):
            targets = [f"instance:{msg.instance_id}"]
        reason = self.policy.policy.check(name, permission, document, targets)
        if reason is not None:
            self.stats["access_denied"] += 1
            self.audit.write("access.denied", client=name, fingerprint=keyfiles.fingerprint(key),
                             op=type(msg).__name__, permission=permission, reason=reason)
            raise RequestError("AccessDenied", reason)

    def _requester(self, key: str | None) -> str:
        if key is None:
            return "insecure"
        return f"{self.keys.client_name(key)} ({keyfiles.fingerprint(key)})"

    def _op_ping(self, msg: protocol.Ping, routing_id: bytes, key: str | None) -> dict[str, Any]:
        return {"broker_version": __version__, "protocol_version": protocol.PROTOCOL_VERSION,
                "time": time.time(), "instances": len(self.instances),
                "online": sum(1 for s in self.sessions.values() if s.online),
                "active_commands": len(self.book.active), "requester": self._requester(key),
                "client_connections": self.stats["zap_allowed_clients"],
                "heartbeat_interval": self.fleet_heartbeat_interval()}

    def _ping_status(self, instance_id: str) -> str:
        session = self.by_instance.get(instance_id)
        if session is None:
            return INACTIVE if instance_id not in self.instances else CONNECTION_LOST
        return ONLINE if session.online else CONNECTION_LOST

    def _matching(self, target_texts: list[str]) -> list[InstanceRecord]:
        """Instances (bound to their accepted key) matching every target, through the tag
        index: the cost follows the matches, not the fleet size."""
        try:
            parsed = targeting.parse_targets(target_texts)
        except targeting.TargetError as exc:
            raise RequestError("InvalidTarget", str(exc)) from None
        candidates: set[str] | None = None
        for target in parsed:
            if target.kind == "instance":
                ids = {i for i in target.values if i in self.instances}
            elif target.values:
                ids = set().union(*(self.tag_index.get((target.key, v), ()) for v in target.values))
            else:
                ids = set(self.tag_keys.get(target.key, ()))
            candidates = ids if candidates is None else candidates & ids
        names = sorted(self.instances if candidates is None else candidates)
        out = []
        for instance_id in names:
            rec = self.instances[instance_id]
            registered = self.config.insecure or self.keys.bound.get(instance_id) == rec.public_key
            if registered and targeting.match_all(parsed, instance_id, rec.tags):
                out.append(rec)
        return out

    def _index_tags(self, rec: InstanceRecord, old_tags: dict[str, str] | None) -> None:
        for key, value in (old_tags or {}).items():
            self.tag_index.get((key, value), set()).discard(rec.instance_id)
            self.tag_keys.get(key, set()).discard(rec.instance_id)
        for key, value in rec.tags.items():
            self.tag_index.setdefault((key, value), set()).add(rec.instance_id)
            self.tag_keys.setdefault(key, set()).add(rec.instance_id)

    def _instance_view(self, rec: InstanceRecord) -> protocol.InstanceView:
        return protocol.InstanceView(
            instance_id=rec.instance_id, tags=rec.tags, hostname=rec.hostname, platform=rec.platform,
            platform_version=rec.platform_version, agent_version=rec.agent_version,
            ping_status=self._ping_status(rec.instance_id), first_seen=rec.first_seen,
            last_seen=rec.last_seen, key_fingerprint=keyfiles.fingerprint(rec.public_key))

    def _op_instances(self, msg: protocol.ListInstances, routing_id: bytes, key: str | None) -> Any:
        views = [self._instance_view(r) for r in self._matching(msg.targets)]
        if not msg.include_offline:
            views = [v for v in views if v.ping_status in (ONLINE, CONNECTION_LOST)]
        return protocol.to_builtins(views)

    def _op_send(self, msg: protocol.SendCommand, routing_id: bytes, key: str | None) -> Any:
        if not msg.targets and not msg.instance_ids:
            raise RequestError("InvalidTarget", "no targets: give --target tag:KEY=VALUE or instance ids")
        target_texts = list(msg.targets) + ([f"instance:{','.join(msg.instance_ids)}"] if msg.instance_ids else [])
        matched = self._matching(target_texts)
        explicit = {i for t in target_texts for i in targeting.parse_target(t).values
                    if t.lower().startswith("instance")}
        unknown = sorted(explicit - {r.instance_id for r in matched}) if not msg.targets else []
        if not matched and not unknown:
            raise RequestError("NoInstancesInTag", f"no instance matches {' AND '.join(target_texts)}")
        platform = matched[0].platform if matched else "Linux"
        try:
            rendered = documents.prepare(msg, platform or "Linux", self.documents)
        except documents.DocumentProblem as exc:
            raise RequestError(exc.code, str(exc)) from None
        count = len(matched) + len(unknown)
        try:
            max_concurrency = parse_rate(msg.max_concurrency, count, DEFAULT_MAX_CONCURRENCY,
                                         minimum=1, what="max_concurrency")
            max_errors = parse_rate(msg.max_errors, count, DEFAULT_MAX_ERRORS, minimum=0, what="max_errors")
        except RateError as exc:
            raise RequestError("InvalidRate", str(exc)) from None
        now = time.time()
        timeout = msg.timeout_seconds or self.config.delivery_timeout
        if not 1 <= timeout <= 30 * 86400:
            raise RequestError("InvalidTimeout", "timeout must be between 1 second and 30 days")
        rec = CommandRecord(
            command_id=uuid.uuid4().hex if not msg.dry_run else "dry-run", status=protocol.PENDING,
            status_details=protocol.PENDING, document_name=rendered.name,
            document_version=rendered.version, document_sha256=rendered.sha256,
            parameters=rendered.parameters, targets=target_texts, requested_by=self._requester(key),
            requested_at=now, expires_at=now + timeout, timeout_seconds=timeout,
            max_concurrency=max_concurrency, max_errors=max_errors, steps=rendered.steps,
            display_steps=rendered.display_steps, comment=msg.comment[:1000], first=max(0, msg.first))
        if msg.dry_run:
            invs = [protocol.InvocationView(invocation_id="", command_id="dry-run", instance_id=r.instance_id,
                                            status="DryRun") for r in matched]
            return protocol.to_builtins(rec.view(invs))
        log.info("command %s: %s v%s on %d instance(s) (%s) by %s", rec.command_id, rec.document_name,
                 rec.document_version, count, " AND ".join(target_texts), rec.requested_by)
        self.audit.write("command.send", command_id=rec.command_id, client=rec.requested_by,
                         document=rec.document_name, version=rec.document_version,
                         sha256=rec.document_sha256, parameters=rec.parameters, targets=target_texts,
                         instances=[r.instance_id for r in matched] + unknown, comment=rec.comment)
        self.book.create(rec, [r.instance_id for r in matched], unknown)
        if msg.wait > 0:  # send and wait in one round trip
            return self._op_wait(protocol.WaitCommand(msg.rid, rec.command_id, msg.wait), routing_id, key)
        return protocol.to_builtins(self.book.view(rec.command_id))

    def _command_view(self, command_id: str, include_output: bool = True,
                      instance_ids: list[str] | None = None) -> protocol.CommandView:
        view = self.book.view(command_id, include_output)
        if view is None:
            raise RequestError("NotFound", f"no command {command_id!r}")
        return _only(view, instance_ids)

    def _op_command(self, msg: protocol.GetCommand, routing_id: bytes, key: str | None) -> Any:
        return protocol.to_builtins(self._command_view(msg.command_id, msg.include_output, msg.instance_ids))

    def _op_commands(self, msg: protocol.ListCommands, routing_id: bytes, key: str | None) -> Any:
        self.store.flush()
        recs = self.store.list_commands(msg.limit, msg.status, msg.document, msg.since, msg.before,
                                        msg.target)
        out = []
        for rec in recs:
            ac = self.book.active.get(rec.command_id)
            rec = ac.rec if ac is not None else rec
            view = rec.view([], False)
            view.target_count = len(rec.invocation_ids)
            out.append(view)
        return protocol.to_builtins(out)

    def _op_wait(self, msg: protocol.WaitCommand, routing_id: bytes, key: str | None) -> Any:
        view = self._command_view(msg.command_id, msg.include_output, msg.instance_ids)
        if view.status in protocol.TERMINAL_STATUSES or msg.timeout <= 0:
            return protocol.to_builtins(view)
        timeout = min(msg.timeout, 300.0)
        self.waiters.append(Waiter(routing_id, msg.rid, msg.command_id, time.monotonic() + timeout,
                                   msg.include_output, instance_ids=msg.instance_ids))
        return _DEFERRED

    def _op_follow(self, msg: protocol.FollowOutput, routing_id: bytes, key: str | None) -> Any:
        update = self._output_update(msg)
        if update.chunks or update.done or msg.timeout <= 0:
            return protocol.to_builtins(update)
        self.waiters.append(Waiter(routing_id, msg.rid, msg.command_id,
                                   time.monotonic() + min(msg.timeout, 300.0), follow=msg))
        return _DEFERRED

    def _output_update(self, msg: protocol.FollowOutput) -> protocol.OutputUpdate:
        """Text each invocation produced beyond the client's cursors: live buffers while it
        runs, the stored output once it has finished."""
        active = self.book.active.get(msg.command_id)
        if active is not None:
            invocations = [self.book.invocations[i] for i in active.rec.invocation_ids]
            status = active.rec.status
        else:
            view = self._command_view(msg.command_id, True)
            invocations, status = view.invocations, view.status
        wanted = set(msg.instance_ids)
        chunks: list[protocol.OutputChunk] = []
        cursors = dict(msg.cursors)
        statuses = {}
        for inv in invocations:
            if wanted and inv.instance_id not in wanted:
                continue
            statuses[inv.instance_id] = inv.status
            finished = inv.status in protocol.TERMINAL_STATUSES
            for stream in ("stdout", "stderr"):
                text = getattr(inv, stream) if finished else self.live.text(inv.invocation_id, stream)
                cursor_key = f"{inv.instance_id}:{stream}"
                seen = cursors.get(cursor_key, 0)
                if len(text) > seen:
                    chunks.append(protocol.OutputChunk(inv.instance_id, stream, text[seen:]))
                    cursors[cursor_key] = len(text)
        return protocol.OutputUpdate(command_id=msg.command_id, status=status,
                                     done=status in protocol.TERMINAL_STATUSES, chunks=chunks,
                                     cursors=cursors, statuses=statuses)

    def _wake_followers(self, command_ids: set[str]) -> None:
        if not command_ids or not self.waiters:
            return
        keep = []
        for waiter in self.waiters:
            if waiter.follow is not None and waiter.command_id in command_ids:
                self._answer_waiter(waiter)
            else:
                keep.append(waiter)
        self.waiters = keep

    def _answer_waiter(self, waiter: Waiter) -> None:
        if waiter.follow is not None:
            try:
                data = protocol.to_builtins(self._output_update(waiter.follow))
                reply = Reply(waiter.rid, True, data=data)
            except RequestError as exc:
                reply = Reply(waiter.rid, False, error=protocol.ErrorInfo(exc.code, str(exc)))
            self._replies.append((waiter.routing_id, reply))
            return
        view = self.book.view(waiter.command_id, waiter.include_output)
        if view is not None:
            view = _only(view, waiter.instance_ids)
        if view is None:
            reply = Reply(waiter.rid, False, error=protocol.ErrorInfo("NotFound", "command vanished"))
        else:
            reply = Reply(waiter.rid, True, data=protocol.to_builtins(view))
        self._replies.append((waiter.routing_id, reply))

    def _command_completed(self, rec: CommandRecord) -> None:
        self.audit.write("command.complete", command_id=rec.command_id, status=rec.status,
                         details=rec.status_details, client=rec.requested_by)
        if not self.waiters:
            return
        keep = []
        for waiter in self.waiters:
            if waiter.command_id == rec.command_id:
                self._answer_waiter(waiter)
            else:
                keep.append(waiter)
        self.waiters = keep

    def _op_cancel(self, msg: protocol.CancelCommand, routing_id: bytes, key: str | None) -> Any:
        self._command_view(msg.command_id, False)
        if msg.command_id in self.book.active:
            log.info("cancel of command %s requested by %s", msg.command_id, self._requester(key))
            self.audit.write("command.cancel", command_id=msg.command_id, client=self._requester(key),
                             instances=msg.instance_ids)
            self.book.cancel(msg.command_id, set(msg.instance_ids) or None)
        return protocol.to_builtins(self._command_view(msg.command_id, False))

    def _op_keys(self, msg: protocol.ListKeys, routing_id: bytes, key: str | None) -> Any:
        return protocol.to_builtins(self.keys.views())

    def _op_key(self, msg: protocol.KeyAction, routing_id: bytes, key: str | None) -> Any:
        try:
            if msg.action == "accept":
                rec = self.keys.accept(msg.name)
                nudge = self.pending_rids.pop(rec.public_key, None)
                if nudge is not None:
                    self._send(self.agents, nudge, protocol.PleaseHello())
            elif msg.action in ("reject", "revoke", "delete"):
                if msg.action == "delete":
                    rec = self.keys.delete(msg.name)
                else:
                    rec = self.keys.reject(msg.name, note="revoked" if msg.action == "revoke" else "")
                if rec.kind == "agent":
                    session = self.sessions.pop(rec.public_key, None)
                    if session is not None and self.by_instance.get(session.instance_id) is session:
                        del self.by_instance[session.instance_id]
                    if rec.public_key == getattr(self.instances.get(rec.name), "public_key", None):
                        self.book.instance_gone(rec.name, GONE_DETAILS[msg.action])
            else:
                raise RequestError("BadRequest", f"unknown key action {msg.action!r}")
        except KeyError_ as exc:
            raise RequestError(exc.code, str(exc)) from None
        log.info("key %s: %s %s by %s", msg.action, rec.kind, rec.name, self._requester(key))
        self.audit.write("key." + msg.action, kind=rec.kind, name=rec.name,
                         fingerprint=keyfiles.fingerprint(rec.public_key), client=self._requester(key))
        return protocol.to_builtins(self.keys.view(rec))

    def _op_key_add(self, msg: protocol.AddKey, routing_id: bytes, key: str | None) -> Any:
        try:
            rec = self.keys.add(msg.kind, msg.name, msg.public_key)
        except KeyError_ as exc:
            raise RequestError(exc.code, str(exc)) from None
        self.audit.write("key.add", kind=rec.kind, name=rec.name,
                         fingerprint=keyfiles.fingerprint(rec.public_key), client=self._requester(key))
        return protocol.to_builtins(self.keys.view(rec))

    # -- documents ----------------------------------------------------------------------------

    def _doc_call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DocumentStoreError as exc:
            raise RequestError(exc.code, str(exc)) from None

    @staticmethod
    def _doc_info(info: Any, **extra: Any) -> dict[str, Any]:
        data = protocol.to_builtins(info)
        data.update(extra)
        return data

    def _op_exec(self, msg: protocol.Exec, routing_id: bytes, key: str | None) -> Any:
        self.interactive.exec(msg, routing_id, key)  # answered by the agent, or with an error
        return _DEFERRED

    def _op_file(self, msg: protocol.FileTransfer, routing_id: bytes, key: str | None) -> Any:
        self.interactive.file(msg, routing_id, key)
        return _DEFERRED

    def _op_documents(self, msg: protocol.ListDocuments, routing_id: bytes, key: str | None) -> Any:
        return [{"name": s.name, "version": s.default_version, "sha256": s.sha256,
                 "description": s.description, "builtin": s.builtin, "is_default": True,
                 "default_version": s.default_version, "latest_version": s.latest_version}
                for s in self._doc_call(self.documents.list)]

    def _op_document(self, msg: protocol.GetDocument, routing_id: bytes, key: str | None) -> Any:
        info, doc = self._doc_call(self.documents.get, msg.name, msg.version)
        params = {name: {"type": spec.type, "description": spec.description,
                         "required": spec.required, "secret": spec.secret}
                  for name, spec in doc.parameters.items()}
        return self._doc_info(info, parameters=params)

    def _op_document_versions(self, msg: protocol.DocumentVersions, routing_id: bytes, key: str | None) -> Any:
        return [self._doc_info(i) for i in self._doc_call(self.documents.versions, msg.name)]

    def _op_document_create(self, msg: protocol.CreateDocument, routing_id: bytes, key: str | None) -> Any:
        info = self._doc_call(self.documents.create, msg.name, msg.content, self._requester(key))
        self.audit.write("document.create", name=info.name, version=info.version, sha256=info.sha256,
                         client=self._requester(key))
        log.info("document %s v%d created by %s", info.name, info.version, self._requester(key))
        return self._doc_info(info)

    def _op_document_update(self, msg: protocol.UpdateDocument, routing_id: bytes, key: str | None) -> Any:
        info = self._doc_call(self.documents.update, msg.name, msg.content, self._requester(key),
                              set_default=msg.set_default)
        self.audit.write("document.update", name=info.name, version=info.version, sha256=info.sha256,
                         client=self._requester(key))
        log.info("document %s v%d added by %s", info.name, info.version, self._requester(key))
        return self._doc_info(info)

    def _op_document_default(self, msg: protocol.SetDefaultDocumentVersion, routing_id: bytes,
                             key: str | None) -> Any:
        info = self._doc_call(self.documents.set_default, msg.name, msg.version)
        self.audit.write("document.set_default", name=info.name, version=info.version, client=self._requester(key))
        log.info("document %s default version set to %d by %s", info.name, info.version, self._requester(key))
        return self._doc_info(info)

    def _op_document_delete(self, msg: protocol.DeleteDocument, routing_id: bytes, key: str | None) -> Any:
        self._doc_call(self.documents.delete, msg.name, msg.version or None)
        self.audit.write("document.delete", name=msg.name, version=msg.version, client=self._requester(key))
        log.info("document %s%s deleted by %s", msg.name, f" v{msg.version}" if msg.version else "",
                 self._requester(key))
        return {"deleted": msg.name, "version": msg.version}

    _operations: dict[type, tuple[Any, str]] = {
        protocol.Ping: (_op_ping, "read"),
        protocol.ListInstances: (_op_instances, "read"),
        protocol.SendCommand: (_op_send, "run"),
        protocol.GetCommand: (_op_command, "read"),
        protocol.ListCommands: (_op_commands, "read"),
        protocol.WaitCommand: (_op_wait, "read"),
        protocol.FollowOutput: (_op_follow, "read"),
        protocol.CancelCommand: (_op_cancel, "cancel"),
        protocol.ListKeys: (_op_keys, "read"),
        protocol.KeyAction: (_op_key, "keys"),
        protocol.AddKey: (_op_key_add, "keys"),
        protocol.ListDocuments: (_op_documents, "read"),
        protocol.GetDocument: (_op_document, "read"),
        protocol.DocumentVersions: (_op_document_versions, "read"),
        protocol.CreateDocument: (_op_document_create, "documents"),
        protocol.UpdateDocument: (_op_document_update, "documents"),
        protocol.SetDefaultDocumentVersion: (_op_document_default, "documents"),
        protocol.DeleteDocument: (_op_document_delete, "documents"),
        protocol.Exec: (_op_exec, "exec"),
        protocol.FileTransfer: (_op_file, "exec"),
    }
    """The complete allow-list of client operations: nothing else is reachable."""


_DEFERRED = object()


def _only(view: protocol.CommandView, instance_ids: list[str] | None) -> protocol.CommandView:
    """The view with only the given instances' invocations (counts still cover all)."""
    if instance_ids:
        wanted = set(instance_ids)
        view.invocations = [i for i in view.invocations if i.instance_id in wanted]
    return view
GONE_DETAILS = {"reject": "agent key rejected", "revoke": "agent key revoked", "delete": "agent key deleted"}
_rid_probe = msgspec.msgpack.Decoder(dict)


def _lenient_rid(body: bytes) -> int:
    try:
        rid = _rid_probe.decode(body).get("rid", 0)
    except Exception:
        return 0
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else 0

