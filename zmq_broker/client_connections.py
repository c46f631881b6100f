"""What client connections may hold: how many per key, and how many reply bytes left unread.

One table of client connections, by file descriptor, serves both bounds:

- **Connections.** A client key is an operator's, yet each connection holds a descriptor and
  libzmq's buffers (about 100 KB) for as long as its peer keeps it open: one key could open
  connections until the broker had no descriptor or memory left. A connection is its key's once
  it sent a request (the key of one that sent nothing is not known: the monitor does not say it).
  So a request on a connection beyond its key's ``limit`` is refused and the connection cut a
  second later (time for the refusal to leave); and past ``limit`` connections that sent nothing,
  the oldest is cut (an idle client's connection after a broker restart is one: its library
  connects again). Cuts follow the rule of ``connections.ConnectionLimits``: only just after the
  client monitor was read.
- **Unread replies.** libzmq queues a peer's messages until its connection takes them, up to a
  high-water mark counted in messages, not bytes: a client that asked and never read (a stopped
  process, or one that means harm) held every reply in the broker's memory. 3,000 requests for one
  200 KiB document held 600 MB; enough of them end the broker. A client that reads keeps nothing
  here: its own libzmq takes every reply off the connection as it comes, whatever its process
  does. So the broker counts the bytes of the replies it hands to each connection, and the kernel
  says how many of them the peer has acknowledged (``TCP_INFO``'s ``tcpi_bytes_acked``, Linux 4.1
  and later); what is in between waits in the broker or in the kernel for the peer to read it.
  While the sum over one key's connections is beyond ``unread_limit``, that key's requests are
  refused (one short error each) instead of answered: nothing more of theirs waits, and everyone
  else is served as always. The kernel is asked only when the broker's own count is beyond the
  bound, so a client that reads costs two dictionary updates per reply. Local (ipc://)
  connections are not counted: their peers are on the broker's machine.

A descriptor's number is reused once its connection closed. The monitor says so, but a request
may be read before the monitor's report of the close before it: an entry is also tied to the
routing id of its connection (a new connection on the same descriptor has a new one), and to its
peer's address, checked before the kernel's count is believed.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

# struct tcp_info (linux/tcp.h): __u64 tcpi_bytes_acked follows 8 one-byte fields, 24 __u32 and
# two __u64 (the pacing rates): offset 120.
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_LENGTH = _BYTES_ACKED_OFFSET + _BYTES_ACKED.size


def tcp_peer_and_acked(fd: int) -> tuple[object, int] | None:
    """``(peer address, bytes the peer acknowledged)`` of the TCP connection on ``fd``, or None
    (not a TCP socket, or closed)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
        if len(info) < _TCP_INFO_LENGTH:  # a kernel older than 4.1
            return None
        return sock.getpeername(), _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0]
    except OSError:
        return None
    finally:
        sock.detach()


@dataclass(slots=True)
class _Connection:
    fd: int
    routing_id: bytes
    owner: str  # the key (or, insecure, the connection itself)
    keyed: bool  # owner is a client key: counted against ``limit``
    peer: object  # the peer's address; None: not counted (ipc://, or TCP_INFO unavailable)
    base: int = 0  # bytes the peer had acknowledged when counting began (the handshake's)
    handed: int = 0  # reply bytes given to libzmq for this connection since
    acked: int = 0  # of those, what the peer acknowledged when the kernel was last asked


