"""How many reply bytes each client key has left unread in the broker, and a bound on it.

libzmq queues a peer's messages until its connection takes them, up to a high-water mark
counted in messages, not bytes: a client that asked and never read (a stopped process, or one
that means harm) held every reply in the broker's memory. 3,000 requests for one 200 KiB
document held 600 MB; enough of them end the broker. A client that reads keeps nothing here:
its own libzmq takes every reply off the connection as it comes, whatever its process does.

So the broker counts the bytes of the replies it hands to each client connection, and the kernel
says how many of them the peer has acknowledged (``TCP_INFO``'s ``tcpi_bytes_acked``, Linux 4.1
and later); what is in between waits in the broker or in the kernel for the peer to read it.
While the sum over one key's connections is beyond the bound, that key's requests are refused
(one short error each) instead of answered: nothing more of theirs waits, and everyone else is
served as always. The kernel is asked only when the broker's own count is beyond the bound,
so a client that reads costs two dictionary updates per reply.

A descriptor's number is reused once its connection closed: an entry is tied to the routing id
of the connection it counts (a new connection on the same descriptor has a new one) and to its
peer's address, checked before the kernel's count is believed. Local (ipc://) connections are not
counted: their peers are on the broker's machine.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

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


@dataclass
class _Connection:
    routing_id: bytes
    owner: str  # the key (or, insecure, the connection itself)
    peer: object  # the peer's address; None: not counted (ipc://, or TCP_INFO unavailable)
    base: int = 0  # bytes the peer had acknowledged when counting began (the handshake's)
    handed: int = 0  # reply bytes given to libzmq for this connection since
    acked: int = 0  # of those, what the peer acknowledged when the kernel was last asked


@dataclass
class ReplyBacklog:
    limit: int  # bytes one key may leave unread
    probe: object = tcp_peer_and_acked  # (fd) -> (peer, acked) | None; a test may give its own
    _by_fd: dict[int, _Connection] = field(default_factory=dict)
    _fd_of: dict[bytes, int] = field(default_factory=dict)  # routing id -> descriptor
    _fds_of: dict[str, set[int]] = field(default_factory=dict)  # owner -> descriptors

    def request(self, routing_id: bytes, fd: int, key: str | None) -> int:
        """A request came on ``fd``: 0 if it may be answered, else the bytes its key left unread."""
        if fd < 0:
            return 0
        conn = self._by_fd.get(fd)
        if conn is None or conn.routing_id != routing_id:
            conn = self._open(routing_id, fd, key if key is not None else f"connection {fd}")
        fds = self._fds_of[conn.owner]
        unread = sum(self._by_fd[f].handed - self._by_fd[f].acked for f in fds)
        if unread <= self.limit:
            return 0
        for f in list(fds):  # beyond the bound by the broker's own count: ask the kernel
            self._refresh(f)
        unread = sum(self._by_fd[f].handed - self._by_fd[f].acked for f in self._fds_of.get(conn.owner, ()))
        return unread if unread > self.limit else 0

    def replied(self, routing_id: bytes, size: int) -> None:
        fd = self._fd_of.get(routing_id)
        if fd is not None:
            self._by_fd[fd].handed += size

    def unread(self) -> dict[str, int]:
        """Bytes left unread per key, as last counted (for ping and metrics)."""
        out: dict[str, int] = {}
        for owner, fds in self._fds_of.items():
            n = sum(max(0, self._by_fd[f].handed - self._by_fd[f].acked) for f in fds)
            if n > 0:
                out[owner] = n
        return out

    def _open(self, routing_id: bytes, fd: int, owner: str) -> _Connection:
        self._close(fd)
        seen = self.probe(fd)
        conn = _Connection(routing_id, owner, seen[0] if seen else None, base=seen[1] if seen else 0)
        self._by_fd[fd] = conn
        self._fd_of[routing_id] = fd
        self._fds_of.setdefault(owner, set()).add(fd)
        return conn

    def _close(self, fd: int) -> None:
        conn = self._by_fd.pop(fd, None)
        if conn is None:
            return
        if self._fd_of.get(conn.routing_id) == fd:
            del self._fd_of[conn.routing_id]
        fds = self._fds_of.get(conn.owner)
        if fds is not None:
            fds.discard(fd)
            if not fds:
                del self._fds_of[conn.owner]

    def _refresh(self, fd: int) -> None:
        conn = self._by_fd[fd]
        if conn.peer is None:  # not counted: all it was handed counts as read
            conn.acked = conn.handed
            return
        seen = self.probe(fd)
        if seen is None or seen[0] != conn.peer:  # closed: what it held went with it
            self._close(fd)
            return
        conn.acked = seen[1] - conn.base
