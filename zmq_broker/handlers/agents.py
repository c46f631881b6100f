"""What agents say, one handler per message type, and what the broker owes them back.

HELLO is taken from any connection whose key passed ZAP (it opens a session); every other
message counts only on the connection its session's HELLO came from.
"""

from __future__ import annotations

import logging
import time

from zerorun import keys as keyfiles, protocol
from zerorun.identifiers import instance_id_problem, tags_problem
from zerorun.protocol import CONNECTION_LOST, KEY_ACCEPTED, KEY_DENIED, KEY_PENDING, ONLINE

from ..context import BrokerContext
from ..model import CommandRecord, InstanceRecord
from ..sessions import DELIVERY_OVERHEAD, Session
from . import commands as command_api

log = logging.getLogger("zerorun.broker")


def on_hello(ctx: BrokerContext, routing_id: bytes, fd: int, key: str | None, hello: protocol.Hello) -> None:
    instance_id = hello.instance_id
    problem = instance_id_problem(instance_id) or tags_problem(hello.tags)
    like = None if problem else ctx.fleet.lookalike(instance_id)
    if like is not None:
        problem = f"instance id {instance_id!r} differs from the known instance {like!r} only by case"
    if problem is not None:  # refused before anything logs the id as it was sent
        ctx.stats["hello_denied"] += 1
        log.warning("denied HELLO from key %s: %s", keyfiles.fingerprint(key) if key else "-", problem)
        ctx.to_agent(routing_id, protocol.Denied(problem), fd=fd)
        return
    if key is None:
        key = "insecure:" + instance_id
        state, message = KEY_ACCEPTED, ""
    else:
        verdict = ctx.keys.on_hello(key, instance_id)
        state, message = verdict.state, verdict.message
    if state == KEY_PENDING:
        ctx.sessions.pending_rids[key] = (routing_id, fd)
        ctx.to_agent(routing_id, protocol.KeyPending(message, retry_after=ctx.config.heartbeat_interval), fd=fd)
        return
    if state == KEY_DENIED:
        ctx.stats["hello_denied"] += 1
        ctx.to_agent(routing_id, protocol.Denied(message), fd=fd)
        return
    now = time.time()
    rec = ctx.fleet.get(instance_id)
    first_seen = rec.first_seen if rec is not None else now
    rec = InstanceRecord(instance_id, key, tags=dict(hello.tags), hostname=hello.hostname,
                         platform=hello.platform, platform_version=hello.platform_version,
                         agent_version=hello.agent_version, first_seen=first_seen, last_seen=now)
    ctx.fleet.put(rec)
    ctx.store.put_instance(rec)
    session = ctx.sessions.open(key, instance_id, routing_id, fd, time.monotonic())
    if hello.max_message_bytes > 0:
        session.max_message_bytes = min(hello.max_message_bytes, protocol.MAX_MESSAGE_BYTES)
    log.info("agent %s online (%s, tags %s)", instance_id, hello.hostname,
             ",".join(f"{k}={v}" for k, v in sorted(hello.tags.items())) or "-")
    ctx.to_agent(routing_id, protocol.Welcome(instance_id, session.interval, now), fd=fd)
    ctx.book.instance_online(instance_id)


def on_heartbeat(ctx: BrokerContext, session: Session, msg: protocol.Heartbeat) -> None:
    pong = ctx.sessions.heartbeat_reply(session)
    if pong is not None:
        ctx.to_agent(session.routing_id, pong, fd=session.fd)


def on_ack(ctx: BrokerContext, session: Session, msg: protocol.Ack) -> None:
    for iid in msg.invocation_ids:
        ctx.book.acked(session.instance_id, iid)
    for iid in msg.started:
        ctx.book.started(session.instance_id, iid, msg.at)


def on_started(ctx: BrokerContext, session: Session, msg: protocol.Started) -> None:
    for iid in msg.invocation_ids:
        ctx.book.started(session.instance_id, iid, msg.at)


def on_results(ctx: BrokerContext, session: Session, msg: protocol.Results) -> None:
    book = ctx.book
    touched = set()
    now = time.monotonic()
    for res in msg.results:
        inv = book.invocations.get(res.invocation_id)
        if inv is not None:
            touched.add(inv.command_id)
        elif not ctx.store.invocation_belongs(res.invocation_id, session.instance_id):
            ctx.stats["results_refused"] += 1
            log.warning("refused a result from %s for invocation %s, which was never delivered to it",
                        session.instance_id, res.invocation_id[:64])
            ctx.audit.write_refusal(session.public_key, "agent.result_refused", instance_id=session.instance_id,
                            invocation_id=res.invocation_id[:64])
            continue
        if book.result(session.instance_id, res, ctx.config.max_output_bytes):
            ctx.sessions.queue_result_ack(session, res.invocation_id, now)
            ctx.live.drop(res.invocation_id)
        else:
            ctx.stats["results_refused"] += 1
            ctx.audit.write_refusal(session.public_key, "agent.result_refused", instance_id=session.instance_id,
                            invocation_id=res.invocation_id[:64])
    command_api.output_arrived(ctx, touched)


def on_refuse(ctx: BrokerContext, session: Session, msg: protocol.Refuse) -> None:
    for item in msg.items:
        ctx.book.refused(session.instance_id, item)


def on_bye(ctx: BrokerContext, session: Session, msg: protocol.Bye) -> None:
    log.info("agent %s said goodbye", session.instance_id)
    set_online(ctx, session, False)


def on_output(ctx: BrokerContext, session: Session, msg: protocol.Output) -> None:
    touched = set()
    for chunk in msg.chunks:
        inv = ctx.book.invocations.get(chunk.invocation_id)
        if inv is None or inv.instance_id != session.instance_id:
            continue  # not this agent's running invocation
        if ctx.live.append(chunk.invocation_id, chunk.stream, chunk.data):
            touched.add(inv.command_id)
    command_api.output_arrived(ctx, touched)


def set_online(ctx: BrokerContext, session: Session, online: bool) -> None:
    session.online = online
    log.info("agent %s %s", session.instance_id, ONLINE if online else CONNECTION_LOST)
    if online:
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


def connection_closed(ctx: BrokerContext, fd: int) -> None:
    session = ctx.sessions.connection_closed(fd)
    if session is not None:
        log.info("agent %s %s (its connection closed)", session.instance_id, CONNECTION_LOST)
        remember_last_seen(ctx, session)


def check_liveness(ctx: BrokerContext, now: float) -> None:
    for session in ctx.sessions.silent(now):
        set_online(ctx, session, False)


# -- what the command book hands to agents ------------------------------------------------------


def deliver(ctx: BrokerContext, inv: protocol.InvocationView, rec: CommandRecord) -> str:
    """Queues an invocation for its agent; or says why the agent cannot take it."""
    size = rec.steps_bytes + DELIVERY_OVERHEAD
    limit = ctx.sessions.by_instance[inv.instance_id].max_message_bytes
    if size > limit // 2:
        return f"the command is {size} bytes, more than this agent accepts in one delivery ({limit // 2})"
    ctx.sessions.queue_delivery(inv.instance_id, protocol.Invocation(
        invocation_id=inv.invocation_id, command_id=rec.command_id, instance_id=inv.instance_id,
        document_name=rec.document_name, document_version=rec.document_version,
        document_sha256=rec.document_sha256, steps=rec.steps, issued_at=rec.requested_at,
        expires_at=rec.expires_at), size)
    return ""


def cancel(ctx: BrokerContext, inv: protocol.InvocationView) -> None:
    ctx.sessions.queue_cancel(inv.instance_id, inv.invocation_id)

