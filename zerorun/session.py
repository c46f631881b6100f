"""Sessions from the client's side: an interactive shell, port forwarding, a proxy for SSH, and a
command with a terminal for the connection plugin's become.

One ``Link`` (a DEALER of its own to the broker, CURVE as every client) carries any number of
``Channel``s, one per session. A channel keeps one long poll (SessionIO) at the broker at all
times; input goes out as further SessionIO, each answering the poll before it. Flow control is
end to end with the agent: a channel sends at most the agent's window beyond what the agent has
acknowledged, and acknowledges the agent's output only once it has been written out locally,
so a slow local reader (a terminal, a socket) slows the instance's side down instead of filling
memory anywhere.

A session is bound to the broker that holds the instance: another broker of a cluster answers
``WrongBroker`` with the right one's endpoint, and the link moves there when that endpoint is one
of the configured ones. A lost broker connection ends every session on the link at once (as a
lost SSH connection does): the terminal is restored and ``zerorun`` exits 255.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import sys
import termios
import time
import tty
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import zmq

from . import protocol
from .client import (HANDSHAKE_FAILURES, BrokerUnavailable, ClientConfig, RequestFailed, ZerorunError,
                     handshake_error, request_frames, secure_broker_socket)
from .zmqutil import close_monitor, connect_monitored, monitor_socket, recv_monitor_event

WINDOW = 512 * 1024  # output this client buffers before it acknowledges
CHUNK = 64 * 1024
POLL_WAIT = 5.0  # seconds the broker may hold a poll
ANSWER_MARGIN = 10.0  # a held poll unanswered this long after its wait: the broker is gone
OPEN_TIMEOUT = 40.0  # the broker gives the agent 30 s to start a session
EXIT_FAILURE = 255  # as ssh: zerorun's own failure, apart from any status of the remote command


class SessionLost(ZerorunError):
    """The session ended without its own end: the broker or the agent went away."""

    code = "SessionLost"


class WrongBroker(RequestFailed):
    """Another broker of the cluster holds the instance; ``endpoint`` is its client endpoint."""

    def __init__(self, message: str, endpoint: str):
        super().__init__(message, "WrongBroker")
        self.endpoint = endpoint


# -- the link ------------------------------------------------------------------------------------


Callback = Callable[[int, "protocol.Reply | None", "ZerorunError | None"], None]


# The signals whose handlers here raise: a session's hang-up (ssh sends its ProxyCommand SIGHUP
# when it is done), Ctrl-C, a stop.
QUIT_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})


def send_unbroken(sock: zmq.Socket, frames: list[bytes]) -> None:
    """``send_multipart`` that a raising signal handler cannot cut between two frames: the first
    frames would stay queued, and the next message sent on the socket would be glued to them (a
    message of the wrong shape, which the broker drops with the one after it, ending the session
    "out of sequence"). The signals wait until the message is whole; libzmq's own threads block
    every signal, so the handler then runs in this thread, after the send."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, QUIT_SIGNALS)
    try:
        sock.send_multipart(frames)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Link:
    """A DEALER to one broker, for sessions: asynchronous calls answered through callbacks."""

    def __init__(self, config: ClientConfig, timeout: float = 10.0, context: zmq.Context | None = None,
                 endpoint: str | None = None):
        self.config = config
        self.timeout = timeout
        self.endpoint = endpoint or config.endpoints[0]
        self._context = context or zmq.Context.instance()
        self._rids = iter(range(1, 1 << 62))
        self.calls: dict[int, tuple[Callback, float]] = {}
        self.lost = ""
        self._up = False
        self._open_socket()

    def _open_socket(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        secure_broker_socket(sock, self.config)
        self.monitor = monitor_socket(sock, HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        connect_monitored(sock, self.monitor, self.endpoint)
        self.socket = sock
        self._up = self.config.insecure

    def move_to(self, endpoint: str) -> None:
        """Another broker (a cluster's): a new connection; nothing may be in flight."""
        self.close()
        self.endpoint = endpoint
        self.calls.clear()
        self._open_socket()

    def close(self) -> None:
        close_monitor(self.socket, self.monitor)
        self.socket.close(0)

    def call(self, message: Any, callback: Callback, timeout: float) -> int:
        if self.lost:
            raise SessionLost(self.lost)
        rid = next(self._rids)
        message.rid = rid
        frames = request_frames(message)  # before the call is recorded: it may be refused
        self.calls[rid] = (callback, time.monotonic() + timeout)
        send_unbroken(self.socket, frames)
        return rid

    def next_deadline(self) -> float:
        return min((deadline for _, deadline in self.calls.values()), default=float("inf"))

    def on_replies(self) -> None:
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2 or parts[0] != protocol.HEADER:
                continue
            try:
                reply = protocol.reply_decoder.decode(parts[1])
            except (protocol.DecodeError, protocol.ValidationError):
                continue
            entry = self.calls.pop(reply.rid, None)
            if entry is not None:
                entry[0](reply.rid, reply, None)

    def on_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_event(self.monitor)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up = True
            elif event & HANDSHAKE_FAILURES:
                self._fail_all(handshake_error(event, self.config))
            elif event == zmq.EVENT_DISCONNECTED and self._up:
                self._fail_all(SessionLost(f"lost the connection to the broker at {self.endpoint}"))
            elif event == zmq.EVENT_CONNECT_RETRIED and not self._up and self.calls:
                self._fail_all(BrokerUnavailable(f"the broker at {self.endpoint} refuses connections"),
                               lose=False)

    def check_deadlines(self, now: float) -> None:
        for rid, (callback, deadline) in list(self.calls.items()):
            if now >= deadline and self.calls.pop(rid, None) is not None:
                callback(rid, None, SessionLost(f"no answer from the broker at {self.endpoint} in time "
                                                "(it stopped, or the network to it failed)"))

    def _fail_all(self, error: ZerorunError, lose: bool = True) -> None:
        if lose:
            self.lost = str(error)
        calls, self.calls = self.calls, {}
        for rid, (callback, _) in calls.items():
            callback(rid, None, error)


class Loop:
    """Waits on the link and on local descriptors; calls their handlers."""

    def __init__(self, link: Link):
        self.link = link
        self.poller = zmq.Poller()
        self.poller.register(link.socket, zmq.POLLIN)
        self.poller.register(link.monitor, zmq.POLLIN)
        self._handlers: dict[int, tuple[Callable[[], None] | None, Callable[[], None] | None]] = {}

    def relink(self) -> None:
        """The link opened a new socket (move_to)."""
        self.poller = zmq.Poller()
        self.poller.register(self.link.socket, zmq.POLLIN)
        self.poller.register(self.link.monitor, zmq.POLLIN)
        for fd, (read, write) in self._handlers.items():
            self.poller.register(fd, (zmq.POLLIN if read else 0) | (zmq.POLLOUT if write else 0))

    def watch(self, fd: int, read: Callable[[], None] | None = None, write: Callable[[], None] | None = None) -> None:
        """Calls ``read`` / ``write`` when ``fd`` is readable / writable (None: not wanted)."""
        if read is None and write is None:
            if self._handlers.pop(fd, None) is not None:
                self.poller.unregister(fd)
            return
        old = self._handlers.get(fd)
        if old is not None and (old[0] is None) == (read is None) and (old[1] is None) == (write is None):
            self._handlers[fd] = (read, write)
            return
        self._handlers[fd] = (read, write)
        self.poller.register(fd, (zmq.POLLIN if read else 0) | (zmq.POLLOUT if write else 0))

    def reading(self, fd: int, read: Callable[[], None] | None) -> None:
        self.watch(fd, read, self._handlers.get(fd, (None, None))[1])

    def writing(self, fd: int, write: Callable[[], None] | None) -> None:
        self.watch(fd, self._handlers.get(fd, (None, None))[0], write)

    def run_once(self, timeout: float | None = None) -> None:
        now = time.monotonic()
        wait = self.link.next_deadline() - now
        if timeout is not None:
            wait = min(wait, timeout)
        wait_ms = None if wait == float("inf") else max(0, int(wait * 1000) + 1)
        events = self.poller.poll(wait_ms)
        for what, flags in events:
            if what is self.link.socket:
                self.link.on_replies()
            elif what is self.link.monitor:
                self.link.on_monitor()
            else:
                handlers = self._handlers.get(what)
                if handlers is None:
                    continue
                # a pipe whose writer closed polls POLLHUP without POLLIN, which zmq reports as
                # POLLERR: the read handler finds the end (or the error) there
                if flags & (zmq.POLLIN | zmq.POLLERR) and handlers[0] is not None:
                    handlers[0]()
                handlers = self._handlers.get(what)
                if handlers is not None and flags & (zmq.POLLOUT | zmq.POLLERR) and handlers[1] is not None:
                    handlers[1]()
        self.link.check_deadlines(time.monotonic())


# -- one session ---------------------------------------------------------------------------------


class Channel:
    """One session over a link: opening, input within the agent's window, output acknowledged
    as it is consumed (``consumed``), a poll always outstanding."""

    def __init__(self, link: Link, on_data: Callable[[str, bytes], None],
                 on_end: Callable[["Channel"], None], window: int = WINDOW):
        self.link = link
        self.on_data = on_data
        self.on_end = on_end
        self.on_credit: Callable[[], None] | None = None
        self.on_eof: Callable[[str], None] | None = None
        self.window = window
        self.session_id = ""
        self.state = "new"  # new | opening | open | ended
        self.seq = 0
        self.sent = 0
        self.peer_acked = 0
        self.peer_window = 0
        self.rx_seq = 0
        self.received = 0
        self.consumed_total = 0
        self.ack_sent = 0
        self.latest = -1
        self.exit_code = -1
        self.error = ""
        self.lost = False  # ended by a failure of the broker or the link, not by the session
        self.info: protocol.SessionUpdate | None = None

    # -- opening --------------------------------------------------------------------------------

    def open(self, request: protocol.OpenSession, on_open: Callable[[ZerorunError | None], None],
             poll: bool = True) -> None:
        """``poll``: ask for output as soon as it is open; False leaves that to ``poll()``, for a
        caller that has to set up what receives the output first."""
        request.window = self.window
        self.state = "opening"

        def opened(rid: int, reply: protocol.Reply | None, error: ZerorunError | None) -> None:
            if error is None and reply is not None and not reply.ok:
                err = reply.error or protocol.ErrorInfo("Error", "refused")
                data = reply.data if isinstance(reply.data, dict) else {}
                if err.code == "WrongBroker":
                    error = WrongBroker(err.message, str(data.get("endpoint", "")))
                else:
                    error = RequestFailed(err.message, err.code)
            if error is not None:
                self.state = "ended"
                self.error = str(error)
                on_open(error)
                return
            assert reply is not None
            update = protocol.convert(reply.data, protocol.SessionUpdate)
            self.info = update
            self.session_id = update.session_id
            self.peer_window = update.window or WINDOW
            self.state = "open"
            on_open(None)
            if poll:
                self.poll()

        self.link.call(request, opened, OPEN_TIMEOUT + self.link.timeout)

    def poll(self) -> None:
        """The long poll for output, unless one is outstanding."""
        if self.state == "open" and self.latest < 0:
            self._request()

    # -- input --------------------------------------------------------------------------------

    def credit(self) -> int:
        return self.peer_window - (self.sent - self.peer_acked) if self.state == "open" else 0

    def write(self, data: bytes, stream: str = "") -> None:
        """Sends input; the caller keeps within ``credit()``."""
        for start in range(0, len(data), CHUNK):
            piece = data[start:start + CHUNK]
            self.seq += 1
            self.sent += len(piece)
            self._request(seq=self.seq, stream=stream, data=piece)

    def eof(self, stream: str = "") -> None:
        if self.state == "open":
            self.seq += 1
            self._request(seq=self.seq, stream=stream, eof=True)

    def resize(self, cols: int, rows: int) -> None:
        if self.state == "open":
            self._request(cols=cols, rows=rows)

    def close(self) -> None:
        if self.state == "open":
            self._request(close=True, wait=0.0)

    def consumed(self, count: int) -> None:
        """``count`` bytes of output were written out: acknowledged now, or with the next request."""
        self.consumed_total += count
        if self.state == "open" and self.consumed_total - self.ack_sent >= self.window // 4:
            self._request()

    def _request(self, wait: float = POLL_WAIT, **fields: Any) -> None:
        message = protocol.SessionIO(session_id=self.session_id, ack=self.consumed_total, wait=wait, **fields)
        self.ack_sent = self.consumed_total
        self.latest = self.link.call(message, self._answered, wait + ANSWER_MARGIN)

    # -- output -------------------------------------------------------------------------------

    def _answered(self, rid: int, reply: protocol.Reply | None, error: ZerorunError | None) -> None:
        if self.state == "ended":
            return
        if error is not None:
            self._finish(str(error), lost=True)
            return
        assert reply is not None
        if not reply.ok:
            err = reply.error or protocol.ErrorInfo("Error", "refused")
            self._finish(f"{err.code}: {err.message}", lost=True)
            return
        update = protocol.convert(reply.data, protocol.SessionUpdate)
        for chunk in update.chunks:
            if chunk.seq != self.rx_seq + 1:
                self._finish(f"output lost in transit (chunk {chunk.seq}, expected {self.rx_seq + 1})", lost=True)
                return
            self.rx_seq = chunk.seq
            self.received += len(chunk.data)
            self.on_data(chunk.stream, chunk.data)
            if self.state == "ended":
                return
        if update.ack > self.peer_acked:
            self.peer_acked = update.ack
            if self.on_credit is not None:
                self.on_credit()
        if self.on_eof is not None:
            for stream in update.eof:
                self.on_eof(stream)
        if update.ended:
            self.exit_code = update.exit_code
            self._finish(update.error)
        elif rid == self.latest and self.state == "open":
            self._request()

    def _finish(self, error: str, lost: bool = False) -> None:
        if self.state == "ended":
            return
        self.state = "ended"
        self.error = error
        self.lost = lost
        self.on_end(self)


def open_channel(link: Link, loop: Loop, request: protocol.OpenSession, on_data: Callable[[str, bytes], None],
                 on_end: Callable[[Channel], None], window: int = WINDOW) -> Channel:
    """Opens a session and waits for the answer (moving to the broker that holds the instance
    when another one says so); raises the refusal. The first poll for output goes out on the
    caller's next turn of the loop (answers are handled only there), so no output arrives
    before the caller holds the channel."""
    for _ in range(2):
        channel = Channel(link, on_data, on_end, window)
        outcome: list[ZerorunError | None] = []
        channel.open(request, outcome.append, poll=False)
        while not outcome:
            loop.run_once()
        error = outcome[0]
        if error is None:
            channel.poll()
            return channel
        if isinstance(error, WrongBroker) and error.endpoint in link.config.endpoints \
                and error.endpoint != link.endpoint:
            link.move_to(error.endpoint)
            loop.relink()
            continue
        raise error
    raise AssertionError("unreachable")


# -- a shell -------------------------------------------------------------------------------------


def terminal_size(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl_ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        if cols and rows:
            return cols, rows
    except OSError:
        pass
    return 80, 24


def fcntl_ioctl(fd: int, request: int, arg: bytes) -> bytes:
    import fcntl

    return fcntl.ioctl(fd, request, arg)


@contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The local terminal in raw mode (every key goes to the remote side as it is typed, Ctrl-C
    and Ctrl-D included), restored on every way out of the block."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Quit(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_shell(config: ClientConfig, instance_id: str, command: str = "", run_as: str = "",
              timeout: float = 10.0, stdin: int = 0, stdout: int = 1, err: Any = None, pty: bool | None = None,
              stderr: int = 2) -> int:
    """A shell (or ``command``) on the instance; the remote exit status, or EXIT_FAILURE (255)
    with a message when zerorun itself fails.

    As ssh: in a pseudo-terminal there when ``stdin`` is a terminal (``pty`` True: always, as
    ``ssh -tt``; False: never, as ``ssh -T``), the local terminal in raw mode; else on pipes, the
    remote shell reading what comes on ``stdin`` until its end, its stderr on ``stderr``."""
    err = err or sys.stderr
    interactive = os.isatty(stdin)
    want_pty = interactive if pty is None else pty
    raw = interactive and want_pty  # keys go through as typed, the escape ~. is read
    cols, rows = terminal_size(stdin if interactive else stdout)
    env = {k: v for k, v in os.environ.items() if k == "LANG" or k.startswith("LC_")}
    request = protocol.OpenSession(instance_id=instance_id, kind="shell", command=command, run_as=run_as,
                                   term=os.environ.get("TERM", "xterm") if interactive else "dumb",
                                   cols=cols, rows=rows, env=env, pty=want_pty)
    link = Link(config, timeout=timeout)
    loop = Loop(link)
    state = {"credit_wanted": False, "reader_gone": False}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous: dict[int, Any] = {}

    def quit_on(signum: int, frame: Any) -> None:
        raise _Quit(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT):
        previous[signum] = signal.signal(signum, quit_on)
    previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, lambda *_: None)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    channel: Channel | None = None
    message = ""
    code = EXIT_FAILURE
    try:
        def on_data(stream: str, data: bytes) -> None:
            assert channel is not None
            if not state["reader_gone"]:
                try:
                    _write_all(stderr if stream == "stderr" else stdout, data)
                except BrokenPipeError:
                    state["reader_gone"] = True
                    raise
            channel.consumed(len(data))

        ended: list[Channel] = []
        try:
            channel = open_channel(link, loop, request, on_data, ended.append)
        except ZerorunError as exc:
            print(f"zerorun: {exc.code}: {exc}", file=err)
            return EXIT_FAILURE
        escape = _Escape()
        # a peer that predates SessionStart.pty gives a pseudo-terminal although none was asked for
        on_pty = channel.info is None or channel.info.pty

        def read_input() -> None:
            assert channel is not None
            credit = channel.credit()
            if credit <= 0:
                loop.reading(stdin, None)
                state["credit_wanted"] = True
                return
            try:
                data = os.read(stdin, min(credit, 16 * 1024))
            except BlockingIOError:
                return
            if not data:
                loop.reading(stdin, None)
                if not on_pty:
                    channel.eof()  # the remote shell's end of input
                elif not raw:
                    channel.write(b"\x04")  # the terminal's end of input, for what reads it
                return
            if raw:
                data, hang_up = escape.feed(data)
                if hang_up:
                    channel.close()
                    ended.append(channel)
                    raise _Disconnect()
            if data:
                channel.write(data)

        def credit_back() -> None:
            if state["credit_wanted"]:
                state["credit_wanted"] = False
                loop.reading(stdin, read_input)

        def on_wake() -> None:
            try:
                while os.read(wake_r, 64):
                    pass
            except BlockingIOError:
                pass
            if raw and channel is not None:
                channel.resize(*terminal_size(stdin))

        channel.on_credit = credit_back
        loop.reading(stdin, read_input)
        loop.reading(wake_r, on_wake)
        with raw_mode(stdin) if raw else _nothing():
            try:
                while not ended:
                    loop.run_once()
            except _Disconnect:
                message = f"Connection to {instance_id} closed."
        if channel.exit_code >= 0 and not channel.error:
            code = channel.exit_code
        elif not message:
            if channel.lost:
                message = f"zerorun: SessionLost: {channel.error}"
            elif channel.error:
                message = f"zerorun: session ended: {channel.error}"
            else:
                code = max(channel.exit_code, 0)
    except BrokenPipeError:  # what reads the output went away (`| head -1`): as with ssh, so does
        if channel is not None:  # the remote side, now rather than when the broker misses the client
            channel.close()
            _settle(loop, time.monotonic() + 1.0, lambda: channel.state == "ended")
        raise  # main() ends quietly, killed by SIGPIPE as coreutils are
    except _Quit as quit_:
        if channel is not None:
            channel.close()
            _settle(loop, time.monotonic() + 1.0, lambda: channel.state == "ended")
        message = f"zerorun: {signal.Signals(quit_.signum).name}: session closed"
        code = 128 + quit_.signum if quit_.signum != signal.SIGINT else 130
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)
        link.close()
    if message:
        print(message, file=err)
    return code


