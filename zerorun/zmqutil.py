"""Small ZeroMQ helpers shared by the agent and the client."""

from __future__ import annotations

import struct

import zmq


def recv_monitor_event(monitor: zmq.Socket) -> int:
    """The event number of one socket-monitor message.

    Decoded by hand: ``zmq.utils.monitor`` imports ``zmq.asyncio`` and so all of asyncio, about
    6 MB of resident memory in a process that never uses it.
    """
    frames = monitor.recv_multipart()
    event, _value = struct.unpack("=hi", frames[0][:6])
    return event


def drain_monitor(monitor: zmq.Socket) -> list[tuple[int, int]]:
    """Every (event, value) waiting on a monitor socket, without blocking. For connection events
    the value is the connection's file descriptor."""
    out = []
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        out.append(struct.unpack("=hi", frames[0][:6]))
