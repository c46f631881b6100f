"""Retention pruning: finished commands older than ``retention_days`` forgotten a pass at a time.

On SQLite a pass runs in the loop: a few milliseconds, and a second writer would only wait for
the loop's commits (one writer at a time). On PostgreSQL the passes run on a thread with a
session of their own: the server's time for a pass (its deletes, its commit's flush to disk)
held the loop for up to 200 ms (bench/README.md, round twenty-nine), and the server lets a
pass and the loop's group commits run side by side."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from .errors import BrokerError
from .store.base import STORE_UNAVAILABLE, PrunePasses

log = logging.getLogger("zerorun.broker")

PRUNE_FIRST = 5.0  # seconds after start before the first pass
PRUNE_EVERY = 60.0
PRUNE_AGAIN = 0.025  # a pass removed something: more may be waiting (a busy broker's backlog)
PRUNE_INVOCATIONS = 100  # rows of invocations one pass deletes at most: a short pass
PRUNE_DEFER = 1.0  # seconds a due pass in the loop waits at most for an iteration without client requests
PRUNE_REPORT = 1.0  # seconds between the loop's looks at the thread's progress


class Pruning:
    """The loop's side: ``run`` when due (``next_at``), in an iteration without client requests
    if one comes within PRUNE_DEFER (their replies would wait behind an in-loop pass)."""

    def __init__(self, store: Any, retention_days: float, outputs: Any, stats: Counter[str], now: float):
        self.store = store
        self.retention_days = retention_days
        self.outputs = outputs
        self.stats = stats
        self.next_at = now + PRUNE_FIRST
        self._unlogged = 0
        self._thread: _PruneThread | None = None
        passes = store.prune_passes() if retention_days > 0 else None
        if passes is not None:
            self._thread = _PruneThread(passes, retention_days)
            self._thread.start()
            self.next_at = now + PRUNE_REPORT

    def due(self, now: float, requests_waiting: bool) -> bool:
        return now >= self.next_at and (self._thread is not None or not requests_waiting
                                        or now >= self.next_at + PRUNE_DEFER)

    def run(self, now: float) -> None:
        """A pass (SQLite), or the thread's progress since the last look (PostgreSQL); the next
        time is set first, so that a failure does not make the loop try again at once."""
        self.next_at = now + (PRUNE_REPORT if self._thread is not None else PRUNE_EVERY)
        if self.retention_days <= 0:
            return
        if self._thread is not None:
            removed, caught_up, failures = self._thread.collect()
            if failures:
                self.stats["internal_errors"] += failures
        else:
            removed = self.store.prune(time.time() - self.retention_days * 86400,
                                       batch=PRUNE_INVOCATIONS, invocations=PRUNE_INVOCATIONS)
            caught_up = not removed
            if removed:
                self.next_at = now + PRUNE_AGAIN
        if removed:
            self.stats["pruned_commands"] += removed
            self._unlogged += removed
        if caught_up:
            self._caught_up()

    def _caught_up(self) -> None:
        if self._unlogged:  # one line per catching up, not one per pass
            log.info("pruned %d command(s) older than %g days", self._unlogged, self.retention_days)
            self._unlogged = 0
        if self.outputs is not None:  # whole outputs of pruned commands (FileData: a bounded pass)
            self.outputs.data.prune(lambda command_id: self.store.get_command(command_id) is not None)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.stop()


class _PruneThread(threading.Thread):
    """Passes back to back while they remove something, then one every PRUNE_EVERY. Its counters
    are written here only and read by the loop (``collect``)."""

    def __init__(self, passes: PrunePasses, retention_days: float):
        super().__init__(name="zerorun-prune", daemon=True)
        self._passes = passes
        self._retention = retention_days * 86400
        self._stopping = threading.Event()
        self._removed = self._failures = 0
        self._idle_passes = 0  # passes that found nothing: caught up
        self._seen = (0, 0, 0)  # (removed, idle passes, failures) at the loop's last look

    def run(self) -> None:
        wait = PRUNE_FIRST
        try:
            while not self._stopping.wait(wait):
                wait = PRUNE_EVERY
                try:
                    removed = self._passes(time.time() - self._retention, PRUNE_INVOCATIONS, PRUNE_INVOCATIONS)
                except Exception as exc:  # the thread goes on whatever a pass met
                    if isinstance(exc, BrokerError) and exc.code == STORE_UNAVAILABLE:
                        log.debug("pruning waits for the store: %s", exc.message)  # the session said it once
                    else:
                        self._failures += 1
                        log.exception("internal error while pruning (the broker keeps serving; next pass in %g s)",
                                      wait)
                    continue
                if removed:
                    self._removed += removed
                    wait = PRUNE_AGAIN
                else:
                    self._idle_passes += 1
        finally:
            self._passes.close()

    def collect(self) -> tuple[int, bool, int]:
        """Since the last look: commands removed, whether a pass found nothing (caught up), failures."""
        now = (self._removed, self._idle_passes, self._failures)
        seen, self._seen = self._seen, now
        return now[0] - seen[0], now[1] != seen[1], now[2] - seen[2]

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10.0)
        if self.is_alive():  # a pass waiting for the server: the process ends without it (a daemon)
            log.warning("pruning: a pass still waits for the store at shutdown; not waited for")
