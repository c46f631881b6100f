"""``Transport.readable``: after an iteration that sent, the broker loop asks both sockets whether
a message waits instead of making another whole pass, because a send can take the edge of a
socket's ZMQ_FD (a request that arrived meanwhile would then wait for the next wake-up). The
answer must see every waiting message, on either socket, also one that came while a reply left."""

from __future__ import annotations

import select
import time
from collections import Counter

import pytest
import zmq

from zerorun.protocol import HEADER
from zmq_broker.config import BrokerConfig
from zmq_broker.transport import Transport
from zmq_broker.warning_throttle import WarningThrottle


@pytest.fixture
def peers():
    """A broker transport (no CURVE, ports of its own) and a client and an agent connected to it."""
    config = BrokerConfig(agent_bind="tcp://127.0.0.1:*", client_bind="tcp://127.0.0.1:*", insecure=True)
    transport = Transport(config, b"", Counter(), WarningThrottle())
    ctx = zmq.Context()
    client, agent = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    client.connect(transport.client_endpoint)
    agent.connect(transport.agent_endpoint)
    yield transport, client, agent
    client.close(0)
    agent.close(0)
    ctx.term()
    transport.close()


def _readable_soon(transport: Transport) -> bool:
    """The message crosses ZeroMQ's I/O thread: give it a moment, never a wrong answer."""
    deadline = time.monotonic() + 5.0
    while not transport.readable() and time.monotonic() < deadline:
        time.sleep(0.005)
    return transport.readable()


def test_a_waiting_message_is_seen_on_either_socket_also_after_a_reply(peers):
    transport, client, agent = peers
    assert not transport.readable()

    client.send_multipart([HEADER, b"first"])
    assert _readable_soon(transport)
    received: list[list[zmq.Frame]] = []
    assert transport.drain(transport.clients, received.append) == 1
    assert not transport.readable()

    client.send_multipart([HEADER, b"second"])
    time.sleep(0.2)  # so that it arrives before the reply to the first leaves (not a condition)
    transport.reply(received[0][0].bytes, {"rid": 0})
    transport.send_queued()
    assert _readable_soon(transport)
    assert transport.drain(transport.clients, received.append) == 1
    assert [parts[-1].bytes for parts in received] == [b"first", b"second"]
    assert client.recv_multipart()[0] == HEADER
    assert not transport.readable()

    agent.send_multipart([HEADER, b"heartbeat"])
    assert _readable_soon(transport)
    assert transport.drain(transport.agents, received.append) == 1
    assert not transport.readable()


def test_a_burst_is_drained_whole_in_order_and_the_next_message_wakes_the_loop(peers):
    """After a drain that found a burst, the next one receives until zmq.Again instead of asking
    before each message: every message still arrives once and in order, the batch still bounds a
    drain, and a message that comes after a drain ended that way still makes the socket's ZMQ_FD
    readable (what the loop's ``poll`` waits on)."""
    transport, client, _ = peers
    waker = select.poll()
    waker.register(transport.clients.getsockopt(zmq.FD), select.POLLIN)
    for n in range(10):
        client.send_multipart([HEADER, b"%d" % n])
    received: list[list[zmq.Frame]] = []
    deadline = time.monotonic() + 5.0
    counts = []
    while len(received) < 10 and time.monotonic() < deadline:
        counts.append(transport.drain(transport.clients, received.append, batch=4))
        if not counts[-1]:
            time.sleep(0.005)
    assert [parts[-1].bytes for parts in received] == [b"%d" % n for n in range(10)]
    assert max(counts) == 4
    transport._bursts.add(transport.clients)  # whatever the arrivals were: the next drain receives until zmq.Again
    assert transport.drain(transport.clients, received.append, batch=4) == 0
    assert transport.clients not in transport._bursts  # none found: asked before each receive again
    assert not waker.poll(0)  # that drain took the edge: only a new message makes the FD readable

    client.send_multipart([HEADER, b"late"])
    assert waker.poll(5000), "a message after the drain did not wake the loop's poll"
    assert _readable_soon(transport)
    assert transport.drain(transport.clients, received.append) == 1
    assert received[-1][-1].bytes == b"late"
