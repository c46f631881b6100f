"""What agents say, one handler per message type, and what the broker owes them back.

HELLO is taken from any connection whose key passed ZAP (it opens a session); every other
message counts only on the connection its session's HELLO came from.
"""

from __future__ import annotations

import logging
import time

from zerorun import keys as keyfiles, protocol
from zerorun.identifiers import printable, tags_problem
from zerorun.versions import older_than
from zerorun.protocol import CONNECTION_LOST, KEY_ACCEPTED, KEY_DENIED, KEY_PENDING, ONLINE

from .. import tokens
from ..cluster import CancelEvent, FleetEvent, OutputEvent, RelayedAck
from ..context import BrokerContext
from ..model import CommandRecord, InstanceRecord
from ..sessions import DELIVERY_OVERHEAD, Session
from . import commands as command_api, tags as tags_api, tokens as tokens_api

log = logging.getLogger("zerorun.broker")

MAX_HELLO_TEXT = 256  # characters of each text a HELLO says about the machine (as ``protocol.Facts`` bounds its own)
HELLO_TEXTS = ("hostname", "platform", "platform_version", "agent_version")


def hello_text_problem(hello: protocol.Hello) -> str | None:
    """None when what the HELLO says about its machine may be logged, stored and listed: at most
    MAX_HELLO_TEXT printable characters each (no line break to forge a log line, no terminal escape)."""
    for name in HELLO_TEXTS:
        value = getattr(hello, name)
        if len(value) > MAX_HELLO_TEXT or not value.isprintable():
            return f"invalid {name} {printable(value)}: at most {MAX_HELLO_TEXT} printable characters"
    return None


def on_hello(ctx: BrokerContext, routing_id: bytes, fd: int, key: str | None, hello: protocol.Hello) -> None:
    ctx.connections.hello(key or "insecure:" + hello.instance_id, fd)  # the key's one connection from now on
    instance_id = hello.instance_id
    problem = ctx.fleet.id_problem(instance_id) or tags_problem(hello.tags) or hello_text_problem(hello)
    if problem is not None:  # refused before anything logs the id as it was sent
        ctx.stats["hello_denied"] += 1
        ctx.transport.warnings.warning(log, "denied HELLOs", "denied HELLO from key %s: %s",
                                       keyfiles.fingerprint(key) if key else "-", problem)
        ctx.to_agent(routing_id, protocol.Denied(problem), fd=fd)
        return
    if ctx.store.write_failed:  # its Welcome would wait for a commit that cannot be made: later
        ctx.stats["hello_deferred"] += 1
        ctx.to_agent(routing_id, protocol.KeyPending(
            "the broker cannot write its database (its log says why); this agent says HELLO again until it can",
            retry_after=ctx.config.heartbeat_interval), fd=fd, at_once=True)
        return
    by_token = False
    if key is None:
        key = "insecure:" + instance_id
        state, message = KEY_ACCEPTED, ""
    else:
        if hello.enrol_token and ctx.keys.may_enrol(key):  # the token vouches for the key, and says its tags
            verdict = tokens_api.enrol(ctx, key, instance_id, hello.enrol_token)
            by_token = True
        else:
            verdict = ctx.keys.on_hello(key, instance_id, hello.tags)
            if verdict.newly_accepted:  # --auto-accept
                tags_api.enrolled(ctx, instance_id, hello.tags, "auto-accept", replace=False)
        state, message = verdict.state, verdict.message
    if state == KEY_PENDING:
        ctx.sessions.pending_rids[key] = (routing_id, fd)
        ctx.to_agent(routing_id, protocol.KeyPending(message, retry_after=ctx.config.heartbeat_interval), fd=fd)
        return
    if state == KEY_DENIED:
        ctx.stats["hello_denied"] += 1
        retry = tokens.RETRY_AFTER if message == tokens.REFUSED else 60.0
        ctx.to_agent(routing_id, protocol.Denied(message, retry_after=retry), fd=fd)
        return
    minimum = ctx.config.min_agent_version
    if minimum and older_than(hello.agent_version, minimum):
        ctx.stats["hello_denied"] += 1
        ctx.transport.warnings.warning(log, "denied HELLOs", "denied HELLO from %s: agent version %s is older "
                                       "than the minimum %s", instance_id, hello.agent_version or "(none)", minimum)
        ctx.to_agent(routing_id, protocol.Denied(
            f"agent version {hello.agent_version or '(none)'} is older than this broker's minimum {minimum}: "
            "upgrade the agent on the instance (the agent role, or its package); it is refused until then",
            retry_after=60.0), fd=fd)
        return
    if not by_token:  # enrolled by a token: the token's tags, the agent's own ignored
        tags_api.propose(ctx, instance_id, hello.tags, tags_api.agent_name(
            None if ctx.config.insecure else key, instance_id))
    now = time.time()
    rec = ctx.fleet.get(instance_id)
    first_seen = rec.first_seen if rec is not None else now
    rec = InstanceRecord(instance_id, key, hostname=hello.hostname,
                         platform=hello.platform, platform_version=hello.platform_version,
                         agent_version=hello.agent_version, first_seen=first_seen, last_seen=now, facts=hello.facts)
    ctx.fleet.put(rec)  # with the instance's approved tags, not the ones it offered
    ctx.store.put_instance(rec)
    session = ctx.sessions.open(key, instance_id, routing_id, fd, time.monotonic())
    if hello.max_message_bytes > 0:
        session.max_message_bytes = min(hello.max_message_bytes, protocol.MAX_MESSAGE_BYTES)
    log.info("agent %s online (%s, tags %s)", instance_id, hello.hostname,
             ",".join(f"{k}={v}" for k, v in sorted(rec.tags.items())) or "-")
    ctx.to_agent(routing_id, protocol.Welcome(instance_id, session.interval, now), fd=fd)
    if ctx.cluster is not None:
        ctx.cluster.session_opened(instance_id, key)
        ctx.cluster.broadcast(FleetEvent(instances=[instance_id]))
    held = [*hello.running, *hello.unacked]  # journaled there: delivered, whatever became of the ack
    for iid in held:  # (a HELLO that crossed the agent's other messages comes again at once)
        ctx.book.acked(instance_id, iid)
    for (owner, command_id), iids in _elsewhere(ctx, session, held).items():  # another broker's: its owner learns
        ctx.cluster.relay_acks(owner, command_id, instance_id, iids, now)
    ctx.book.instance_online(instance_id)
    if ctx.outputs:  # whole outputs it still holds: read on, asking again what the last connection had
        ctx.outputs.agent_back(instance_id)


