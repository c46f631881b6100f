"""Exec and file transfers for the Ansible connection plugin, relayed to one online agent
(bookkeeping in ``interactive.py``); the agent's ExecDone / FileDone answers the client."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from zerorun import protocol

from ..context import DEFERRED, BrokerContext, Peer
from ..interactive import (DEFAULT_EXEC_TIMEOUT, FILE_OP_TIMEOUT, GRACE, SLOW_FILE_OP_TIMEOUT, Pending,
                           TransferOwner)
from ..sessions import Session
from . import access

log = logging.getLogger("zerorun.broker.interactive")

AUDIT_COMMAND_CHARS = 500


def _session(ctx: BrokerContext, peer: Peer, rid: int, instance_id: str) -> Session | None:
    """The instance's online session, or None after answering the client why not."""
    if not instance_id:
        ctx.fail(peer.routing_id, rid, "BadRequest", "no instance_id")
        return None
    rec = ctx.fleet.get(instance_id)
    access.require_in_scope(ctx, peer, "Exec/FileTransfer", [(instance_id, rec.tags if rec is not None else {})])
    session = ctx.sessions.by_instance.get(instance_id)
    if session is None or not session.online:
        if instance_id not in ctx.fleet:
            text = f"instance {instance_id!r} is unknown to the broker"
        else:
            text = f"the agent of instance {instance_id!r} is not connected (ping status {ctx.ping_status(instance_id)})"
        ctx.fail(peer.routing_id, rid, "AgentUnavailable", text)
        return None
    return session


def _relay(ctx: BrokerContext, session: Session, message: Any, pending: Pending, request_id: str) -> None:
    def unreachable(error: Exception) -> None:
        if ctx.relay.pending.pop(request_id, None) is not None:
            ctx.relay.finish_transfer(pending.transfer_id, pending.op, ok=False)
            ctx.fail(pending.routing_id, pending.rid, "AgentUnavailable",
                     f"could not reach the agent of {pending.instance_id}: {error}")

    ctx.relay.pending[request_id] = pending
    ctx.to_agent(session.routing_id, message, unreachable, fd=session.fd)


def op_exec(ctx: BrokerContext, msg: protocol.Exec, peer: Peer) -> Any:
    session = _session(ctx, peer, msg.rid, msg.instance_id)
    if session is None:
        return DEFERRED
    timeout = msg.timeout if msg.timeout > 0 else DEFAULT_EXEC_TIMEOUT
    request_id = uuid.uuid4().hex
    ctx.audit.write("exec", client=ctx.requester(peer.key), instance=msg.instance_id,
                    command=msg.command[:AUDIT_COMMAND_CHARS], stdin_bytes=len(msg.stdin), request_id=request_id)
    ctx.stats["interactive_exec"] += 1
    pending = Pending(peer.routing_id, msg.rid, time.monotonic() + timeout + GRACE, msg.instance_id, session, "exec")
    _relay(ctx, session, protocol.AgentExec(request_id=request_id, command=msg.command, stdin=msg.stdin,
                                            timeout=timeout, env=dict(msg.env), expires_at=time.time() + timeout),
           pending, request_id)
    return DEFERRED


