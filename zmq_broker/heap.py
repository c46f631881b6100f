"""The broker's Python heap and its garbage collector: the loop must not stop for it.

A full collection walks every object the collector tracks and holds the loop for all of it: with
10,000 agents connected, 40-130 ms at a time on a 2-core VM, several times while agents connect
and again whenever a quarter as many objects again have survived two young collections (what a
command in flight holds does, at the default young threshold of 700 allocations). So, once the
broker has started:

- what start-up made (modules, classes, the policy, the records read from the store) is frozen
  (``gc.freeze``): it lives as long as the process, and no later collection walks it. What of it
  is dropped later is still freed by reference counting; only a reference cycle among such objects
  would stay (the store's first connection, replaced after an outage, is closed explicitly first:
  its socket goes, a few kilobytes may not);
- the young generation is collected after ``YOUNG_THRESHOLD`` net allocations instead of 700:
  what a message or a command in flight allocates has mostly been freed by then (by reference
  counting), so far less of it survives into the older generations and full collections become
  rare.

``GcPauses`` records how long each collection held the loop, for the metrics
(``zerorun_gc_pause_seconds``): a stall an operator can see, not only guess at.
"""

from __future__ import annotations

import bisect
import gc
import time
from typing import Any

YOUNG_THRESHOLD = 10_000
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def settle() -> None:
    """After start-up, before the loop: freeze what exists and collect the young less often."""
    gc.collect()  # start-up's garbage goes now, not into the frozen generation
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


class GcPauses:
    """Total and longest pause per generation, and a histogram of pauses, kept by a
    ``gc.callbacks`` hook. The hook only does arithmetic on lists it owns: it may run in any
    thread (the metrics server's allocations collect too), so it takes no lock and calls nothing
    that could allocate much or wait."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self.buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        paused = time.perf_counter() - self._started
        generation = info["generation"]
        self.seconds[generation] += paused
        if paused > self.longest[generation]:
            self.longest[generation] = paused
        self.buckets[generation][bisect.bisect_left(PAUSE_BUCKETS, paused)] += 1

    def snapshot(self) -> dict[str, Any]:
        """Copies, for the metrics snapshot (the scrape thread never reads the live lists)."""
        return {"collections": [sum(b) for b in self.buckets], "seconds": list(self.seconds),
                "longest": list(self.longest), "buckets": [list(b) for b in self.buckets]}

    def close(self) -> None:
        try:
            gc.callbacks.remove(self._on_gc)
        except ValueError:
            pass
