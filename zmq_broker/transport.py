"""The broker's sockets and its one way in and out.

Two CURVE ROUTER sockets (agents, clients) enforced by a ZAP handler, received in bounded
batches and decoded against the protocol's types (anything else is counted and dropped). Every
message the broker sends goes through ``to_agent``/``reply``: queued, then sent by ``send_queued``
after the loop's group commit. One path means one count of messages sent, which the loop needs
to avoid a lost wake-up, and no reply can promise what is not yet committed.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from typing import Any, Callable

import msgspec
import zmq

from zerorun import protocol
from zerorun.protocol import HEADER, Reply
from zerorun.zmqutil import EVENTS, POLLIN, close_monitor, drain_monitor, monitor_socket, receive, send_routed
from zerorun.zmqutil import readable as socket_readable

from .client_connections import ClientConnections
from .config import BrokerConfig
from .descriptors import HANDSHAKE_SECONDS
from .warning_throttle import WarningThrottle

log = logging.getLogger("zerorun.broker")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
BATCH = 2000  # agent messages drained per loop iteration
BURST = 3  # messages in a drain from which the next drain receives until zmq.Again
CLIENT_BATCH = 256  # client requests per iteration: a flood from one client delays others' replies less


class _Rid(msgspec.Struct):
    rid: int = 0


_rid_only = msgspec.msgpack.Decoder(_Rid)


def request_id_of(body: bytes) -> int:
    """The ``rid`` of a request that did not decode, so that its sender is answered; decodes
    that field alone (a huge hostile body is never built into objects)."""
    try:
        rid = _rid_only.decode(body).rid
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    return rid if 0 <= rid < 2**63 else 0


class Transport:
    def __init__(self, config: BrokerConfig, secret_key: bytes, stats: Counter[str], warnings: WarningThrottle):
        self.config = config
        self.stats = stats
        self.warnings = warnings
        self._ctx = zmq.Context()
        self.zap = self._ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)  # before any socket that asks it
        self._secret_key = secret_key
        self.agents = self._router(config.agent_bind, b"agents")
        self.clients = self._router(config.client_bind, b"clients")
        # Told at once when an agent's connection goes away, with its file descriptor: the
        # session bound to that descriptor ends before anything more is sent to its routing id
        # (which another connection could otherwise claim; see sessions.py).
        self.agent_monitor = monitor_socket(self.agents, zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        self.client_monitor = monitor_socket(self.clients, zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        self.agent_endpoint = self.agents.getsockopt_string(zmq.LAST_ENDPOINT)
        self.client_endpoint = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self._to_agents: list[tuple[bytes, Any, Callable[[Exception], None] | None, int]] = []
        # replies are encoded when queued: their bytes count against their key's bound at once
        # (client_connections.py), not after a pass that may have answered hundreds more of its requests
        self._to_clients: list[tuple[bytes, bytes]] = []
        self._at_once: list[tuple[bytes, bytes]] = []  # replies that wait for no commit (``reply``)
        self._agents_at_once: list[tuple[bytes, Any]] = []  # agent messages that wait for none (``to_agent``)
        self._answers: list[tuple[tuple[bytes, bytes], Any]] = []  # queued replies with what they answer
        self._bursts: set[zmq.Socket] = set()  # sockets whose last drain found BURST or more (see drain)
        # client connections by key: how many, and the reply bytes they left unread
        self.client_connections = ClientConnections(config.max_client_connections,
                                                    max(1, config.max_unread_reply_mb) * 1024 * 1024)

    def _router(self, endpoint: str, domain: bytes) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_SECONDS * 1000)  # a held descriptor, until then
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
            sock.curve_secretkey = self._secret_key
            sock.zap_domain = domain
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise SystemExit(f"zerorun-broker: cannot bind {endpoint}: {exc}") from None
        return sock

    def close(self) -> None:
        close_monitor(self.agents, self.agent_monitor)
        close_monitor(self.clients, self.client_monitor)
        for sock in (self.agents, self.clients, self.zap):
            sock.close(0)
        self._ctx.term()

    # -- in ---------------------------------------------------------------------------------

    def drain(self, sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None], batch: int = BATCH) -> int:
        """Hands up to ``batch`` waiting messages to ``handle``; returns how many. ``handle`` never
        raises (the loop guards it).

        A ZMQ_EVENTS read (1.1 us) is cheaper than a receive that raises zmq.Again (2.6 us), so a
        socket whose last drain found fewer than ``BURST`` messages is asked before each receive;
        one that had a burst is received from until zmq.Again (once per drain, not a read per
        message)."""
        bursting = sock in self._bursts
        count = 0
        while count < batch:
            if not bursting and not sock.getsockopt(EVENTS) & POLLIN:
                break
            try:
                parts = receive(sock)
            except zmq.Again:
                break
            count += 1
            handle(parts)
        if count >= BURST:
            self._bursts.add(sock)
        else:
            self._bursts.discard(sock)
        return count

    def readable(self) -> bool:
        """Whether a message waits on the agents' or the clients' socket."""
        return socket_readable(self.agents) or socket_readable(self.clients)

    def decode(self, parts: list[zmq.Frame], decoder: msgspec.msgpack.Decoder, kind: str) -> Any:
        """The message, or None (counted and logged) when framing, version or body is wrong."""
        if len(parts) != 3:
            self._reject(kind, "frame_count")
            return None
        header = parts[1].bytes
        if header != HEADER:
            self._reject(kind, "protocol_version" if header[:3] == HEADER[:3] else "bad_header")
            return None
        try:
            return decoder.decode(parts[2].buffer)
        except (protocol.DecodeError, protocol.ValidationError) as exc:
            self._reject(kind, "malformed_body", str(exc))
            return None

    def _reject(self, kind: str, reason: str, detail: str = "") -> None:
        self.stats[f"rejected_{kind}_{reason}"] += 1
        self.stats["rejected"] += 1
        self.warnings.warning(log, f"dropped {kind} messages", "dropped %s message: %s%s", kind, reason,
                              f" ({detail[:200]})" if detail else "")

    @staticmethod
    def source_fd(parts: list[zmq.Frame]) -> int:
        """The file descriptor of the connection a message came on (-1 if unknown)."""
        try:
            return parts[-1].get(zmq.SRCFD)
        except zmq.ZMQError:
            return -1

    def connection_events(self) -> list[tuple[int, int]]:
        """Agent connections accepted (``zmq.EVENT_ACCEPTED``) and closed (``zmq.EVENT_DISCONNECTED``)
        since the last call, in order, each with its file descriptor."""
        return drain_monitor(self.agent_monitor)

    def client_connection_events(self) -> list[tuple[int, int]]:
        """As ``connection_events``, for client connections."""
        return drain_monitor(self.client_monitor)

    def cut(self, fd: int) -> None:
        """Ends the connection on ``fd`` as if its peer had (see connections.py); the descriptor
        stays libzmq's."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
            self.stats["connections_cut"] += 1
        except OSError:
            pass
        finally:
            sock.detach()

    def peer_key(self, parts: list[zmq.Frame]) -> str | None:
        """The sender's authenticated public key (z85), or None in insecure mode."""
        if self.config.insecure:
            return None
        try:
            return parts[-1].get("User-Id")
        except zmq.ZMQError:
            return None

    # -- out --------------------------------------------------------------------------------

    def to_agent(self, routing_id: bytes, message: Any, on_failure: Callable[[Exception], None] | None = None,
                 fd: int = -1, at_once: bool = False) -> None:
        """``on_failure(error)`` runs if the message cannot be handed to the peer's connection (gone,
        or at its high-water mark); without it, the message is counted and dropped (what it
        carried stays queued in the broker's state and goes again after the agent's next HELLO).
        ``fd``: the connection the message is meant for; if it closed meanwhile, the message is
        not sent to its routing id at all. ``at_once``: the message shows nothing the group
        commit makes true and carries nothing of the instance's (a Pong, "say HELLO later"), so
        it goes even while the store is away (``send_at_once``), without that check."""
        if at_once:
            self._agents_at_once.append((routing_id, message))
        else:
            self._to_agents.append((routing_id, message, on_failure, fd))

    def reply(self, routing_id: bytes, reply: Reply, at_once: bool = False, about: Any = None) -> None:
        """``at_once``: the reply shows nothing the group commit makes true (a read that failed),
        and goes even while the store is away (``send_at_once``). ``about``: what the reply
        answers (a waiter), should it have to be taken back before it is sent (``withdraw``)."""
        entry = (routing_id, protocol.encode(reply))
        self.client_connections.replied(routing_id, len(entry[1]))
        (self._at_once if at_once else self._to_clients).append(entry)
        if about is not None and not at_once:
            self._answers.append((entry, about))

    def withdraw(self, wanted: Callable[[Any], bool]) -> list[Any]:
        """Takes back the queued replies whose ``about`` is ``wanted``; returns those ``about``."""
        gone = [(entry, about) for entry, about in self._answers if wanted(about)]
        if gone:
            ids = {id(entry) for entry, _ in gone}
            self._to_clients = [entry for entry in self._to_clients if id(entry) not in ids]
            self._answers = [(entry, about) for entry, about in self._answers if id(entry) not in ids]
            for (routing_id, data), _ in gone:
                self.client_connections.replied(routing_id, -len(data))
        return [about for _, about in gone]

    @property
    def queued(self) -> bool:
        return bool(self._to_agents or self._to_clients or self._at_once or self._agents_at_once)

    def send_at_once(self) -> None:
        """Sends the messages that wait for no commit, while the rest waits for the store."""
        if self._at_once:
            replies, self._at_once = self._at_once, []
            for routing_id, reply in replies:
                self._send(self.clients, routing_id, reply)
        if self._agents_at_once:
            messages, self._agents_at_once = self._agents_at_once, []
            for routing_id, message in messages:
                self._send(self.agents, routing_id, message)

    def send_queued(self, closed: set[int] = frozenset()) -> None:
        """Sends everything queued: replies first, then agent messages, each in its order (a
        failed agent send may queue a reply: it goes too). Nothing goes to a connection whose
        descriptor is in ``closed``."""
        self.send_at_once()
        while self._to_clients or self._to_agents:
            clients, self._to_clients = self._to_clients, []
            self._answers = []
            for routing_id, reply in clients:
                self._send(self.clients, routing_id, reply)
            agents, self._to_agents = self._to_agents, []
            for routing_id, message, on_failure, fd in agents:
                if fd in closed:
                    error: Exception | None = ConnectionError("the agent's connection closed")
                else:
                    error = self._send(self.agents, routing_id, message)
                if error is not None and on_failure is not None:
                    on_failure(error)

    def _send(self, sock: zmq.Socket, routing_id: bytes, message: Any) -> zmq.ZMQError | None:
        try:
            # small frames by copy: pyzmq's zero-copy path costs 3x per message
            data = message if type(message) is bytes else protocol.encode(message)
            send_routed(sock, routing_id, HEADER, data)
            self.stats["messages_out"] += 1
            return None
        except zmq.ZMQError as exc:
            self.stats["send_failures"] += 1
            log.debug("could not send to %r: %s", routing_id, exc)
            return exc
