"""``send_unbroken``: a signal whose handler raises (ssh hanging up its ProxyCommand: SIGHUP) must
not cut a message between its frames. With ``send_multipart`` the first frame stays queued and
the next message is glued to it: the broker received a message of the wrong shape, dropped it and
the one after it, and ended the session "out of sequence" (seen in CI, test_sessions.py)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest
import zmq

from zerorun.session import send_unbroken


class _HungUpMidMessage(zmq.Socket):
    """A DEALER that is sent SIGHUP (to this thread, as ssh's hang-up reaches a proxy whose other
    threads are libzmq's, which block every signal) right after the first frame of a message."""

    armed = False

    def send(self, data: Any, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
        result = super().send(data, flags, *args, **kwargs)
        if self.armed and flags & zmq.SNDMORE:
            self.armed = False
            signal.pthread_kill(threading.get_ident(), signal.SIGHUP)
        return result


def _hang_up(*_: Any) -> None:
    raise KeyboardInterrupt()


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://send-unbroken")
    dealer = ctx.socket(zmq.DEALER, socket_class=_HungUpMidMessage)
    dealer.connect("inproc://send-unbroken")
    previous = signal.signal(signal.SIGHUP, _hang_up)
    try:
        yield router, dealer
    finally:
        signal.signal(signal.SIGHUP, previous)
        router.close(0)
        dealer.close(0)
        ctx.term()


def _received(router: zmq.Socket) -> list[list[bytes]]:
    out = []
    while router.poll(500):
        out.append(router.recv_multipart()[1:])  # without the routing id
    return out


def test_a_hang_up_waits_until_the_message_is_whole(sockets):
    router, dealer = sockets
    dealer.armed = True
    with pytest.raises(KeyboardInterrupt):  # raised after the send, not in the middle of it
        send_unbroken(dealer, [b"header", b"data"])
    send_unbroken(dealer, [b"header", b"close"])  # what the proxy sends next: the channel's close
    assert _received(router) == [[b"header", b"data"], [b"header", b"close"]]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGHUP} == set()  # unblocked again


def test_send_multipart_cut_by_the_same_hang_up_glues_the_next_message_to_it(sockets):
    """What ``send_unbroken`` prevents, shown with the plain call."""
    router, dealer = sockets
    dealer.armed = True
    with pytest.raises(KeyboardInterrupt):
        dealer.send_multipart([b"header", b"data"])
    dealer.send_multipart([b"header", b"close"])
    assert _received(router) == [[b"header", b"header", b"close"]]