class _Disconnect(Exception):
    """The user typed the escape ``~.``."""


class _Escape:
    """SSH's escape character: ``~.`` after a newline disconnects, ``~~`` sends one ``~``."""

    def __init__(self) -> None:
        self.line_start = True
        self.pending = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        for byte in data:
            char = bytes((byte,))
            if self.pending:
                self.pending = False
                if char == b".":
                    return bytes(out), True
                if char != b"~":
                    out += b"~"
                out += char
            elif self.line_start and char == b"~":
                self.pending = True
                continue
            else:
                out += char
            self.line_start = char in (b"\r", b"\n")
        return bytes(out), False


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


def _settle(loop: Loop, deadline: float, done: Callable[[], bool]) -> None:
    """Lets the loop run until ``done()`` or the deadline (a close on its way out)."""
    while not done() and time.monotonic() < deadline:
        try:
            loop.run_once(max(0.0, deadline - time.monotonic()))
        except ZerorunError:
            return


# -- byte streams: port forwarding and the SSH proxy ------------------------------------------------


class Splice:
    """A local byte stream (a socket, or stdin and stdout) joined to one session's main stream."""

    def __init__(self, loop: Loop, channel: Channel, read_fd: int, write_fd: int, sock: socket.socket | None,
                 on_done: Callable[["Splice"], None]):
        self.loop, self.channel = loop, channel
        self.read_fd, self.write_fd, self.sock = read_fd, write_fd, sock
        self.on_done = on_done
        self.outbuf = bytearray()
        self.local_eof = False  # the local side sent its end
        self.remote_eof = False  # the instance's side sent its end
        self.write_closed = False
        self.done = False
        channel.on_data = self._data
        channel.on_end = self._ended
        channel.on_credit = self._resume
        channel.on_eof = self._remote_eof

    def start(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if not self.local_eof and not self.done:
            self.loop.reading(self.read_fd, self._readable)

    def _readable(self) -> None:
        credit = self.channel.credit()
        if credit <= 0:
            self.loop.reading(self.read_fd, None)
            return
        try:
            data = os.read(self.read_fd, min(credit, CHUNK))
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                data = b""
            else:
                raise
        if data:
            self.channel.write(data)
            return
        self.local_eof = True
        self.loop.reading(self.read_fd, None)
        self.channel.eof()

    def _data(self, stream: str, data: bytes) -> None:
        if self.write_closed:
            self.channel.consumed(len(data))
            return
        self.outbuf += data
        self._writable()

    def _writable(self) -> None:
        if self.outbuf and not self.write_closed:
            try:
                written = os.write(self.write_fd, self.outbuf)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
                written = len(self.outbuf)  # the local reader is gone: drop what it would not read
                self.write_closed = True
            if written:
                del self.outbuf[:written]
                self.channel.consumed(written)
        self.loop.writing(self.write_fd, self._writable if self.outbuf and not self.write_closed else None)
        if not self.outbuf and self.remote_eof:
            self._close_write()
        self._check_done()

    def _remote_eof(self, stream: str) -> None:
        self.remote_eof = True
        if not self.outbuf:
            self._close_write()

    def _close_write(self) -> None:
        if self.write_closed:
            return
        self.write_closed = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        elif self.write_fd != self.read_fd:
            try:
                os.close(self.write_fd)
            except OSError:
                pass
            self.loop.writing(self.write_fd, None)

    def _ended(self, channel: Channel) -> None:
        if self.outbuf and not self.write_closed and not channel.error:
            self.remote_eof = True  # what came before the end goes out first
            self._writable()
        self._check_done()

    def _check_done(self) -> None:
        if self.done or self.channel.state != "ended":
            return
        if self.outbuf and not self.write_closed and not self.channel.error:
            return
        self.done = True
        for fd in {self.read_fd, self.write_fd}:
            self.loop.watch(fd, None, None)
        self.on_done(self)


def parse_forward(spec: str) -> tuple[int, str, int]:
    """``LOCAL_PORT:[HOST:]REMOTE_PORT`` (HOST may be an IPv6 address in brackets) -> (local,
    host, remote); ValueError with what is wrong."""
    local, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"{spec!r}: expected LOCAL_PORT:[HOST:]REMOTE_PORT, e.g. 8080:80 or 5432:db.internal:5432")
    host, sep, remote = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        local_port, remote_port = int(local), int(remote)
    except ValueError:
        raise ValueError(f"{spec!r}: the ports must be numbers") from None
    if not 0 <= local_port <= 65535 or not 1 <= remote_port <= 65535:
        raise ValueError(f"{spec!r}: ports are 1-65535 (a local port of 0 picks a free one)")
    return local_port, host, remote_port


