"""The long polls a client holds are counted as they are added and taken, whichever way they go."""

from __future__ import annotations

from zerorun import protocol
from zmq_broker import waiters as waiters_module
from zmq_broker.waiters import Waiter, Waiters


def test_each_client_has_room_for_a_bounded_number_and_gets_it_back_as_they_are_answered(monkeypatch):
    monkeypatch.setattr(waiters_module, "MAX_PER_CLIENT", 3)
    waiters = Waiters()
    follow = protocol.FollowOutput(command_id="c2")
    for command_id, deadline, follows in (("c1", 10.0, None), ("c2", 10.0, follow), ("c3", 1.0, None)):
        assert waiters.room_for(b"conn-a", "key-a")
        waiters.add(Waiter(b"conn-a", 1, command_id, deadline, "key-a", follow=follows))
    assert not waiters.room_for(b"conn-b", "key-a"), "the bound is the key's, whatever its connection"
    assert waiters.room_for(b"conn-b", "key-b") and waiters.room_for(b"conn-c", None)
    waiters.add(Waiter(b"conn-c", 1, "c1", 10.0, None))  # a client without a key: its connection
    assert [w.command_id for w in waiters.take_expired(5.0)] == ["c3"]
    assert waiters.room_for(b"conn-a", "key-a")
    waiters.add(Waiter(b"conn-a", 2, "c3", 10.0, "key-a"))
    assert [w.command_id for w in waiters.take_followers({"c2"})] == ["c2"]
    assert [w.rid for w in waiters.take_completed("c1")] == [1, 1]
    assert waiters.room_for(b"conn-a", "key-a") and waiters._held == {"key-a": 1}
    waiters.take_completed("c3")
    assert not waiters and waiters._held == {}
