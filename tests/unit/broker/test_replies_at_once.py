"""Replies that wait for no commit. A broker cut off from its store commits nothing, and sends
nothing whose truth a commit makes, until the store is back; a read it could not make is answered
StoreUnavailable at once (``Transport.reply(at_once=True)``, ``BrokerContext.respond``), so that a
client of several brokers asks another. Only requests that change nothing qualify. And replies
taken back before the commit (``Transport.withdraw``)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import zmq

from zerorun import protocol
from zmq_broker.config import BrokerConfig
from zmq_broker.handlers import CLIENT_OPERATIONS
from zmq_broker.transport import Transport
from zmq_broker.warning_throttle import WarningThrottle


def test_requests_answered_at_once_are_reads():
    """What a client repeats elsewhere, and a broker answers without its commit, changes nothing:
    every such request needs only the read permission (a send, a cancel, a key action never)."""
    assert protocol.SAFE_TO_REPEAT
    for kind in protocol.SAFE_TO_REPEAT:
        assert CLIENT_OPERATIONS[kind][1] == "read", kind
    assert not isinstance(protocol.SendCommand(document="x", targets=["instance:i"]), protocol.SAFE_TO_REPEAT)


@pytest.fixture
def transport_and_client():
    config = BrokerConfig(agent_bind="tcp://127.0.0.1:*", client_bind="tcp://127.0.0.1:*", insecure=True)
    transport = Transport(config, b"", Counter(), WarningThrottle())
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.connect(transport.client_endpoint)
    yield transport, client
    client.close(0)
    ctx.term()
    transport.close()


def _routing_id(transport: Transport, client: zmq.Socket) -> bytes:
    client.send_multipart([protocol.HEADER, b"hello"])
    received: list[list[zmq.Frame]] = []
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        transport.drain(transport.clients, received.append)
        time.sleep(0.005)
    return received[0][0].bytes


def _replies(client: zmq.Socket) -> list[int]:
    rids = []
    while client.poll(300):
        rids.append(protocol.reply_decoder.decode(client.recv_multipart()[-1]).rid)
    return rids


def test_a_reply_at_once_leaves_while_the_others_wait_for_the_commit(transport_and_client):
    transport, client = transport_and_client
    routing_id = _routing_id(transport, client)
    error = protocol.ErrorInfo("StoreUnavailable", "away")
    transport.reply(routing_id, protocol.Reply(1, True, data="committed state"))
    transport.reply(routing_id, protocol.Reply(2, False, error=error), at_once=True)
    assert transport.queued
    transport.send_at_once()  # the commit failed: only the failed read goes
    assert _replies(client) == [2]
    assert transport.queued
    transport.reply(routing_id, protocol.Reply(3, False, error=error), at_once=True)
    transport.send_queued()  # the commit is made: everything goes, the reply at once first
    assert _replies(client) == [3, 1]
    assert not transport.queued


def test_an_answer_taken_back_before_the_commit_is_not_sent(transport_and_client):
    """A waiter's answer from a command this broker lost before its commit (``withdraw``): the
    other replies go, in their order; what was withdrawn is handed back to wait again."""
    transport, client = transport_and_client
    routing_id = _routing_id(transport, client)
    transport.reply(routing_id, protocol.Reply(1, True, data="kept"), about="cmd-a")
    transport.reply(routing_id, protocol.Reply(2, True, data="lost"), about="cmd-b")
    transport.reply(routing_id, protocol.Reply(3, True, data="no waiter"))
    assert transport.withdraw(lambda about: about == "cmd-b") == ["cmd-b"]
    assert transport.withdraw(lambda about: about == "cmd-b") == []
    transport.send_queued()
    assert _replies(client) == [1, 3]
    transport.reply(routing_id, protocol.Reply(4, True, data="later"), about="cmd-a")
    assert transport.withdraw(lambda about: about == "cmd-a") == ["cmd-a"]  # not the one already sent
    assert not transport.queued
