"""The zygote: a small process that forks supervisors ahead of need.

A supervisor per invocation must not cost a Python start-up (about 17 ms here, 40 ms with the
step flow imported; 5 ms even with ``python -S``), nor a fork on the hot path (about a
millisecond for a Python process on a small VM, more when the machine is busy). The agent starts
this process once (``python -m agent.zygote FD``); it imports the step flow and then forks
*warm* supervisors when the agent asks for them: each is already a session leader, and waits on
a socket of its own for the one invocation it will run. Starting an invocation is then one
message from the agent to a waiting process (the agent asks for the next warm supervisor at the
same time). A supervisor that has run an invocation waits for the next one from the same agent
(no fork at all in steady state); the agent keeps a few idle ones and closes the others' sockets.
The zygote is single-threaded (forking a threaded process is unsafe: the agent has
ZeroMQ's I/O threads), holds nothing but its socket, and exits when the agent's end of it closes
(the agent stopped or re-executed itself); so does every warm supervisor that got no invocation.

The zygote's socket (a UNIX stream socketpair): the agent writes one byte, ``W``, per warm
supervisor it wants; the zygote answers each with a 12-byte record ``[i32 pid][i32 errno][i32
flags]`` carrying (SCM_RIGHTS) the agent's end of the supervisor's socket and, when the kernel
has them (``flags`` 1), a pidfd of the supervisor, opened before the zygote can reap it, so it
never names a recycled pid. A supervisor's socket: the agent writes ``[u32 length][msgpack
Launch]``; the supervisor writes ``D`` once its outcome is on disk (the agent is woken then, not
after the process has been torn down), or, when the run directory could not take the outcome (a
full disk), the outcome itself: ``[b"O"][u32 length][msgpack Outcome]`` (``supervisor.py``), and
then exits (it is not reused). The agent reads that as it comes, without blocking its loop
(``executor.py``). Supervisors are reaped here while the zygote lives; after it is gone they
belong to init (or the nearest subreaper).
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import struct
import sys

from . import supervisor

HEADER = struct.Struct("!I")
REPLY = struct.Struct("!iii")
WANT = b"W"
DONE = b"D"
HAS_PIDFD = 1

BASE_ENV: dict[str, str] = {}


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        try:
            chunk = sock.recv(min(n, 1 << 20))
        except InterruptedError:
            continue
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _warm(channel: socket.socket) -> int:
    """A forked warm supervisor: waits for an invocation, runs it, says it is done; again, for
    as long as the agent that started it keeps its socket open."""
    while True:
        header = recv_exact(channel, HEADER.size)
        if header is None:
            return 0  # the agent went away (or no longer needs this one)
        payload = recv_exact(channel, HEADER.unpack(header)[0])
        if payload is None:
            return 0
        worker = supervisor.Supervisor(supervisor.decode_launch(payload), BASE_ENV, channel)
        code = worker.run()
        if worker.outcome_sent:
            # the outcome itself went on the socket (its run directory could not take it): this
            # process is not reused, so that the run directory, with no outcome, never names a live
            # supervisor that runs something else (an agent restarted before the result is
            # journaled would take it back, and wait for it)
            return code
        try:
            channel.sendall(DONE)
        except OSError:
            return code  # the agent that started it is gone: the next one reads the outcome from disk


def _child(sock: socket.socket, wake_r: int, wake_w: int, channel: socket.socket) -> None:
    """In the forked child: become a warm supervisor; never returns."""
    code = 1
    try:
        os.setsid()
        sock.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = _warm(channel)
    except BaseException as exc:  # noqa: BLE001 - the agent reports a supervisor without an outcome
        try:  # an OSError (a full disk) as its reason and file, not Python's repr of it
            why = (f"{exc.strerror}{f' ({exc.filename})' if exc.filename else ''}"
                   if isinstance(exc, OSError) and exc.strerror else repr(exc))
            os.write(2, f"zerorun supervisor {os.getpid()}: {why}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def serve(fd: int) -> int:
    global BASE_ENV
    BASE_ENV = dict(os.environ)
    supervisor.set_boot_id(supervisor.boot_id())
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    gc.collect()
    gc.freeze()  # what is imported now stays shared with every supervisor (no copy-on-write by the GC)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap()
                continue
            try:
                wanted = sock.recv(64)
            except InterruptedError:
                continue
            if not wanted:
                return 0  # the agent is gone: so is the zygote (its supervisors live on)
            for _ in range(wanted.count(WANT)):
                if not _fork_warm(sock, wake_r, wake_w):
                    return 0
            _reap()


def _fork_warm(sock: socket.socket, wake_r: int, wake_w: int) -> bool:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    signal.pthread_sigmask(signal.SIG_BLOCK, supervisor.STOP_SIGNALS)  # unblocked by the supervisor
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.STOP_SIGNALS)
        ours.close()
        theirs.close()
        return _reply(sock, REPLY.pack(-1, exc.errno or 0, 0), [])
    if pid == 0:
        ours.close()
        _child(sock, wake_r, wake_w, theirs)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.STOP_SIGNALS)
    theirs.close()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        fds = [ours.fileno(), pidfd] if pidfd >= 0 else [ours.fileno()]
        return _reply(sock, REPLY.pack(pid, 0, HAS_PIDFD if pidfd >= 0 else 0), fds)
    finally:
        ours.close()
        if pidfd >= 0:
            os.close(pidfd)


def _reply(sock: socket.socket, record: bytes, fds: list[int]) -> bool:
    try:
        if fds:
            socket.send_fds(sock, [record], fds)
        else:
            sock.sendall(record)
        return True
    except OSError:
        return False


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m agent.zygote FD (started by the agent)", file=sys.stderr)
        return 2
    return serve(int(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
