"""The output store: every invocation's whole output, beyond the view's cap.

A command's view keeps ``--max-output-bytes`` per stream (what ``show``, ``wait`` and the Ansible
results carry). An agent whose step output is larger, or not UTF-8, keeps the step's output files
after the result and says so (``InvocationResult.stdout_follows``); the broker that received the
result then *pulls* the whole stream from the agent, one chunk per ``OutputRead``, at most
``WINDOW`` chunks in flight across all agents and ``PER_INVOCATION`` per invocation: a 1 GiB output
(or a hundred of them) never floods the broker, and neither side ever holds a whole output in
memory. Up to ``--max-full-output-bytes`` per invocation is kept (stdout first); the record says
what was produced, what is kept and, when that is not all, why.

Where the bytes go: with SQLite (one broker), files beside the database,
``<state dir>/outputs/<command>/<invocation>.stdout|.stderr`` (0600 in 0700 directories); with
PostgreSQL (brokers that share a store), the ``output_chunks`` table, so that every broker serves
every output. Records (``outputs`` table, ``model.OutputRecord``) go through the group commit in
both. An output smaller than the view's cap and valid UTF-8 is not copied: the view holds it whole.
Both are pruned with their command.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zerorun import protocol
from zerorun.identifiers import one_line
from zerorun.protocol import InvocationResult, InvocationView, OutputSlice

from .model import OutputRecord

log = logging.getLogger("zerorun.broker.outputs")

CHUNK = 256 * 1024  # bytes per OutputRead
WINDOW = 16  # chunks in flight across every agent (4 MiB)
PER_INVOCATION = 4  # chunks in flight per invocation
READ_TIMEOUT = 30.0  # seconds before a read without an answer is asked again
GIVE_UP = 3600.0  # seconds without progress after which an output is left incomplete
MAX_SLICE = 4 * 1024 * 1024  # bytes a client gets per GetOutput
STREAMS = ("stdout", "stderr")


class FileData:
    """Whole outputs as files under the broker's state dir (one broker, SQLite)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)

    def _path(self, command_id: str, invocation_id: str, stream: str) -> Path:
        return self.root / command_id / f"{invocation_id}.{stream}"

    def write(self, command_id: str, invocation_id: str, stream: str, offset: int, data: bytes) -> None:
        directory = self.root / command_id
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self._path(command_id, invocation_id, stream), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    def read(self, command_id: str, invocation_id: str, stream: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(command_id, invocation_id, stream), os.O_RDONLY)
        except FileNotFoundError:
            return b""
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def path(self, command_id: str, invocation_id: str, stream: str) -> Path:
        return self._path(command_id, invocation_id, stream)

    def prune(self, command_exists: Callable[[str], bool], limit: int = 200) -> int:
        """Removes the outputs of up to ``limit`` commands the store no longer has (pruned)."""
        removed = 0
        for entry in os.scandir(self.root):
            if removed >= limit:
                break
            if entry.is_dir(follow_symlinks=False) and not command_exists(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        return removed


class StoreData:
    """Whole outputs as rows of ``output_chunks`` in PostgreSQL (brokers sharing a store), written
    with the group commit; chunks are CHUNK-aligned."""

    def __init__(self, store: Any):
        self.store = store

    def write(self, command_id: str, invocation_id: str, stream: str, offset: int, data: bytes) -> None:
        for at in range(0, len(data), CHUNK):
            self.store.queue_write(
                'INSERT INTO output_chunks (invocation_id, stream, "offset", command_id, data) VALUES '
                "(%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", [invocation_id, stream, offset + at, command_id,
                                                               data[at:at + CHUNK]])

    def read(self, command_id: str, invocation_id: str, stream: str, offset: int, length: int) -> bytes:
        first = offset - offset % CHUNK
        rows = self.store.query('SELECT "offset", data FROM output_chunks WHERE invocation_id = %s AND stream = %s'
                                ' AND "offset" >= %s AND "offset" < %s ORDER BY "offset"',
                                (invocation_id, stream, first, offset + length))
        out = bytearray()
        for start, data in rows:
            start = int(start)
            if start > offset + len(out):
                break  # a gap: not stored yet
            out += bytes(data)[offset + len(out) - start:]
        return bytes(out[:length])

    def prune(self, command_exists: Callable[[str], bool], limit: int = 200) -> int:
        return 0  # rows go with their command (Store.prune)

    def reader(self) -> "StoreData":
        """The same chunks through a connection of its own, for another thread (the S3 sink)."""
        session = self.store.session("zerorun-broker-reader")

        class _Query:
            @staticmethod
            def query(sql: str, params: Any = ()) -> list[Any]:
                def run(conn: Any) -> list[Any]:
                    with conn.cursor(binary=True) as cur:
                        cur.execute(sql, params)
                        return cur.fetchall()

                return session.run(run)

        return StoreData(_Query())


@dataclass
class _Reading:
    """An output being pulled from its agent."""

    rec: OutputRecord
    next_offset: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    in_flight: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)  # -> (length, sent at)
    received: dict[str, dict[int, int]] = field(default_factory=lambda: {"stdout": {}, "stderr": {}})
    progress_at: float = 0.0
    inline: dict[str, bytes] = field(default_factory=dict)  # streams the result carried whole (for the sink)