def op_file(ctx: BrokerContext, msg: protocol.FileTransfer, peer: Peer) -> Any:
    if not msg.transfer_id or len(msg.transfer_id) > 128:
        ctx.fail(peer.routing_id, msg.rid, "BadRequest", "a file transfer needs a transfer_id (at most 128 characters)")
        return DEFERRED
    client_key = peer.key or "insecure"
    relay = ctx.relay
    now = time.monotonic()
    owner = None
    if msg.op.startswith("open-"):
        if msg.transfer_id in relay.transfers:
            ctx.fail(peer.routing_id, msg.rid, "BadRequest", "transfer id already in use")
            return DEFERRED
    else:
        owner = relay.owner(msg.transfer_id, client_key, msg.instance_id)
        if owner is None:
            if msg.op in ("close", "abort"):
                ctx.reply(peer.routing_id, msg.rid, {"ok": True})
            else:
                ctx.fail(peer.routing_id, msg.rid, "NotFound",
                         f"no open transfer {msg.transfer_id[:64]!r} of this client")
            return DEFERRED
    session = _session(ctx, peer, msg.rid, msg.instance_id)
    if session is None:
        return DEFERRED
    requester = ctx.requester(peer.key)
    if owner is None:
        relay.transfers[msg.transfer_id] = TransferOwner(client_key, msg.instance_id, msg.path, now)
        ctx.audit.write("file.open", client=requester, instance=msg.instance_id,
                        direction="put" if msg.op == "open-put" else "fetch", path=msg.path,
                        transfer_id=msg.transfer_id)
    else:
        owner.last_used = now
        if msg.op == "commit":
            ctx.audit.write("file.commit", client=requester, instance=msg.instance_id, path=owner.path,
                            sha256=msg.sha256, transfer_id=msg.transfer_id)
    if msg.op in ("write", "read"):
        ctx.stats["interactive_file_bytes"] += len(msg.data) + msg.length
    timeout = SLOW_FILE_OP_TIMEOUT if msg.op in ("open-fetch", "commit") else FILE_OP_TIMEOUT
    request_id = uuid.uuid4().hex
    pending = Pending(peer.routing_id, msg.rid, now + timeout, msg.instance_id, session, "file", msg.op,
                      msg.transfer_id)
    _relay(ctx, session, protocol.AgentFileOp(
        request_id=request_id, transfer_id=msg.transfer_id, op=msg.op, path=msg.path, mode=msg.mode,
        offset=msg.offset, data=msg.data, length=msg.length, sha256=msg.sha256,
        expires_at=time.time() + timeout), pending, request_id)
    return DEFERRED


# -- the agent's answers --------------------------------------------------------------------------


def _claim(ctx: BrokerContext, session: Session, request_id: str, kind: str) -> Pending | None:
    pending, refused = ctx.relay.claim(session, request_id)
    if pending is None:
        ctx.stats["interactive_refused"] += 1
        if refused:
            log.warning("refused an interactive answer from %s for a request sent to another instance",
                        session.instance_id)
            ctx.audit.write_refusal(session.public_key, "agent.interactive_refused", instance_id=session.instance_id,
                                    request_id=request_id[:64])
        return None
    if pending.kind != kind:  # answered, wrongly: the client hears so now, not at its deadline
        ctx.stats["interactive_refused"] += 1
        ctx.relay.finish_transfer(pending.transfer_id, "abort", ok=False)
        ctx.fail(pending.routing_id, pending.rid, "AgentError",
                 f"{pending.instance_id}: the agent answered the {pending.kind} request as a {kind} one")
        return None
    return pending


def on_exec_done(ctx: BrokerContext, session: Session, msg: protocol.ExecDone) -> None:
    pending = _claim(ctx, session, msg.request_id, "exec")
    if pending is None:
        return
    if msg.error:
        code = "Timeout" if msg.error.startswith("timed out") else "ExecFailed"
        ctx.fail(pending.routing_id, pending.rid, code, f"{pending.instance_id}: {msg.error}")
        return
    ctx.reply(pending.routing_id, pending.rid, {"rc": msg.rc, "stdout": msg.stdout, "stderr": msg.stderr})


def on_file_done(ctx: BrokerContext, session: Session, msg: protocol.FileDone) -> None:
    pending = _claim(ctx, session, msg.request_id, "file")
    if pending is None:
        return
    ctx.relay.finish_transfer(pending.transfer_id, pending.op, msg.ok)
    if not msg.ok:
        ctx.fail(pending.routing_id, pending.rid, msg.code or "FileError", f"{pending.instance_id}: {msg.error}")
        return
    ctx.reply(pending.routing_id, pending.rid, {"ok": True, "data": msg.data, "size": msg.size,
                                                "sha256": msg.sha256, "mode": msg.mode})


def sweep(ctx: BrokerContext) -> None:
    """Answers requests whose agent went away or that are past their deadline."""
    for pending, why in ctx.relay.sweep(time.monotonic(), ctx.sessions.by_instance.get):
        if why == "gone":
            ctx.fail(pending.routing_id, pending.rid, "AgentUnavailable",
                     f"the agent of {pending.instance_id} disconnected before answering")
        else:
            ctx.stats["interactive_timeouts"] += 1
            what = "command" if pending.kind == "exec" else f"file operation {pending.op}"
            ctx.fail(pending.routing_id, pending.rid, "Timeout",
                     f"no answer from the agent of {pending.instance_id} to the {what} in time")
