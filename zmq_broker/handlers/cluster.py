"""What other brokers of the cluster tell this one (see ``cluster.py``), one handler per event,
and the work that follows from a broker's death: its sessions forgotten, its commands adopted."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from zerorun import protocol

from .. import cluster as c
from ..commands import MAX_DELIVERIES, unacknowledged
from ..context import BrokerContext
from ..errors import BrokerError
from ..store.base import STORE_UNAVAILABLE
from ..sessions import DELIVERY_OVERHEAD
from . import agents as agent_api, commands as command_api

log = logging.getLogger("zerorun.broker.cluster")


def on_events(ctx: BrokerContext) -> None:
    cluster = ctx.cluster
    assert cluster is not None
    for event in cluster.drain():
        if cluster.stalled:  # behind those, in order (a cancel must not overtake its delivery)
            cluster.stall(event)
            continue
        try:
            _handle(ctx, event)
        except BrokerError:  # the store is away (its session says so once): again when it is back
            cluster.stall(event)


def _handle(ctx: BrokerContext, event: c.Event) -> None:
    """Raises ``BrokerError`` only when the store is away (the event can be handled later)."""
    try:
        HANDLERS[type(event)](ctx, event)
    except BrokerError as exc:
        if exc.code == STORE_UNAVAILABLE:
            raise
        log.warning("ignored a cluster event (%s): %s", type(event).__name__, exc.message)


def resync(ctx: BrokerContext) -> None:
    """Handles again the events this broker could not act on (the store was away), then re-reads
    what the notifications it missed (sent while its coordination session was away) announce:
    rows relayed to the commands it owns, where other brokers' agents now are, and the ends of
    commands waited on here. Raises ``BrokerError`` while the store is still away; the caller
    tries again on a later tick."""
    cluster = ctx.cluster
    assert cluster is not None
    while cluster.stalled:  # in the order they came; one that fails again stays first
        _handle(ctx, cluster.stalled[0])
        cluster.stalled.popleft()
    owned = list(ctx.book.active)
    if owned:
        apply_relayed(ctx, owned)
    for instance_id in cluster.reread_sessions(ctx.sessions.is_online):
        ctx.book.instance_online(instance_id)  # what we own for it goes to its new holder
    for command_id in cluster.completed(list({w.command_id for w in ctx.waiters.all()} - set(ctx.book.active))):
        command_api.answer_completed(ctx, command_id)


def on_session(ctx: BrokerContext, event: c.SessionEvent) -> None:
    assert ctx.cluster is not None
    if ctx.cluster.apply_session(event):
        local = ctx.sessions.by_instance.get(event.instance_id)
        if local is not None and local.online:  # the agent moved away from us: that session is stale
            local.online = False
        ctx.book.instance_online(event.instance_id)  # what we own for it goes to its new holder


def on_fleet(ctx: BrokerContext, event: c.FleetEvent) -> None:
    if event.instances:
        for tags in ctx.store.get_tags(event.instances):  # before the records, which take the approved tags
            ctx.fleet.set_tags(tags)
        for rec in ctx.store.get_instances(event.instances):
            ctx.fleet.put(rec)
    if event.keys:
        accepted = ctx.keys.refresh(event.keys, ctx.store.get_keys(event.keys))
        for public_key in accepted:  # an agent waiting here was accepted on another broker
            nudge = ctx.sessions.pending_rids.pop(public_key, None)
            if nudge is not None:
                ctx.to_agent(nudge[0], protocol.PleaseHello(), fd=nudge[1])


def on_done(ctx: BrokerContext, event: c.DoneEvent) -> None:
    for command_id in event.commands:
        if command_id not in ctx.book.active:
            command_api.answer_completed(ctx, command_id)


def on_output(ctx: BrokerContext, event: c.OutputEvent) -> None:
    assert ctx.cluster is not None
    ctx.cluster.live_seen(cid for cid in event.commands if cid in ctx.book.active)
    command_api.output_arrived(ctx, set(event.commands))


def on_relay(ctx: BrokerContext, event: c.RelayEvent) -> None:
    """Agents' messages about commands this broker owns, from the brokers holding their sessions."""
    assert ctx.cluster is not None
    owned = [cid for cid in event.commands if cid in ctx.book.active]
    if owned:
        apply_relayed(ctx, owned)


def apply_relayed(ctx: BrokerContext, command_ids: list[str]) -> None:
    assert ctx.cluster is not None
    items = ctx.cluster.relayed_items(command_ids)
    book = ctx.book
    touched = set()
    for item in items:
        if item.kind == "ack":
            ack = item.ack()
            for iid in ack.invocation_ids:
                book.acked(item.instance_id, iid)
        elif item.kind == "started":
            ack = item.ack()
            for iid in ack.invocation_ids:
                book.started(item.instance_id, iid, ack.at)
        elif item.kind == "result":
            result = item.result()
            book.result(item.instance_id, result, ctx.config.max_output_bytes)
            ctx.cluster.forget_live(result.invocation_id, item.command_id)
            touched.add(item.command_id)
        elif item.kind == "refuse":
            book.refused(item.instance_id, item.refusal())
        elif item.kind == "undeliverable":
            undelivered = item.undelivered()
            book.undeliverable(item.instance_id, undelivered.invocation_id, undelivered.why)
        elif item.kind == "cancel":
            book.cancel(item.command_id, set(item.instances()) or None)
    ctx.cluster.applied(items)
    command_api.output_arrived(ctx, touched)