def on_facts(ctx: BrokerContext, session: Session, msg: protocol.FactsUpdate) -> None:
    """The agent's facts changed: kept with its instance (claims, for fact: targets and views)."""
    rec = ctx.fleet.get(session.instance_id)
    if rec is None or rec.public_key != session.public_key or not ctx.fleet.set_facts(session.instance_id, msg.facts):
        return
    ctx.store.put_instance(rec)
    if ctx.cluster is not None:
        ctx.cluster.broadcast(FleetEvent(instances=[session.instance_id]))


def on_heartbeat(ctx: BrokerContext, session: Session, msg: protocol.Heartbeat) -> None:
    pong = ctx.sessions.heartbeat_reply(session)
    if pong is not None:  # while nothing can be committed, a Pong still goes: the agent stays
        ctx.to_agent(session.routing_id, pong, fd=session.fd, at_once=bool(ctx.store.write_failed))


def _elsewhere(ctx: BrokerContext, session: Session, invocation_ids: list[str]) -> dict[tuple[str, str], list[str]]:
    """Of these invocations, those another broker owns, by (owner, command) (none without a cluster)."""
    out: dict[tuple[str, str], list[str]] = {}
    if ctx.cluster is None:
        return out
    unknown = [iid for iid in invocation_ids if iid not in ctx.book.invocations]
    found = ctx.cluster.owners_of(unknown, session.instance_id) if unknown else {}
    for iid in unknown:
        if iid in found:
            out.setdefault((found[iid][1], found[iid][0]), []).append(iid)
    return out


def on_ack(ctx: BrokerContext, session: Session, msg: protocol.Ack) -> None:
    for iid in msg.invocation_ids:
        ctx.book.acked(session.instance_id, iid)
    for iid in msg.started:
        ctx.book.started(session.instance_id, iid, msg.at)
    for (owner, command_id), iids in _elsewhere(ctx, session, msg.invocation_ids).items():
        ctx.cluster.relay_acks(owner, command_id, session.instance_id, iids, msg.at)
        started = [i for i in iids if i in msg.started]
        if started:
            ctx.cluster.relay(owner, command_id, "started", session.instance_id, RelayedAck(started, msg.at))


def on_started(ctx: BrokerContext, session: Session, msg: protocol.Started) -> None:
    for iid in msg.invocation_ids:
        ctx.book.started(session.instance_id, iid, msg.at)
    for (owner, command_id), iids in _elsewhere(ctx, session, msg.invocation_ids).items():
        ctx.cluster.relay(owner, command_id, "started", session.instance_id, RelayedAck(iids, msg.at))


