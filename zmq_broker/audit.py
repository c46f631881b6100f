"""The broker's append-only audit log: one JSON object per line, who did what, where, when.

It must not be silenced, flooded, or turn into a way to stop the broker:

- the file is reopened on SIGHUP and whenever its path no longer leads to the open file (after
  ``rm``, or a ``mv`` by logrotate: its usual ``postrotate ... kill -HUP`` works, and so does
  nothing at all);
- every field is bounded: a string longer than ``MAX_TEXT`` becomes its first characters plus its
  size and SHA-256, a list longer than ``MAX_ITEMS`` its first items plus a count, so one request
  can never write megabytes;
- refusals are rate-limited per client key (``write_refusal``): past the limit they are counted
  and the count is written with the next line let through, or by ``flush_suppressed``;
- a write never raises: a failure (a full disk) is remembered (``failed``), the broker refuses
  new work while it lasts (``handlers``), and nothing already received is dropped because of it;
- lines are written in batches, once per loop iteration (``flush``), before any answer of that
  iteration goes out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger("zerorun.broker.audit")

MAX_TEXT = 1024  # characters of one string field
MAX_ITEMS = 1000  # items of one list field
MAX_KEYS = 200  # entries of one mapping field
REFUSALS_PER_SECOND = 5.0  # per client key, after a burst of REFUSAL_BURST
REFUSAL_BURST = 20


_ENCODER = msgspec.json.Encoder(enc_hook=str, order="sorted")  # str(): what json's default=str wrote


def _line(entry: dict[str, Any]) -> str:
    """The entry as one JSON line, keys sorted. A line of at most ``MAX_TEXT`` bytes holds no
    string, list or mapping beyond the bounds (a longer string alone would make it longer, and so
    would 1,000 items or 200 keys), so only a longer line is walked and cut: most lines are short,
    and the walk cost half of writing one. What msgspec cannot encode (a lone surrogate from a file
    name, a key that is no string) goes through ``json``, escaped."""
    try:
        data = _ENCODER.encode(entry)
        if len(data) > MAX_TEXT:
            data = _ENCODER.encode(bounded(entry))
        return data.decode() + "\n"
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return json.dumps(bounded(entry), sort_keys=True, default=str) + "\n"


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` with every string, list and mapping in it cut to the audit log's bounds."""
    if isinstance(value, str):
        if len(value) <= MAX_TEXT:
            return value
        data = value.encode("utf-8", "surrogatepass")
        return {"text": value[:200], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, bytes):
        return {"size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if depth > 8:
        return "..."
    if isinstance(value, (list, tuple)):
        items = [bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"... and {len(value) - MAX_ITEMS} more")
        return items
    if isinstance(value, dict):
        out = {str(k)[:MAX_TEXT]: bounded(v, depth + 1) for k, v in list(value.items())[:MAX_KEYS]}
        if len(value) > MAX_KEYS:
            out["..."] = f"{len(value) - MAX_KEYS} more"
        return out
    return value


class AuditLog:
    def __init__(self, path: Path | None):
        self.path = path
        self._fd = -1
        self._pending: list[str] = []  # lines written since the last flush
        self._inode = 0
        self.failed = ""  # why the last write failed ("" while healthy)
        self.failures = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._suppressed: dict[str, int] = {}
        if path is not None:
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._inode = os.fstat(fd).st_ino

    def reopen(self) -> None:
        """SIGHUP: start a new file if the old one was moved or removed (and in any case reopen)."""
        if self.path is None:
            return
        try:
            self._open()
        except OSError as exc:
            self._failed(exc)

    def check_rotation(self) -> None:
        """Reopens when the path no longer leads to the open file (rm, mv: rotation)."""
        if self.path is None:
            return
        try:
            moved = os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            moved = True
        except OSError:
            return
        if moved:
            log.info("audit log %s was moved or removed; writing to a new file there", self.path)
            self.reopen()

    def write(self, event: str, **fields: Any) -> None:
        """Queues a line: the loop writes a batch's lines at once (``flush``) before it answers
        anyone, so no reply goes out before the lines of the work it reports."""
        if self._fd >= 0:
            self._pending.append(_line({"ts": round(time.time(), 6), "event": event, **fields}))

    def flush(self) -> None:
        """Writes the queued lines with one system call (two lines per command were two)."""
        if not self._pending:
            return
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            self._failed(exc)
            return
        if self.failed:
            log.warning("the audit log can be written again (%s)", self.path)
            self.failed = ""

    def write_refusal(self, key: str, event: str, **fields: Any) -> None:
        """A refusal, at most REFUSALS_PER_SECOND per key after a burst: a flood of refused
        requests is counted, not written line by line."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(REFUSAL_BURST), now))
        tokens = min(float(REFUSAL_BURST), tokens + (now - last) * REFUSALS_PER_SECOND)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._buckets[key] = (tokens - 1.0, now)
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed_before"] = suppressed
        self.write(event, **fields)
        if len(self._buckets) > 10_000:  # forget the quiet ones
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}

    def flush_suppressed(self) -> None:
        """Writes the counts of refusals that were not written one by one."""
        for key, count in list(self._suppressed.items()):
            self.write("access.denied.suppressed", key=key, count=count)
        self._suppressed.clear()

    def retry(self) -> None:
        """While failed: try again to reopen and write (the loop calls this every few seconds)."""
        if self.failed:
            self.reopen()
            self.write("audit.recovered", after_failures=self.failures)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        reason = getattr(exc, "strerror", None) or str(exc)
        if not self.failed:
            log.error("cannot write the audit log %s: %s; refusing new work until it can be written", self.path,
                      reason)
        self.failed = reason

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1