def on_deliver(ctx: BrokerContext, event: c.DeliverEvent) -> None:
    """Another broker's invocations for agents connected here, within the limits the owner keeps
    for its own deliveries (what this agent accepts in one message; ``MAX_DELIVERIES`` sent
    without an acknowledgement): beyond them, the owner ends the invocation Undeliverable."""
    cluster = ctx.cluster
    assert cluster is not None
    rec = cluster.command(event.command_id)
    if rec is None:
        return
    for invocation_id, instance_id in event.invocations:
        session = ctx.sessions.by_instance.get(instance_id)
        if session is None or not session.online:
            continue  # gone meanwhile: the owner delivers again when the agent says HELLO anywhere
        attempts = cluster.attempts.get(invocation_id, 0)
        why = (agent_api.too_large(session, rec.steps_bytes + DELIVERY_OVERHEAD)
               or (unacknowledged(attempts) if attempts >= MAX_DELIVERIES else ""))
        if why:
            log.warning("invocation %s on %s is undeliverable: %s", invocation_id, instance_id, why)
            cluster.relay(rec.owner, rec.command_id, "undeliverable", instance_id, c.Undelivered(invocation_id, why))
            continue
        cluster.delivered_for(invocation_id, event.command_id, instance_id)
        ctx.sessions.queue_delivery(instance_id, protocol.Invocation(
            invocation_id=invocation_id, command_id=rec.command_id, instance_id=instance_id,
            document_name=rec.document_name, document_version=rec.document_version,
            document_sha256=rec.document_sha256, steps=rec.steps, issued_at=rec.requested_at,
            expires_at=rec.expires_at), rec.steps_bytes)


def on_command(ctx: BrokerContext, event: c.CommandEvent) -> None:
    assert ctx.cluster is not None
    ctx.cluster.described(event)


def on_cancel(ctx: BrokerContext, event: c.CancelEvent) -> None:
    for invocation_id, instance_id in event.invocations:
        ctx.sessions.queue_cancel(instance_id, invocation_id)


def peers_died(ctx: BrokerContext, dead: list[str]) -> None:
    """Other brokers are gone: their agents reconnect elsewhere; their commands are adopted here,
    one command at a time by whichever broker takes its lock first."""
    assert ctx.cluster is not None
    adopted = []
    locked = [cid for cid in ctx.cluster.active_commands_of(dead)
              if cid not in ctx.book.active and ctx.cluster.own(cid)]
    taken = ctx.cluster.take_over(locked, dead)
    for command_id in locked:
        rec = ctx.store.get_command(command_id) if command_id in taken else None
        if rec is not None:
            adopted.append(rec)
        else:
            ctx.cluster.disown(command_id)
    if adopted:
        ctx.book.adopt(adopted)
        ctx.cluster.live_seen(r.command_id for r in adopted)  # their holders may have written some
        ctx.cluster.stats["commands_adopted"] += len(adopted)
        log.warning("adopted %d command(s) of %s", len(adopted), ", ".join(dead))
        apply_relayed(ctx, [r.command_id for r in adopted])


def fence_after_outage(ctx: BrokerContext) -> None:
    """Before what was queued during an outage of the store is written: the commands another
    broker adopted meanwhile (this one was cut off long enough to be judged dead) are left to it,
    and the agents whose sessions the others forgot say HELLO again."""
    cluster = ctx.cluster
    assert cluster is not None
    online = [s.instance_id for s in ctx.sessions.sessions() if s.online]
    lost, forgotten = cluster.fence_after_outage(time.monotonic(), online)
    taken_over(ctx, lost, forgotten)


def taken_over(ctx: BrokerContext, command_ids: set[str], rehello: Iterable[str] = ()) -> None:
    """Commands this broker owned that another owns now: forgotten here without a write, with
    what was queued for their agents. An agent whose result was recorded here and not written
    keeps it (its ack is taken back) and says HELLO again: what it holds and its results go to
    the new owner."""
    cluster = ctx.cluster
    assert cluster is not None
    instances = set(rehello)
    if command_ids:
        log.warning("command(s) %s were taken over by another broker while this one was cut off from the store: "
                    "left to it", ", ".join(sorted(command_ids)))
        released = cluster.forget_commands(command_ids, ctx.book.release(command_ids))
        ctx.sessions.withdraw(released)
        instances.update(released.values())
        # answers this broker gave from its own copy and could not send: its clients wait again,
        # for what the new owner records (the next resync answers those whose command ended)
        for waiter in ctx.transport.withdraw(lambda w: w.command_id in command_ids):
            ctx.waiters.add(waiter)
        cluster.missed_notifications = True
    for instance_id in sorted(instances):
        session = ctx.sessions.by_instance.get(instance_id)
        if session is not None and session.online:
            ctx.to_agent(session.routing_id, protocol.PleaseHello(), fd=session.fd)


HANDLERS: dict[type, Callable[[BrokerContext, object], None]] = {
    c.SessionEvent: on_session,
    c.FleetEvent: on_fleet,
    c.DoneEvent: on_done,
    c.OutputEvent: on_output,
    c.RelayEvent: on_relay,
    c.DeliverEvent: on_deliver,
    c.CommandEvent: on_command,
    c.CancelEvent: on_cancel,
}