class _Strangers:
    """The invocations of a Results message that this broker's book does not hold, looked up in
    the store all at once when the first is met (not one round trip each: a message may name
    thousands, made up); the common message, all of whose results the book holds, pays nothing."""

    def __init__(self, ctx: BrokerContext, instance_id: str, results: list[protocol.InvocationResult]):
        self.ctx, self.instance_id = ctx, instance_id
        self.asked = {r.invocation_id for r in results if r.invocation_id not in ctx.book.invocations}
        cluster = ctx.cluster
        self.elsewhere = cluster.owners_of(list(self.asked), instance_id) if cluster is not None else {}
        self._belonging: set[str] | None = None

    def owner_of(self, invocation_id: str) -> tuple[str, str] | None:
        """(command id, owner) when another broker owns the invocation (see ``Cluster.owner_of``)."""
        if invocation_id in self.asked:
            return self.elsewhere.get(invocation_id)
        cluster = self.ctx.cluster
        return cluster.owner_of(invocation_id, self.instance_id) if cluster is not None else None

    def belongs(self, invocation_id: str) -> bool:
        if invocation_id not in self.asked:
            return self.ctx.store.invocation_belongs(invocation_id, self.instance_id)
        if self._belonging is None:
            self._belonging = self.ctx.store.invocations_belonging(
                [i for i in self.asked if i not in self.elsewhere], self.instance_id)
        return invocation_id in self._belonging


def on_results(ctx: BrokerContext, session: Session, msg: protocol.Results) -> None:
    book = ctx.book
    touched = set()
    now = time.monotonic()
    refused: list[str] = []
    strangers: _Strangers | None = None
    for res in msg.results:
        inv = book.invocations.get(res.invocation_id)
        if inv is not None:
            touched.add(inv.command_id)
        else:
            if strangers is None:
                strangers = _Strangers(ctx, session.instance_id, msg.results)
            if owner := strangers.owner_of(res.invocation_id):
                # another broker owns it: the result goes to the owner through the store, and is
                # acknowledged to the agent once that write is committed (acks go after the commit)
                if ctx.outputs is not None:  # the whole output is read by the broker its agent talks to
                    ctx.outputs.result_arrived(session.instance_id, owner[0], res, ctx.config.max_output_bytes)
                ctx.cluster.relay(owner[1], owner[0], "result", session.instance_id, res)
                ctx.sessions.queue_result_ack(session, res.invocation_id, now)
                ctx.cluster.forget_delivery(res.invocation_id)
                continue
            if not strangers.belongs(res.invocation_id):
                ctx.stats["results_refused"] += 1
                refused.append(res.invocation_id)
                ctx.audit.write_refusal(session.public_key, "agent.result_refused", instance_id=session.instance_id,
                                        invocation_id=res.invocation_id[:64])
                continue
        if inv is not None and ctx.outputs is not None and inv.instance_id == session.instance_id:
            ctx.outputs.result_arrived(session.instance_id, inv.command_id, res, ctx.config.max_output_bytes)
        if book.result(session.instance_id, res, ctx.config.max_output_bytes):
            ctx.sessions.queue_result_ack(session, res.invocation_id, now)
            ctx.live.drop(res.invocation_id)
            if ctx.cluster is not None:
                ctx.cluster.forget_live(res.invocation_id, inv.command_id if inv is not None else None)
        else:
            ctx.stats["results_refused"] += 1
            ctx.audit.write_refusal(session.public_key, "agent.result_refused", instance_id=session.instance_id,
                            invocation_id=res.invocation_id[:64])
    if refused:  # one line per message, however many it holds (the audit log has each, rate-limited)
        ctx.transport.warnings.warning(
            log, "refused results", "refused %d result(s) from %s for invocations never delivered to it: %s%s",
            len(refused), session.instance_id, printable(refused[0], 64), " and others" if len(refused) > 1 else "")
    command_api.output_arrived(ctx, touched)


def on_output_data(ctx: BrokerContext, session: Session, msg: protocol.OutputData) -> None:
    """A chunk of a whole output this broker asked the agent for (see ``outputs.py``)."""
    if ctx.outputs is not None:
        ctx.outputs.data_arrived(session.instance_id, msg)
        ctx.outputs.pump()


def read_output(ctx: BrokerContext, instance_id: str, message: protocol.OutputRead | protocol.OutputDone) -> bool:
    """Sends an output read (or done) to the instance's agent; False when it is not connected here."""
    session = ctx.sessions.by_instance.get(instance_id)
    if session is None or not session.online:
        return False
    ctx.to_agent(session.routing_id, message, fd=session.fd)
    return True


def on_refuse(ctx: BrokerContext, session: Session, msg: protocol.Refuse) -> None:
    for item in msg.items:
        ctx.book.refused(session.instance_id, item)
    items = {item.invocation_id: item for item in msg.items}
    for (owner, command_id), iids in _elsewhere(ctx, session, list(items)).items():
        for iid in iids:
            ctx.cluster.relay(owner, command_id, "refuse", session.instance_id, items[iid])
            ctx.cluster.forget_delivery(iid)


