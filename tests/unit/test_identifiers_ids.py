"""Ids the broker makes: UUIDv7s as 32 hex digits, which sort by creation time."""

from __future__ import annotations

import time
import uuid

from zerorun.identifiers import time_ordered_ids


def test_time_ordered_ids_are_distinct_uuid7s_that_sort_by_creation():
    first = time_ordered_ids(1000)
    time.sleep(0.002)
    later = time_ordered_ids(1)[0]
    assert len(set(first)) == 1000
    assert all(len(i) == 32 and uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122
               for i in [*first, later])
    assert max(first) < later
    assert abs(int(later[:12], 16) / 1000 - time.time()) < 5  # the creation time, in milliseconds
