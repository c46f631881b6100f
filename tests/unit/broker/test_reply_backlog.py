"""The bound on reply bytes a client key leaves unread (zmq_broker/client_connections.py), with the
kernel's count given by the test; and the real probe on a real TCP connection."""

from __future__ import annotations

import socket

from zmq_broker.client_connections import ClientConnections, tcp_peer_and_acked


class Kernel:
    """What TCP_INFO would say: per descriptor, (peer, bytes acknowledged); missing: closed."""

    def __init__(self) -> None:
        self.conns: dict[int, tuple[object, int]] = {}
        self.asked = 0

    def __call__(self, fd: int):
        self.asked += 1
        return self.conns.get(fd)


def request(book: ClientConnections, routing_id: bytes, fd: int, key: str | None) -> int:
    """A request on ``fd``: 0 if it may be answered, else the bytes its key left unread."""
    assert book.spoke(fd, routing_id, key, 0.0) == 0
    return book.unread_beyond(fd)


def test_a_key_is_refused_past_the_bound_and_answered_once_its_peer_acknowledged():
    kernel = Kernel()
    kernel.conns[7] = (("10.0.0.1", 5000), 300)  # 300: the handshake, before counting began
    backlog = ClientConnections(1024, unread_limit=1000, probe=kernel)
    assert request(backlog, b"r1", 7, "K") == 0
    backlog.replied(b"r1", 900)
    asked = kernel.asked
    assert request(backlog, b"r1", 7, "K") == 0
    assert kernel.asked == asked, "within the bound by its own count: the kernel is not asked"
    backlog.replied(b"r1", 900)
    assert request(backlog, b"r1", 7, "K") == 1800  # nothing acknowledged: refused
    assert backlog.unread() == {"K": 1800}
    kernel.conns[7] = (("10.0.0.1", 5000), 300 + 1500)
    assert request(backlog, b"r1", 7, "K") == 0  # it read: answered again


def test_the_bound_is_the_keys_over_all_its_connections():
    kernel = Kernel()
    kernel.conns.update({7: ("a", 0), 8: ("b", 0), 9: ("c", 0)})
    backlog = ClientConnections(1024, unread_limit=1000, probe=kernel)
    request(backlog, b"r1", 7, "K")
    request(backlog, b"r2", 8, "K")
    request(backlog, b"r3", 9, "other")
    backlog.replied(b"r1", 600)
    backlog.replied(b"r2", 600)
    backlog.replied(b"r3", 600)
    assert request(backlog, b"r2", 8, "K") == 1200
    assert request(backlog, b"r3", 9, "other") == 0


def test_a_closed_or_reused_descriptor_no_longer_counts():
    kernel = Kernel()
    kernel.conns.update({7: ("a", 0), 8: ("b", 0)})
    backlog = ClientConnections(1024, unread_limit=1000, probe=kernel)
    request(backlog, b"r1", 7, "K")
    backlog.replied(b"r1", 5000)
    request(backlog, b"r2", 8, "K")
    del kernel.conns[7]  # closed with 5000 unread: libzmq freed them with it
    assert request(backlog, b"r2", 8, "K") == 0
    # descriptor 8 now another connection (another peer): its predecessor's count is not its own
    backlog.replied(b"r2", 5000)
    kernel.conns[8] = ("c", 10)
    assert request(backlog, b"r2", 8, "K") == 0
    # a new connection on a descriptor (a new routing id) starts from nothing, whoever it is
    backlog.replied(b"r2", 5000)
    kernel.conns[8] = ("d", 0)
    assert request(backlog, b"r4", 8, "other") == 0
    assert request(backlog, b"r4", 8, "other") == 0
    assert "K" not in backlog.unread()


def test_a_connection_the_monitor_reported_closed_no_longer_counts():
    kernel = Kernel()
    kernel.conns.update({7: ("a", 0), 8: ("b", 0)})
    book = ClientConnections(1024, unread_limit=1000, probe=kernel)
    request(book, b"r1", 7, "K")
    request(book, b"r2", 8, "K")
    book.replied(b"r1", 5000)
    book.closed(7)  # what it held went with it
    asked = kernel.asked
    assert request(book, b"r2", 8, "K") == 0
    assert kernel.asked == asked, "within the bound by the broker's own count"
    book.replied(b"r1", 5000)  # a reply queued for it before its close was read: counted against nothing
    assert book.unread() == {}


def test_connections_of_an_insecure_broker_that_asked_are_not_silent():
    book = ClientConnections(2, unread_limit=1000, probe=lambda fd: None)
    book.accepted(5)
    assert request(book, b"r5", 5, None) == 0
    book.accepted(6)
    book.accepted(7)
    assert book.take_cuts() == []
    book.accepted(8)
    assert book.take_cuts() == [6], "5 asked: only the silent ones are cut, oldest first"


def test_replies_taken_back_and_uncounted_connections_hold_nothing():
    backlog = ClientConnections(1024, unread_limit=1000, probe=lambda fd: None)  # ipc://: no TCP_INFO
    request(backlog, b"r1", 7, None)
    backlog.replied(b"r1", 5000)
    assert request(backlog, b"r1", 7, None) == 0
    kernel = Kernel()
    kernel.conns[3] = ("a", 0)
    backlog = ClientConnections(1024, unread_limit=1000, probe=kernel)
    request(backlog, b"r1", 3, "K")
    backlog.replied(b"r1", 5000)
    backlog.replied(b"r1", -5000)  # withdrawn before it was sent
    assert request(backlog, b"r1", 3, "K") == 0
    backlog.replied(b"unknown", 5000)  # a routing id never seen asking: nothing to count it against
    assert request(backlog, b"r1", -1, "K") == 0  # no descriptor known: not counted


def test_the_kernel_says_what_a_tcp_peer_acknowledged():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        peer, acked = tcp_peer_and_acked(accepted.fileno())
        assert peer == client.getsockname() and acked >= 0
        accepted.sendall(b"x" * 10_000)
        assert client.recv(10_000, socket.MSG_WAITALL) == b"x" * 10_000
        assert tcp_peer_and_acked(accepted.fileno())[1] >= acked + 10_000
        assert accepted.fileno() >= 0, "the descriptor stays its owner's"
        left, right = socket.socketpair()
        try:
            assert tcp_peer_and_acked(left.fileno()) is None
        finally:
            left.close()
            right.close()
        assert tcp_peer_and_acked(10_000) is None  # not open
    finally:
        for s in (accepted, client, server):
            s.close()