def on_bye(ctx: BrokerContext, session: Session, msg: protocol.Bye) -> None:
    log.info("agent %s said goodbye", session.instance_id)
    set_online(ctx, session, False)


def on_output(ctx: BrokerContext, session: Session, msg: protocol.Output) -> None:
    touched = set()
    elsewhere: set[str] = set()
    for chunk in msg.chunks:
        inv = ctx.book.invocations.get(chunk.invocation_id)
        if inv is None and ctx.cluster is not None:
            # delivered here for another owner, to this agent
            command_id = ctx.cluster.relayed_command(chunk.invocation_id, session.instance_id)
            if command_id is not None and chunk.stream in ("stdout", "stderr"):
                ctx.cluster.live_output(command_id, chunk.invocation_id, chunk.stream, chunk.data)
                elsewhere.add(command_id)
            continue
        if inv is None or inv.instance_id != session.instance_id:
            continue  # not this agent's running invocation
        if ctx.live.append(chunk.invocation_id, chunk.stream, chunk.data):
            touched.add(inv.command_id)
            if ctx.cluster is not None:  # followers may be on other brokers
                ctx.cluster.live_output(inv.command_id, chunk.invocation_id, chunk.stream, chunk.data)
                ctx.cluster.live_seen((inv.command_id,))
                elsewhere.add(inv.command_id)
    command_api.output_arrived(ctx, touched)
    if elsewhere:
        ctx.cluster.broadcast(OutputEvent(sorted(elsewhere)))


def set_online(ctx: BrokerContext, session: Session, online: bool) -> None:
    session.online = online
    log.info("agent %s %s", session.instance_id, ONLINE if online else CONNECTION_LOST)
    if online:
        if ctx.cluster is not None:
            ctx.cluster.session_opened(session.instance_id, session.public_key)
        ctx.book.instance_online(session.instance_id)
    else:
        remember_last_seen(ctx, session)


def remember_last_seen(ctx: BrokerContext, session: Session) -> None:
    """Stores when an instance whose session ended was last heard from (one write per session,
    not per heartbeat)."""
    rec = ctx.fleet.get(session.instance_id)
    if rec is not None and rec.public_key == session.public_key:
        rec.last_seen = max(rec.last_seen, time.time() - (time.monotonic() - session.last_seen))
        ctx.store.put_instance(rec)
    if ctx.cluster is not None and ctx.sessions.by_instance.get(session.instance_id) is session:
        ctx.cluster.session_closed(session.instance_id)


def connection_closed(ctx: BrokerContext, fd: int) -> None:
    session = ctx.sessions.connection_closed(fd)
    if session is not None:
        log.info("agent %s %s (its connection closed)", session.instance_id, CONNECTION_LOST)
        remember_last_seen(ctx, session)


def check_liveness(ctx: BrokerContext, now: float) -> None:
    for session in ctx.sessions.silent(now):
        set_online(ctx, session, False)


# -- what the command book hands to agents ------------------------------------------------------


def too_large(session: Session, size: int) -> str:
    """Why a delivery of ``size`` bytes cannot go to this agent ("" when it can)."""
    limit = session.max_message_bytes // 2
    return f"the command is {size} bytes, more than this agent accepts in one delivery ({limit})" if size > limit else ""


def deliver(ctx: BrokerContext, inv: protocol.InvocationView, rec: CommandRecord) -> str:
    """Queues an invocation for its agent (through the broker holding its session, in a
    cluster); or says why the agent cannot take it."""
    session = ctx.sessions.by_instance.get(inv.instance_id)
    if (session is None or not session.online) and ctx.cluster is not None:
        holder = ctx.cluster.holder(inv.instance_id)
        if holder is not None:
            ctx.cluster.deliver_through(holder, rec, inv.invocation_id, inv.instance_id)
            return ""
    assert session is not None
    size = rec.steps_bytes + DELIVERY_OVERHEAD
    problem = too_large(session, size)
    if problem:
        return problem
    ctx.sessions.queue_delivery(inv.instance_id, protocol.Invocation(
        invocation_id=inv.invocation_id, command_id=rec.command_id, instance_id=inv.instance_id,
        document_name=rec.document_name, document_version=rec.document_version,
        document_sha256=rec.document_sha256, steps=rec.steps, issued_at=rec.requested_at,
        expires_at=rec.expires_at), size)
    return ""


def cancel(ctx: BrokerContext, inv: protocol.InvocationView) -> None:
    session = ctx.sessions.by_instance.get(inv.instance_id)
    if (session is None or not session.online) and ctx.cluster is not None:
        holder = ctx.cluster.holder(inv.instance_id)
        if holder is not None:
            ctx.cluster.tell(holder, CancelEvent([(inv.invocation_id, inv.instance_id)]))
            return
    ctx.sessions.queue_cancel(inv.instance_id, inv.invocation_id)

