"""What a handler may use: the narrow face of the broker that request and agent-message
handlers get, instead of the broker itself.

Handlers read and change state through the parts named here and send only through ``reply`` /
``fail`` / ``to_agent`` (queued by the transport, sent after the loop's group commit).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from zerorun import keys as keyfiles
from zerorun import protocol
from zerorun.protocol import ONLINE, Reply

from .audit import AuditLog
from .client_connections import ClientConnections
from .cluster import Cluster
from .commands import CommandBook
from .config import BrokerConfig
from .docstore import DocumentStore
from .errors import BrokerError
from .fleet import FleetIndex
from .identity import KeyRegistry
from .interactive import InteractiveRelay
from .metrics import BrokerMetrics
from .output import LiveOutput
from .outputs import WholeOutputs
from .policy import PolicyFile, Role
from .rendering import Renderer
from .sessions import SessionTable
from .store import Store
from .connections import ConnectionLimits
from .store.base import STORE_UNAVAILABLE
from .transport import Transport
from .tunnels import TunnelTable
from .waiters import Waiters

log = logging.getLogger("zerorun.broker")


DEFERRED = object()
"""What a request handler returns when the answer comes later (a wait, an exec relayed to an agent)."""


@dataclass
class Peer:
    """Who sent a request: the connection to answer and its authenticated key (None: insecure)."""

    routing_id: bytes
    key: str | None
    name: str = "insecure"  # the client's name, once authorised
    role: Role | None = None  # its role, once authorised (None: insecure mode, no policy)


@dataclass
class BrokerContext:
    config: BrokerConfig
    stats: Counter[str]
    transport: Transport
    store: Store
    keys: KeyRegistry
    fleet: FleetIndex
    sessions: SessionTable
    book: CommandBook
    waiters: Waiters
    documents: DocumentStore
    policy: PolicyFile
    audit: AuditLog
    live: LiveOutput
    relay: InteractiveRelay
    renderer: Renderer
    metrics: BrokerMetrics | None = None
    cluster: Cluster | None = None  # several brokers on one PostgreSQL store
    outputs: WholeOutputs | None = None  # the output store: whole outputs beyond the view's cap
    webhooks: Any = None  # webhooks.WebhookQueue: completion notifications
    tunnels: TunnelTable = field(default_factory=TunnelTable)  # sessions relayed to agents
    connections: ConnectionLimits = field(default_factory=lambda: ConnectionLimits(30.0))  # what agent ones may hold

    @property
    def client_connections(self) -> ClientConnections:
        """What client connections may hold (the transport counts their replies)."""
        return self.transport.client_connections

    # -- sending ----------------------------------------------------------------------------

    def reply(self, routing_id: bytes, rid: int, data: Any, about: Any = None, at_once: bool = False) -> None:
        """``about``: what the reply answers, should it be taken back (``Transport.withdraw``);
        ``at_once``: sent now, not after the next commit (it promises nothing a commit makes true)."""
        self.transport.reply(routing_id, Reply(rid, True, data=data), at_once, about)

    def fail(self, routing_id: bytes, rid: int, code: str, message: str, at_once: bool = False,
             about: Any = None) -> None:
        self.transport.reply(routing_id, Reply(rid, False, error=protocol.ErrorInfo(code, message)), at_once, about)

    def respond(self, routing_id: bytes, rid: int, work: Callable[[], Any], what: str = "request",
                read_only: bool = False) -> None:
        """Runs ``work`` and answers the request with what it returns (nothing for DEFERRED): the
        one place where an error becomes a reply, for handlers and for work finished later. A
        ``read_only`` request (``protocol.SAFE_TO_REPEAT``) that could not read the store is
        answered at once, not after the next commit: a broker cut off from its store commits
        nothing until it is back, and a client of several brokers asks another meanwhile."""
        try:
            data = work()
        except BrokerError as exc:
            self.fail(routing_id, rid, exc.code, exc.message,
                      at_once=exc.before_any_change or (read_only and exc.code == STORE_UNAVAILABLE))
            return
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("internal error handling %s", what)
            self.fail(routing_id, rid, "InternalError", "the broker failed to handle this request; see its log")
            return
        if data is not DEFERRED:
            self.reply(routing_id, rid, data)

    def to_agent(self, routing_id: bytes, message: Any, on_failure: Callable[[Exception], None] | None = None,
                 fd: int = -1, at_once: bool = False) -> None:
        """Queues a message for an agent connection (``fd``: the connection it is meant for;
        ``at_once``: see ``Transport.to_agent``)."""
        self.transport.to_agent(routing_id, message, on_failure, fd, at_once)

    # -- naming -----------------------------------------------------------------------------

    def requester(self, key: str | None) -> str:
        """How audit lines and views name a client: its name and key fingerprint."""
        if key is None:
            return "insecure"
        return f"{self.keys.client_name(key)} ({keyfiles.fingerprint(key)})"

    def ping_status(self, instance_id: str) -> str:
        status = self.sessions.ping_status(instance_id, instance_id in self.fleet)
        if status != ONLINE and self.cluster is not None and self.cluster.holder(instance_id) is not None:
            return ONLINE
        return status

    def is_online(self, instance_id: str) -> bool:
        """Connected here, or (several brokers) to another live broker."""
        return self.sessions.is_online(instance_id) or (
            self.cluster is not None and self.cluster.holder(instance_id) is not None)

    def broker_of(self, instance_id: str) -> str:
        """Which broker holds the instance's session ("" without a cluster or a session)."""
        if self.cluster is None:
            return ""
        if self.sessions.is_online(instance_id):
            return self.cluster.id
        return self.cluster.holder(instance_id) or ""
