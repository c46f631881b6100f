"""Sessions relayed between a client and an agent: shells, port forwards, terminal execs.

The broker only relays (``handlers/sessions.py``); this module keeps each session's state and
enforces its flow control. Data moves as sequenced chunks; each side announces its receive
window, and the broker refuses (ends the session) a peer that sends a chunk out of sequence or
more than the other side's window beyond what that side has acknowledged. So the broker holds at
most the client's window of output per session (waiting for the client's next poll) and never
queues client input: it goes to the agent at once, within the agent's window.

Sessions are this broker's alone (in memory, never in the store): a session ends when its agent's
connection ends, when its client stops polling, on the idle timeout and the maximum duration.
The shell's output may be recorded to an asciicast v2 file (``Transcript``).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerorun import protocol

from .sessions import Session

log = logging.getLogger("zerorun.broker.tunnels")

DEFAULT_WINDOW = 512 * 1024  # a side's receive window when it names none
MIN_WINDOW = 16 * 1024
MAX_WINDOW = 4 * 1024 * 1024
MAX_CHUNK = 256 * 1024  # bytes of one SessionIO or SessionData
REPLY_BYTES = 1024 * 1024  # output handed to the client in one answer, at most
MAX_WAIT = 10.0  # seconds an answer may be held (the client's long poll)
OPEN_TIMEOUT = 30.0  # the agent must have started it by then
CLIENT_SILENCE = 20.0  # a client that has not polled for this long (beyond its own wait) is gone
ENDED_KEPT = 30.0  # an ended session waits this long for its client to come and read the end
TRANSCRIPT_MAX_BYTES = 64 * 1024 * 1024  # output recorded per session, at most
BUSY_WINDOW = 0.25  # seconds after the broker last saw command work during which sessions yield to it

PERMISSIONS = {"shell": "session", "tcp": "forward", "exec": "exec"}


@dataclass
class Held:
    """A client's SessionIO waiting to be answered."""

    routing_id: bytes
    rid: int
    deadline: float


