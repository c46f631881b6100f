"""Small ZeroMQ helpers shared by the agent and the client."""

from __future__ import annotations

import itertools
import struct

import zmq

_monitors = itertools.count()


def monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """An event monitor of ``sock`` whose queue never fills (use it instead of pyzmq's
    ``get_monitor_socket``).

    libzmq sends monitor events from its I/O thread with a blocking send. Once a thousand wait
    unread (a client idle while its broker is down is told of a reconnection ten times a second),
    that thread stops, and with it every socket of the context; closing the socket then blocks
    for good, holding the GIL. A receiving end without a high-water mark makes the inproc pipe
    unbounded; a client that backs off its reconnections keeps what waits small.
    """
    address = f"inproc://zerorun-monitor-{next(_monitors)}-{id(sock):x}"
    sock.monitor(address, events)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.linger = 0
    monitor.setsockopt(zmq.RCVHWM, 0)
    monitor.connect(address)
    sock._monitor_socket = monitor  # as pyzmq's own: disable_monitor() forgets it
    return monitor


def recv_monitor_event(monitor: zmq.Socket) -> int:
    """The event number of one socket-monitor message.

    Decoded by hand: ``zmq.utils.monitor`` imports ``zmq.asyncio`` and so all of asyncio, about
    6 MB of resident memory in a process that never uses it.
    """
    frames = monitor.recv_multipart()
    event, _value = struct.unpack("=hi", frames[0][:6])
    return event


# Plain ints: pyzmq's constants are IntFlag members, and each ``&`` or ``|`` on them is a Python
# call. Loops that check a socket before every receive use these.
EVENTS, POLLIN, NOBLOCK, SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.SNDMORE)


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
    sock.send(routing_id, NOBLOCK | SNDMORE)
    sock.send(header, NOBLOCK | SNDMORE)
    sock.send(body, NOBLOCK)


def send_message(sock: zmq.Socket, header: bytes, body: bytes) -> None:
    """``send_multipart([header, body], NOBLOCK)`` (a DEALER's message) at a third of its cost."""
    sock.send(header, NOBLOCK | SNDMORE)
    sock.send(body, NOBLOCK)


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
