"""``QuietSockets``: the broker loop skips reading its ZAP socket and its agents' monitor unless
poll(2) says something arrived since they were last read empty. A message must never be missed:
one that arrives after a drain, one left behind by a drain that stopped at its batch, and one
that arrived before the first look."""

from __future__ import annotations

import time

import zmq

from zerorun.zmqutil import QuietSockets, readable


def _pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    reader, writer = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    reader.bind(f"inproc://{name}")
    writer.connect(f"inproc://{name}")
    return reader, writer


def _waiting_soon(quiet: QuietSockets, index: int, expected: bool) -> bool:
    """The signal crosses from the writer's thread; give it a moment, never a wrong answer."""
    deadline = time.monotonic() + 2.0
    while quiet.waiting()[index] != expected and time.monotonic() < deadline:
        time.sleep(0.005)
    return quiet.waiting()[index] == expected


def _drain(sock: zmq.Socket, batch: int = 1000) -> int:
    count = 0
    while count < batch and readable(sock):
        sock.recv(zmq.NOBLOCK)
        count += 1
    return count


def test_a_message_is_never_skipped():
    ctx = zmq.Context()
    a_reader, a_writer = _pair(ctx, "quiet-a")
    b_reader, b_writer = _pair(ctx, "quiet-b")
    try:
        a_writer.send(b"early")  # before the first look: the start counts as waiting
        quiet = QuietSockets(a_reader, b_reader)
        assert quiet.waiting() == [True, True]
        assert _drain(a_reader) == 1 and _drain(b_reader) == 0
        quiet.drained(0, True)
        quiet.drained(1, True)
        assert _waiting_soon(quiet, 0, False) and not quiet.waiting()[1]

        b_writer.send(b"later")  # after a drain to EAGAIN: the socket's descriptor says so
        assert _waiting_soon(quiet, 1, True) and not quiet.waiting()[0]
        assert _drain(b_reader) == 1
        quiet.drained(1, True)
        assert _waiting_soon(quiet, 1, False)

        for n in range(3):  # a drain that stops at its batch leaves messages whose edge it took
            a_writer.send(b"%d" % n)
        assert _waiting_soon(quiet, 0, True)
        assert _drain(a_reader, batch=1) == 1
        quiet.drained(0, False)
        time.sleep(0.05)
        assert quiet.waiting()[0]  # still waiting, though no new edge came
        assert _drain(a_reader) == 2
        quiet.drained(0, True)
        assert _waiting_soon(quiet, 0, False)
    finally:
        for sock in (a_reader, a_writer, b_reader, b_writer):
            sock.close(0)
        ctx.term()
