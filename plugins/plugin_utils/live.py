# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""What run_command shows while it waits: progress lines and, with ``-v``, live output.

A playbook run prints nothing for a task until the task ends; a command on a fleet can run for
minutes. So the process that waits for a command (the task itself with explicit targets, the
batch's leader in per-host mode: exactly one per broker command) reports while it waits:

- progress (on stderr), without ``-v`` too: ``zerorun: command ID: 2/5 done, 2 running, 1 failed,
  1 pending (20s)``. Nothing for a command that ends within ``progress_interval`` seconds; then at
  most one line per interval, when the counts changed or, unchanged, every HEARTBEAT intervals;
  and a last line with the final counts when any line was shown. The counts come from the wait
  the task does anyway (its long-poll slices last one interval), so they cost no extra request
  (only the output, which can be large, is fetched once at the end instead of with each slice).
- with ``-v``: every instance's output lines as they arrive, ``INSTANCE | line`` (``INSTANCE !
  line`` for stderr) as ``zerorun send --follow`` prints them, and ``INSTANCE -- STATUS`` when an
  instance ends. This follows the output at the broker (FollowOutput long-polls), one request
  per burst of output: a cost paid only when someone asked for the output.

The Watch talks to a ``zerorun.client.Client``; everything else here is pure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

TERMINAL = frozenset({"Success", "Failed", "Cancelled", "TimedOut", "Undeliverable"})
"""An invocation or command in one of these has ended (zerorun.protocol.TERMINAL_STATUSES)."""
RUNNING = frozenset({"InProgress", "Cancelling"})
SUCCESS = "Success"

DEFAULT_PROGRESS_INTERVAL = 10
HEARTBEAT = 6
"""Unchanged counts are shown again after this many intervals (one minute by default)."""
FOLLOW_SLICE = 10.0
"""Longest follow long-poll when no progress is shown (a dead broker is noticed within it)."""
MAX_PREFIX = 32
"""Instance ids longer than this are not padded to a common width."""


# -- progress ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    done: int
    running: int
    failed: int
    pending: int
    total: int

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], total: int | None = None) -> "Progress":
        """From a command view's counts (invocations per status)."""
        done = sum(n for status, n in counts.items() if status in TERMINAL)
        failed = sum(n for status, n in counts.items() if status in TERMINAL and status != SUCCESS)
        running = sum(n for status, n in counts.items() if status in RUNNING)
        counted = sum(counts.values())
        total = counted if total is None else max(total, counted)
        return cls(done, running, failed, total - done - running, total)

    @classmethod
    def from_statuses(cls, statuses: Mapping[str, str]) -> "Progress":
        """From a FollowOutput answer's statuses (instance id -> invocation status)."""
        counts: dict[str, int] = {}
        for status in statuses.values():
            counts[status] = counts.get(status, 0) + 1
        return cls.from_counts(counts, len(statuses))


def progress_line(command_id: str, progress: Progress, elapsed: float) -> str:
    return "zerorun: command %s: %d/%d done, %d running, %d failed, %d pending (%ds)" % (
        command_id, progress.done, progress.total, progress.running, progress.failed, progress.pending,
        int(elapsed))


class ProgressGate:
    """Rate limit of progress lines (see the module docstring for the rule)."""

    def __init__(self, interval: float, started: float, heartbeat: int = HEARTBEAT):
        self.interval = interval
        self.started = started
        self.heartbeat = heartbeat
        self.last_at: float | None = None
        self.last: Progress | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def shown_any(self) -> bool:
        return self.last_at is not None

    def due(self, now: float, progress: Progress) -> bool:
        if not self.enabled or now - self.started < self.interval:
            return False
        if self.last_at is None:
            return True
        since = now - self.last_at
        if since < self.interval:
            return False
        return progress != self.last or since >= self.heartbeat * self.interval

    def shown(self, now: float, progress: Progress) -> None:
        self.last_at, self.last = now, progress


# -- output lines ---------------------------------------------------------------------------

def prefix_width(instance_ids: Iterable[str]) -> int:
    return min(MAX_PREFIX, max((len(i) for i in instance_ids), default=0))


def output_line(instance_id: str, stream: str, line: str, width: int = 0) -> str:
    mark = "!" if stream == "stderr" else "|"
    return "%-*s %s %s" % (width, instance_id, mark, line)


def end_line(instance_id: str, status: str, width: int = 0) -> str:
    return "%-*s -- %s" % (width, instance_id, status)


class LineAssembler:
    """Whole lines out of output chunks, per instance and stream; a line's start is kept until
    its end arrives (chunks are cut wherever the agent flushed)."""

    def __init__(self) -> None:
        self._partial: dict[tuple[str, str], str] = {}

    def feed(self, instance_id: str, stream: str, data: str) -> list[str]:
        key = (instance_id, stream)
        *lines, rest = (self._partial.pop(key, "") + data).split("\n")
        if rest:
            self._partial[key] = rest
        return [line[:-1] if line.endswith("\r") else line for line in lines]

    def flush(self, instance_id: str | None = None) -> list[tuple[str, str, str]]:
        """The unfinished last lines (of one instance, or of all), as (instance, stream, line)."""
        keys = [k for k in self._partial if instance_id is None or k[0] == instance_id]
        return [(k[0], k[1], self._partial.pop(k)) for k in sorted(keys)]


