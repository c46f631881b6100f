"""Small ZeroMQ helpers shared by the agent and the client."""

from __future__ import annotations

import itertools
import os
import select
import struct
import threading
import weakref

import zmq

_monitors = itertools.count()
_readers: dict[int, tuple[zmq.Socket, "weakref.ref[zmq.Socket]", int]] = {}  # reader, monitored, pid
_readers_lock = threading.Lock()
MONITOR_STOPPED = int(zmq.EVENT_MONITOR_STOPPED)


def _new_lock_after_fork() -> None:
    """A child forked while another thread held the lock must not wait for it forever."""
    global _readers_lock
    _readers_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """An event monitor of ``sock`` that can never stop the process's ZeroMQ I/O thread (use it
    instead of pyzmq's ``get_monitor_socket``, and ``close_monitor`` to end it).

    libzmq sends monitor events from its I/O thread with a blocking send, so that thread stops,
    and with it every socket of the context, when the monitor's reading end is full (a thousand
    unread events: a client idle while its broker is down hears of a reconnection ten times a
    second) or gone (closed, or freed by the garbage collector, while the monitored socket still
    reconnects). Closing the socket then blocks for good, with the GIL held. So the reading end
    has no high-water mark, and it stays open until libzmq has stopped the monitor: at once in
    ``close_monitor``; for a socket that was dropped without it, when the reading end has been
    told ``MONITOR_STOPPED`` (checked whenever another monitor is made).
    """
    address = f"inproc://zerorun-monitor-{next(_monitors)}-{id(sock):x}"
    sock.monitor(address, events | MONITOR_STOPPED)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.linger = 0
    monitor.setsockopt(zmq.RCVHWM, 0)
    monitor.connect(address)
    with _readers_lock:
        _close_stopped_readers()
        _readers[id(monitor)] = (monitor, weakref.ref(sock), os.getpid())
    return monitor


def close_monitor(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stops ``sock``'s monitor, then closes its reading end (never the other way round)."""
    with _readers_lock:
        if sock.closed:  # libzmq stops the monitor when it frees the socket: the reading end waits
            return
        try:
            sock.disable_monitor()  # synchronous: no event is sent after it
        except zmq.ZMQError:
            return
        _readers.pop(id(monitor), None)
        monitor.close(0)


def connect_monitored(sock: zmq.Socket, monitor: zmq.Socket, endpoint: str) -> None:
    """Connects a monitored socket; when that fails, its monitor ends first (a reading end left
    registered would keep a later ``Context.term()`` waiting for it)."""
    try:
        sock.connect(endpoint)
    except BaseException:
        close_monitor(sock, monitor)
        raise


def _close_stopped_readers() -> None:
    """Closes the reading ends of monitored sockets that are gone, once libzmq said it stopped."""
    pid = os.getpid()
    for key, (reader, monitored, owner) in list(_readers.items()):
        if owner != pid:  # a forked child's copy: the parent's sockets are not ours to touch
            del _readers[key]
            continue
        sock = monitored()
        if sock is not None and not sock.closed:
            continue
        if any(event == MONITOR_STOPPED for event, _ in drain_monitor(reader)):
            del _readers[key]
            reader.close(0)


def recv_monitor_event(monitor: zmq.Socket) -> int:
    """The event number of one socket-monitor message.

    Decoded by hand: ``zmq.utils.monitor`` imports ``zmq.asyncio`` and so all of asyncio, about
    6 MB of resident memory in a process that never uses it.
    """
    return recv_monitor_message(monitor)[0]


def recv_monitor_message(monitor: zmq.Socket) -> tuple[int, str]:
    """A socket-monitor message's event number and endpoint (as libzmq names it: an address, for
    a connection to a host name)."""
    frames = monitor.recv_multipart()
    event, _value = struct.unpack("=hi", frames[0][:6])
    return event, frames[1].decode(errors="replace") if len(frames) > 1 else ""


# Plain ints: pyzmq's constants are IntFlag members, and each ``&`` or ``|`` on them is a Python
# call. Loops that check a socket before every receive use these.
EVENTS, POLLIN, NOBLOCK, SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.SNDMORE)
# pyzmq's Socket.send under its Python wrapper (which only handles the draft sockets' routing ids
# and groups): 0.22 us per small frame against 0.41-0.50 (bench/README.md, round sixteen).
_send = zmq.backend.Socket.send if issubclass(zmq.Socket, zmq.backend.Socket) else zmq.Socket.send


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits: cheaper than a receive that raises zmq.Again."""
    return bool(sock.getsockopt(EVENTS) & POLLIN)


def receive(sock: zmq.Socket) -> list[zmq.Frame]:
    """``recv_multipart(NOBLOCK, copy=False)`` at half its cost (pyzmq's does flag arithmetic and
    an option read per frame); raises zmq.Again when nothing waits."""
    frame = sock.recv(NOBLOCK, copy=False)
    parts = [frame]
    while frame.more:
        frame = sock.recv(0, copy=False)
        parts.append(frame)
    return parts


def send_routed(sock: zmq.Socket, routing_id: bytes, header: bytes, body: bytes) -> None:
    """``send_multipart([routing_id, header, body], NOBLOCK)`` at a third of its cost. Atomic as
    that is: once a message's first frame is queued, ZeroMQ queues all of it."""
    _send(sock, routing_id, NOBLOCK | SNDMORE)
    _send(sock, header, NOBLOCK | SNDMORE)
    _send(sock, body, NOBLOCK)


class QuietSockets:
    """Which of a few rarely busy sockets may have a message: one ``poll(2)`` of their ZMQ_FDs
    (0.4 us) instead of a ZMQ_EVENTS read of each (1.2 us: an option lookup in pyzmq and libzmq's
    command processing), for a loop that looks at them every iteration. The ZMQ_FD is an
    edge-style notification, cleared by any ZMQ_EVENTS read or receive: it tells of what arrived
    after a reader last found the socket empty. So a socket counts as waiting until its reader
    says it drained it to EAGAIN (``drained``)."""

    def __init__(self, *socks: zmq.Socket):
        self._poll = select.poll()
        self._fds = [sock.getsockopt(zmq.FD) for sock in socks]
        for fd in self._fds:
            self._poll.register(fd, select.POLLIN)
        self._unsure = [True] * len(socks)  # not read since the start: anything may wait

    def waiting(self) -> list[bool]:
        """For each socket, in order: whether a message may wait."""
        ready = {fd for fd, _ in self._poll.poll(0)}
        return [unsure or fd in ready for unsure, fd in zip(self._unsure, self._fds)]

    def drained(self, index: int, empty: bool) -> None:
        """The reader of socket ``index`` stopped: at EAGAIN (``empty``), or before (a batch's end)."""
        self._unsure[index] = not empty


def send_message(sock: zmq.Socket, header: bytes, body: bytes) -> None:
    """``send_multipart([header, body], NOBLOCK)`` (a DEALER's message) at a third of its cost."""
    _send(sock, header, NOBLOCK | SNDMORE)
    _send(sock, body, NOBLOCK)


def drain_monitor(monitor: zmq.Socket) -> list[tuple[int, int]]:
    """Every (event, value) waiting on a monitor socket, without blocking. For connection events
    the value is the connection's file descriptor."""
    out = []
    while readable(monitor):
        try:
            frames = monitor.recv_multipart(NOBLOCK)
        except zmq.Again:
            return out
        out.append(struct.unpack("=hi", frames[0][:6]))
    return out
