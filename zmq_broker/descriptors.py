"""File descriptors: the broker holds one per connected agent or client, and one per connection
still in its handshake. Without a free one, libzmq can accept nothing: every agent and operator is
refused, and its I/O thread retries the accept at once, spinning a core, until one is freed. A
peer that only opens TCP connections can get there, so

- the soft limit is raised to the hard one at start (what a service manager's ``LimitNOFILE``
  sets both to; a broker started by hand often has a soft limit of 1,024);
- a connection that has not finished its handshake is closed after ``HANDSHAKE_SECONDS``
  (libzmq's default is 30): a flood holds descriptors for a third of the time;
- the loop looks every few seconds whether a descriptor can still be opened (one ``open`` and
  ``close``, not a count of /proc), and says when none or few are left.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

log = logging.getLogger("zerorun.broker")

HANDSHAKE_SECONDS = 10
CHECK_EVERY = 5.0  # seconds between looks
LOW = 0.9  # share of the limit from which it warns
SAY_AGAIN = 60.0  # seconds between lines while it lasts
FEW = 4096  # a limit below this holds only a small fleet: said at start


def raise_limit() -> int:
    """Raises the soft limit of open files to the hard one (or 1,048,576 if unlimited); returns
    the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the limit of open files from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < FEW:
        log.warning("this broker may open %d files: about that many agents and clients can connect at once; "
                    "raise its LimitNOFILE (roles/broker: zerorun_broker_limit_nofile)", soft)
    return soft


class DescriptorWatch:
    def __init__(self, limit: int):
        self.limit = limit
        self._next = 0.0
        self._said = -SAY_AGAIN

    def check(self, now: float) -> bool:
        """Called by the loop's tick; looks at most every CHECK_EVERY seconds. True: none was free."""
        if now < self._next:
            return False
        self._next = now + CHECK_EVERY
        try:
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return False
            self._say(now, logging.ERROR, "out of file descriptors (%s, limit %d): no agent or client can connect "
                      "until some are freed; connections that do not finish their handshake are closed after %d s. "
                      "Raise the broker's LimitNOFILE, or find who holds its connections (ss -tn)",
                      exc.strerror, self.limit, HANDSHAKE_SECONDS)
            return True
        os.close(fd)
        if fd >= self.limit * LOW:  # the lowest free number: about how many are open
            self._say(now, logging.WARNING, "about %d of %d file descriptors in use: raise the broker's LimitNOFILE "
                      "before new connections are refused", fd, self.limit)
        return False

    def _say(self, now: float, level: int, message: str, *args: object) -> None:
        if now - self._said >= SAY_AGAIN:
            self._said = now
            log.log(level, message, *args)
