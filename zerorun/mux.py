"""One CURVE connection to the broker, shared by many short-lived local clients.

Ansible runs every task in a freshly forked worker, so a connection plugin that dialled the
broker itself would pay a TCP connect, a CURVE handshake and a ZAP round per task, and the
broker would see a connection storm of forks x tasks. Like SSH's ControlPersist, the first
worker starts this multiplexer in the background; it holds the one broker connection, and every
later worker talks to it over a unix socket in a private (0700) directory. It exits after
``persist`` seconds without traffic once no worker is attached.

Files, all beside each other in the control directory, named after a digest of the broker
endpoint and both public keys (so a different broker or client key gets its own multiplexer):

- ``<name>.sock``  the ipc socket (created under umask 077);
- ``<name>.lock``  held exclusively by the living multiplexer (its pid inside): liveness;
- ``<name>.users`` held shared by every attached client: the multiplexer leaves only when it
  can take it exclusively, so it never exits under a client that just connected;
- ``<name>.log``   the multiplexer's stderr.

Requests pass through unchanged: the multiplexer reads only their ``rid`` to route the answer
back, which is why clients behind it start their request ids at a random 62-bit offset.

Anyone who can open the socket acts with the client key, exactly as with an SSH control socket,
and anyone who can put a socket where a client looks reads its commands and forges the answers.
So (see SECURITY.md, "The multiplexer's control directory"):

- the control directory is opened once, never through a symbolic link, and checked on that
  descriptor (``fstat``: ours, no group or other bits); every file in it is then reached
  through the descriptor (``openat`` with ``O_NOFOLLOW``, ``O_EXCL`` when new; the sockets
  through ``/proc/self/fd/N/``), so a path switched after the check redirects nothing;
- files found there must be ours (regular files with one link, sockets bound by us);
- the multiplexer's socket admits only our uid (libzmq's ``ZMQ_IPC_FILTER_UID``, which reads
  ``SO_PEERCRED`` at accept, and again each request's ``Peer-Address`` credentials);
- a client reads ``SO_PEERCRED`` of its one connection before it sends anything, and never
  reconnects unchecked.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import zmq

from . import protocol
from .client import (HANDSHAKE_FAILURES, Client, ClientConfig, Unauthorized, ZerorunError, handshake_error,
                     secure_broker_socket)
from .zmqutil import close_monitor, monitor_socket, recv_monitor_event

DEFAULT_CONTROL_DIR = "~/.ansible/cp"
ENV_CONTROL_DIR = "ZERORUN_CONTROL_PATH_DIR"  # the connection plugin's control_path_dir, from the environment
DEFAULT_PERSIST = 60.0
CONNECT_ATTEMPTS = 5  # a connection refused before it was made (backlog full) is tried again
STALE_REQUEST_SECONDS = 86400.0  # an unanswered request is forgotten after a day
FD_DIR = "/proc/self/fd"  # where a descriptor can be named in a path (the sockets need a path)
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # O_NONBLOCK: a FIFO would not hang an open
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class MuxError(ZerorunError):
    """The multiplexer cannot be used (callers may fall back to a direct connection)."""


class _Rid(msgspec.Struct):
    rid: int = -1


_rid_decoder = msgspec.msgpack.Decoder(_Rid)


def _rid(body: bytes) -> int:
    try:
        return _rid_decoder.decode(body).rid
    except (msgspec.DecodeError, msgspec.ValidationError):
        return -1


# -- the control directory -------------------------------------------------------------------


class ControlDir:
    """The control directory, held open: every file in it is reached through this descriptor,
    so whoever controls a parent directory (or a symlink on the way) cannot swap what we use
    after the check. Make one with ``open_control_dir``."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        _check_dir(path, os.fstat(fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ControlDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self, name: str, flags: int, create: bool = False) -> int:
        """A descriptor for file ``name``: never through a symlink; created exclusively (so
        ours) when new; otherwise refused unless it is our regular file with a single link."""
        for _ in range(5):  # each step below loses only to a concurrent create or remove
            if create:
                try:
                    return os.open(name, flags | _OPEN | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.fd)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise self._refusal(name, exc) from None
            try:
                fd = os.open(name, flags | _OPEN, dir_fd=self.fd)
            except FileNotFoundError:
                if create:
                    continue
                raise
            except OSError as exc:
                raise self._refusal(name, exc) from None
            try:
                self._check_file(name, os.fstat(fd), stat.S_ISREG, "regular file")
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise MuxError(f"{self.path / name} keeps appearing and disappearing; refused")

    def has_socket(self, name: str) -> bool:
        """Whether our socket ``name`` is there; MuxError when something else is."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        self._check_file(name, st, stat.S_ISSOCK, "socket")
        return True

    def endpoint(self, name: str) -> str:
        """An ipc:// endpoint for socket ``name`` that reaches it through our descriptor."""
        return f"ipc://{fd_path(self.fd)}/{name}"

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def read_tail(self, name: str, size: int = 4096) -> str:
        try:
            fd = self.open(name, os.O_RDONLY)
        except (OSError, MuxError):
            return ""
        try:
            end = os.fstat(fd).st_size
            return os.pread(fd, size, max(0, end - size)).decode(errors="replace")
        finally:
            os.close(fd)

    def _check_file(self, name: str, st: os.stat_result, is_kind: Any, kind: str) -> None:
        where = self.path / name
        if not is_kind(st.st_mode):
            raise MuxError(f"{where} is not a {kind}: refused (remove it)")
        if st.st_uid != os.geteuid():
            raise MuxError(f"{where} belongs to uid {st.st_uid}, not to uid {os.geteuid()}: refused "
                           "(someone else put it there; remove it)")
        if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
            raise MuxError(f"{where} has {st.st_nlink} hard links: refused (remove it)")

    def _refusal(self, name: str, exc: OSError) -> MuxError:
        if exc.errno == errno.ELOOP:
            return MuxError(f"{self.path / name} is a symbolic link: refused (remove it)")
        return MuxError(f"{self.path / name}: {exc.strerror or exc}")


