"""Client operations on commands: send, show, list, wait, follow output, cancel; and the answers
owed to waiting clients when a command completes, gains output or their deadline passes."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from zerorun import keys as keyfiles, protocol
from zerorun.identifiers import printable, time_ordered_ids, user_name_problem
from zerorun.protocol import Target

from .. import documents, webhooks
from ..commands import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ERRORS, parse_rate
from ..context import DEFERRED, BrokerContext, Peer
from ..errors import BrokerError
from ..fleet import parse_targets
from ..model import CommandRecord, InstanceRecord
from ..cluster import DoneEvent
from ..waiters import MAX_PER_CLIENT as MAX_WAITS_PER_CLIENT, Waiter
from . import access

log = logging.getLogger("zerorun.broker")

MAX_WAIT = 300.0  # seconds a long poll is held at most
MAX_EXECUTION_TIMEOUT = 172800  # SSM's bound on a step's timeout (two days)


def op_send(ctx: BrokerContext, msg: protocol.SendCommand, peer: Peer) -> Any:
    if not msg.targets and not msg.instance_ids:
        raise BrokerError("InvalidTarget", "no targets: give --target tag:KEY=VALUE or instance ids")
    targets = parse_targets(msg.targets)
    if msg.instance_ids:
        targets += parse_targets([Target("instance", values=tuple(msg.instance_ids))])
    target_texts = [str(t) for t in targets]
    matched = ctx.fleet.matching_targets(targets)
    # An instance named on its own (instance_ids, or one lone instance target) always gets an
    # invocation: one the broker does not know ends Undeliverable. Combined with other targets,
    # instance targets are filters like any other.
    explicit = {i for t in targets if t.kind == "instance" for i in t.values}
    named_alone = len(targets) == 1 and targets[0].kind == "instance"
    unknown = sorted(explicit - {r.instance_id for r in matched}) if named_alone or not msg.targets else []
    if not matched and not unknown:
        raise BrokerError("NoInstancesInTag", f"no instance matches {' AND '.join(target_texts)}")
    access.require_in_scope(ctx, peer, "SendCommand",
                            [(r.instance_id, r.tags) for r in matched] + [(i, {}) for i in unknown])
    count = len(matched) + len(unknown)
    max_concurrency = parse_rate(msg.max_concurrency, count, DEFAULT_MAX_CONCURRENCY, minimum=1,
                                 what="max_concurrency")
    max_errors = parse_rate(msg.max_errors, count, DEFAULT_MAX_ERRORS, minimum=0, what="max_errors")
    timeout = msg.timeout_seconds or ctx.config.delivery_timeout
    if not 1 <= timeout <= 30 * 86400:
        raise BrokerError("InvalidTimeout", "timeout must be between 1 second and 30 days (2592000 s)")
    if not 0 <= msg.execution_timeout <= MAX_EXECUTION_TIMEOUT:
        raise BrokerError("InvalidTimeout", f"the execution timeout must be between 1 and {MAX_EXECUTION_TIMEOUT} "
                                            f"seconds (0: the document's own), not {msg.execution_timeout}")
    if msg.first < 0:
        raise BrokerError("InvalidRate", f"first (the canary) must be 0 or more, not {msg.first}")
    if msg.run_as and (problem := user_name_problem(msg.run_as)):
        raise BrokerError("InvalidRunAs", problem)
    notify = _webhook_targets(ctx, peer, msg)
    platform = (matched[0].platform if matched else "") or "Linux"

    def rendered(result: documents.Rendered | None, error: BrokerError | None) -> None:
        def create() -> Any:
            if error is not None:
                raise error
            assert result is not None
            access.require_documents(ctx, peer, "SendCommand", result.nested_names)
            if msg.run_as:  # the command's user, for every step that names none (new steps: the
                # rendering may be shared with other commands, see Renderer._inline)
                result.steps = _run_as(result.steps, msg.run_as)
                result.display_steps = _run_as(result.display_steps, msg.run_as)
            access.require_run_as(ctx, peer, "SendCommand", {step.run_as for step in result.steps})
            return _create(ctx, msg, peer, result, matched, unknown, target_texts, timeout, max_concurrency,
                           max_errors, notify)

        ctx.respond(peer.routing_id, msg.rid, create, "SendCommand")

    ctx.renderer.render(msg, platform, rendered)
    return DEFERRED


def _run_as(steps: list[protocol.Step], user: str) -> list[protocol.Step]:
    return [step if step.run_as else msgspec.structs.replace(step, run_as=user) for step in steps]


def _create(ctx: BrokerContext, msg: protocol.SendCommand, peer: Peer, rendered: documents.Rendered,
            matched: list[InstanceRecord], unknown: list[str], target_texts: list[str], timeout: int,
            max_concurrency: int, max_errors: int, notify: list[tuple[str, str]]) -> Any:
    """A command from a rendered document: recorded, audited, handed to the command book."""
    count = len(matched) + len(unknown)
    now = time.time()
    rec = CommandRecord(
        command_id=time_ordered_ids(1)[0] if not msg.dry_run else "dry-run", status=protocol.PENDING,
        status_details=protocol.PENDING, document_name=rendered.name,
        document_version=rendered.version, document_sha256=rendered.sha256,
        parameters=rendered.parameters, targets=target_texts, requested_by=ctx.requester(peer.key),
        requested_at=now, expires_at=now + timeout, timeout_seconds=timeout,
        max_concurrency=max_concurrency, max_errors=max_errors, steps=rendered.steps,
        display_steps=rendered.display_steps, comment=msg.comment[:1000], first=max(0, msg.first),
        instance_ids=[r.instance_id for r in matched] + unknown, steps_bytes=rendered.size,
        requested_by_key=keyfiles.fingerprint(peer.key) if peer.key else "", run_as=msg.run_as,
        notify=notify, notify_invocations=msg.notify_invocations and bool(notify))
    if msg.dry_run:
        # as the real send: an instance named alone that the broker does not know would end
        # Undeliverable (it was left out, and the dry run said "on 0 instance(s)")
        invs = [protocol.InvocationView(invocation_id="", command_id="dry-run", instance_id=r.instance_id,
                                        status="DryRun") for r in matched]
        invs += [protocol.InvocationView(invocation_id="", command_id="dry-run", instance_id=i,
                                         status=protocol.UNDELIVERABLE, status_details="unknown instance")
                 for i in unknown]
        return rec.view(invs)
    log.info("command %s: %s v%s on %d instance(s) (%s) by %s", rec.command_id, rec.document_name,
             rec.document_version, count, " AND ".join(target_texts), rec.requested_by)
    ctx.audit.write("command.send", command_id=rec.command_id, client=rec.requested_by,
                    document=rec.document_name, version=rec.document_version,
                    sha256=rec.document_sha256, parameters=rec.parameters, targets=target_texts,
                    instances=[r.instance_id for r in matched] + unknown, comment=rec.comment,
                    run_as=sorted({step.run_as or "root" for step in rec.steps}),
                    notify=[target for target, _ in notify])
    if ctx.cluster is not None:
        ctx.cluster.own_created(rec.command_id)
    ctx.book.create(rec, [r.instance_id for r in matched], unknown)
    if msg.wait > 0:  # send and wait in one round trip
        return op_wait(ctx, protocol.WaitCommand(msg.rid, rec.command_id, msg.wait), peer)
    return ctx.book.view(rec.command_id)


def _webhook_targets(ctx: BrokerContext, peer: Peer, msg: protocol.SendCommand) -> list[tuple[str, str]]:
    """The command's webhooks, (shown target, URL): names the broker configures for any client
    that may run; raw URLs only as the client's role allows (``webhook_urls``)."""
    if not msg.notify:
        return []
    if ctx.webhooks is None:
        raise BrokerError("InvalidNotify", "this broker sends no webhooks")

    def may_use_url(url: str) -> None:
        if peer.role is not None and not peer.role.may_notify_url(url):
            access.deny(ctx, peer, "SendCommand", f"client {peer.name!r} (role {peer.role.name}) may not send webhooks "
                        "to URLs of its choosing (its role's webhook_urls match none of "
                        f"{webhooks.shown_target(url)!r}); use a webhook the broker names")

    return webhooks.resolve(list(msg.notify), ctx.config.webhooks, may_use_url)


