"""The broker: builds its parts, then runs one loop that dispatches to them.

Each loop iteration drains a bounded batch from every ready socket and hands each message to
its handler (``handlers``), which changes in-memory state and queues what to send; then the
store commits once (group commit) and everything queued is sent. Nothing a peer sends can crash
the loop: frames are checked, bodies decoded against the protocol's types, and every handler
runs inside a guard that counts and logs failures.
"""

from __future__ import annotations

import errno
import logging
import select
import signal
import time
from collections import Counter
from typing import Any, Callable

import zmq

from zerorun import __version__, protocol
from zerorun.zmqutil import QuietSockets

from . import handlers, heap, statedir
from .audit import AuditLog
from .cluster import Cluster, FleetEvent, stable_id
from .commands import CommandBook
from .config import BrokerConfig
from .context import BrokerContext
from .descriptors import HANDSHAKE_SECONDS, DescriptorWatch, raise_limit
from .docstore import DocumentStore
from .errors import BrokerError
from .fleet import FleetIndex
from .handlers import (agents as agent_api, cluster as cluster_api, commands as command_api,
                       interactive as interactive_api, sessions as session_api)
from .identity import KeyRegistry
from .interactive import InteractiveRelay
from .output import LiveOutput
from .outputs import FileData, StoreData, WholeOutputs
from .webhooks import WebhookQueue, load_secret
from .documents import RenderLimits
from .policy import PolicyError, PolicyFile
from .pruning import Pruning
from .rendering import Renderer, RenderSettings
from .sessions import LIVENESS, SessionTable
from .store import open_store
from .store.base import STORE_UNAVAILABLE
from .transport import BATCH, CLIENT_BATCH, Transport
from .waiters import Waiters
from .warning_throttle import WarningThrottle
from .zap import ZapHandler

log = logging.getLogger("zerorun.broker")

