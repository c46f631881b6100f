"""Clients long-polling a command: waiters (answered when it is terminal) and followers of its
live output (answered when it has new output). Both are answered at their deadline at the latest.

Only the bookkeeping lives here; what an answer contains is the request handlers' business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from zerorun import protocol

MAX_PER_CLIENT = 10_000
"""Long polls one client holds at once: Ansible's forks share one connection through the
multiplexer, and each waits for one command; a client that asks for more is refused, so that it
cannot hold the broker's memory (and each completion's scan) without bound."""


@dataclass
class Waiter:
    routing_id: bytes
    rid: int
    command_id: str
    deadline: float
    key: str | None = None  # the client key that asked
    include_output: bool = True
    follow: protocol.FollowOutput | None = None  # a follower of live output, not a waiter for the end
    instance_ids: list[str] | None = None  # only these invocations in the answer


class Waiters:
    def __init__(self) -> None:
        self._items: list[Waiter] = []
        self._held: dict[object, int] = {}  # long polls per client (its key, or its connection)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def room_for(self, routing_id: bytes, key: str | None) -> bool:
        return self._held.get(key or routing_id, 0) < MAX_PER_CLIENT

    def add(self, waiter: Waiter) -> None:
        self._items.append(waiter)
        client = waiter.key or waiter.routing_id
        self._held[client] = self._held.get(client, 0) + 1

    def _take(self, wanted: Callable[[Waiter], bool]) -> list[Waiter]:
        if not self._items:
            return []
        taken, keep = [], []
        for waiter in self._items:
            (taken if wanted(waiter) else keep).append(waiter)
        self._items = keep
        for waiter in taken:
            client = waiter.key or waiter.routing_id
            if (held := self._held[client] - 1):
                self._held[client] = held
            else:
                del self._held[client]
        return taken

    def all(self) -> list[Waiter]:
        return list(self._items)

    def take_completed(self, command_id: str) -> list[Waiter]:
        """Everyone waiting on or following a command that just completed."""
        return self._take(lambda w: w.command_id == command_id)

    def take_followers(self, command_ids: set[str]) -> list[Waiter]:
        """Followers of commands that have new output."""
        if not command_ids:
            return []
        return self._take(lambda w: w.follow is not None and w.command_id in command_ids)

    def take_expired(self, now: float) -> list[Waiter]:
        return self._take(lambda w: now >= w.deadline)