def _record_and_view(ctx: BrokerContext, command_id: str,
                     include_output: bool) -> tuple[CommandRecord, protocol.CommandView]:
    found = ctx.book.record_and_view(command_id, include_output)
    if found is None:
        raise BrokerError("NotFound", f"no command {command_id!r}")
    rec, view = found
    if ctx.webhooks is not None and rec.notify:
        view.webhooks = ctx.webhooks.status(command_id)
    return rec, view


def command_view(ctx: BrokerContext, command_id: str, include_output: bool = True,
                 instance_ids: list[str] | None = None) -> protocol.CommandView:
    return _only(_record_and_view(ctx, command_id, include_output)[1], instance_ids)


def visible_view(ctx: BrokerContext, peer: Peer, op: str, command_id: str, include_output: bool = True,
                 instance_ids: list[str] | None = None) -> protocol.CommandView:
    """The command's view, if this client may see it (see ``access.command_visible``)."""
    rec, view = _record_and_view(ctx, command_id, include_output)
    if not access.unrestricted(peer):
        access.require_command_visible(ctx, peer, op, rec, (i.instance_id for i in view.invocations))
    return _only(view, instance_ids)


def _instances_of(ctx: BrokerContext, rec: CommandRecord) -> list[str]:
    if rec.instance_ids or not rec.invocation_ids:
        return rec.instance_ids
    return [inv.instance_id for inv in ctx.store.get_invocations(rec.command_id)]  # before instance_ids


