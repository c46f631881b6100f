"""What the agent reports about its machine: facts, for ``fact:`` targets and the inventory.

Collected from files the kernel and the OS keep current (``/etc/os-release``, ``/proc``) and from
``os.uname``: a few small reads, cheap enough to repeat once a minute from the agent's loop. The
one lookup that may wait on the network, the FQDN (a DNS query), runs in a thread of its own;
its answer is folded in at the next check. Every value is cut to the bounds ``protocol.Facts``
declares, so that an honest agent's HELLO always decodes.

Facts are claims: the broker keeps them apart from the tags it owns, and policy scopes never use
them.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from zerorun import __version__
from zerorun.protocol import Facts, OsFacts

CHECK_EVERY = 60.0  # seconds between checks for changed facts
MAX_TEXT = 256
MAX_IPS = 32
PROC = Path("/proc")
OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
OS_RELEASE_ENV = "ZERORUN_OS_RELEASE"  # another os-release file (as systemd's $SYSTEMD_OS_RELEASE): containers, tests


def _text(value: str) -> str:
    return value.strip()[:MAX_TEXT]


def os_release(paths: tuple[Path, ...] | None = None) -> OsFacts:
    """``ID``, ``VERSION_ID``, ``NAME`` and ``ID_LIKE`` of os-release(5)."""
    if paths is None:
        override = os.environ.get(OS_RELEASE_ENV)
        paths = (Path(override),) if override else OS_RELEASE
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        values: dict[str, str] = {}
        for line in lines:
            key, sep, value = line.partition("=")
            if sep and key.strip().isidentifier():
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                values[key.strip()] = value
        return OsFacts(id=_text(values.get("ID", "")), version=_text(values.get("VERSION_ID", "")),
                       name=_text(values.get("NAME", "")),
                       like=[_text(v) for v in values.get("ID_LIKE", "").split()][:16])
    return OsFacts()


def ip_addresses(proc: Path = PROC) -> list[str]:
    """The machine's own addresses, IPv4 first, without loopback and IPv6 link-local ones."""
    v4: list[str] = []
    try:
        lines = (proc / "net" / "fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    for previous, line in zip(lines, lines[1:]):
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            address = previous.split("|--", 1)[1].strip()
            if not address.startswith("127.") and address not in v4:
                v4.append(address)
    v6: list[str] = []
    try:
        rows = (proc / "net" / "if_inet6").read_text().splitlines()
    except OSError:
        rows = []
    for row in rows:
        fields = row.split()
        if len(fields) < 6 or fields[5] == "lo":
            continue
        try:
            address = ipaddress.IPv6Address(int(fields[0], 16))
        except ValueError:
            continue
        if not (address.is_link_local or address.is_loopback) and str(address) not in v6:
            v6.append(str(address))
    return (v4 + v6)[:MAX_IPS]


def memory_mb(proc: Path = PROC) -> int:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def boot_time(proc: Path = PROC) -> float:
    try:
        for line in (proc / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def collect(fqdn: str = "") -> Facts:
    """The facts of this machine now (``fqdn``: the last one resolved, "" while unknown)."""
    uname = os.uname()
    hostname = socket.gethostname()
    return Facts(os=os_release(), kernel=_text(uname.release), arch=_text(uname.machine), hostname=_text(hostname),
                 fqdn=_text(fqdn or (hostname if "." in hostname else "")), ip=ip_addresses(), cpus=cpu_count(),
                 memory_mb=memory_mb(), boot_time=boot_time(), agent_version=_text(__version__),
                 python_version=_text(platform.python_version()))


class FactsWatcher:
    """Tells the agent when its facts changed, checked at most every ``every`` seconds
    (``due``/``check`` from the loop). The FQDN is resolved in a thread; ``on_resolved`` wakes the
    loop so that it checks again at once."""

    def __init__(self, every: float = CHECK_EVERY, on_resolved: Callable[[], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.every = every
        self.on_resolved = on_resolved
        self._mono = monotonic
        self._fqdn = ""
        self._resolving_for = ""  # the host name whose FQDN a thread is looking up
        self.current = collect()
        self._next = monotonic() + every
        self._resolve(self.current.hostname)

    def _resolve(self, hostname: str) -> None:
        if not hostname or hostname == self._resolving_for:
            return
        self._resolving_for = hostname

        def lookup() -> None:
            try:
                name = socket.getfqdn(hostname)
            except OSError:
                name = ""
            if self._resolving_for == hostname:
                self._fqdn = name if name and name != "localhost" else hostname
                if self.on_resolved is not None:
                    self.on_resolved()

        threading.Thread(target=lookup, name="fqdn", daemon=True).start()

    def due(self) -> bool:
        return self._mono() >= self._next

    def check(self) -> Facts | None:
        """The facts when they changed since the last check (None otherwise)."""
        self._next = self._mono() + self.every
        fresh = collect(self._fqdn)
        if fresh.hostname != self.current.hostname:
            self._resolve(fresh.hostname)
            fresh.fqdn = fresh.hostname if "." in fresh.hostname else ""
        if abs(fresh.boot_time - self.current.boot_time) < 5:  # btime moves by a second with clock adjustments
            fresh.boot_time = self.current.boot_time
        if fresh == self.current:
            return None
        self.current = fresh
        return fresh