def check_forward(config: ClientConfig, instance_id: str, host: str, port: int, timeout: float = 10.0) -> None:
    """Asks the broker whether this forward would be allowed (permission, scope, destination,
    the instance online); raises its refusal. Opens nothing."""
    link = Link(config, timeout=timeout)
    try:
        loop = Loop(link)
        for _ in range(2):
            answer: list[Any] = []
            link.call(protocol.OpenSession(instance_id=instance_id, kind="tcp", host=host, port=port, dry_run=True),
                      lambda rid, reply, error: answer.append(error or reply), timeout)
            while not answer:
                loop.run_once()
            outcome = answer[0]
            if isinstance(outcome, ZerorunError):
                raise outcome
            if outcome.ok:
                return
            err = outcome.error or protocol.ErrorInfo("Error", "refused")
            data = outcome.data if isinstance(outcome.data, dict) else {}
            endpoint = str(data.get("endpoint", ""))
            if err.code == "WrongBroker" and endpoint in config.endpoints and endpoint != link.endpoint:
                link.move_to(endpoint)
                loop.relink()
                continue
            raise RequestFailed(err.message, err.code)
    finally:
        link.close()


def run_forward(config: ClientConfig, instance_id: str, local_port: int, host: str, remote_port: int,
                timeout: float = 10.0, err: Any = None, on_listening: Callable[[int], None] | None = None,
                bind: str = "127.0.0.1") -> int:
    """Listens on ``bind:local_port`` and carries every connection to ``host:remote_port`` as
    reached from the instance, each in its own session. Runs until interrupted."""
    err = err or sys.stderr
    check_forward(config, instance_id, host, remote_port, timeout)
    listener = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((bind, local_port))
    except OSError as exc:
        listener.close()
        raise RequestFailed(f"cannot listen on {bind}:{local_port}: {exc.strerror or exc}", "BadRequest") from None
    listener.listen(128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    target = f"{host}:{remote_port}" if host else str(remote_port)
    print(f"Forwarding {bind}:{port} -> {instance_id}:{target} (Ctrl-C to stop)", file=err, flush=True)
    if on_listening is not None:
        on_listening(port)
    link = Link(config, timeout=timeout)
    loop = Loop(link)
    splices: set[Splice] = set()
    told: set[str] = set()

    def say_once(text: str) -> None:
        if text not in told:
            told.add(text)
            print(f"zerorun forward: {text}", file=err, flush=True)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start(conn)

    def start(conn: socket.socket) -> None:
        channel = Channel(link, lambda s, d: None, lambda c: None)

        def done(splice: Splice) -> None:
            splices.discard(splice)
            if splice.channel.error:
                say_once(splice.channel.error)
            conn.close()

        splice = Splice(loop, channel, conn.fileno(), conn.fileno(), conn, done)

        def opened(error: ZerorunError | None) -> None:
            if error is not None:
                say_once(f"{error.code}: {error}")
                conn.close()
                return
            splices.add(splice)
            splice.start()

        channel.open(protocol.OpenSession(instance_id=instance_id, kind="tcp", host=host, port=remote_port), opened)

    loop.reading(listener.fileno(), accept)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            loop.run_once()
            if link.lost:
                print(f"zerorun: SessionLost: {link.lost}", file=err)
                return 3
    except KeyboardInterrupt:
        for splice in list(splices):
            splice.channel.close()
        _settle(loop, time.monotonic() + 1.0, lambda: not splices or bool(link.lost))
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.close()
        for splice in splices:
            if splice.sock is not None:
                splice.sock.close()
        link.close()


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt()


def run_proxy(config: ClientConfig, instance_id: str, port: int, host: str = "", timeout: float = 10.0,
              err: Any = None, stdin: int = 0, stdout: int = 1) -> int:
    """stdin and stdout joined to ``host:port`` as reached from the instance (SSH's ProxyCommand)."""
    err = err or sys.stderr
    link = Link(config, timeout=timeout)
    loop = Loop(link)
    restore: list[tuple[int, bool]] = []
    for fd in (stdin, stdout):
        if not os.isatty(fd):
            restore.append((fd, os.get_blocking(fd)))
            os.set_blocking(fd, False)
    finished: list[Splice] = []
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGHUP, signal.SIGTERM)}
    try:
        try:
            channel = open_channel(link, loop, protocol.OpenSession(instance_id=instance_id, kind="tcp",
                                                                    host=host, port=port),
                                   lambda s, d: None, lambda c: None)
        except ZerorunError as exc:
            print(f"zerorun proxy: {exc.code}: {exc}", file=err)
            return EXIT_FAILURE
        splice = Splice(loop, channel, stdin, stdout, None, finished.append)
        splice.start()
        try:
            while not finished:
                loop.run_once()
        except KeyboardInterrupt:  # ssh hangs its proxy up when it is done with it: close cleanly
            channel.close()
            _settle(loop, time.monotonic() + 1.0, lambda: channel.state == "ended")
            return 0
        if channel.error:
            print(f"zerorun proxy: {'SessionLost: ' if channel.lost else ''}{channel.error}", file=err)
            return EXIT_FAILURE
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for fd, blocking in restore:
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
        link.close()


