"""Which agent connections the broker cuts: a key's earlier one, one that said no HELLO in time;
which client connections: a key's beyond its bound, the oldest silent ones beyond theirs."""

from __future__ import annotations

from zmq_broker.client_connections import ClientConnections
from zmq_broker.connections import ConnectionLimits


def test_a_hello_on_a_new_connection_cuts_the_keys_earlier_one_once():
    limits = ConnectionLimits(10.0)
    limits.hello("k", 7)
    limits.hello("k", 7)  # again on the same one: nothing to cut
    assert limits.take_cuts() == []
    limits.hello("k", 9)
    assert limits.take_cuts() == [7]
    limits.hello("other", 7)  # 7 was closed and its number taken: another key's now
    limits.hello("k", 11)
    assert limits.take_cuts() == [9]


def test_a_connection_that_closed_before_its_cut_is_not_cut():
    limits = ConnectionLimits(10.0)
    limits.hello("k", 7)
    limits.hello("k", 9)
    limits.closed(7)  # reported closed: its number may be a new connection's next
    limits.accepted(7, 0.0)
    assert limits.take_cuts() == []


def test_a_connection_that_says_no_hello_in_time_is_cut():
    limits = ConnectionLimits(10.0)
    limits.accepted(5, 0.0)
    limits.accepted(6, 0.0)
    limits.accepted(8, 5.0)
    limits.hello("k", 6)
    limits.closed(8)
    limits.overdue(9.0)
    assert limits.take_cuts() == []
    limits.overdue(10.5)
    assert limits.take_cuts() == [5]
    limits.overdue(100.0)
    assert limits.take_cuts() == []


def spoke(book: ClientConnections, fd: int, key: str, now: float, connection: int = 0) -> int:
    """A request of ``key`` on ``fd``; ``connection``: which of the connections that had that number."""
    return book.spoke(fd, f"{fd}/{connection}".encode(), key, now)


def test_a_client_key_past_its_bound_is_refused_on_its_newest_connection_then_cut():
    book = ClientConnections(2, unread_limit=1 << 30, probe=lambda fd: None)
    for fd in (5, 6):
        book.accepted(fd)
        assert spoke(book, fd, "k", 0.0) == 0
    book.accepted(7)
    assert spoke(book, 5, "k", 0.1) == 0  # again on one it holds: served
    assert spoke(book, 7, "k", 0.2) == 3  # the third: refused
    assert spoke(book, 7, "k", 0.3) == 3
    assert spoke(book, 8, "other", 0.3) == 0  # another key's are its own
    book.refused_due(0.5)
    assert book.take_cuts() == []  # the refusal has a second to leave
    book.refused_due(1.2)
    assert book.take_cuts() == [7]
    book.closed(7)
    book.accepted(7)  # a new connection on that number
    assert spoke(book, 7, "k", 2.0, connection=1) == 3  # the key still holds 5 and 6
    book.refused_due(3.0)
    assert book.take_cuts() == [7]
    book.closed(7)
    book.closed(5)
    book.accepted(9)
    assert spoke(book, 9, "k", 4.0) == 0  # one closed: room for another


def test_silent_client_connections_past_the_bound_are_cut_oldest_first():
    book = ClientConnections(2, unread_limit=1 << 30, probe=lambda fd: None)
    book.accepted(5)
    book.accepted(6)
    spoke(book, 6, "k", 0.0)  # it spoke: no longer silent
    book.accepted(7)
    assert book.take_cuts() == []
    book.accepted(8)
    assert book.take_cuts() == [5]
    spoke(book, 9, "k", 0.0)  # its request read before the monitor's report of it
    book.accepted(9)
    book.accepted(10)
    assert book.take_cuts() == [7], "9 spoke: it is not silent"


def test_a_client_connection_that_closed_before_its_cut_is_not_cut():
    book = ClientConnections(1, unread_limit=1 << 30, probe=lambda fd: None)
    book.accepted(5)
    book.accepted(6)
    book.closed(5)  # reported closed: its number may be a new connection's next
    assert book.take_cuts() == []
