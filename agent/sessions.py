"""The agent's side of sessions: a shell in a pseudo-terminal, an exec with a controlling
terminal (for become prompts), a TCP connection as reached from the instance.

Nothing here is journaled: a session lives while its broker connection does. All session I/O
runs in one thread of this module with a selector over the sessions' descriptors (never in the
agent's loop, which only hands messages over); what goes to the broker leaves through ``send``,
which passes it to the loop (the loop owns the socket).

Flow control, end to end with the client: a session reads from its process or socket only while
the client's window has room (bytes sent minus bytes the client acknowledged), and acknowledges
client input once it has written it, so neither side buffers more than the other's window.

A shell is a login shell (or ``shell -c COMMAND``, as sshd runs a command) of the agent's user
in a new session whose controlling terminal is the pseudo-terminal; the client's window size is
set on it and changed on resize (the kernel then signals SIGWINCH). A shell for which no terminal
was asked (SessionStart.pty False: the client's stdin is not a terminal, or ssh's -T) runs as
sshd runs one: on pipes, with no controlling terminal, the client's eof closing its stdin. The
session ends when the shell has exited and its output has been read; the process group is hung
up when the session is ended from the other side.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import queue
import selectors
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from typing import Any, Callable

from zerorun import protocol

from . import runas

log = logging.getLogger("zerorun.agent.sessions")

WINDOW = 512 * 1024  # client input this agent buffers before it acknowledges
CHUNK = 64 * 1024  # bytes read at once
EXIT_GRACE = 2.0  # an exec's pipes may stay open this long after it exited (a background child)
PTY_GRACE = 0.5  # a shell's pty, likewise (its output after the exit is read until EIO or this)
KILL_AFTER = 5.0  # a hung-up process group still alive after this is killed
CONNECT_TIMEOUT = 10.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLOCK_SKEW_ALLOWANCE = 300.0


class _End(Exception):
    """Ends the session it is raised in, with this error ("" for a clean end)."""


class _Endpoint:
    """One descriptor of a session: what is read from it goes out on ``out``, what comes in on
    ``inp`` is written to it."""

    def __init__(self, fd: int, out: str | None, inp: str | None, sock: socket.socket | None = None):
        self.fd = fd
        self.out = out
        self.inp = inp
        self.sock = sock
        self.pending = bytearray()
        self.read_done = out is None
        self.write_done = inp is None
        self.close_after_write = False  # the peer said eof: close (or shut down) once pending is written
        self.events = 0


class _Session:
    def __init__(self, owner: "AgentSessions", msg: protocol.SessionStart):
        self.owner = owner
        self.id = msg.session_id
        self.kind = msg.kind
        self.window = max(16 * 1024, msg.window or WINDOW)  # the client's: our send credit
        self.endpoints: list[_Endpoint] = []
        self.by_stream: dict[str, _Endpoint] = {}
        self.out_seq = 0
        self.sent = 0
        self.acked = 0
        self.in_seq = 0
        self.consumed = 0
        self.ack_sent = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.exited_at = 0.0
        self.exit_code = -1
        self.master = -1
        self.slave = -1  # an exec's: held open here, so that the pty never hangs up under unread output
        self.pty = True  # False: a shell on pipes (SessionStart.pty)
        self.ended = False
        self._last_read = 0

    # -- credit ----------------------------------------------------------------------------------

    def credit(self) -> int:
        return self.window - (self.sent - self.acked)

    def emit(self, stream: str, data: bytes = b"", eof: bool = False) -> None:
        self.out_seq += 1
        self.sent += len(data)
        ack = self._take_ack()
        self.owner.send(protocol.SessionData(self.id, seq=self.out_seq, stream=stream, data=data, eof=eof, ack=ack))

    def _take_ack(self) -> int:
        if self.consumed == self.ack_sent:
            return 0
        self.ack_sent = self.consumed
        return self.consumed

    def flush_ack(self) -> None:
        """Acknowledges written input once everything pending is written, or a quarter window."""
        unacked = self.consumed - self.ack_sent
        if unacked <= 0:
            return
        if unacked >= WINDOW // 4 or not any(e.pending for e in self.endpoints):
            self.ack_sent = self.consumed
            self.owner.send(protocol.SessionData(self.id, ack=self.consumed))

    # -- from the broker ---------------------------------------------------------------------

    def take(self, msg: protocol.SessionData) -> None:
        if msg.data or msg.eof:
            if msg.seq != self.in_seq + 1:
                raise _End(f"input out of sequence (got {msg.seq}, expected {self.in_seq + 1})")
            self.in_seq = msg.seq
            endpoint = self.by_stream.get(msg.stream)
            if endpoint is None or endpoint.write_done:
                self.consumed += len(msg.data)  # nowhere to go: dropped, and acknowledged
            else:
                endpoint.pending += msg.data
                if len(endpoint.pending) > 2 * WINDOW:
                    raise _End("the client sent beyond this agent's window (flow control)")
                if msg.eof:
                    endpoint.close_after_write = True
        if msg.ack > self.acked:
            self.acked = min(msg.ack, self.sent)
        if msg.cols > 0 and msg.rows > 0 and self.master >= 0:
            set_window_size(self.master, msg.cols, msg.rows)

    # -- I/O ---------------------------------------------------------------------------------

    def readable(self, endpoint: _Endpoint) -> None:
        self._last_read = 0
        want = min(CHUNK, self.credit())
        if want <= 0:
            return
        try:
            data = os.read(endpoint.fd, want)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:  # a pty whose other side is closed: the end of its output
                data = b""
            elif exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise _End("the connection was reset") from None
            else:
                raise _End(f"read failed: {exc.strerror or exc}") from None
        if data:
            self._last_read = len(data)
            self.emit(endpoint.out or "", data)
            return
        endpoint.read_done = True
        if self.kind == "tcp" or endpoint.fd != self.master:
            self.emit(endpoint.out or "", eof=True)

    def writable(self, endpoint: _Endpoint) -> None:
        if endpoint.pending:
            try:
                written = os.write(endpoint.fd, endpoint.pending)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EIO):
                    self.consumed += len(endpoint.pending)  # the reader is gone: drop, acknowledge
                    endpoint.pending.clear()
                    endpoint.write_done = True
                    return
                raise _End(f"write failed: {exc.strerror or exc}") from None
            del endpoint.pending[:written]
            self.consumed += written
        if not endpoint.pending and endpoint.close_after_write and not endpoint.write_done:
            endpoint.write_done = True
            if endpoint.sock is not None:
                try:
                    endpoint.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            elif endpoint.fd != self.master:
                self.owner.forget_fd(endpoint)
                os.close(endpoint.fd)
                endpoint.fd = -1

    def finished(self) -> bool:
        """Whether the session is over: its process exited and its output was read (or, when a
        background process holds its pty or pipes, a grace passed), or both directions of its
        connection closed."""
        if self.kind == "tcp":
            return bool(self.endpoints) and all(e.read_done and (e.write_done or e.close_after_write and not e.pending) for e in self.endpoints)
        if not self.exited_at:
            return False
        if self.kind == "exec":  # ends with its pipes; what it wrote on the terminal is read first
            if all(e.read_done for e in self.endpoints if e.out in ("", "stderr") and e.fd >= 0):
                tty = self.by_stream["tty"]
                if self.credit() <= 0:
                    return False
                self._drain(tty)
                if self._last_read == 0 or tty.read_done:
                    return True
                return False
        elif all(e.read_done for e in self.endpoints if e.out is not None and e.fd >= 0):
            return True
        grace = PTY_GRACE if self.kind == "shell" and self.pty else EXIT_GRACE
        return time.monotonic() - self.exited_at > grace and self.credit() > 0

    def process_exited(self) -> None:
        if self.proc is None or self.exited_at:
            return
        code = self.proc.poll()
        if code is None:
            return
        self.exited_at = time.monotonic()
        self.exit_code = 128 - code if code < 0 else code
        if self.pidfd >= 0:  # readable from now on: out of the selector
            self.owner.forget_pidfd(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        for endpoint in self.endpoints:  # what was written before the exit
            if endpoint.out is not None and endpoint.fd >= 0:
                self._drain(endpoint)

    def _drain(self, endpoint: _Endpoint) -> None:
        while not endpoint.read_done and self.credit() > 0:
            try:
                self.readable(endpoint)
            except _End:
                endpoint.read_done = True
            if not self._last_read:
                return

    def close(self, hangup: bool) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
        for endpoint in self.endpoints:
            if endpoint.fd >= 0:
                self.owner.forget_fd(endpoint)
                try:
                    if endpoint.sock is not None:
                        endpoint.sock.close()
                    else:
                        os.close(endpoint.fd)
                except OSError:
                    pass
                endpoint.fd = -1
        if self.pidfd >= 0:
            self.owner.forget_pidfd(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if self.proc is not None:
            if hangup and self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGHUP)
            self.owner.reap(self.proc)


class AgentSessions:
    """Runs SessionStart / SessionData from the broker; ``send(message)`` may be called from
    this module's thread (the driver hands the message to its loop)."""

    def __init__(self, send: Callable[[Any], None], user: str | None = None):
        self.send = send
        self._user = pwd.getpwuid(os.geteuid()) if user is None else pwd.getpwnam(user)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._sessions: dict[str, _Session] = {}
        self._dying: list[tuple[subprocess.Popen[bytes], float]] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    # -- entry points (the agent's loop thread) --------------------------------------------------

    def handle(self, msg: Any) -> None:
        self._put(("msg", msg))

    def close_all(self, why: str) -> None:
        """The broker connection that carried the sessions is gone: end them all."""
        if self._thread is not None:
            self._put(("close_all", why))

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._put(("stop", "the agent is stopping"))
            thread.join(timeout=5.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _put(self, item: tuple[str, Any]) -> None:
        with self._lock:
            if self._stopped and item[0] != "stop":
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sessions", daemon=True)
                self._thread.start()
        self._inbox.put(item)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- the sessions' thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = None
            if self._dying or any(s.exited_at or (s.proc is not None and s.pidfd < 0)
                                  for s in self._sessions.values()):
                timeout = 0.1
            for key, events in self._selector.select(timeout):
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except OSError:
                        pass
                    continue
                session, endpoint = key.data
                if session.ended:
                    continue
                try:
                    if endpoint is None:  # the pidfd: the process exited
                        session.process_exited()
                        continue
                    if events & selectors.EVENT_WRITE:
                        session.writable(endpoint)
                    if events & selectors.EVENT_READ and endpoint.fd >= 0:
                        session.readable(endpoint)
                except _End as end:
                    self._end(session, str(end))
            if not self._inbox_drained():
                return
            for session in list(self._sessions.values()):
                if session.ended:
                    continue
                try:
                    if session.pidfd < 0:
                        session.process_exited()
                    if session.finished():
                        self._end(session, "", hangup=False)
                        continue
                    session.flush_ack()
                except _End as end:
                    self._end(session, str(end))
                    continue
                self._update_interest(session)
            self._reap()

    def _inbox_drained(self) -> bool:
        """Takes what the loop handed over; False when the thread must stop."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if kind == "msg":
                self._message(payload)
            elif kind == "opened":
                self._connected(*payload)
            elif kind in ("close_all", "stop"):
                for session in list(self._sessions.values()):
                    self._end(session, payload, tell=False)
                if kind == "stop":
                    self._reap(final=True)
                    return False

    def _message(self, msg: Any) -> None:
        if isinstance(msg, protocol.SessionStart):
            self._start(msg)
            return
        session = self._sessions.get(msg.session_id)
        if session is None or session.ended:
            return
        if msg.close:
            self._end(session, msg.error, tell=False)
            return
        try:
            session.take(msg)
            for endpoint in session.endpoints:  # write at once (most input fits), close when told
                if endpoint.fd >= 0 and (endpoint.pending or endpoint.close_after_write and not endpoint.write_done):
                    session.writable(endpoint)
        except _End as end:
            self._end(session, str(end))

    def _start(self, msg: protocol.SessionStart) -> None:
        if msg.session_id in self._sessions:
            return
        if msg.expires_at and time.time() > msg.expires_at + CLOCK_SKEW_ALLOWANCE:
            self.send(protocol.SessionStarted(msg.session_id, ok=False, error="expired before it reached the agent"))
            return
        session = _Session(self, msg)
        try:
            if msg.kind == "tcp":
                self._sessions[msg.session_id] = session
                threading.Thread(target=self._connect, args=(session, msg.host or "127.0.0.1", msg.port),
                                 name="session-connect", daemon=True).start()
                return
            self._spawn(session, msg)
        except _End as end:
            session.close(hangup=True)
            self.send(protocol.SessionStarted(msg.session_id, ok=False, error=str(end)))
            return
        self._sessions[msg.session_id] = session
        log.info("session %s: %s started (pid %d)", msg.session_id[:8], msg.kind,
                 session.proc.pid if session.proc else -1)
        self.send(protocol.SessionStarted(msg.session_id, window=WINDOW, pty=session.pty))
        self._update_interest(session)

    def _account_for(self, run_as: str) -> runas.Account:
        """The session's user: the agent's own (no run-as), or the one named, as steps run as it."""
        try:
            return runas.lookup(run_as or self._user.pw_name)
        except runas.RunAsError as exc:
            raise _End(str(exc)) from None

    def _spawn(self, session: _Session, msg: protocol.SessionStart) -> None:
        account = self._account_for(msg.run_as)
        home = account.home if runas.can_enter(account.home, account) else "/"
        switch = runas.spawn_options(account)
        if msg.kind == "shell" and not msg.pty:
            self._spawn_on_pipes(session, msg, account, home, switch)
            return
        master, slave = os.openpty()
        if account.switches:  # the terminal belongs to the session's user, as sshd does it
            os.fchown(slave, account.uid, -1)
            os.fchmod(slave, 0o620)
        set_window_size(master, msg.cols, msg.rows)
        os.set_blocking(master, False)
        fcntl.fcntl(master, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        session.master = master
        try:
            if msg.kind == "shell":
                argv, argv0, env = _shell(account, home, msg, term=msg.term or "xterm")
                session.proc = subprocess.Popen(argv, executable=argv0, stdin=slave, stdout=slave, stderr=slave,
                                                env=env, cwd=home, start_new_session=True,
                                                preexec_fn=_controlling_terminal(0), **switch)
                endpoint = _Endpoint(master, "", "")
                session.endpoints.append(endpoint)
                session.by_stream[""] = endpoint
            else:  # exec: pipes, and the pty as controlling terminal (stdin too when asked)
                env = runas.environment(dict(os.environ), account) if account.switches else dict(os.environ)
                env.update(msg.env)
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                in_r, in_w = (slave, -1) if msg.stdin_tty else os.pipe()
                try:
                    session.proc = subprocess.Popen(["/bin/sh", "-c", msg.command], stdin=in_r, stdout=out_w,
                                                    stderr=err_w, env=env, cwd=home, start_new_session=True,
                                                    pass_fds=(slave,), preexec_fn=_controlling_terminal(slave),
                                                    **switch)
                finally:
                    for fd in (out_w, err_w, in_r if in_r != slave else -1):
                        if fd >= 0:
                            os.close(fd)
                pipes = [_Endpoint(out_r, "", None), _Endpoint(err_r, "stderr", None)]
                tty = _Endpoint(master, "tty", "tty")
                if in_w >= 0:
                    pipes.append(_Endpoint(in_w, None, ""))
                else:
                    tty.inp = ""  # the terminal is stdin: input of both streams goes there
                    session.by_stream["tty"] = tty
                for endpoint in pipes + [tty]:
                    os.set_blocking(endpoint.fd, False)
                    session.endpoints.append(endpoint)
                    if endpoint.inp is not None:
                        session.by_stream[endpoint.inp] = endpoint
                session.by_stream.setdefault("tty", tty)
        except OSError as exc:
            raise _End(f"cannot start {'the shell' if msg.kind == 'shell' else '/bin/sh'}: "
                       f"{exc.strerror or exc}") from None
        finally:
            if msg.kind == "shell":
                os.close(slave)  # the shell's end is the pty's hang-up once every process of it is gone
            else:
                session.slave = slave
        self._watch_exit(session)

    def _spawn_on_pipes(self, session: _Session, msg: protocol.SessionStart, account: runas.Account, home: str,
                        switch: dict[str, Any]) -> None:
        """A shell without a terminal, as sshd runs a session for which none was asked (ssh -T,
        or stdin not a terminal): stdin, stdout and stderr are pipes, no controlling terminal,
        no TERM; the client's eof closes its stdin, and it ends with its pipes."""
        argv, argv0, env = _shell(account, home, msg)
        pipes: list[int] = []
        try:
            out_r, out_w = os.pipe()
            pipes += (out_r, out_w)
            err_r, err_w = os.pipe()
            pipes += (err_r, err_w)
            in_r, in_w = os.pipe()
            pipes += (in_r, in_w)
            session.proc = subprocess.Popen(argv, executable=argv0, stdin=in_r, stdout=out_w, stderr=err_w,
                                            env=env, cwd=home, start_new_session=True, **switch)
        except OSError as exc:
            for fd in pipes:
                os.close(fd)
            raise _End(f"cannot start the shell: {exc.strerror or exc}") from None
        for fd in (out_w, err_w, in_r):
            os.close(fd)
        for endpoint in (_Endpoint(out_r, "", None), _Endpoint(err_r, "stderr", None), _Endpoint(in_w, None, "")):
            os.set_blocking(endpoint.fd, False)  # (pipes are close-on-exec already)
            session.endpoints.append(endpoint)
            if endpoint.inp is not None:
                session.by_stream[endpoint.inp] = endpoint
        session.pty = False
        self._watch_exit(session)

    def _watch_exit(self, session: _Session) -> None:
        assert session.proc is not None
        try:
            session.pidfd = os.pidfd_open(session.proc.pid)
            self._selector.register(session.pidfd, selectors.EVENT_READ, (session, None))
        except (AttributeError, OSError):
            session.pidfd = -1  # polled instead

    def _connect(self, session: _Session, host: str, port: int) -> None:
        """A worker thread: the connection (name resolution may block), handed back to the
        sessions' thread."""
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result: Any = sock
        except OSError as exc:
            result = f"cannot connect to {host}:{port} from the instance: {exc.strerror or exc}"
        self._put(("opened", (session, result)))

    def _connected(self, session: _Session, result: Any) -> None:
        if session.ended or self._sessions.get(session.id) is not session:
            if isinstance(result, socket.socket):
                result.close()
            return
        if isinstance(result, str):
            session.ended = True
            del self._sessions[session.id]
            self.send(protocol.SessionStarted(session.id, ok=False, error=result))
            return
        endpoint = _Endpoint(result.fileno(), "", "", sock=result)
        session.endpoints.append(endpoint)
        session.by_stream[""] = endpoint
        log.info("session %s: tcp connected", session.id[:8])
        self.send(protocol.SessionStarted(session.id, window=WINDOW))
        self._update_interest(session)

    def _end(self, session: _Session, error: str, tell: bool = True, hangup: bool = True) -> None:
        if session.ended:
            return
        session.ended = True
        self._sessions.pop(session.id, None)
        session.close(hangup=hangup)
        if tell:
            self.send(protocol.SessionData(session.id, close=True, exit_code=session.exit_code, error=error,
                                           ack=session.consumed))
        log.info("session %s ended%s%s", session.id[:8],
                 f" (exit {session.exit_code})" if session.exit_code >= 0 else "", f": {error}" if error else "")

    # -- descriptors -----------------------------------------------------------------------------

    def _update_interest(self, session: _Session) -> None:
        credit = session.credit() > 0
        for endpoint in session.endpoints:
            if endpoint.fd < 0:
                continue
            events = 0
            if not endpoint.read_done and credit:
                events |= selectors.EVENT_READ
            if endpoint.pending:
                events |= selectors.EVENT_WRITE
            if events == endpoint.events:
                continue
            if endpoint.events and events:
                self._selector.modify(endpoint.fd, events, (session, endpoint))
            elif events:
                self._selector.register(endpoint.fd, events, (session, endpoint))
            else:
                self._selector.unregister(endpoint.fd)
            endpoint.events = events

    def forget_fd(self, endpoint: _Endpoint) -> None:
        if endpoint.events and endpoint.fd >= 0:
            try:
                self._selector.unregister(endpoint.fd)
            except (KeyError, ValueError):
                pass
            endpoint.events = 0

    def forget_pidfd(self, pidfd: int) -> None:
        try:
            self._selector.unregister(pidfd)
        except (KeyError, ValueError):
            pass

    def reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            self._dying.append((proc, time.monotonic() + KILL_AFTER))

    def _reap(self, final: bool = False) -> None:
        still = []
        for proc, kill_at in self._dying:
            if proc.poll() is not None:
                continue
            if final or time.monotonic() >= kill_at:
                _signal_group(proc.pid, signal.SIGKILL)
                if final:
                    continue
            still.append((proc, kill_at))
        self._dying = still


def _shell(account: runas.Account, home: str, msg: protocol.SessionStart,
           term: str = "") -> tuple[list[str], str, dict[str, str]]:
    """The argv, executable and login environment (``TERM`` only with a terminal) of the user's
    shell (``/bin/sh`` when that cannot be run): a login shell, or ``shell -c COMMAND`` as sshd
    runs a command."""
    shell = account.shell if os.access(account.shell, os.X_OK) else "/bin/sh"
    env = {"HOME": home, "USER": account.name, "LOGNAME": account.name, "SHELL": shell,
           "PATH": DEFAULT_PATH if account.uid == 0 else runas.USER_PATH}
    if term:
        env["TERM"] = term
    env.update(msg.env)
    if msg.command:  # as sshd runs a command: through the user's shell
        return [shell, "-c", msg.command], shell, env
    return ["-" + os.path.basename(shell)], shell, env  # a login shell: argv[0] starts with "-"


def set_window_size(fd: int, cols: int, rows: int) -> None:
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    except OSError:
        pass


def _controlling_terminal(fd: int) -> Callable[[], None]:
    """Runs in the child between fork and exec, after setsid(): makes the pty whose slave is
    ``fd`` the new session's controlling terminal (then closes ``fd`` unless it is stdin).
    Only an ioctl and a close, nothing that takes a lock another thread could hold."""

    def preexec() -> None:
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        if fd > 2:
            os.close(fd)

    return preexec


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
