"""An agent's DEALER socket driven by hand, for tests of what a broker does with what an agent
says (or leaves unsaid): it connects with an agent's CURVE keys and says only what the test
makes it say."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from zerorun import keys, protocol
from zerorun.zmqutil import monitor_socket


def connect(ctx: zmq.Context, runtime: dict, key_dir: Path, routing_id: bytes | None = None,
            reconnect: bool = True) -> zmq.Socket:
    """A socket to the agent endpoint of the broker whose ``runtime`` this is, with the agent keys
    in ``key_dir`` (``agent.key_secret``); ``reconnect=False``: one connection, never made again."""
    return _socket(ctx, runtime, key_dir, routing_id, reconnect)


def connect_watched(ctx: zmq.Context, runtime: dict, key_dir: Path) -> tuple[zmq.Socket, zmq.Socket]:
    """One connection (never made again) and a monitor of it (``zerorun.zmqutil.monitor_socket``),
    started before it connects: its handshake and its end (``close_monitor`` it after)."""
    return _socket(ctx, runtime, key_dir, None, False, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)


def _socket(ctx: zmq.Context, runtime: dict, key_dir: Path, routing_id: bytes | None, reconnect: bool,
            events: int = 0):
    public, secret = keys.load_secret(key_dir / "agent.key_secret")
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if not reconnect:
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.curve_serverkey = runtime["broker_public_key"].encode()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    monitor = monitor_socket(sock, events) if events else None
    sock.connect(runtime["agent_endpoint"])
    return sock if monitor is None else (sock, monitor)


def receive(sock: zmq.Socket, timeout: float, until: type | None = None) -> list:
    """What the broker sends within ``timeout`` (or until a message of type ``until`` came)."""
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        if sock.poll(100):
            out.append(protocol.broker_to_agent_decoder.decode(sock.recv_multipart()[1]))
            if until is not None and isinstance(out[-1], until):
                break
    return out


def hello(sock: zmq.Socket, instance_id: str = "raw-1", timeout: float = 5, **fields) -> None:
    """Says HELLO as ``instance_id`` and waits for the broker's Welcome."""
    sock.send_multipart(protocol.frames(protocol.Hello(instance_id=instance_id, **fields)))
    assert any(isinstance(m, protocol.Welcome) for m in receive(sock, timeout, until=protocol.Welcome))