@dataclass(eq=False)
class Tunnel:
    session_id: str
    kind: str
    instance_id: str
    client_key: str  # the key that opened it: only it may use it
    client: str  # name and fingerprint, for audit lines
    agent: Session  # the agent session it runs on (ended when that one ends)
    opened_at: float  # wall clock
    started: float  # monotonic
    detail: dict[str, Any] = field(default_factory=dict)  # command / run_as / host / port, for audit
    state: str = "opening"  # opening | open | ended
    opener: Held | None = None  # the OpenSession waiting for the agent
    held: Held | None = None
    last_activity: float = 0.0  # monotonic: data either way
    last_request: float = 0.0  # monotonic: the client's last SessionIO
    client_wait: float = 0.0  # what the client asked to wait, last time
    # client -> agent
    client_seq: int = 0
    to_agent: int = 0  # bytes the client sent
    agent_window: int = DEFAULT_WINDOW
    agent_acked: int = 0  # bytes the agent consumed
    acked_told: int = 0  # of those, what the client was last told
    # agent -> client
    agent_seq: int = 0
    to_client: int = 0  # bytes the agent sent
    client_window: int = DEFAULT_WINDOW
    client_acked: int = 0  # bytes the client consumed
    ack_relayed: int = 0  # of those, what the agent was last told
    ack_held: bool = False  # the client's acknowledgement waits (commands first): relayed at the next tick
    out_seq: int = 0  # numbers the chunks handed to the client
    buffer: deque[protocol.SessionChunk] = field(default_factory=deque)
    buffered: int = 0
    eof: list[str] = field(default_factory=list)  # streams the agent's side closed (not yet told)
    agent_closed: set[str] = field(default_factory=set)  # every stream the agent's side closed
    exit_code: int = -1
    error: str = ""
    ended_at: float = 0.0  # monotonic
    told_end: bool = False
    transcript: "Transcript | None" = None

    @property
    def permission(self) -> str:
        return PERMISSIONS[self.kind]

    def take_update(self, release: bool = True) -> protocol.SessionUpdate:
        """What the client has not been told yet: buffered output (up to REPLY_BYTES), closed
        streams, the agent's acknowledgement (unless ``release`` is False: commands first), the end."""
        chunks: list[protocol.SessionChunk] = []
        size = 0
        while self.buffer and (not chunks or size + len(self.buffer[0].data) <= REPLY_BYTES):
            chunk = self.buffer.popleft()
            chunks.append(chunk)
            size += len(chunk.data)
        self.buffered -= size
        if release:
            self.acked_told = self.agent_acked
        update = protocol.SessionUpdate(self.session_id, chunks=chunks, ack=self.acked_told)
        if not self.buffer:
            update.eof, self.eof = self.eof, []
            if self.state == "ended":
                update.ended, update.exit_code, update.error = True, self.exit_code, self.error
                self.told_end = True
        return update

    def worth_answering(self, release: bool = True) -> bool:
        """Whether a held poll should be answered now: output, the end, or an acknowledgement
        the client may be waiting for (it has used half its credit)."""
        if self.buffer or self.eof or self.state == "ended":
            return True
        if not release or self.agent_acked == self.acked_told:
            return False
        return (self.agent_acked - self.acked_told >= self.agent_window // 4
                or self.to_agent - self.acked_told >= self.agent_window // 2)


class TunnelTable:
    """The sessions, and whether command work is going on (sessions yield to it)."""

    def __init__(self) -> None:
        self.by_id: dict[str, Tunnel] = {}
        self.command_mark = -1  # a count that moves with command work
        self.busy_until = 0.0

    def commands_busy(self, mark: int, now: float) -> bool:
        """Whether command work was seen in the last BUSY_WINDOW: ``mark`` is a count that
        moves with it (deliveries, results, client requests other than sessions')."""
        if mark != self.command_mark:
            self.command_mark = mark
            self.busy_until = now + BUSY_WINDOW
        return now < self.busy_until

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def __len__(self) -> int:
        return len(self.by_id)

    def live(self) -> int:
        return sum(1 for t in self.by_id.values() if t.state != "ended")


class Transcript:
    """The output of one shell session as asciicast v2 (asciinema's format): a JSON header line,
    then ``[seconds, "o", text]`` per output chunk and ``[seconds, "r", "COLSxROWS"]`` per
    resize. Input is not recorded (what the user types without echo, a password, stays out)."""

    def __init__(self, directory: Path, tunnel: Tunnel, cols: int, rows: int, term: str):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(tunnel.opened_at))
        self.path = directory / f"{stamp}-{tunnel.instance_id}-{tunnel.session_id}.cast"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._started = time.monotonic()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._written = 0
        self.failed = ""
        header: dict[str, Any] = {"version": 2, "width": cols, "height": rows, "timestamp": int(tunnel.opened_at),
                                  "title": f"{tunnel.instance_id} ({tunnel.client})"}
        if term:
            header["env"] = {"TERM": term}
        if tunnel.detail.get("command"):
            header["command"] = tunnel.detail["command"]
        self._line(header)

    def _line(self, value: Any) -> None:
        if self.failed:
            return
        try:
            text = json.dumps(value, ensure_ascii=False) + "\n"
            self._file.write(text)
            self._written += len(text)
        except (OSError, ValueError) as exc:
            self.failed = str(exc)
            log.error("session transcript %s: %s; recording stopped", self.path, exc)

    def output(self, data: bytes) -> None:
        if self._written > TRANSCRIPT_MAX_BYTES:
            return
        text = self._decoder.decode(data)
        if text:
            self._line([round(time.monotonic() - self._started, 6), "o", text])
            if self._written > TRANSCRIPT_MAX_BYTES:
                self._line([round(time.monotonic() - self._started, 6), "o",
                            f"\r\n[zerorun: transcript cut at {TRANSCRIPT_MAX_BYTES} bytes]\r\n"])

    def resize(self, cols: int, rows: int) -> None:
        self._line([round(time.monotonic() - self._started, 6), "r", f"{cols}x{rows}"])

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
