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
Anyone who can open the socket acts with the client key, exactly as with an SSH control socket:
hence the private directory, checked on every use.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from . import protocol
from .client import (HANDSHAKE_FAILURES, Client, ClientConfig, Unauthorized, ZerorunError, handshake_error,
                     secure_broker_socket)
from .zmqutil import recv_monitor_event

DEFAULT_CONTROL_DIR = "~/.ansible/cp"
DEFAULT_PERSIST = 60.0
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the final NUL
STALE_REQUEST_SECONDS = 86400.0  # an unanswered request is forgotten after a day


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


def private_dir(directory: str | os.PathLike) -> Path:
    """The control directory, created 0700; refused when others could reach into it."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise MuxError(f"control directory {path}: {exc.strerror or exc}") from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise MuxError(f"control directory {path} must be owned by uid {os.geteuid()} and "
                       f"private (mode 0700), not mode {st.st_mode & 0o777:04o}")
    return path


def control_path(config: ClientConfig, directory: str | os.PathLike) -> Path:
    """Where the multiplexer for this broker and client key lives (without a suffix)."""
    digest = hashlib.sha256(b"\0".join([config.endpoint.encode(), config.broker_public_key,
                                        config.public_key])).hexdigest()[:20]
    return private_dir(directory) / f"zerorun-{digest}"


def _with(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def running_pid(path: Path) -> int | None:
    """The pid of the multiplexer holding ``path``'s lock, or None when none runs."""
    try:
        fd = os.open(_with(path, ".lock"), os.O_RDONLY | os.O_CLOEXEC)
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


# -- the client side -------------------------------------------------------------------------


class MuxClient(Client):
    """A Client through the local multiplexer; holds the shared ``.users`` lock until closed."""

    def __init__(self, config: ClientConfig, path: Path, lease: int, timeout: float,
                 context: zmq.Context | None = None):
        self._lease = lease
        self.control_path = path
        super().__init__(config, timeout=timeout, context=context, via=f"ipc://{_with(path, '.sock')}")

    def close(self) -> None:
        super().close()
        if self._lease >= 0:
            os.close(self._lease)  # releases the shared lock
            self._lease = -1