# -- a command with a terminal, for the connection plugin's become ----------------------------------


class TerminalExec:
    """``/bin/sh -c command`` on the instance with pipes for stdin, stdout and stderr and a
    pseudo-terminal as its controlling terminal (stdin too with ``stdin_tty``), driven step by
    step: ``read()`` returns output as it comes ((stream, bytes): "" stdout, "stderr", "tty"),
    ``send()`` writes to stdin ("") or the terminal ("tty")."""

    def __init__(self, config: ClientConfig, instance_id: str, command: str, *, stdin_tty: bool = False,
                 env: dict[str, str] | None = None, timeout: float = 10.0, context: zmq.Context | None = None):
        self.link = Link(config, timeout=timeout, context=context)
        self.loop = Loop(self.link)
        self._events: deque[tuple[str, bytes]] = deque()
        self._ended: list[Channel] = []
        self.request = protocol.OpenSession(instance_id=instance_id, kind="exec", command=command,
                                            stdin_tty=stdin_tty, env=dict(env or {}))
        self.channel: Channel | None = None

    def start(self) -> None:
        self.channel = open_channel(self.link, self.loop, self.request,
                                    lambda stream, data: self._events.append((stream, data)), self._ended.append)

    @property
    def ended(self) -> bool:
        return bool(self._ended)

    @property
    def exit_code(self) -> int:
        return self.channel.exit_code if self.channel is not None else -1

    @property
    def error(self) -> str:
        return self.channel.error if self.channel is not None else ""

    def read(self, timeout: float) -> list[tuple[str, bytes]]:
        """Output that came within ``timeout`` seconds (returns at the first), [] at the end."""
        deadline = time.monotonic() + timeout
        while not self._events and not self._ended and time.monotonic() < deadline:
            self.loop.run_once(max(0.0, deadline - time.monotonic()))
        return self._take()

    def _take(self) -> list[tuple[str, bytes]]:
        out = list(self._events)
        self._events.clear()
        if out and self.channel is not None and not self._ended:  # read by the caller: room for more
            self.channel.consumed(sum(len(data) for _, data in out))
        return out

    def send(self, data: bytes, stream: str = "", eof: bool = False) -> None:
        assert self.channel is not None
        view = memoryview(data)
        while view and not self._ended:
            credit = self.channel.credit()
            if credit <= 0:
                self.loop.run_once(1.0)
                continue
            self.channel.write(bytes(view[:credit]), stream)
            view = view[credit:]
        if eof and not self._ended:
            self.channel.eof(stream)

    def wait(self, timeout: float | None = None) -> list[tuple[str, bytes]]:
        """Everything until the end (or the timeout: then SessionLost)."""
        out: list[tuple[str, bytes]] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ended:
            if deadline is not None and time.monotonic() >= deadline:
                raise SessionLost(f"the command did not finish within {timeout:g}s")
            out += self.read(1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic())))
        return out + self._take()

    def close(self) -> None:
        if self.channel is not None and not self._ended:
            self.channel.close()
            _settle(self.loop, time.monotonic() + 2.0, lambda: bool(self._ended))
        self.link.close()