class ClientConnections:
    REFUSED_CUT_AFTER = 1.0  # seconds: the refusal goes out before its connection is cut

    def __init__(self, limit: int, unread_limit: int, probe=tcp_peer_and_acked):
        self.limit = max(1, limit)
        self.unread_limit = unread_limit  # bytes one key may leave unread
        self.probe = probe  # (fd) -> (peer, acked) | None; a test may give its own
        self._unspoken: dict[int, None] = {}  # descriptors in the order they were accepted
        self._by_fd: dict[int, _Connection] = {}
        self._by_routing_id: dict[bytes, _Connection] = {}
        self._fds_of: dict[str, set[int]] = {}  # owner -> descriptors
        self._refused: dict[int, float] = {}  # descriptor -> when to cut it
        self.to_cut: list[int] = []

    # -- what the client monitor says --------------------------------------------------------

    def accepted(self, fd: int) -> None:
        if fd in self._by_fd:  # its first request was read before the monitor's report of it
            return
        self._unspoken[fd] = None
        if len(self._unspoken) > self.limit:
            oldest = next(iter(self._unspoken))
            del self._unspoken[oldest]
            self.to_cut.append(oldest)

    def closed(self, fd: int) -> None:
        self._forget(fd)
        self._refused.pop(fd, None)
        if fd in self.to_cut:  # gone already: its number may be another connection's next
            self.to_cut = [f for f in self.to_cut if f != fd]

    # -- requests and replies ----------------------------------------------------------------

    def spoke(self, fd: int, routing_id: bytes, key: str | None, now: float) -> int:
        """A request of ``key`` (None: an insecure broker's client) came on ``fd``: 0 if it may
        be served, else how many connections the key holds (this one is refused, and cut soon)."""
        if fd < 0:
            return 0
        conn = self._by_fd.get(fd)
        if conn is None or conn.routing_id != routing_id:
            conn = self._open(fd, routing_id, key)
        if not conn.keyed:
            return 0
        held = len(self._fds_of[conn.owner])
        if held <= self.limit:
            return 0
        self._refused.setdefault(fd, now + self.REFUSED_CUT_AFTER)
        return held

    def unread_beyond(self, fd: int) -> int:
        """0 if the key of the connection on ``fd`` (which just ``spoke``) may be answered, else
        the reply bytes it left unread."""
        conn = self._by_fd.get(fd)
        if conn is None:
            return 0
        unread = self._unread(conn.owner)
        if unread <= self.unread_limit:
            return 0
        for f in list(self._fds_of[conn.owner]):  # beyond the bound by the broker's own count: ask the kernel
            self._refresh(self._by_fd[f])
        unread = self._unread(conn.owner)
        return unread if unread > self.unread_limit else 0

    def replied(self, routing_id: bytes, size: int) -> None:
        conn = self._by_routing_id.get(routing_id)
        if conn is not None:
            conn.handed += size

    def unread(self) -> dict[str, int]:
        """Bytes left unread per key, as last counted (what a test or a debugger reads: ping counts
        refusals, not bytes)."""
        out = {owner: self._unread(owner) for owner in self._fds_of}
        return {owner: n for owner, n in out.items() if n > 0}

    # -- cuts --------------------------------------------------------------------------------

    def refused_due(self, now: float) -> None:
        """Refused connections whose refusal has had time to leave go to ``to_cut``."""
        due = [fd for fd, at in self._refused.items() if at <= now]
        for fd in due:
            del self._refused[fd]
            self._forget(fd)
            self.to_cut.append(fd)

    def take_cuts(self) -> list[int]:
        """The descriptors to cut now: just after the monitor was read (and ``closed`` told)."""
        cuts, self.to_cut = self.to_cut, []
        return cuts

    # -- the table ---------------------------------------------------------------------------

    def _open(self, fd: int, routing_id: bytes, key: str | None) -> _Connection:
        self._forget(fd)
        seen = self.probe(fd)
        conn = _Connection(fd, routing_id, key if key is not None else f"connection {fd}", key is not None,
                           seen[0] if seen else None, base=seen[1] if seen else 0)
        self._by_fd[fd] = conn
        self._by_routing_id[routing_id] = conn
        self._fds_of.setdefault(conn.owner, set()).add(fd)
        return conn

    def _forget(self, fd: int) -> None:
        self._unspoken.pop(fd, None)
        conn = self._by_fd.pop(fd, None)
        if conn is None:
            return
        if self._by_routing_id.get(conn.routing_id) is conn:
            del self._by_routing_id[conn.routing_id]
        fds = self._fds_of[conn.owner]
        fds.discard(fd)
        if not fds:
            del self._fds_of[conn.owner]

    def _unread(self, owner: str) -> int:
        by_fd = self._by_fd
        return sum(max(0, by_fd[f].handed - by_fd[f].acked) for f in self._fds_of.get(owner, ()))

    def _refresh(self, conn: _Connection) -> None:
        if conn.peer is None:  # not counted: all it was handed counts as read
            conn.acked = conn.handed
            return
        seen = self.probe(conn.fd)
        if seen is None or seen[0] != conn.peer:  # closed: what it held went with it
            self._forget(conn.fd)
            return
        conn.acked = seen[1] - conn.base
