"""Warnings a peer can cause as often as it likes: malformed frames, denied HELLOs, refused
results. Each kind is logged at most BURST times at once and PER_SECOND after that; how many were
left out is said with the next one logged, or at the loop's tick once the flood has stopped. The
stats count every one. Without this, an accepted agent sending malformed frames as fast as it
could had the loop format, and the journal keep, a line for each."""

from __future__ import annotations

import logging
import time

BURST = 20
PER_SECOND = 1.0


class WarningThrottle:
    def __init__(self, burst: int = BURST, per_second: float = PER_SECOND):
        self.burst = float(burst)
        self.per_second = per_second
        self._buckets: dict[str, tuple[float, float]] = {}  # kind -> (tokens, when): kinds are a fixed few
        self._left_out: dict[str, tuple[logging.Logger, int]] = {}

    def warning(self, logger: logging.Logger, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.get(kind, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[kind] = (tokens, now)
            self._left_out[kind] = (logger, self._left_out.get(kind, (logger, 0))[1] + 1)
            return
        self._buckets[kind] = (tokens - 1.0, now)
        left_out = self._left_out.pop(kind, None)
        if left_out is not None:
            message, args = message + " (and %d more %s not logged)", (*args, left_out[1], kind)
        logger.warning(message, *args)

    def flush(self) -> None:
        """Says how many were left out, for kinds that have gone quiet."""
        for kind, (logger, count) in self._left_out.items():
            logger.warning("%d more %s not logged", count, kind)
        self._left_out.clear()