QUIET_BATCH_MS = 50  # agent messages wait at most this long while nothing is in flight
TICK = 0.25  # seconds between timeout, liveness and waiter checks
LIVENESS_SCAN = 1.0  # seconds between liveness scans (precise enough, and cheap at scale)
POLICY_CHECK = 2.0
SCRUB_EVERY = 5.0  # at most this often, the store forgets overwritten secret values
REBALANCE_OUTPUTS = 5.0  # seconds between looks for whole outputs whose agent moved between brokers


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.stats: Counter[str] = Counter()
        self._stop = False
        self._reload = False
        self._next_scrub = 0.0
        self._next_rebalance = 0.0
        self._fenced_outages = 0  # the store's outages that ``fence_after_outage`` has followed
        self.reload_hook: Callable[[], None] | None = None  # set by main: re-reads what the config file may change
        self.sink: Any = None  # the S3 copy of whole outputs, when configured
        keys = statedir.prepare(config.state_dir)
        self.public_key = keys.public
        try:
            store = open_store(config.state_dir, config.store, config.store_password_file)
        except BrokerError as exc:
            raise SystemExit(f"zerorun-broker: {exc}") from None
        registry = KeyRegistry(store, auto_accept=config.auto_accept, max_pending=config.max_pending_keys)
        registry.ensure_admin(keys.admin_public.decode())
        registry.broker_key = keys.public.decode()
        try:
            policy = PolicyFile(config.policy_file or config.state_dir / "policy.yaml")
        except PolicyError as exc:
            raise SystemExit(f"zerorun-broker: {exc}") from None
        sessions = SessionTable(config.heartbeat_interval, config.max_heartbeats_per_second)
        ctx: BrokerContext  # the book's callbacks reach the handlers through it
        book = CommandBook(store, lambda inv, rec: agent_api.deliver(ctx, inv, rec),
                           lambda inv: agent_api.cancel(ctx, inv), lambda instance_id: ctx.is_online(instance_id),
                           lambda rec: command_api.command_completed(ctx, rec))
        self.descriptors = DescriptorWatch(raise_limit())  # before the sockets: one per connection
        transport = Transport(config, keys.secret, self.stats, WarningThrottle())
        cluster = None
        if hasattr(store, "coordination"):  # PostgreSQL: a cluster of one broker or several
            try:
                cluster = Cluster(store, stable_id(config.state_dir, config.broker_id),
                                  statedir.advertised(transport.agent_endpoint, config.advertise_host),
                                  statedir.advertised(transport.client_endpoint, config.advertise_host))
            except BrokerError as exc:
                transport.close()
                raise SystemExit(f"zerorun-broker: {exc}") from None
            book.owner, book.durable_dispatch = cluster.id, True
            cluster.owned = lambda: list(book.active)
            registry.on_change = lambda public_key: cluster.broadcast(FleetEvent(keys=[public_key]))
            book.load([r for r in store.load_active_commands()
                       if r.owner in (cluster.id, "") and cluster.own(r.command_id)])
        else:
            book.load()
        store.flush()
        metrics = None
        if config.metrics_bind:
            from .metrics import BrokerMetrics

            metrics = BrokerMetrics(config.metrics_bind)
            book.observer = lambda inv: metrics.observe_invocation(inv.requested_at, inv.delivered_at, inv.ended_at)
        documents = DocumentStore(store)
        renderer = Renderer(RenderSettings(
            workers=config.render_workers, timeout=config.render_timeout,
            memory_bytes=config.render_memory_mb * 1024 * 1024,
            limits=RenderLimits(config.max_step_bytes, config.max_command_bytes)), documents)
        ctx = BrokerContext(
            config=config, stats=self.stats, transport=transport, store=store, keys=registry,
            fleet=FleetIndex.from_store(store, None if config.insecure else registry.bound.get),
            sessions=sessions, book=book, waiters=Waiters(), documents=documents, policy=policy,
            audit=AuditLog(config.audit_file or config.state_dir / "audit.jsonl"),
            live=LiveOutput(config.max_output_bytes), relay=InteractiveRelay(), renderer=renderer, metrics=metrics,
            cluster=cluster)
        ctx.outputs = WholeOutputs(
            store, StoreData(store) if hasattr(store, "queue_write") else FileData(config.state_dir / "outputs"),
            config.max_full_output_bytes, cluster.id if cluster is not None else "",
            lambda instance_id, message: agent_api.read_output(ctx, instance_id, message),
            lambda instance_id, ids: agent_api.read_output(ctx, instance_id, protocol.OutputDone(ids)) and None)
        ctx.outputs.load()
        try:
            secret = load_secret(config.webhook_secret_file or config.state_dir / "keys" / "webhook.secret",
                                 create=config.webhook_secret_file is None)
        except (BrokerError, OSError) as exc:
            transport.close()
            raise SystemExit(f"zerorun-broker: {getattr(exc, 'message', exc)}") from None
        ctx.webhooks = WebhookQueue(store, secret, config.webhook_retry_seconds, cluster.id if cluster else "")
        book.on_invocation_end = ctx.webhooks.invocation_ended
        if config.s3_bucket:
            from .s3sink import S3Sink

            try:
                data = ctx.outputs.data
                sink = S3Sink(config.s3_bucket, config.s3_prefix, config.s3_endpoint_url, data,
                              reader=data.reader() if isinstance(data, StoreData) else None)
            except BrokerError as exc:
                transport.close()
                raise SystemExit(f"zerorun-broker: {exc.message}") from None
            ctx.outputs.on_finished = sink.finished
            self.sink = sink
        ctx.connections.hello_within = HANDSHAKE_SECONDS + LIVENESS * config.heartbeat_interval
        self.ctx = ctx
        self.zap = ZapHandler(transport.zap, registry.zap_allows, self.stats)
        # ZAP requests come with new connections, disconnections as they happen: the loop asks
        # poll(2) about both sockets before it reads either (see QuietSockets)
        self._quiet_sockets = QuietSockets(transport.zap, transport.agent_monitor, transport.client_monitor)
        self.agent_endpoint = transport.agent_endpoint
        self.client_endpoint = transport.client_endpoint
        statedir.write_client_files(
            config.state_dir, public_key=keys.public,
            client_endpoint=statedir.advertised(transport.client_endpoint, config.advertise_host),
            agent_endpoint=statedir.advertised(transport.agent_endpoint, config.advertise_host),
            insecure=config.insecure, metrics_address=metrics.address if metrics else "")
        if config.insecure:
            log.warning("INSECURE MODE: no CURVE encryption or authentication; any peer can connect")
        if config.auto_accept:
            log.warning("auto-accept is on: any new agent key is accepted on first HELLO")
        if config.agent_tags == "trusted":
            log.warning("--agent-tags trusted: every agent sets its own tags, and so decides which targets and policy "
                        "scopes reach it; for labs only (default: operators own tags)")

    # -- signals ------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stop = True

    def request_reload(self, *_: Any) -> None:
        self._reload = True

    def _maybe_reload(self) -> None:
        force, self._reload = self._reload, False
        outcome = self.ctx.policy.reload_if_changed(force=force)
        if outcome is True:
            self.ctx.audit.write("policy.reload", path=str(self.ctx.policy.path), sha256=self.ctx.policy.policy.sha256)
        elif outcome:
            self.stats["policy_reload_failures"] += 1
            self.ctx.audit.write("policy.reload_failed", path=str(self.ctx.policy.path), error=outcome)
        if force:
            self.ctx.audit.reopen()
            if self.reload_hook is not None:
                self.reload_hook()
            log.info("SIGHUP: policy and log level reloaded, audit log reopened")
        else:
            self.ctx.audit.check_rotation()
        self.ctx.audit.retry()
        self.ctx.audit.flush_suppressed()

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        ctx, transport = self.ctx, self.ctx.transport
        # Wait on the sockets' ZMQ_FDs with plain poll(2), never zmq_poll: zmq_poll reads
        # ZMQ_EVENTS, and with ROUTER_MANDATORY libzmq answers POLLOUT by walking every peer's
        # pipe (5,000 agents: most of the broker's idle CPU). The FDs are edge-style
        # notifications: the loop sleeps only when every drain ended on EAGAIN and nothing at all
        # was sent in the iteration (a send processes the socket's pending commands, which may
        # consume the edge of a message that arrived meanwhile: a lost wake-up).
        # While nothing is in flight, agent traffic (heartbeats) is taken in batches every
        # QUIET_BATCH_MS instead of one wake-up per message; clients still wake the loop at once.
        all_fds, client_fds = select.poll(), select.poll()
        for sock in (transport.zap, transport.agents, transport.clients):
            all_fds.register(sock.getsockopt(zmq.FD), select.POLLIN)
        for sock in (transport.zap, transport.clients):
            client_fds.register(sock.getsockopt(zmq.FD), select.POLLIN)
        render_fds: set[int] = set()

        def render_fds_changed(added: list[int], removed: list[int]) -> None:
            for fd in added:
                render_fds.add(fd)
                all_fds.register(fd, select.POLLIN)
                client_fds.register(fd, select.POLLIN)
            for fd in removed:
                render_fds.discard(fd)
                all_fds.unregister(fd)
                client_fds.unregister(fd)

        ctx.renderer.on_fds_changed = render_fds_changed
        cluster_fd = [-1]  # the cluster's PostgreSQL session (a new one after the server came back)
        cluster_fds = select.poll()

        def watch_cluster() -> None:
            if ctx.cluster is None:
                return
            try:
                fd = ctx.cluster.fileno()
            except BrokerError:
                fd = -1
            if fd != cluster_fd[0]:
                for poller in (all_fds, client_fds, cluster_fds):
                    if cluster_fd[0] >= 0:
                        poller.unregister(cluster_fd[0])
                    if fd >= 0:
                        poller.register(fd, select.POLLIN)
                cluster_fd[0] = fd

        def cluster_said() -> bool:
            """Whether other brokers' notifications wait: on the session's socket (a poll(2) of
            it), or already read off it by a query of this broker's (``unread``). Without a
            session (the store away) the drain is what reconnects, so it is always made."""
            return cluster_fd[0] < 0 or ctx.cluster.coord.unread or bool(cluster_fds.poll(0))

        watch_cluster()
        log.info("broker %s listening: agents %s, clients %s, state %s", __version__,
                 transport.agent_endpoint, transport.client_endpoint, self.config.state_dir)
        on_agent = lambda parts: self._guard("message", handlers.handle_agent_message, ctx, parts)  # noqa: E731
        on_client = lambda parts: self._guard("message", handlers.handle_request, ctx, parts)  # noqa: E731
        now = time.monotonic()
        next_tick = next_liveness = 0.0
        pruning = Pruning(ctx.store, self.config.retention_days, ctx.outputs, self.stats, now)
        next_policy_check = now + POLICY_CHECK
        next_snapshot = 0.0
        heap.settle()  # start-up is over: what it made is out of every collection from now on
        try:
            idle = False
            while not self._stop:
                if idle:
                    if self._quiet():
                        client_fds.poll(QUIET_BATCH_MS)
                    else:
                        all_fds.poll(200)
                sent = self.stats["messages_out"]  # a handler's send may eat another socket's edge
                requests = self.stats["requests"]
                more = False
                if self._quiet_sockets.waiting()[0]:
                    more = self.zap.drain(BATCH) == BATCH
                    self._quiet_sockets.drained(0, not more)
                # after ZAP, before agent messages: a connection that is new in this batch was
                # accepted after any connection that used its descriptor had closed, and libzmq
                # reports a close before it frees the descriptor
                self._guard("connections", self._connections)
                more |= transport.drain(transport.agents, on_agent) == BATCH
                more |= transport.drain(transport.clients, on_client, CLIENT_BATCH) == CLIENT_BATCH
                if render_fds:  # renderings finished (or workers asking for a document)
                    self._guard("rendering", ctx.renderer.collect)
                if ctx.cluster is not None and cluster_said():  # what other brokers said
                    self._guard("cluster", cluster_api.on_events, ctx)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    if now >= next_liveness:
                        next_liveness = now + LIVENESS_SCAN
                        self._guard("liveness", agent_api.check_liveness, ctx, now)
                    self._guard("tick", self._tick, now)
                    if ctx.cluster is not None:
                        self._guard("cluster", self._cluster_tick, now)
                        watch_cluster()
                    if self._reload or now >= next_policy_check:
                        next_policy_check = now + POLICY_CHECK
                        self._guard("policy reload", self._maybe_reload)
                if ctx.metrics is not None and now >= next_snapshot:
                    next_snapshot = now + 1.0
                    self._guard("metrics", self._publish_metrics)
                if pruning.due(now, self.stats["requests"] != requests):
                    self._guard("prune", pruning.run, now)
                self._commit_and_send()
                idle = (not more and (self.stats["messages_out"] == sent or self._settled())
                        and not (ctx.cluster is not None and ctx.cluster.coord.unread))  # poll(2) would not see those
        finally:
            log.info("broker stopping")
            pruning.close()
            if ctx.tunnels:
                self._guard("sessions", session_api.end_all, ctx, "the broker is stopping")
            if ctx.cluster is not None:
                ctx.cluster.leave()
            self._commit_and_send()
            ctx.store.close()
            ctx.audit.close()
            if ctx.metrics is not None:
                ctx.metrics.close()
            ctx.renderer.close()
            ctx.webhooks.close()
            if self.sink is not None:
                self.sink.close()
            transport.close()

    def _settled(self) -> bool:
        """After an iteration that sent: whether the loop may wait in ``poll`` without another
        pass. A send can take the edge of a socket's ZMQ_FD (what arrived meanwhile would then
        wait for the next wake-up), so the sockets are asked (a ZMQ_EVENTS read each) instead
        of a whole pass over everything. (Other brokers' notifications wake ``poll`` on their
        socket, unless a query read them off it: the loop checks ``unread`` for those.)"""
        ctx = self.ctx
        return (not ctx.store.dirty and not ctx.sessions.dirty and not ctx.transport.queued
                and not ctx.transport.readable())

    def _quiet(self) -> bool:
        """Nothing in flight that an agent's message would advance."""
        ctx = self.ctx
        return not (ctx.book.active or ctx.waiters or ctx.relay or ctx.sessions.dirty or ctx.sessions.held
                    or ctx.renderer or ctx.outputs
                    or ctx.tunnels
                    or (ctx.cluster is not None and ctx.cluster.relayed))  # delivered here for another owner

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            if isinstance(exc, BrokerError) and exc.code == STORE_UNAVAILABLE:
                # an outage the store's session has reported once: not a traceback per loop iteration
                self.stats["store_unavailable"] += 1
                log.debug("%s waits for the store: %s", what, exc.message)
                return None
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):  # said by the tick, once
                self.stats["descriptors_exhausted"] += 1
                self.ctx.transport.warnings.warning(log, "failures for want of descriptors", "%s failed: %s", what, exc)
                return None
            self.stats["internal_errors"] += 1
            log.exception("internal error while handling %s (the broker keeps serving)", what)
            return None

    def _commit_and_send(self) -> None:
        """Group commit, then everything whose promise depends on it."""
        ctx = self.ctx
        ctx.audit.flush()  # before any answer: the log has what the answers report
        if ctx.cluster is not None:
            ctx.cluster.flush()  # its events go out with the commit that makes them true
        if not self._fence_and_flush():  # the store's server is away: writes stay queued, nothing is sent
            self.stats["store_unavailable"] += 1
            ctx.transport.send_at_once()  # but reads that failed for it (they show nothing)
            return
        closed = self._closed_connections()
        self.stats["invocations_delivered"] += ctx.sessions.flush(
            lambda routing_id, message, fd: ctx.transport.to_agent(routing_id, message, None, fd), time.monotonic(),
            ctx.book.sent if ctx.cluster is None else self._sent)
        ctx.transport.send_queued(closed)

    def _fence_and_flush(self) -> bool:
        """The group commit; False while the store is away. A cluster broker whose store session
        was lost (an outage, or ended by another broker that found this one unresponsive) looks
        first at which of its commands another broker took meanwhile (``fence_after_outage``):
        the PostgreSQL store never writes on a new session unasked, and a session lost during
        the flush is replaced and the flush made again, once, after that look."""
        ctx = self.ctx
        for attempt in (1, 2):
            if ctx.cluster is not None and ctx.cluster.store.outages != self._fenced_outages:
                outages = ctx.cluster.store.outages
                try:  # before what waited through the outage is written
                    cluster_api.fence_after_outage(ctx)
                except Exception as exc:
                    if isinstance(exc, BrokerError) and exc.code == STORE_UNAVAILABLE:
                        return False  # still away
                    self.stats["internal_errors"] += 1
                    log.exception("internal error while fencing after an outage of the store (the broker keeps "
                                  "serving)")
                self._fenced_outages = outages
            if not ctx.store.dirty:
                return True
            try:
                ctx.store.flush()
            except BrokerError:
                if attempt == 2 or ctx.cluster is None or not ctx.cluster.store.available:
                    return False
                continue  # the session was lost on the way, and the server answers: fence, then again
            if ctx.metrics is not None:
                ctx.metrics.store_write.observe(ctx.store.last_flush_seconds)
            return True
        return False

    def _sent(self, invocation_ids: list[str]) -> None:
        """Deliveries that left this broker, its own and those it made for other owners."""
        self.ctx.book.sent(invocation_ids)
        self.ctx.cluster.sent_for_others(invocation_ids)  # type: ignore[union-attr]

    def _cluster_tick(self, now: float) -> None:
        cluster = self.ctx.cluster
        lost = cluster.fence(now)
        if lost:
            cluster_api.taken_over(self.ctx, set(lost))
        dead = cluster.tick(now)
        if cluster.missed_notifications:  # e.g. relayed rows whose NOTIFY came before our LISTEN was back
            try:
                cluster_api.resync(self.ctx)
                cluster.missed_notifications = False
            except BrokerError:  # the store's own session may still be away (it has its own backoff)
                pass
        if dead:
            cluster_api.peers_died(self.ctx, dead)
        if now >= self._next_rebalance and self.ctx.outputs is not None:  # whole outputs follow their agents
            self._next_rebalance = now + REBALANCE_OUTPUTS
            ctx = self.ctx
            ctx.outputs.rebalance(ctx.sessions.is_online, lambda i: ctx.cluster.holder(i) is not None)

    def _connections(self) -> None:
        """What the monitors of agent and client connections said (one poll(2) for both)."""
        waiting = self._quiet_sockets.waiting()
        self._closed_connections(waiting[1])
        if waiting[2] or self.ctx.client_connections.to_cut:
            self._client_connections()

    def _closed_connections(self, waiting: bool | None = None) -> set[int]:
        """Ends the sessions of agent connections that closed; their descriptors. Then cuts the
        connections that may hold one no longer (connections.py), now that the monitor was read."""
        limits = self.ctx.connections
        if waiting is None:
            waiting = self._quiet_sockets.waiting()[1]
        if not waiting and not limits.to_cut:
            return set()
        closed = set()
        now = time.monotonic()
        for event, fd in self.ctx.transport.connection_events():
            if event == zmq.EVENT_DISCONNECTED:
                closed.add(fd)
                limits.closed(fd)
            else:
                limits.accepted(fd, now)
        self._quiet_sockets.drained(1, True)  # drain_monitor reads to EAGAIN
        for fd in closed:
            agent_api.connection_closed(self.ctx, fd)
        for fd in limits.take_cuts():
            self.ctx.transport.cut(fd)
        return closed

    def _client_connections(self) -> None:
        """Client connections accepted and closed; then cuts those past their bounds
        (client_connections.py), now that the monitor was read."""
        book = self.ctx.client_connections
        for event, fd in self.ctx.transport.client_connection_events():
            if event == zmq.EVENT_DISCONNECTED:
                book.closed(fd)
            else:
                book.accepted(fd)
        self._quiet_sockets.drained(2, True)
        cuts = book.take_cuts()
        if cuts:
            self.stats["client_connections_cut"] += len(cuts)
            self.ctx.transport.warnings.warning(
                log, "client connections cut", "closed %d client connection(s) past --max-client-connections (%d): "
                "connections of one key, or connections that sent nothing", len(cuts), book.limit)
        for fd in cuts:
            self.ctx.transport.cut(fd)

    def _tick(self, now: float) -> None:
        ctx = self.ctx
        ctx.client_connections.refused_due(now)
        ctx.book.check_timeouts(time.time())
        if ctx.book.secrets_dropped and now >= self._next_scrub:
            self._next_scrub = now + SCRUB_EVERY
            ctx.book.secrets_dropped = False
            ctx.store.forget_overwritten()
        if ctx.relay:
            interactive_api.sweep(ctx)
        if ctx.tunnels:
            session_api.sweep(ctx, now)
        if ctx.renderer:
            ctx.renderer.check_deadlines(now)
        if ctx.waiters:
            command_api.expire_waiters(ctx, now)
        if ctx.outputs:
            ctx.outputs.pump()
        ctx.webhooks.tick(time.time())
        ctx.connections.overdue(now)
        if self.descriptors.check(now):
            self.stats["descriptors_exhausted"] += 1
        ctx.transport.warnings.flush()

    def _publish_metrics(self) -> None:
        ctx = self.ctx
        agents: Counter[str] = Counter(ctx.ping_status(i) for i in ctx.fleet)
        rejected = {k[len("rejected_"):]: v for k, v in self.stats.items() if k.startswith("rejected_")}
        rejected.update({k: v for k, v in self.stats.items()
                         if k.startswith("zap_denied_") or k in ("results_refused", "access_denied", "hello_denied", "refused_unread_replies",
                                 "refused_client_connections", "client_connections_cut")})
        ctx.metrics.publish({
            "taken_at": time.time(), "agents": dict(agents),
            "commands": dict(ctx.book.finished_commands), "invocations": dict(ctx.book.finished_invocations),
            "messages_in": self.stats["messages_in"], "messages_out": self.stats["messages_out"],
            "requests": self.stats["requests"], "rejected": rejected,
            "active_commands": len(ctx.book.active),
            "open_invocations": sum(a.open for a in ctx.book.active.values()),
            "queued_invocations": sum(len(a.queue) for a in ctx.book.active.values()),
            "waiters": len(ctx.waiters), "pending_keys": ctx.keys.pending_count(),
            "policy_reload_failures": ctx.policy.failures, "audit_write_failures": ctx.audit.failures,
            "pruned_commands": self.stats["pruned_commands"], "internal_errors": self.stats["internal_errors"],
            "sessions_held": ctx.sessions.online_count(), "webhooks": ctx.webhooks.snapshot(time.time()),
            "whole_outputs": dict(ctx.outputs.stats, reading=len(ctx.outputs.reading)),
            "s3": dict(self.sink.stats) if self.sink is not None else {},
            "cluster": dict(ctx.cluster.stats) if ctx.cluster is not None else {},
            "gc": ctx.metrics.gc_pauses.snapshot()})