class WholeOutputs:
    """Pulls whole outputs from agents and serves them to clients (see the module's doc)."""

    def __init__(self, store: Any, data: FileData | StoreData, limit: int, broker_id: str,
                 read: Callable[[str, protocol.OutputRead], bool], done: Callable[[str, list[str]], None]):
        self.store = store
        self.data = data
        self.limit = max(0, limit)
        self.broker_id = broker_id
        self._read = read  # (instance id, message) -> False when the agent is not connected here
        self._done = done
        self.reading: dict[str, _Reading] = {}
        # the S3 sink, when configured: (record, the bytes of the streams the view holds and the store not)
        self.on_finished: Callable[[OutputRecord, dict[str, bytes] | None], None] | None = None
        self.stats = {"bytes_read": 0, "completed": 0, "incomplete": 0}

    def __bool__(self) -> bool:
        return bool(self.reading)

    def load(self) -> None:
        """Outputs this broker was reading when it stopped: read on (the agent still holds them,
        unless it restarted too, and then says so)."""
        for rec in self.store.pending_outputs(self.broker_id):
            reading = _Reading(rec, progress_at=time.monotonic())
            reading.next_offset = {"stdout": rec.stdout_have, "stderr": rec.stderr_have}
            self.reading[rec.invocation_id] = reading
        if self.reading:
            log.info("reading on the whole output of %d invocation(s)", len(self.reading))

    def rebalance(self, here: Callable[[str], bool], elsewhere: Callable[[str], bool]) -> None:
        """Several brokers: an output is read by the broker its agent is connected to. Readings
        whose agent moved to another broker are left to it; pending outputs whose agent is
        connected here (it moved, or its broker died) are taken over, from what is stored."""
        for iid, reading in list(self.reading.items()):
            if elsewhere(reading.rec.instance_id):
                del self.reading[iid]
        for rec in self.store.pending_outputs(self.broker_id, others=True):
            if rec.invocation_id in self.reading or not here(rec.instance_id):
                continue
            rec.broker_id, rec.updated_at = self.broker_id, time.time()
            reading = _Reading(rec, progress_at=time.monotonic())
            reading.next_offset = {"stdout": rec.stdout_have, "stderr": rec.stderr_have}
            self.reading[rec.invocation_id] = reading
            self.store.put_output(rec)
            log.info("reading on the whole output of invocation %s, whose agent %s is connected here now",
                     rec.invocation_id, rec.instance_id)

    # -- from agents ---------------------------------------------------------------------------

    def result_arrived(self, instance_id: str, command_id: str, res: InvocationResult, view_cap: int) -> None:
        """A result: pull what the agent kept, or keep the result's own text when the view will
        not (larger than its cap); nothing for output the view holds whole."""
        if res.invocation_id in self.reading:
            return  # a result sent again
        if res.stdout_follows > 0 or res.stderr_follows > 0:
            existing = self.store.get_output(res.invocation_id)
            if existing is not None:  # a result sent again
                if existing.state != "pending":  # read already (whole or cut): the agent may drop its copy
                    self._done(instance_id, [res.invocation_id])
                return  # another broker was reading it: the one its agent is connected to reads on (rebalance)
            # sizes the agent says: never below 0 (a negative stdout left the limit's room to stderr)
            stdout_size, stderr_size = max(0, res.stdout_follows), max(0, res.stderr_follows)
            stdout_want = min(stdout_size, self.limit)
            stderr_want = min(stderr_size, self.limit - stdout_want)
            rec = OutputRecord(res.invocation_id, command_id, instance_id, stdout_size=stdout_size,
                               stderr_size=stderr_size, stdout_want=stdout_want, stderr_want=stderr_want,
                               broker_id=self.broker_id, updated_at=time.time())
            reading = _Reading(rec, progress_at=time.monotonic())
            if self.on_finished is not None:
                reading.inline = {stream: getattr(res, stream).encode("utf-8", "surrogateescape") for stream in STREAMS
                                  if not getattr(res, f"{stream}_follows")}
            self.reading[res.invocation_id] = reading
            self._check_done(reading)
            self.store.put_output(rec)
            return
        if len(res.stdout) <= view_cap and len(res.stderr) <= view_cap:  # the view's cap counts characters
            if self.on_finished is not None and (res.stdout or res.stderr):
                self.on_finished(OutputRecord(res.invocation_id, command_id, instance_id, state="complete"),
                                 {stream: getattr(res, stream).encode("utf-8", "surrogateescape") for stream in STREAMS})
            return
        texts = {stream: getattr(res, stream).encode("utf-8", "surrogateescape") for stream in STREAMS}
        rec = OutputRecord(res.invocation_id, command_id, instance_id, state="complete", broker_id=self.broker_id,
                           updated_at=time.time())
        unwritten = ""
        for stream, text in texts.items():
            keep = b"" if unwritten else text[:self.limit]
            if keep:
                try:
                    self.data.write(command_id, res.invocation_id, stream, 0, keep)
                except OSError as exc:  # a full disk: the result itself is still taken
                    unwritten, keep = _unwritten(exc), b""
            setattr(rec, f"{stream}_size", len(text))
            setattr(rec, f"{stream}_want", len(keep))
            setattr(rec, f"{stream}_have", len(keep))
        if unwritten:
            rec.state, rec.note = "incomplete", unwritten
            log.warning("whole output of invocation %s on %s is incomplete: %s", res.invocation_id, instance_id,
                        unwritten)
        elif rec.stdout_have < rec.stdout_size or rec.stderr_have < rec.stderr_size:
            rec.state, rec.note = "incomplete", f"cut at the broker's limit of {self.limit} bytes per invocation"
        self.store.put_output(rec)
        self._finished(rec)

    def data_arrived(self, instance_id: str, msg: protocol.OutputData) -> None:
        reading = self.reading.get(msg.invocation_id)
        if reading is None or reading.rec.instance_id != instance_id:
            return  # not asked for (any more), or not this agent's
        asked = reading.in_flight.pop((msg.stream, msg.offset), None)
        if asked is None:
            return  # an answer to a read asked again: the first answer was used
        rec = reading.rec
        if msg.error:
            self._give_up(reading, f"the agent could not send it: {one_line(msg.error)}")
            return
        data = msg.data[:asked[0]]
        if len(data) < asked[0]:  # the file is shorter than the agent said: that is all of it
            setattr(rec, f"{msg.stream}_want", msg.offset + len(data))
        if data:
            try:
                self.data.write(rec.command_id, rec.invocation_id, msg.stream, msg.offset, data)
            except OSError as exc:
                self._give_up(reading, _unwritten(exc))
                return
            self.stats["bytes_read"] += len(data)
        received = reading.received[msg.stream]
        received[msg.offset] = len(data)
        have = getattr(rec, f"{msg.stream}_have")
        while have in received and received[have] > 0:
            have += received.pop(have)
        setattr(rec, f"{msg.stream}_have", have)
        reading.progress_at = time.monotonic()
        rec.updated_at = time.time()
        self._check_done(reading)
        self.store.put_output(rec)

    def _check_done(self, reading: _Reading) -> None:
        rec = reading.rec
        if rec.stdout_have < rec.stdout_want or rec.stderr_have < rec.stderr_want:
            return
        if rec.stdout_want < rec.stdout_size or rec.stderr_want < rec.stderr_size:
            rec.state = "incomplete"
            rec.note = rec.note or f"cut at the broker's limit of {self.limit} bytes per invocation"
        else:
            rec.state = "complete"
        self.reading.pop(rec.invocation_id, None)
        self._done(rec.instance_id, [rec.invocation_id])
        self._finished(rec, reading.inline)

    def _give_up(self, reading: _Reading, why: str) -> None:
        rec = reading.rec
        rec.state, rec.note, rec.updated_at = "incomplete", why, time.time()
        self.reading.pop(rec.invocation_id, None)
        self.store.put_output(rec)
        log.warning("whole output of invocation %s on %s is incomplete: %s", rec.invocation_id,
                    rec.instance_id, why)
        self._finished(rec, reading.inline)

    def _finished(self, rec: OutputRecord, inline: dict[str, bytes] | None = None) -> None:
        self.stats["completed" if rec.state == "complete" else "incomplete"] += 1
        if self.on_finished is not None:
            self.on_finished(rec, inline or None)

    # -- pacing ---------------------------------------------------------------------------------

    def agent_back(self, instance_id: str) -> None:
        """The instance's agent said HELLO on a new connection: what was asked of it on the last
        one, and its answers, may have gone with that one. Asked again now, not after READ_TIMEOUT
        (an agent that reconnected twice left a read waiting a minute, and a client gave up)."""
        for reading in self.reading.values():
            if reading.in_flight and reading.rec.instance_id == instance_id:
                for key, (length, _sent) in reading.in_flight.items():
                    reading.in_flight[key] = (length, 0.0)  # overdue
        self.pump()

    def pump(self) -> None:
        """Asks agents for more chunks, within the window; asks again what went unanswered."""
        if not self.reading:
            return
        now = time.monotonic()
        in_flight = 0
        for reading in list(self.reading.values()):
            for key, (length, sent) in list(reading.in_flight.items()):
                if now - sent > READ_TIMEOUT:
                    if self._read(reading.rec.instance_id, protocol.OutputRead(
                            reading.rec.invocation_id, key[0], key[1], length)):
                        reading.in_flight[key] = (length, now)
            in_flight += len(reading.in_flight)
            if now - reading.progress_at > GIVE_UP:
                self._give_up(reading, f"the agent sent nothing of it for {GIVE_UP:g} seconds")
        for reading in list(self.reading.values()):
            rec = reading.rec
            for stream in STREAMS:
                want = getattr(rec, f"{stream}_want")
                while (in_flight < WINDOW and len(reading.in_flight) < PER_INVOCATION
                       and reading.next_offset[stream] < want):
                    offset = reading.next_offset[stream]
                    length = min(CHUNK, want - offset)
                    if not self._read(rec.instance_id, protocol.OutputRead(rec.invocation_id, stream, offset, length)):
                        break  # its agent is not connected here now: later
                    reading.in_flight[(stream, offset)] = (length, now)
                    reading.next_offset[stream] = offset + length
                    in_flight += 1

    # -- to clients -----------------------------------------------------------------------------

    def slice(self, inv: InvocationView, rec: OutputRecord | None, stream: str, offset: int,
              length: int) -> OutputSlice:
        """A part of an invocation's whole stdout or stderr, from the store or from its view."""
        offset, length = max(0, offset), max(0, min(length, MAX_SLICE))
        finished = inv.status in protocol.TERMINAL_STATUSES
        if rec is None or getattr(rec, f"{stream}_size") == 0:
            # the view holds it (whole, unless an agent of an older version cut it)
            text = getattr(inv, stream).encode("utf-8", "surrogateescape")
            produced = getattr(inv, f"{stream}_size") or len(text)
            whole = finished and produced <= len(text)
            note = "" if whole or not finished else (
                "only the view's part was kept: the agent did not keep the rest (an agent older than the output "
                "store)")
            return OutputSlice(data=text[offset:offset + length], size=len(text), produced=max(produced, len(text)),
                               complete=whole, pending=not finished, note=note)
        have = getattr(rec, f"{stream}_have")
        data = b""
        if offset < have:
            data = self.data.read(rec.command_id, rec.invocation_id, stream, offset, min(length, have - offset))
        produced = getattr(rec, f"{stream}_size")
        return OutputSlice(data=data, size=have, produced=produced,
                           complete=rec.state != "pending" and have >= produced,
                           pending=rec.state == "pending", note=rec.note if have < produced else "")


def _unwritten(exc: OSError) -> str:
    return f"the broker could not store it: {exc.strerror or exc}"
