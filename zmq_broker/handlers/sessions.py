"""Sessions relayed between a client and the agent of one instance (state in ``tunnels.py``).

A client's OpenSession becomes a SessionStart for the instance's agent, answered when the agent
says SessionStarted. Then the client's SessionIO carry input (relayed to the agent at once as
SessionData) and long-poll for output (the agent's SessionData, buffered here within the
client's window). Each session is audited when it opens and when it ends: who, where, when, how
long, bytes each way, and how it ended.

With several brokers, a session goes through the broker that holds the instance's agent
connection: another broker refuses it with ``WrongBroker``, naming that broker and its client
endpoint (the client library moves there when it knows that endpoint). Relaying a byte stream
through the store would put every keystroke and every chunk of a transfer into PostgreSQL.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from zerorun import protocol
from zerorun.identifiers import instance_id_problem, one_line

from ..context import DEFERRED, BrokerContext, Peer
from ..errors import BrokerError
from ..sessions import Session
from ..tunnels import (CLIENT_SILENCE, DEFAULT_WINDOW, ENDED_KEPT, MAX_CHUNK, MAX_WAIT, MAX_WINDOW, MIN_WINDOW,
                       OPEN_TIMEOUT, PERMISSIONS, Held, Transcript, Tunnel)
from . import access

log = logging.getLogger("zerorun.broker.sessions")

MAX_COMMAND_CHARS = 64 * 1024
MAX_ENV = 64
AUDIT_COMMAND_CHARS = 500


def _busy(ctx: BrokerContext) -> bool:
    """Command work is going on: sessions yield. While it is, acknowledgements (the credit that
    lets a transfer go on) pass only once per tick, so a bulk transfer slows to about a window
    per tick and session to instead of taking the CPU that dispatch and results need."""
    stats = ctx.stats
    mark = (stats["invocations_delivered"] + sum(ctx.book.finished_invocations.values())
            + stats["requests"] - stats["session_requests"])
    return ctx.tunnels.commands_busy(mark, time.monotonic())


def permission_to_open(ctx: BrokerContext, msg: protocol.OpenSession) -> str:
    return PERMISSIONS[msg.kind]


def permission_to_use(ctx: BrokerContext, msg: protocol.SessionIO) -> str:
    """A session is used with the permission it was opened with (checked on every request, so a
    policy change that takes it away ends the session's use at once)."""
    tunnel = ctx.tunnels.by_id.get(msg.session_id)
    return tunnel.permission if tunnel is not None else "session"


# -- opening ------------------------------------------------------------------------------------


def _check_open(ctx: BrokerContext, msg: protocol.OpenSession, peer: Peer) -> None:
    """Every refusal that needs no agent, with a reason a person can act on."""
    if not msg.instance_id or instance_id_problem(msg.instance_id):
        raise BrokerError("BadRequest", "a session needs a valid instance_id")
    if msg.kind == "tcp":
        if not 1 <= msg.port <= 65535:
            raise BrokerError("BadRequest", f"port {msg.port} is not 1-65535")
        host = msg.host.strip()
        if len(host) > 253 or not all(c.isalnum() or c in ".-_:" for c in host):
            raise BrokerError("BadRequest", f"{msg.host[:80]!r} is not a host name or address")
    elif msg.command and len(msg.command) > MAX_COMMAND_CHARS:
        raise BrokerError("BadRequest", f"the command is longer than {MAX_COMMAND_CHARS} characters")
    if msg.kind == "exec" and not msg.command:
        raise BrokerError("BadRequest", "an exec session needs a command")
    if not (1 <= msg.cols <= 10000 and 1 <= msg.rows <= 10000):
        raise BrokerError("BadRequest", "the terminal size must be 1-10000 columns and rows")
    if len(msg.env) > MAX_ENV or len(msg.term) > 64 or len(msg.run_as) > 64:
        raise BrokerError("BadRequest", "too many environment variables, or a terminal or user name too long")
    if msg.window and not MIN_WINDOW <= msg.window <= MAX_WINDOW:
        raise BrokerError("BadRequest", f"the receive window must be {MIN_WINDOW}-{MAX_WINDOW} bytes")
    rec = ctx.fleet.get(msg.instance_id)
    access.require_in_scope(ctx, peer, f"OpenSession({msg.kind})", [(msg.instance_id, rec.tags if rec else {})])
    if msg.kind == "shell" or msg.run_as:  # a shell runs as someone; exec (root already) only when it names a user
        access.require_run_as(ctx, peer, f"OpenSession({msg.kind})", [msg.run_as])
    if msg.kind == "tcp" and peer.role is not None and not peer.role.may_forward(msg.host, msg.port):
        destination = f"{msg.host}:{msg.port}" if msg.host else f"port {msg.port} of the instance"
        allowed = ", ".join(map(str, peer.role.forward)) or "none"
        access.deny(ctx, peer, "OpenSession(tcp)", f"client {peer.name!r} (role {peer.role.name}) may not forward "
                                                   f"to {destination} (its forward destinations: {allowed})",
                    instance_id=msg.instance_id, destination=destination)
    if rec is None:
        raise BrokerError("AgentUnavailable", f"instance {msg.instance_id!r} is unknown to the broker")


def _agent_session(ctx: BrokerContext, instance_id: str) -> Session:
    session = ctx.sessions.by_instance.get(instance_id)
    if session is not None and session.online:
        return session
    holder = ctx.cluster.holder(instance_id) if ctx.cluster is not None else None
    if holder is not None:
        peer = ctx.cluster.peers.get(holder)
        endpoint = peer.client_endpoint if peer is not None else ""
        raise BrokerError("WrongBroker", f"instance {instance_id} is connected to broker {holder}"
                                         + (f" ({endpoint})" if endpoint else "")
                                         + ": a session goes through the broker that holds the instance; use "
                                         + (endpoint or "that broker"))
    raise BrokerError("AgentUnavailable", f"the agent of instance {instance_id!r} is not connected "
                                          f"(ping status {ctx.ping_status(instance_id)})")


def op_open(ctx: BrokerContext, msg: protocol.OpenSession, peer: Peer) -> Any:
    ctx.stats["session_requests"] += 1
    _check_open(ctx, msg, peer)
    try:
        agent = _agent_session(ctx, msg.instance_id)
    except BrokerError as exc:
        if exc.code != "WrongBroker":
            raise
        holder = ctx.cluster.holder(msg.instance_id) if ctx.cluster is not None else None
        other = ctx.cluster.peers.get(holder) if ctx.cluster is not None and holder else None
        ctx.transport.reply(peer.routing_id, protocol.Reply(
            msg.rid, False, data={"broker_id": holder or "", "endpoint": other.client_endpoint if other else ""},
            error=protocol.ErrorInfo(exc.code, exc.message)))
        return DEFERRED
    if msg.dry_run:
        return {"ok": True, "instance_id": msg.instance_id}
    if ctx.tunnels.live() >= ctx.config.max_sessions:
        raise BrokerError("TooManySessions", f"this broker has {ctx.config.max_sessions} sessions open, its limit "
                                             "(--max-sessions); try again later")
    now = time.monotonic()
    tunnel = Tunnel(uuid.uuid4().hex, msg.kind, msg.instance_id, peer.key or "insecure", ctx.requester(peer.key),
                    agent, time.time(), now, last_activity=now, last_request=now,
                    client_window=msg.window or DEFAULT_WINDOW)
    env = dict(msg.env)
    if msg.kind == "shell":  # a terminal's locale, nothing that changes what runs
        env = {k: v for k, v in env.items() if k == "LANG" or k.startswith("LC_")}
    if msg.kind == "tcp":
        tunnel.detail = {"host": msg.host or "localhost", "port": msg.port}
    else:
        tunnel.detail = {"command": msg.command[:AUDIT_COMMAND_CHARS], "run_as": msg.run_as or "(agent's user)"}
        if msg.kind == "shell" and not msg.pty:
            tunnel.detail["pty"] = False
    if msg.kind == "shell" and ctx.config.session_transcripts is not None:
        try:
            tunnel.transcript = Transcript(ctx.config.session_transcripts, tunnel, msg.cols, msg.rows, msg.term)
            tunnel.detail["transcript"] = str(tunnel.transcript.path)
        except OSError as exc:
            raise BrokerError("TranscriptUnavailable", f"the broker records every shell session and cannot write "
                                                       f"this one's transcript ({exc.strerror or exc})") from None
    tunnel.opener = Held(peer.routing_id, msg.rid, now + OPEN_TIMEOUT)
    ctx.tunnels.by_id[tunnel.session_id] = tunnel
    ctx.stats["sessions_opened"] += 1
    ctx.audit.write("session.open", client=tunnel.client, instance=msg.instance_id, kind=msg.kind,
                    session_id=tunnel.session_id, **tunnel.detail)

    def unreachable(error: Exception) -> None:
        _end(ctx, tunnel, f"could not reach the agent of {msg.instance_id}: {error}", tell_agent=False)

    ctx.to_agent(agent.routing_id, protocol.SessionStart(
        session_id=tunnel.session_id, kind=msg.kind, command=msg.command, run_as=msg.run_as, term=msg.term,
        cols=msg.cols, rows=msg.rows, env=env, stdin_tty=msg.stdin_tty, pty=msg.pty, host=msg.host,
        port=msg.port, window=tunnel.client_window, expires_at=time.time() + OPEN_TIMEOUT), unreachable, fd=agent.fd)
    return DEFERRED


# -- using --------------------------------------------------------------------------------------


def op_io(ctx: BrokerContext, msg: protocol.SessionIO, peer: Peer) -> Any:
    ctx.stats["session_requests"] += 1
    tunnel = ctx.tunnels.by_id.get(msg.session_id)
    if tunnel is None or tunnel.client_key != (peer.key or "insecure"):
        raise BrokerError("NotFound", f"no session {msg.session_id[:64]!r} of this client (it ended, or it was "
                                      "opened by another client or on another broker)")
    now = time.monotonic()
    tunnel.last_request = now
    tunnel.client_wait = min(msg.wait, MAX_WAIT) if msg.wait > 0 else 0.0  # (NaN: no wait)
    if tunnel.state == "opening":
        raise BrokerError("BadRequest", "the session is not open yet")
    release = not _busy(ctx)
    if tunnel.state == "open":
        problem = _take_input(ctx, tunnel, msg, release)
        if problem:
            _end(ctx, tunnel, problem)
    if tunnel.held is not None:  # the newer request answers the one held before it
        _answer(ctx, tunnel, release)
    if tunnel.client_wait > 0 and not tunnel.worth_answering(release):
        tunnel.held = Held(peer.routing_id, msg.rid, now + tunnel.client_wait)
        return DEFERRED
    update = tunnel.take_update(release)
    _forget_if_told(ctx, tunnel)
    return update


def _take_input(ctx: BrokerContext, tunnel: Tunnel, msg: protocol.SessionIO, release: bool) -> str:
    """Relays a client's input to the agent; the reason to end the session when it breaks the rules."""
    relay = protocol.SessionData(tunnel.session_id)
    relayed = False
    if msg.data or msg.eof:
        if msg.seq != tunnel.client_seq + 1:
            return f"client input out of sequence (got {msg.seq}, expected {tunnel.client_seq + 1})"
        if len(msg.data) > MAX_CHUNK:
            return f"a client chunk of {len(msg.data)} bytes (at most {MAX_CHUNK})"
        if tunnel.to_agent + len(msg.data) - tunnel.agent_acked > tunnel.agent_window:
            return "the client sent beyond the agent's window (flow control)"
        tunnel.client_seq = msg.seq
        tunnel.to_agent += len(msg.data)
        relay.seq, relay.stream, relay.data, relay.eof = msg.seq, msg.stream, msg.data, msg.eof
        relayed = True
        if msg.data:
            tunnel.last_activity = time.monotonic()
            ctx.stats["session_bytes_in"] += len(msg.data)
    if msg.ack > tunnel.client_acked:
        if msg.ack > tunnel.to_client:
            return "the client acknowledged output it was never sent"
        tunnel.client_acked = msg.ack
        if not release:
            tunnel.ack_held = True
        elif msg.ack != tunnel.ack_relayed:
            relay.ack = tunnel.ack_relayed = msg.ack
            tunnel.ack_held = False
            relayed = True
    if msg.cols > 0 and msg.rows > 0:
        relay.cols, relay.rows = min(msg.cols, 10000), min(msg.rows, 10000)
        relayed = True
        if tunnel.transcript is not None:
            tunnel.transcript.resize(relay.cols, relay.rows)
    if msg.close:
        _end(ctx, tunnel, "")
        return ""
    if relayed:
        _to_agent(ctx, tunnel, relay)
    return ""


def _to_agent(ctx: BrokerContext, tunnel: Tunnel, message: protocol.SessionData) -> None:
    def unreachable(error: Exception) -> None:
        _end(ctx, tunnel, f"the agent of {tunnel.instance_id} disconnected ({error})", tell_agent=False)

    ctx.to_agent(tunnel.agent.routing_id, message, unreachable, fd=tunnel.agent.fd)


def _answer(ctx: BrokerContext, tunnel: Tunnel, release: bool = True) -> None:
    held, tunnel.held = tunnel.held, None
    if held is not None:
        ctx.reply(held.routing_id, held.rid, tunnel.take_update(release))
        _forget_if_told(ctx, tunnel)


def _forget_if_told(ctx: BrokerContext, tunnel: Tunnel) -> None:
    if tunnel.state == "ended" and tunnel.told_end:
        ctx.tunnels.by_id.pop(tunnel.session_id, None)


# -- the agent's side -----------------------------------------------------------------------------


def _of_agent(ctx: BrokerContext, session: Session, session_id: str) -> Tunnel | None:
    tunnel = ctx.tunnels.by_id.get(session_id)
    if tunnel is None or tunnel.state == "ended":
        return None
    if tunnel.agent is not session:
        ctx.stats["session_refused"] += 1
        log.warning("refused session data from %s for a session of %s", session.instance_id, tunnel.instance_id)
        ctx.audit.write_refusal(session.public_key, "agent.session_refused", instance_id=session.instance_id,
                                session_id=session_id[:64])
        return None
    return tunnel


def on_started(ctx: BrokerContext, session: Session, msg: protocol.SessionStarted) -> None:
    tunnel = _of_agent(ctx, session, msg.session_id)
    if tunnel is None or tunnel.state != "opening":
        return
    opener, tunnel.opener = tunnel.opener, None
    if not msg.ok:
        tunnel.told_end = True  # the client hears it as the open's error
        _end(ctx, tunnel, one_line(msg.error) or "the agent could not start the session", tell_agent=False)
        if opener is not None:
            ctx.fail(opener.routing_id, opener.rid, "SessionFailed", f"{tunnel.instance_id}: {tunnel.error}")
        return
    tunnel.state = "open"
    tunnel.agent_window = min(max(msg.window or DEFAULT_WINDOW, MIN_WINDOW), MAX_WINDOW)
    if opener is not None:
        ctx.reply(opener.routing_id, opener.rid, protocol.SessionUpdate(
            tunnel.session_id, window=tunnel.agent_window, pty=msg.pty,
            idle_timeout=ctx.config.session_idle_timeout, max_duration=ctx.config.session_max_duration))


def on_data(ctx: BrokerContext, session: Session, msg: protocol.SessionData) -> None:
    tunnel = _of_agent(ctx, session, msg.session_id)
    if tunnel is None or tunnel.state != "open":
        return
    if msg.data or msg.eof:
        if msg.seq != tunnel.agent_seq + 1:
            _end(ctx, tunnel, f"the agent's output came out of sequence (got {msg.seq}, expected "
                              f"{tunnel.agent_seq + 1}): a message was lost")
            return
        if len(msg.data) > MAX_CHUNK or tunnel.to_client + len(msg.data) - tunnel.client_acked > tunnel.client_window:
            _end(ctx, tunnel, "the agent sent beyond the client's window (flow control)")
            return
        tunnel.agent_seq = msg.seq
        if msg.data:
            tunnel.to_client += len(msg.data)
            tunnel.out_seq += 1
            tunnel.buffer.append(protocol.SessionChunk(tunnel.out_seq, msg.stream, msg.data))
            tunnel.buffered += len(msg.data)
            tunnel.last_activity = time.monotonic()
            ctx.stats["session_bytes_out"] += len(msg.data)
            if tunnel.transcript is not None and msg.stream != "tty":  # a shell on pipes: stderr too
                tunnel.transcript.output(msg.data)
        if msg.eof and msg.stream not in tunnel.agent_closed:  # once per stream, however often it says so
            tunnel.agent_closed.add(msg.stream)
            tunnel.eof.append(msg.stream)
    if msg.ack > tunnel.agent_acked:
        tunnel.agent_acked = min(msg.ack, tunnel.to_agent)
    if msg.close:
        tunnel.exit_code = msg.exit_code
        _end(ctx, tunnel, one_line(msg.error), tell_agent=False)
        return
    if tunnel.held is not None:
        release = not _busy(ctx)
        if tunnel.worth_answering(release):
            _answer(ctx, tunnel, release)


# -- ending -------------------------------------------------------------------------------------


def _end(ctx: BrokerContext, tunnel: Tunnel, error: str, tell_agent: bool = True) -> None:
    """Ends a session once: audited, the agent told (unless it said so itself), the client
    answered now if it waits, else when it next asks (or never, if it never does)."""
    if tunnel.state == "ended":
        return
    was_open = tunnel.state == "open"
    tunnel.state = "ended"
    tunnel.error = error
    tunnel.ended_at = time.monotonic()
    if tunnel.opener is not None:  # never opened: the open's answer is the error
        opener, tunnel.opener = tunnel.opener, None
        tunnel.told_end = True
        ctx.fail(opener.routing_id, opener.rid, "SessionFailed", f"{tunnel.instance_id}: {error}")
    if tell_agent:
        _to_agent(ctx, tunnel, protocol.SessionData(tunnel.session_id, close=True, error=error))
    if tunnel.transcript is not None:
        tunnel.transcript.close()
    ctx.stats["sessions_ended"] += 1
    ctx.audit.write("session.close", client=tunnel.client, instance=tunnel.instance_id, kind=tunnel.kind,
                    session_id=tunnel.session_id, opened_at=round(tunnel.opened_at, 3),
                    duration_seconds=round(tunnel.ended_at - tunnel.started, 3), bytes_in=tunnel.to_agent,
                    bytes_out=tunnel.to_client, exit_code=tunnel.exit_code, error=error, opened=was_open)
    log.info("session %s (%s on %s) ended after %.1fs, %d bytes in, %d out%s", tunnel.session_id[:8], tunnel.kind,
             tunnel.instance_id, tunnel.ended_at - tunnel.started, tunnel.to_agent, tunnel.to_client,
             f": {error}" if error else "")
    if tunnel.held is not None:
        _answer(ctx, tunnel)
    else:
        _forget_if_told(ctx, tunnel)


def sweep(ctx: BrokerContext, now: float) -> None:
    """Ends sessions whose agent or client went away or that passed a limit; answers long polls
    that waited long enough; forgets ended sessions nobody came to read."""
    idle, longest = ctx.config.session_idle_timeout, ctx.config.session_max_duration
    for tunnel in list(ctx.tunnels.by_id.values()):
        if tunnel.state == "ended":
            if now - tunnel.ended_at > ENDED_KEPT:
                ctx.tunnels.by_id.pop(tunnel.session_id, None)
            continue
        current = ctx.sessions.by_instance.get(tunnel.instance_id)
        if current is not tunnel.agent or not current.online:
            _end(ctx, tunnel, f"the agent of {tunnel.instance_id} disconnected", tell_agent=False)
        elif tunnel.state == "opening" and tunnel.opener is not None and now >= tunnel.opener.deadline:
            _end(ctx, tunnel, f"the agent of {tunnel.instance_id} did not start the session within "
                              f"{OPEN_TIMEOUT:g}s")
        elif tunnel.state == "open" and now - tunnel.last_request > tunnel.client_wait + CLIENT_SILENCE:
            _end(ctx, tunnel, "the client stopped polling (gone)")
        elif idle > 0 and now - tunnel.last_activity > idle:
            _end(ctx, tunnel, f"idle for {idle:g}s (the broker's --session-idle-timeout)")
        elif longest > 0 and now - tunnel.started > longest:
            _end(ctx, tunnel, f"open for {longest:g}s (the broker's --session-max-duration)")
        else:
            if tunnel.ack_held:  # once per tick, even while command work goes on
                tunnel.ack_held = False
                if tunnel.client_acked != tunnel.ack_relayed:
                    tunnel.ack_relayed = tunnel.client_acked
                    _to_agent(ctx, tunnel, protocol.SessionData(tunnel.session_id, ack=tunnel.client_acked))
            if tunnel.held is not None and (now >= tunnel.held.deadline or tunnel.worth_answering()):
                _answer(ctx, tunnel)


def end_all(ctx: BrokerContext, why: str) -> None:
    """The broker is stopping: every session ends, its agent and client are told."""
    for tunnel in list(ctx.tunnels.by_id.values()):
        _end(ctx, tunnel, why)