def op_command(ctx: BrokerContext, msg: protocol.GetCommand, peer: Peer) -> Any:
    return visible_view(ctx, peer, "GetCommand", msg.command_id, msg.include_output, msg.instance_ids)


def op_commands(ctx: BrokerContext, msg: protocol.ListCommands, peer: Peer) -> Any:
    ctx.store.flush()
    if msg.before_id:  # the page goes on after this row: one mistyped (or another time) repeated or left out rows
        rec = ctx.store.get_command(msg.before_id)
        if rec is None or rec.requested_at != msg.before:
            raise BrokerError("BadRequest", f"no command {printable(msg.before_id)} was requested at {msg.before!r} "
                                            "(give both as a page's '(more: ...)' line does; pruned since?)")
    def visible(rec: CommandRecord) -> bool:
        return access.command_visible(ctx, peer, rec, _instances_of(ctx, rec))

    out = []
    for rec in ctx.store.list_commands(msg.limit, msg.status, msg.document, msg.since, msg.before, msg.target,
                                       visible=None if access.unrestricted(peer) else visible,
                                       before_id=msg.before_id):
        active = ctx.book.active.get(rec.command_id)
        rec = active.rec if active is not None else rec
        view = rec.view([], False)
        view.target_count = len(rec.invocation_ids)
        out.append(view)
    return out


def op_wait(ctx: BrokerContext, msg: protocol.WaitCommand, peer: Peer) -> Any:
    view = visible_view(ctx, peer, "WaitCommand", msg.command_id, msg.include_output, msg.instance_ids)
    if view.status in protocol.TERMINAL_STATUSES or not msg.timeout > 0:  # (NaN is no wait either)
        return view
    _room_to_wait(ctx, peer)
    ctx.waiters.add(Waiter(peer.routing_id, msg.rid, msg.command_id, time.monotonic() + min(msg.timeout, MAX_WAIT),
                           peer.key, msg.include_output, instance_ids=msg.instance_ids))
    return DEFERRED


def op_follow(ctx: BrokerContext, msg: protocol.FollowOutput, peer: Peer) -> Any:
    visible_view(ctx, peer, "FollowOutput", msg.command_id, False)
    update = output_update(ctx, msg)
    if update.chunks or update.done or not msg.timeout > 0:
        return update
    _room_to_wait(ctx, peer)
    ctx.waiters.add(Waiter(peer.routing_id, msg.rid, msg.command_id, time.monotonic() + min(msg.timeout, MAX_WAIT),
                           peer.key, follow=msg))
    return DEFERRED


def _room_to_wait(ctx: BrokerContext, peer: Peer) -> None:
    if not ctx.waiters.room_for(peer.routing_id, peer.key):
        raise BrokerError("TooManyWaits", f"this client already holds {MAX_WAITS_PER_CLIENT} waits and follows "
                                          "of commands; ask again once some are answered")


def op_output(ctx: BrokerContext, msg: protocol.GetOutput, peer: Peer) -> Any:
    """A slice of one invocation's whole output (``zerorun show --output full``)."""
    view = visible_view(ctx, peer, "GetOutput", msg.command_id, True, [msg.instance_id])
    if not view.invocations:
        raise BrokerError("NotFound", f"command {msg.command_id} has no invocation on {msg.instance_id!r}")
    if ctx.outputs is None:
        raise BrokerError("Unavailable", "this broker keeps no output store")
    inv = view.invocations[0]
    return protocol.to_builtins(ctx.outputs.slice(inv, ctx.store.get_output(inv.invocation_id), msg.stream,
                                                  msg.offset, msg.length))


def op_cancel(ctx: BrokerContext, msg: protocol.CancelCommand, peer: Peer) -> Any:
    view = visible_view(ctx, peer, "CancelCommand", msg.command_id, False)
    strangers = sorted(set(msg.instance_ids) - {i.instance_id for i in view.invocations})
    if strangers:
        raise BrokerError("InvalidTarget", f"command {msg.command_id} does not run on {', '.join(strangers)}")
    if view.status in protocol.TERMINAL_STATUSES:
        return command_view(ctx, msg.command_id, False)
    requester = ctx.requester(peer.key)
    log.info("cancel of command %s requested by %s", msg.command_id, requester)
    ctx.audit.write("command.cancel", command_id=msg.command_id, client=requester, instances=msg.instance_ids)
    if msg.command_id in ctx.book.active:
        ctx.book.cancel(msg.command_id, set(msg.instance_ids) or None)
    elif ctx.cluster is not None:  # another broker owns it: the cancel goes to it through the store
        rec = ctx.book.record(msg.command_id)
        if rec is not None and rec.owner:
            ctx.cluster.relay(rec.owner, msg.command_id, "cancel", "", list(msg.instance_ids))
    return command_view(ctx, msg.command_id, False)


