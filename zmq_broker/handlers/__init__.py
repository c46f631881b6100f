"""The broker's two dispatch tables and the one place where a request's error becomes a reply.

A new client operation: a request type in ``zerorun/protocol.py``, a handler
``op_x(ctx, msg, peer)`` in the module of its concern, and a row in ``CLIENT_OPERATIONS`` with
the permission it needs (or a function of the request that names it, when that depends on the
request: a session needs ``session``, ``forward`` or ``exec`` by its kind). A new agent message: a message type, a handler
``on_x(ctx, session, msg)`` in ``agents.py`` and a row in ``AGENT_MESSAGES``. Nothing else is
reachable.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import zmq

from zerorun import protocol

from ..context import DEFERRED, BrokerContext, Peer
from ..errors import BrokerError
from ..store.base import STORE_UNAVAILABLE
from ..transport import request_id_of
from . import agents, commands, documents, fleet, interactive, keys, sessions, tags, tokens
from .access import authorise

log = logging.getLogger("zerorun.broker")

Permission = str | Callable[[BrokerContext, Any], str]

CLIENT_OPERATIONS: dict[type, tuple[Callable[[BrokerContext, Any, Peer], Any], Permission]] = {
    protocol.Ping: (fleet.op_ping, "read"),
    protocol.ListInstances: (fleet.op_instances, "read"),
    protocol.SendCommand: (commands.op_send, "run"),
    protocol.GetCommand: (commands.op_command, "read"),
    protocol.ListCommands: (commands.op_commands, "read"),
    protocol.WaitCommand: (commands.op_wait, "read"),
    protocol.FollowOutput: (commands.op_follow, "read"),
    protocol.GetOutput: (commands.op_output, "read"),
    protocol.CancelCommand: (commands.op_cancel, "cancel"),
    protocol.ListKeys: (keys.op_keys, "read"),
    protocol.KeyAction: (keys.op_key, "keys"),
    protocol.AddKey: (keys.op_key_add, "keys"),
    protocol.ListDocuments: (documents.op_documents, "read"),
    protocol.GetDocument: (documents.op_document, "read"),
    protocol.DocumentVersions: (documents.op_document_versions, "read"),
    protocol.CreateDocument: (documents.op_document_create, "documents"),
    protocol.UpdateDocument: (documents.op_document_update, "documents"),
    protocol.SetDefaultDocumentVersion: (documents.op_document_default, "documents"),
    protocol.DeleteDocument: (documents.op_document_delete, "documents"),
    protocol.Exec: (interactive.op_exec, "exec"),
    protocol.FileTransfer: (interactive.op_file, "exec"),
    protocol.TagAction: (tags.op_tags, "tags"),
    protocol.CreateToken: (tokens.op_token_create, "keys"),
    protocol.ListTokens: (tokens.op_tokens, "read"),
    protocol.RevokeToken: (tokens.op_token_revoke, "keys"),
    protocol.OpenSession: (sessions.op_open, sessions.permission_to_open),
    protocol.SessionIO: (sessions.op_io, sessions.permission_to_use),
}
"""The complete allow-list of client operations, each with the permission it needs."""

AGENT_MESSAGES: dict[type, Callable[[BrokerContext, Any, Any], None]] = {
    protocol.Heartbeat: agents.on_heartbeat,
    protocol.Ack: agents.on_ack,
    protocol.Started: agents.on_started,
    protocol.Results: agents.on_results,
    protocol.Refuse: agents.on_refuse,
    protocol.Bye: agents.on_bye,
    protocol.Output: agents.on_output,
    protocol.OutputData: agents.on_output_data,
    protocol.ExecDone: interactive.on_exec_done,
    protocol.FileDone: interactive.on_file_done,
    protocol.FactsUpdate: agents.on_facts,
    protocol.SessionStarted: sessions.on_started,
    protocol.SessionData: sessions.on_data,
}
"""Every agent message but HELLO, which opens the session the others need."""


def _decode(ctx: BrokerContext, parts: list[zmq.Frame], decoder: Any, kind: str) -> Any:
    """``Transport.decode``, a body nested deeper than the decoder follows being malformed too:
    msgspec raises RecursionError for it (``parameters`` may hold any value), not a DecodeError."""
    try:
        return ctx.transport.decode(parts, decoder, kind)
    except RecursionError:
        ctx.stats[f"rejected_{kind}_malformed_body"] += 1
        ctx.stats["rejected"] += 1
        ctx.transport.warnings.warning(log, f"dropped {kind} messages", "dropped %s message: malformed_body "
                                       "(nested too deeply)", kind)
        return None


def _request_id(body: Any) -> int:
    try:
        return request_id_of(body)
    except RecursionError:  # the rid is there, but so is what cannot be skipped over
        return 0


def handle_request(ctx: BrokerContext, parts: list[zmq.Frame]) -> None:
    ctx.stats["requests"] += 1
    msg = _decode(ctx, parts, protocol.request_decoder, "client")
    if msg is None:
        if len(parts) == 3:  # answer with the request's own id when it has one: no client waits
            ctx.fail(parts[0].bytes, _request_id(parts[2].buffer), "BadRequest",
                     "malformed request or unsupported protocol version")
        return
    peer = Peer(parts[0].bytes, ctx.transport.peer_key(parts))
    fd = ctx.transport.source_fd(parts)
    held = ctx.client_connections.spoke(fd, peer.routing_id, peer.key, time.monotonic())
    if held:
        _refuse_connection(ctx, peer, msg.rid, held)
        return
    unread = ctx.client_connections.unread_beyond(fd)
    if unread:
        _refuse_unread(ctx, peer, msg.rid, unread)
        return
    handler, needs = CLIENT_OPERATIONS[type(msg)]

    def work() -> Any:
        permission = needs if isinstance(needs, str) else needs(ctx, msg)
        authorise(ctx, peer, permission, msg)
        if permission != "read" and ctx.audit.failed:
            raise BrokerError("AuditUnavailable", f"the broker cannot write its audit log ({ctx.audit.failed}); it "
                                                  "refuses new work until it can (commands already running finish)")
        if ctx.store.write_failed:
            # nothing is committed until its disk takes writes again, and answers wait for a
            # commit: a ping (how an operator finds out why) is answered at once, the rest refused
            if isinstance(msg, protocol.Ping):
                ctx.reply(peer.routing_id, msg.rid, handler(ctx, msg, peer), at_once=True)
                return DEFERRED
            raise BrokerError(STORE_UNAVAILABLE, f"the broker cannot write its database ({ctx.store.write_failed}); "
                                                 "it refuses requests until it can (commands already running finish)",
                              before_any_change=True)
        return handler(ctx, msg, peer)

    ctx.respond(peer.routing_id, msg.rid, work, type(msg).__name__, isinstance(msg, protocol.SAFE_TO_REPEAT))


def _refuse_connection(ctx: BrokerContext, peer: Peer, rid: int, held: int) -> None:
    """A key past ``--max-client-connections`` is refused on its newest connection, which is cut."""
    ctx.stats["refused_client_connections"] += 1
    limit = ctx.client_connections.limit
    ctx.transport.warnings.warning(
        log, f"connections {peer.key}", "client %s holds %d connections (at most %d): its newest is refused and "
        "closed", ctx.requester(peer.key), held, limit)
    ctx.fail(peer.routing_id, rid, "TooManyConnections",
             f"this client's key holds {held} connections to the broker (at most {limit}): this one is refused "
             "and closed; close some, or raise --max-client-connections", at_once=True)


def _refuse_unread(ctx: BrokerContext, peer: Peer, rid: int, unread: int) -> None:
    """A key that left more replies unread than ``--max-unread-reply-mb`` gets no more
    (client_connections.py)."""
    ctx.stats["refused_unread_replies"] += 1
    who = ctx.requester(peer.key) if peer.key is not None else "an insecure client"
    mib = unread / (1024 * 1024)
    ctx.transport.warnings.warning(
        log, f"unread {peer.key}", "client %s left %.0f MiB of replies unread (at most %d MiB): its requests are "
        "refused until it reads them", who, mib, ctx.config.max_unread_reply_mb)
    ctx.fail(peer.routing_id, rid, "UnreadReplies",
             f"this client's key left {mib:.0f} MiB of replies unread in the broker (at most "
             f"{ctx.config.max_unread_reply_mb} MiB): a connection of it asks and does not read; its requests are "
             "refused until it reads them or closes", at_once=True)


def handle_agent_message(ctx: BrokerContext, parts: list[zmq.Frame]) -> None:
    ctx.stats["messages_in"] += 1
    msg = _decode(ctx, parts, protocol.agent_message_decoder, "agent")
    if msg is None:
        return
    routing_id = parts[0].bytes
    key = ctx.transport.peer_key(parts)
    fd = ctx.transport.source_fd(parts)
    if isinstance(msg, protocol.Hello):
        agents.on_hello(ctx, routing_id, fd, key, msg)
        return
    session = ctx.sessions.find(key, routing_id, fd)
    if session is None:
        ctx.to_agent(routing_id, protocol.PleaseHello(), fd=fd)
        return
    session.last_seen = time.monotonic()
    if not session.online:
        agents.set_online(ctx, session, True)
    AGENT_MESSAGES[type(msg)](ctx, session, msg)