# -- who shows what ---------------------------------------------------------------------------

def shows_live(explicit: bool, leader: bool) -> bool:
    """One process per broker command reports on it: the task with explicit targets, or the
    batch's leader in per-host mode (the followers would repeat the same lines)."""
    return explicit or leader


def follows_output(verbosity: int, no_log: bool = False) -> bool:
    """Output lines only with -v, and never for a no_log task (they could hold what it hides)."""
    return verbosity >= 1 and not no_log


def awaits_leader(wait: bool, follows: bool, progress_interval: float) -> bool:
    """A follower holds its result back until the leader printed its last lines, so that the
    batch's output comes before the hosts' results; only when the leader prints anything."""
    return wait and (follows or progress_interval > 0)


def hide_result_dump(verbosity: int, instance_ids: Iterable[str], shown: Iterable[str]) -> bool:
    """The task's result need not be dumped by ``-v`` when its output was shown live already
    (``_ansible_verbose_override``; Ansible still dumps a failed result)."""
    wanted = set(instance_ids)
    return verbosity >= 1 and bool(wanted) and wanted <= set(shown)


# -- the wait -------------------------------------------------------------------------------

Emit = Callable[[str, bool], None]
"""emit(text, is_output): one or more lines for the display."""


class Watch:
    """Waits for a command at the broker while showing progress (and output when ``follow``).

    ``instance_ids`` limits the returned view's invocations (per-host mode: the host's own);
    ``shown`` holds the instances whose output was shown live up to their end."""

    def __init__(self, client: Any, command_id: str, emit: Emit, *, follow: bool, progress_interval: float,
                 width: int = 0, instance_ids: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.command_id = command_id
        self.emit = emit
        self.follow = follow
        self.width = width
        self.instance_ids = list(instance_ids)
        self.clock = clock
        self.started = clock()
        self.gate = ProgressGate(progress_interval, self.started)
        self.shown: set[str] = set()
        self.latest: Progress | None = None

    def run(self, timeout: float | None) -> Any:
        """The command's view (with output) when it ended, or the latest one after ``timeout``."""
        deadline = None if timeout is None else self.started + timeout
        try:
            if self.follow:
                self._follow(deadline)
                return self.client.get_command(self.command_id, instance_ids=self.instance_ids)
            return self._wait(deadline)
        finally:
            if self.gate.shown_any and self.latest is not None:
                self.emit(progress_line(self.command_id, self.latest, self.clock() - self.started), False)

    def _progress(self, progress: Progress) -> None:
        self.latest = progress
        now = self.clock()
        if self.gate.due(now, progress):
            self.gate.shown(now, progress)
            self.emit(progress_line(self.command_id, progress, now - self.started), False)

    def _view_progress(self, view: Any) -> None:
        self._progress(Progress.from_counts(view.counts, view.target_count or None))

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - self.clock())

    def _wait(self, deadline: float | None) -> Any:
        if not self.gate.enabled:
            return self.client.wait(self.command_id, timeout=self._remaining(deadline), instance_ids=self.instance_ids)
        # a quick command is answered, output included, by the first slice: one request as before
        remaining = self._remaining(deadline)
        first = self.gate.interval if remaining is None else min(self.gate.interval, remaining)
        view = self.client.wait(self.command_id, timeout=first, instance_ids=self.instance_ids)
        if view.status in TERMINAL or (deadline is not None and self.clock() >= deadline):
            if view.status in TERMINAL:
                self.latest = Progress.from_counts(view.counts, view.target_count or None)
            return view
        self._view_progress(view)
        # a slow one: slices without output (the output can be large), the output once at the end
        view = self.client.wait(self.command_id, timeout=self._remaining(deadline), include_output=False,
                                on_progress=self._view_progress, poll_interval=self.gate.interval,
                                instance_ids=self.instance_ids)
        if view.status in TERMINAL:
            self.latest = Progress.from_counts(view.counts, view.target_count or None)
        return self.client.get_command(self.command_id, instance_ids=self.instance_ids)

    def _follow(self, deadline: float | None) -> None:
        assembler = LineAssembler()
        cursors: dict[str, int] = {}
        slice_ = self.gate.interval if self.gate.enabled else FOLLOW_SLICE
        while True:
            remaining = self._remaining(deadline)
            update = self.client.follow(self.command_id, cursors,
                                        timeout=slice_ if remaining is None else min(slice_, remaining))
            cursors = update.cursors
            lines = []
            for chunk in update.chunks:
                lines.extend(output_line(chunk.invocation_id, chunk.stream, line, self.width)
                             for line in assembler.feed(chunk.invocation_id, chunk.stream, chunk.data))
            for instance_id, status in sorted(update.statuses.items()):
                if status in TERMINAL and instance_id not in self.shown:
                    self.shown.add(instance_id)
                    lines.extend(output_line(i, s, text, self.width) for i, s, text in assembler.flush(instance_id))
                    lines.append(end_line(instance_id, status, self.width))
            if lines:
                self.emit("\n".join(lines), True)
            progress = Progress.from_statuses(update.statuses)
            if update.done:
                self.latest = progress
                break
            self._progress(progress)
            if deadline is not None and self.clock() >= deadline:
                break
        rest = assembler.flush()
        if rest:
            self.emit("\n".join(output_line(i, s, text, self.width) for i, s, text in rest), True)
