"""The other local user in the multiplexer's attacker tests (test_mux_security.py).

Started as root by a test, it imports everything it needs, then becomes the attacker for good
(setgroups, setgid, setuid: a second user as the kernel sees it, not a simulation), and plays
one part. It prints one JSON object per line on stdout and stops on SIGTERM, printing its totals.

    mux_attacker.py UID GID fake-mux DIR NAME [--fd FD]
        a fake multiplexer: holds DIR/NAME.lock (its pid inside) and answers every request on
        DIR/NAME.sock with a forged reply; with --fd it listens on an inherited, bound socket
    mux_attacker.py UID GID flip-symlink LINK TARGET_A TARGET_B
        keeps switching LINK between symlinks to TARGET_A and TARGET_B (atomic rename)
    mux_attacker.py UID GID flip-exchange PATH_A PATH_B
        keeps exchanging two directories (renameat2 RENAME_EXCHANGE)
    mux_attacker.py UID GID connect SOCKET_PATH
        tries to use a multiplexer's socket: a raw connect, then a ZeroMQ Ping
    mux_attacker.py UID GID symlink TARGET LINK | mkdir PATH MODE | write PATH TEXT
        plants something
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time

import zmq

from zerorun import protocol

FORGED = b"forged by the attacker\n"
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_stopping = False


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _stop(*_) -> None:
    global _stopping
    _stopping = True


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() != uid or os.getegid() != gid or os.getuid() != uid:
        raise SystemExit("could not become the attacker")


def fake_mux(directory: str, name: str, *rest: str) -> None:
    """Answers like a multiplexer, with forged results, and says what it was sent."""
    os.umask(0)
    lock = os.open(f"{directory}/{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    if list(rest[:1]) == ["--fd"]:  # a socket file someone else bound: we listen on it
        fd = int(rest[1])
        listener = socket.socket(fileno=fd)
        listener.listen(64)
        listener.detach()
        router.setsockopt(zmq.USE_FD, fd)
    router.bind(f"ipc://{directory}/{name}.sock")
    emit(ready=True, pid=os.getpid(), uid=os.geteuid())
    requests = 0
    while not _stopping:
        if not router.poll(100):
            continue
        parts = router.recv_multipart()
        if len(parts) != 3:
            continue
        try:
            message = protocol.request_decoder.decode(parts[2])
        except (protocol.DecodeError, protocol.ValidationError):
            continue
        requests += 1
        emit(request=type(message).__name__, rid=message.rid, command=getattr(message, "command", None))
        data = {"rc": 0, "stdout": FORGED, "stderr": b""} if isinstance(message, protocol.Exec) else {"forged": True}
        router.send_multipart([parts[0], protocol.HEADER, protocol.encode(protocol.Reply(message.rid, True, data=data))])
    emit(requests=requests)


def flip_symlink(link: str, target_a: str, target_b: str) -> None:
    flips, temp = 0, f"{link}.flip"
    while not _stopping:
        for target in (target_a, target_b):
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            os.symlink(target, temp)
            os.replace(temp, link)
            flips += 1
    emit(flips=flips)


def flip_exchange(path_a: str, path_b: str) -> None:
    flips = 0
    a, b = path_a.encode(), path_b.encode()
    while not _stopping:
        if _libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            emit(error=os.strerror(ctypes.get_errno()))
            return
        flips += 1
    emit(flips=flips)


def connect(path: str, wait: str = "2") -> None:
    """What another user gets from a multiplexer's socket."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.connect(path)
        emit(raw_connect="connected")
    except OSError as exc:
        emit(raw_connect=type(exc).__name__)
    finally:
        raw.close()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    monitor = dealer.get_monitor_socket()
    dealer.connect(f"ipc://{path}")
    dealer.send_multipart(protocol.frames(protocol.Ping(rid=424242)))
    events, reply = [], None
    deadline = time.monotonic() + float(wait)
    while time.monotonic() < deadline:
        if monitor.poll(20):
            event, _ = struct.unpack("=hi", monitor.recv_multipart()[0][:6])
            events.append(zmq.Event(event).name)
        if dealer.poll(0):
            reply = protocol.reply_decoder.decode(dealer.recv_multipart()[-1])
            break
    emit(events=sorted(set(events)), replied=reply is not None, ok=reply.ok if reply else None)


def main(argv: list[str]) -> None:
    uid, gid, action, *args = argv
    signal.signal(signal.SIGTERM, _stop)
    become(int(uid), int(gid))
    if action == "fake-mux":
        fake_mux(*args)
    elif action == "flip-symlink":
        flip_symlink(*args)
    elif action == "flip-exchange":
        flip_exchange(*args)
    elif action == "connect":
        connect(*args)
    elif action == "symlink":
        os.symlink(args[0], args[1])
        emit(done=True)
    elif action == "mkdir":
        os.mkdir(args[0])
        os.chmod(args[0], int(args[1], 8))
        emit(done=True)
    elif action == "write":
        with open(args[0], "w") as handle:
            handle.write(args[1])
        emit(done=True)
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main(sys.argv[1:])
