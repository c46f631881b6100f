"""Which agent connections the broker cuts: a key's earlier one, one that said no HELLO in time."""

from __future__ import annotations

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