def output_update(ctx: BrokerContext, msg: protocol.FollowOutput) -> protocol.OutputUpdate:
    """Text each invocation produced beyond the client's cursors: live buffers while it runs,
    the stored output once it has finished."""
    active = ctx.book.active.get(msg.command_id)
    if active is not None:
        invocations = [ctx.book.invocations[i] for i in active.rec.invocation_ids]
        status = active.rec.status
    else:
        view = command_view(ctx, msg.command_id, True)
        invocations, status = view.invocations, view.status
    wanted = set(msg.instance_ids)
    chunks: list[protocol.OutputChunk] = []
    cursors = dict(msg.cursors)
    statuses = {}
    remote: dict[tuple[str, str], str] | None = None  # live output held by other brokers' agents
    for inv in invocations:
        if wanted and inv.instance_id not in wanted:
            continue
        statuses[inv.instance_id] = inv.status
        finished = inv.status in protocol.TERMINAL_STATUSES
        for stream in ("stdout", "stderr"):
            text = getattr(inv, stream) if finished else ctx.live.text(inv.invocation_id, stream)
            if not finished and not text and ctx.cluster is not None:
                if remote is None:
                    remote = ctx.cluster.live_text(msg.command_id)
                text = remote.get((inv.invocation_id, stream), "")
            cursor_key = f"{inv.instance_id}:{stream}"
            seen = cursors.get(cursor_key, 0)
            if len(text) > seen:
                chunks.append(protocol.OutputChunk(inv.instance_id, stream, text[seen:]))
                cursors[cursor_key] = len(text)
    return protocol.OutputUpdate(command_id=msg.command_id, status=status,
                                 done=status in protocol.TERMINAL_STATUSES, chunks=chunks,
                                 cursors=cursors, statuses=statuses)


# -- answers owed to waiting clients ----------------------------------------------------------


def answer(ctx: BrokerContext, waiter: Waiter) -> None:
    """Queued with the waiter it answers: a command this broker loses to another before the
    answer is sent (``cluster.taken_over``) has its answers taken back and its waiters wait again."""
    if waiter.follow is not None:
        try:
            ctx.reply(waiter.routing_id, waiter.rid, output_update(ctx, waiter.follow), waiter)
        except BrokerError as exc:
            ctx.fail(waiter.routing_id, waiter.rid, exc.code, exc.message, about=waiter)
        return
    view = ctx.book.view(waiter.command_id, waiter.include_output)
    if view is None:
        ctx.fail(waiter.routing_id, waiter.rid, "NotFound", "command vanished", about=waiter)
    else:
        ctx.reply(waiter.routing_id, waiter.rid, _only(view, waiter.instance_ids), waiter)


def command_completed(ctx: BrokerContext, rec: CommandRecord) -> None:
    ctx.audit.write("command.complete", command_id=rec.command_id, status=rec.status,
                    details=rec.status_details, client=rec.requested_by)
    if ctx.webhooks is not None:  # queued with the commit that records the completion
        ctx.webhooks.command_completed(rec, ctx.book.completed_counts)
    if ctx.cluster is not None:
        ctx.cluster.broadcast(DoneEvent([rec.command_id]))  # waiters on other brokers
        ctx.cluster.disown(rec.command_id, at_once=False)
    answer_completed(ctx, rec.command_id)


def answer_completed(ctx: BrokerContext, command_id: str) -> None:
    for waiter in ctx.waiters.take_completed(command_id):
        answer(ctx, waiter)


def output_arrived(ctx: BrokerContext, command_ids: set[str]) -> None:
    for waiter in ctx.waiters.take_followers(command_ids):
        answer(ctx, waiter)


def expire_waiters(ctx: BrokerContext, now: float) -> None:
    for waiter in ctx.waiters.take_expired(now):
        answer(ctx, waiter)


def _only(view: protocol.CommandView, instance_ids: list[str] | None) -> protocol.CommandView:
    """The view with only the given instances' invocations (counts still cover all)."""
    if instance_ids:
        wanted = set(instance_ids)
        view.invocations = [i for i in view.invocations if i.instance_id in wanted]
    return view