def fd_path(fd: int) -> str:
    """A path naming what descriptor ``fd`` is open on (Linux's /proc/self/fd); MuxError without it."""
    if not os.path.isdir(FD_DIR):
        raise MuxError(f"the multiplexer needs {FD_DIR} (Linux with /proc mounted) to reach its socket "
                       "through a checked directory")
    return f"{FD_DIR}/{fd}"


def _check_dir(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise MuxError(f"control directory {path} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise MuxError(f"control directory {path} must be owned by uid {os.geteuid()} and "
                       f"private (mode 0700), not uid {st.st_uid} with mode {st.st_mode & 0o777:04o}")


def open_control_dir(directory: str | os.PathLike, create: bool = True) -> ControlDir:
    """The control directory (created 0700 when ``create``), opened without following a symlink
    and checked on the descriptor; MuxError when it is not ours and private, FileNotFoundError
    when it is missing and not to be created."""
    path = Path(directory).expanduser()
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise MuxError(f"control directory {path}: {exc.strerror or exc}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
    except FileNotFoundError:
        if create:
            raise MuxError(f"control directory {path}: No such file or directory") from None
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise MuxError(f"control directory {path} is a symbolic link: refused (name the directory "
                           "itself; a link can be switched between a check and a use)") from None
        raise MuxError(f"control directory {path}: {exc.strerror or exc}") from None
    try:
        return ControlDir(fd, path)
    except BaseException:
        os.close(fd)
        raise


def control_name(config: ClientConfig) -> str:
    """The file name stem of the multiplexer for this broker and client key."""
    digest = hashlib.sha256(b"\0".join([config.endpoint.encode(), config.broker_public_key,
                                        config.public_key])).hexdigest()[:20]
    return f"zerorun-{digest}"


def control_path(config: ClientConfig, directory: str | os.PathLike) -> Path:
    """Where the multiplexer for this broker and client key lives (without a suffix); for
    messages only: files are opened through ``open_control_dir``."""
    return Path(directory).expanduser() / control_name(config)


def _running_pid(cdir: ControlDir, name: str) -> int | None:
    try:
        fd = cdir.open(f"{name}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.pread(fd, 32, 0).split(b"\n")[0]
            return int(data) if data.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_pid(path: str | os.PathLike) -> int | None:
    """The pid of the multiplexer holding ``path``'s lock, or None when none runs."""
    path = Path(path).expanduser()
    try:
        cdir = open_control_dir(path.parent, create=False)
    except FileNotFoundError:
        return None
    with cdir:
        return _running_pid(cdir, path.name)


def peer_credentials(fd: int) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of unix socket ``fd`` (SO_PEERCRED: for
    a connecting side, who called listen())."""
    copy = os.dup(fd)
    try:
        sock = socket.socket(fileno=copy)
    except BaseException:
        os.close(copy)
        raise
    with sock:
        return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def _peer_uid(frame: zmq.Frame) -> int | None:
    """The uid libzmq read with SO_PEERCRED when it accepted the connection a frame came on (its
    ``Peer-Address`` is ``<address>:<uid>:<gid>:<pid>`` for ipc); None when it does not say."""
    try:
        fields = frame.get("Peer-Address").rsplit(":", 3)
    except (zmq.ZMQError, AttributeError):
        return None
    return int(fields[1]) if len(fields) == 4 and fields[1].isdigit() else None


# -- the client side -------------------------------------------------------------------------


class MuxClient(Client):
    """A Client through the local multiplexer; holds the shared ``.users`` lock until closed.

    Its one connection is checked before anything is sent: the process listening on the socket
    must run as our uid. It never reconnects (a reconnection would be unchecked)."""

    def __init__(self, config: ClientConfig, cdir: ControlDir, name: str, lease: int, timeout: float,
                 context: zmq.Context | None = None, connect_timeout: float = 10.0):
        self._lease, self._cdir = lease, cdir
        self.control_path = cdir.path / name
        # Client connects to ``via`` at once, with reconnection on: give it a path that cannot
        # exist (below a regular file: ENOTDIR), and make the real, checked connection here. (A
        # pending inproc endpoint would do too, but libzmq never frees a socket that had one.)
        placeholder = f"ipc://{fd_path(lease)}/unconnected"
        super().__init__(config, timeout=timeout, context=context, via=placeholder)
        try:
            self._socket.disconnect(placeholder)
            self._connect_checked(cdir.endpoint(f"{name}.sock"), connect_timeout)
        except BaseException:
            Client.close(self)  # the lease and the directory stay the caller's
            raise

    def _connect_checked(self, endpoint: str, connect_timeout: float) -> None:
        """Connects once, without reconnection, and checks who listens before anything is sent."""
        self._socket.setsockopt(zmq.RECONNECT_IVL, -1)
        monitor = monitor_socket(self._socket, zmq.EVENT_CONNECTED | zmq.EVENT_CLOSED)
        try:
            self._socket.connect(endpoint)
            deadline = time.monotonic() + connect_timeout
            refused = 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not monitor.poll(max(1, int(remaining * 1000))):
                    raise MuxError(f"no connection to the multiplexer at {self.control_path}.sock "
                                   f"within {connect_timeout:g}s")
                frames = monitor.recv_multipart()
                event, value = struct.unpack("=hi", frames[0][:6])
                if frames[1].decode(errors="replace") != endpoint:
                    continue  # the placeholder's failed attempt, reported late
                if event == zmq.EVENT_CLOSED:
                    # before any connection was made: the listener's backlog was full (a busy
                    # multiplexer); try again a few times, each attempt checked the same way
                    refused += 1
                    if refused > CONNECT_ATTEMPTS:
                        raise MuxError(f"the multiplexer at {self.control_path}.sock closed the connection")
                    self._socket.disconnect(endpoint)
                    time.sleep(0.01 * refused)
                    self._socket.connect(endpoint)
                    continue
                if event == zmq.EVENT_CONNECTED:
                    try:
                        pid, uid, _ = peer_credentials(value)
                    except OSError as exc:
                        raise MuxError(f"cannot tell who listens on {self.control_path}.sock: {exc}") from None
                    if uid != os.geteuid():
                        raise MuxError(f"the process listening on {self.control_path}.sock (pid {pid}) runs "
                                       f"as uid {uid}, not uid {os.geteuid()}: refused, nothing sent")
                    return
        finally:
            close_monitor(self._socket, monitor)

    def close(self) -> None:
        super().close()
        if self._lease >= 0:
            os.close(self._lease)  # releases the shared lock
            self._lease = -1
        self._cdir.close()


def attach(config: ClientConfig, directory: str | os.PathLike = DEFAULT_CONTROL_DIR,
           persist: float = DEFAULT_PERSIST, timeout: float = 10.0,
           context: zmq.Context | None = None, start_timeout: float = 10.0) -> MuxClient:
    """A client through the multiplexer for this broker and key, started if none runs.
    Raises MuxError when it cannot be used."""
    cdir = open_control_dir(directory)
    name = control_name(config)
    lease = -1
    try:
        lease = cdir.open(f"{name}.users", os.O_RDWR, create=True)
        fcntl.flock(lease, fcntl.LOCK_SH)  # waits only while a multiplexer is shutting down
        if not _ready(cdir, name):
            _start(config, cdir, name, persist, start_timeout)
        return MuxClient(config, cdir, name, lease, timeout, context, connect_timeout=start_timeout)
    except BaseException:
        if lease >= 0:
            os.close(lease)
        cdir.close()
        raise


def _start(config: ClientConfig, cdir: ControlDir, name: str, persist: float, start_timeout: float) -> None:
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    log = cdir.open(f"{name}.log", os.O_WRONLY | os.O_APPEND, create=True)
    # The directory goes to the multiplexer as the very descriptor checked here, not as a path
    # to look up again; as a copy numbered 3 or more, clear of the stdio it gets (a worker whose
    # stdin was closed has its directory at 0). cwd "/": `python -m` puts the working directory
    # first on sys.path, and the worker's may be writable by others.
    dir_fd = fcntl.fcntl(cdir.fd, fcntl.F_DUPFD_CLOEXEC, 3)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zerorun.mux", "serve", str(cdir.path / name), "--dir-fd", str(dir_fd),
             "--persist", str(persist)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd="/",
            close_fds=True, pass_fds=(dir_fd,), start_new_session=True)  # outlives the worker that started it
    finally:
        os.close(dir_fd)
        os.close(log)
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(json.dumps(_config_json(config)).encode())
    deadline = time.monotonic() + start_timeout
    while not _ready(cdir, name):
        code = proc.poll()
        if code is not None and _running_pid(cdir, name) is None:
            tail = cdir.read_tail(f"{name}.log").strip().splitlines()[-1:]
            raise MuxError(f"the multiplexer exited with status {code}" + (f": {tail[0]}" if tail else ""))
        if time.monotonic() > deadline:
            raise MuxError(f"the multiplexer did not start within {start_timeout:g}s")
        time.sleep(0.005)


def _ready(cdir: ControlDir, name: str) -> bool:
    """Whether a multiplexer listens there: its socket (checked first: someone else's is refused,
    not replaced) and its lock, held with its pid inside (written once it listens)."""
    socket_there = cdir.has_socket(f"{name}.sock")
    return socket_there and bool(_running_pid(cdir, name))


def _config_json(config: ClientConfig) -> dict[str, Any]:
    return {"endpoint": config.endpoint, "insecure": config.insecure,
            "broker_public_key": config.broker_public_key.decode(),
            "public_key": config.public_key.decode(), "secret_key": config.secret_key.decode()}


def stop_all(directory: str | os.PathLike, timeout: float = 5.0) -> list[int]:
    """Stops every multiplexer in ``directory`` (SIGTERM, by the pid in its lock); their pids."""
    try:
        cdir = open_control_dir(directory, create=False)
    except FileNotFoundError:
        return []
    with cdir:
        names = sorted(n[:-len(".lock")] for n in cdir.names() if n.startswith("zerorun-") and n.endswith(".lock"))
        pids, stopping = [], []
        for name in names:
            pid = _running_pid(cdir, name)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                    stopping.append(name)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for name in stopping:  # until its lock is free: an exiting one clears its pid (0) just before
            while _running_pid(cdir, name) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
    return pids


# -- the multiplexer -------------------------------------------------------------------------


class Multiplexer:
    def __init__(self, config: ClientConfig, cdir: ControlDir, name: str, persist: float):
        self.config, self.cdir, self.name, self.persist = config, cdir, name, persist
        self.pending: dict[int, tuple[bytes, float]] = {}  # rid -> (client routing id, since)
        self.uid = os.geteuid()
        self.filtered = False  # libzmq refuses other uids at accept (ZMQ_IPC_FILTER_UID)
        self.refused = 0  # requests dropped because they came from another uid (or an unknown one)
        self._refused_peers: set[str] = set()
        self._stop = False
        self.backlog: deque[tuple[zmq.Frame, float]] = deque()  # requests no broker connection could take yet

    def stop(self, *_: Any) -> None:
        self._stop = True

    def serve(self) -> int:
        lock = self.cdir.open(f"{self.name}.lock", os.O_RDWR, create=True)
        if not _take_lock(lock):
            os.close(lock)
            return 0  # another one runs; the clients use that one
        os.ftruncate(lock, 0)  # a pid left by one that was killed is no longer true
        users = self.cdir.open(f"{self.name}.users", os.O_RDWR, create=True)
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        back = ctx.socket(zmq.DEALER)
        for sock in (front, back):
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
        self.filtered = admit_only_uid(front, self.uid)
        if not self.filtered:
            print("zerorun mux: this libzmq has no ZMQ_IPC_FILTER_UID; other users' connections are "
                  "refused per request instead", file=sys.stderr, flush=True)
        secure_broker_socket(back, self.config)
        if len(self.config.endpoints) > 1:
            # A cluster: hand requests only to brokers connected now. Without this, a DEALER
            # queues for every broker it was told of, the dead ones too, and each request given
            # to a dead broker's queue (the first of them, as the first broker listed was dead)
            # waited there until the client gave up: "no answer ... within 10s".
            back.setsockopt(zmq.IMMEDIATE, 1)
        monitor = monitor_socket(back, HANDSHAKE_FAILURES)
        sock_name = f"{self.name}.sock"
        old_umask = os.umask(0o077)
        try:
            front.bind(self.cdir.endpoint(sock_name))  # libzmq first removes a stale socket there
        finally:
            os.umask(old_umask)
        # The pid only now: clients take it to mean "listening" (a socket file exists between
        # bind() and listen(), and a client connects once, without retrying).
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        for endpoint in self.config.endpoints:  # a cluster: requests spread over its live brokers
            back.connect(endpoint)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        poller = zmq.Poller()
        for sock in (front, back, monitor):
            poller.register(sock, zmq.POLLIN)
        last_activity = time.monotonic()
        try:
            self.cdir.has_socket(sock_name)  # what we bound is our socket (MuxError otherwise)
            while not self._stop:
                events = dict(poller.poll(50 if self.backlog else 1000))
                now = time.monotonic()
                if self.backlog:
                    self._send_backlog(back, now)
                if monitor in events:
                    error = handshake_error(recv_monitor_event(monitor), self.config)
                    print(f"zerorun mux: {error}", file=sys.stderr, flush=True)
                    self._fail_all(front, error)
                    return 1  # the next client starts a fresh one and sees the same error
                if front in events:
                    last_activity = now
                    self._forward_requests(front, back, now)
                if back in events:
                    last_activity = now
                    self._forward_replies(back, front)
                if now - last_activity > self.persist:
                    try:
                        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        last_activity = now  # a client is attached: look again later
                    else:
                        break  # nobody attached, and none can attach until we are gone
                if len(self.pending) > 10_000:
                    self._forget_stale(now)
            return 0
        finally:
            self.cdir.unlink(sock_name)
            close_monitor(back, monitor)
            for sock in (front, back):
                sock.close(0)
            ctx.term()
            os.ftruncate(lock, 0)  # no pid: a starting multiplexer waiting for the lock may take it
            os.close(lock)  # from here on a new multiplexer may start
            os.close(users)

    def _forward_requests(self, front: zmq.Socket, back: zmq.Socket, now: float) -> None:
        for _ in range(1000):
            try:
                parts = front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) != 3 or parts[1].bytes != protocol.HEADER:
                continue
            ident, body = parts[0].bytes, parts[2]
            if not self._admitted(body):
                continue
            rid = _rid(body.bytes)
            if rid < 0:
                continue
            owner = self.pending.get(rid)
            if owner is not None and owner[0] != ident:
                self._answer(front, ident, rid, protocol.ErrorInfo("BadRequest", "request id in use"))
                continue
            self.pending[rid] = (ident, now)
            self._send(back, body, now)

    def _send(self, back: zmq.Socket, body: zmq.Frame, now: float) -> None:
        """To a connected broker, or into the backlog until one is (a cluster's brokers all
        unreachable now, or the multiplexer just started: the handshakes are not done)."""
        if not self.backlog:
            try:
                back.send_multipart([protocol.HEADER, body], zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
        self.backlog.append((body, now))

    def _send_backlog(self, back: zmq.Socket, now: float) -> None:
        while self.backlog:
            body, since = self.backlog[0]
            if now - since < STALE_REQUEST_SECONDS:  # (else dropped: its client gave up long ago)
                try:
                    back.send_multipart([protocol.HEADER, body], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
            self.backlog.popleft()

    def _admitted(self, frame: zmq.Frame) -> bool:
        """Whether a request came from our uid: the second check behind the accept filter (and
        the only one where libzmq lacks the filter)."""
        uid = _peer_uid(frame)
        if uid == self.uid or (uid is None and self.filtered):
            return True
        self.refused += 1
        peer = _peer_address(frame)
        if peer not in self._refused_peers and len(self._refused_peers) < 1000:
            self._refused_peers.add(peer)  # one line per connection
            print(f"zerorun mux: refused a request from {peer or 'an unidentified peer'} "
                  f"(uid:gid:pid; only uid {self.uid} may use this multiplexer)", file=sys.stderr, flush=True)
        return False

    def _forward_replies(self, back: zmq.Socket, front: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                parts = back.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) != 2:
                continue
            owner = self.pending.pop(_rid(parts[1].bytes), None)
            if owner is not None:
                try:
                    front.send_multipart([owner[0], *parts], zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:
                    pass  # that client is gone

    def _answer(self, front: zmq.Socket, ident: bytes, rid: int, error: protocol.ErrorInfo) -> None:
        reply = protocol.Reply(rid, False, error=error)
        try:
            front.send_multipart([ident, protocol.HEADER, protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _fail_all(self, front: zmq.Socket, error: ZerorunError) -> None:
        code = "Unauthorized" if isinstance(error, Unauthorized) else "BrokerUnavailable"
        for rid, (ident, _) in self.pending.items():
            self._answer(front, ident, rid, protocol.ErrorInfo(code, str(error)))
        self.pending.clear()

    def _forget_stale(self, now: float) -> None:
        self.pending = {rid: v for rid, v in self.pending.items() if now - v[1] < STALE_REQUEST_SECONDS}


def _take_lock(lock: int) -> bool:
    """Whether we became the multiplexer (the lock taken exclusively). Clients checking liveness
    hold it shared for an instant, so this retries for up to a second; but it gives up at once
    when a multiplexer holds it (its pid is written and alive), so that a loser of the race to start never
    takes over later, unseen by ``stop_all``, from a winner that was just stopped."""
    for _ in range(50):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pid = os.pread(lock, 32, 0).split(b"\n")[0]
            if pid.isdigit() and _alive(int(pid)):
                return False
            time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def admit_only_uid(sock: zmq.Socket, uid: int) -> bool:
    """Has libzmq close every ipc connection from another uid at accept, before any ZMTP
    (ZMQ_IPC_FILTER_UID, read with SO_PEERCRED). False where this libzmq lacks the option."""
    option = getattr(zmq, "IPC_FILTER_UID", None)
    if option is None:
        return False
    try:
        sock.setsockopt(option, uid)
    except zmq.ZMQError:
        return False
    return True


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return ""


def _read_config(stream: Any) -> ClientConfig:
    data = json.loads(stream.read() or "{}")
    return ClientConfig(data["endpoint"], data["broker_public_key"].encode(), data["public_key"].encode(),
                        data["secret_key"].encode(), insecure=bool(data.get("insecure")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zerorun.mux", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run a multiplexer (its client config comes on stdin, as JSON)")
    serve.add_argument("path", help="control path, without suffix")
    serve.add_argument("--dir-fd", type=int, default=-1,
                       help="an inherited descriptor of the control directory (instead of opening it by path)")
    serve.add_argument("--persist", type=float, default=DEFAULT_PERSIST,
                       help="seconds without traffic before it exits (once no client is attached)")
    stop = sub.add_parser("stop", help="stop every multiplexer in a control directory")
    stop.add_argument("--control-path-dir", default=os.environ.get(ENV_CONTROL_DIR) or DEFAULT_CONTROL_DIR,
                      help=f"default: ${ENV_CONTROL_DIR} (as the connection plugin), else {DEFAULT_CONTROL_DIR}")
    args = p.parse_args(argv)
    try:
        if args.action == "stop":
            pids = stop_all(args.control_path_dir)
            print(f"stopped {len(pids)} multiplexer(s)" + (f": {' '.join(map(str, pids))}" if pids else ""))
            return 0
        try:
            config = _read_config(sys.stdin)
        except (ValueError, KeyError) as exc:
            print(f"zerorun mux: bad client config on stdin: {exc}", file=sys.stderr)
            return 2
        path = Path(args.path).expanduser()
        cdir = ControlDir(args.dir_fd, path.parent) if args.dir_fd >= 0 else open_control_dir(path.parent, create=False)
        with cdir:
            return Multiplexer(config, cdir, path.name, args.persist).serve()
    except (MuxError, OSError) as exc:
        print(f"zerorun mux: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