def attach(config: ClientConfig, directory: str | os.PathLike = DEFAULT_CONTROL_DIR,
           persist: float = DEFAULT_PERSIST, timeout: float = 10.0,
           context: zmq.Context | None = None, start_timeout: float = 10.0) -> MuxClient:
    """A client through the multiplexer for this broker and key, started if none runs.
    Raises MuxError when it cannot be used."""
    path = control_path(config, directory)
    if len(str(_with(path, ".sock")).encode()) > MAX_SOCKET_PATH:
        raise MuxError(f"control directory {directory} is too long for a unix socket path; choose a shorter one")
    lease = os.open(_with(path, ".users"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lease, fcntl.LOCK_SH)  # waits only while a multiplexer is shutting down
        if running_pid(path) is None or not _with(path, ".sock").exists():
            _start(config, path, persist, start_timeout)
        return MuxClient(config, path, lease, timeout, context)
    except BaseException:
        os.close(lease)
        raise


def _start(config: ClientConfig, path: Path, persist: float, start_timeout: float) -> None:
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    with open(_with(path, ".log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zerorun.mux", "serve", str(path), "--persist", str(persist)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env, close_fds=True,
            start_new_session=True)  # outlives the worker that started it
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(json.dumps(_config_json(config)).encode())
    deadline = time.monotonic() + start_timeout
    while running_pid(path) is None or not _with(path, ".sock").exists():
        code = proc.poll()
        if code is not None and running_pid(path) is None:
            tail = _with(path, ".log").read_text(errors="replace").strip().splitlines()[-1:]
            raise MuxError(f"the multiplexer exited with status {code}" + (f": {tail[0]}" if tail else ""))
        if time.monotonic() > deadline:
            raise MuxError(f"the multiplexer did not start within {start_timeout:g}s")
        time.sleep(0.005)


def _config_json(config: ClientConfig) -> dict[str, Any]:
    return {"endpoint": config.endpoint, "insecure": config.insecure,
            "broker_public_key": config.broker_public_key.decode(),
            "public_key": config.public_key.decode(), "secret_key": config.secret_key.decode()}


def stop_all(directory: str | os.PathLike, timeout: float = 5.0) -> list[int]:
    """Stops every multiplexer in ``directory`` (SIGTERM, by the pid in its lock); their pids."""
    path = Path(directory).expanduser()
    pids = []
    for lock in sorted(path.glob("zerorun-*.lock")) if path.is_dir() else []:
        pid = running_pid(lock.with_suffix(""))
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for lock in sorted(path.glob("zerorun-*.lock")) if path.is_dir() else []:
        while running_pid(lock.with_suffix("")) and time.monotonic() < deadline:
            time.sleep(0.02)
    return pids


# -- the multiplexer -------------------------------------------------------------------------


class Multiplexer:
    def __init__(self, config: ClientConfig, path: Path, persist: float):
        self.config, self.path, self.persist = config, path, persist
        self.pending: dict[int, tuple[bytes, float]] = {}  # rid -> (client routing id, since)
        self._stop = False

    def stop(self, *_: Any) -> None:
        self._stop = True

    def serve(self) -> int:
        lock = os.open(_with(self.path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _take_lock(lock):
            os.close(lock)
            return 0  # another one runs; the clients use that one
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        users = os.open(_with(self.path, ".users"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        back = ctx.socket(zmq.DEALER)
        for sock in (front, back):
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
        secure_broker_socket(back, self.config)
        monitor = back.get_monitor_socket(HANDSHAKE_FAILURES)
        back.connect(self.config.endpoint)
        sock_path = _with(self.path, ".sock")
        old_umask = os.umask(0o077)
        try:
            front.bind(f"ipc://{sock_path}")
        finally:
            os.umask(old_umask)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        poller = zmq.Poller()
        for sock in (front, back, monitor):
            poller.register(sock, zmq.POLLIN)
        last_activity = time.monotonic()
        try:
            while not self._stop:
                events = dict(poller.poll(1000))
                now = time.monotonic()
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
            try:
                sock_path.unlink()
            except OSError:
                pass
            back.disable_monitor()
            for sock in (monitor, front, back):
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
            rid = _rid(body.bytes)
            if rid < 0:
                continue
            owner = self.pending.get(rid)
            if owner is not None and owner[0] != ident:
                self._answer(front, ident, rid, protocol.ErrorInfo("BadRequest", "request id in use"))
                continue
            self.pending[rid] = (ident, now)
            back.send_multipart([protocol.HEADER, body], copy=False)

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


def _read_config(stream: Any) -> ClientConfig:
    data = json.loads(stream.read() or "{}")
    return ClientConfig(data["endpoint"], data["broker_public_key"].encode(), data["public_key"].encode(),
                        data["secret_key"].encode(), insecure=bool(data.get("insecure")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zerorun.mux", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run a multiplexer (its client config comes on stdin, as JSON)")
    serve.add_argument("path", help="control path, without suffix")
    serve.add_argument("--persist", type=float, default=DEFAULT_PERSIST,
                       help="seconds without traffic before it exits (once no client is attached)")
    stop = sub.add_parser("stop", help="stop every multiplexer in a control directory")
    stop.add_argument("--control-path-dir", default=DEFAULT_CONTROL_DIR)
    args = p.parse_args(argv)
    if args.action == "stop":
        pids = stop_all(args.control_path_dir)
        print(f"stopped {len(pids)} multiplexer(s)" + (f": {' '.join(map(str, pids))}" if pids else ""))
        return 0
    try:
        config = _read_config(sys.stdin)
    except (ValueError, KeyError) as exc:
        print(f"zerorun mux: bad client config on stdin: {exc}", file=sys.stderr)
        return 2
    return Multiplexer(config, Path(args.path), args.persist).serve()


if __name__ == "__main__":
    sys.exit(main())
