"""What an agent connection may hold: a file descriptor, for as long as it is some key's latest.

Each connection to the agent port holds a descriptor until its peer closes it. A key the broker
admits (accepted, or pending up to ``--max-pending-keys``) finished the CURVE handshake, which
then no longer times out, and libzmq never closes a connection on its own: one key could open
connections until the broker had no descriptor left, and no agent or operator could connect. So

- a connection must say HELLO within ``hello_within`` seconds of being accepted;
- a key holds one connection: a HELLO on a new one cuts the one its last HELLO came on (an agent
  that reconnected left it behind, half open, or someone else holds it).

libzmq offers no way to close one peer of a ROUTER socket; ``shutdown(2)`` on its descriptor
makes libzmq see the end of the stream and close the connection itself, as if the peer had.
A descriptor is cut only just after the socket monitor was read (``Transport.cut``): libzmq
reports a close before it frees the descriptor, so one not reported closed then is still the
connection it was (a later one would have had to be accepted on a freed descriptor).
"""

from __future__ import annotations


class ConnectionLimits:
    def __init__(self, hello_within: float):
        self.hello_within = hello_within
        self._unspoken: dict[int, float] = {}  # descriptor -> when accepted, until its first HELLO
        self._latest: dict[str, int] = {}  # key -> descriptor of its last HELLO
        self._key_of: dict[int, str] = {}
        self.to_cut: list[int] = []  # cut after the next read of the monitor

    def accepted(self, fd: int, now: float) -> None:
        self._unspoken[fd] = now

    def closed(self, fd: int) -> None:
        self._unspoken.pop(fd, None)
        if fd in self.to_cut:  # gone already: its number may be another connection's next
            self.to_cut = [f for f in self.to_cut if f != fd]
        key = self._key_of.pop(fd, None)
        if key is not None and self._latest.get(key) == fd:
            del self._latest[key]

    def hello(self, key: str, fd: int) -> None:
        """``key`` said HELLO on ``fd``: its connection from now on."""
        self._unspoken.pop(fd, None)
        if fd < 0:
            return
        old = self._latest.get(key)
        if old == fd:
            return
        if old is not None:
            del self._key_of[old]
            self.to_cut.append(old)
        other = self._key_of.get(fd)  # another key's HELLO came on this one before
        if other is not None and self._latest.get(other) == fd:
            del self._latest[other]
        self._latest[key] = fd
        self._key_of[fd] = key

    def overdue(self, now: float) -> None:
        """Connections that said no HELLO in time go to ``to_cut``."""
        deadline = now - self.hello_within
        late = [fd for fd, since in self._unspoken.items() if since < deadline]
        for fd in late:
            del self._unspoken[fd]
        self.to_cut.extend(late)

    def take_cuts(self) -> list[int]:
        """The descriptors to cut now: just after the monitor was read (and ``closed`` told)."""
        cuts, self.to_cut = self.to_cut, []
        return cuts

