"""Rendering documents without ever making the broker's loop wait on client-supplied content.

A document whose rendering is linear and provably small (``documents.may_render_inline``: SSM
substitution of a stored or built-in document within the size caps) is rendered in the loop:
that is the hot path (RunShellScript and friends), and it costs no more than before. Everything
else - Jinja templates (which are code), composite documents, local documents (their text must be
parsed first) and document validation for create/update - runs in a small pool of render
worker processes (``render_worker.py``) with a memory limit (RLIMIT_AS) and a deadline: a worker
that overruns is killed and replaced, and the request is refused with a clear error. The loop
only moves bytes to and from the workers' pipes.

Worker protocol: length-prefixed msgpack frames on the worker's stdin/stdout. The loop sends
``RenderJob``/``ValidateJob``; the worker may ask for a document that a composite document names
(``NeedDocument``), which the loop answers from its store (``DocumentReply``); it ends each job
with ``JobDone``. Workers get no store, no keys, nothing but what each job carries.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Union

import msgspec

from zerorun import protocol
from zerorun.documents import builtin_document

from .docstore import CheckedDocument, DocumentStore
from .documents import RenderLimits, Rendered, load_named_if_cheap, may_render_inline, render, store_resolver
from .errors import BrokerError

PARSE_IN_LOOP_BYTES = 16 * 1024  # a stored version longer than this, not parsed yet, is parsed by a worker
# (about 10 ms of the loop for 16 KiB of YAML; 256 KiB took a tenth of a second or more)
RENDER_CACHE = 256  # inline renderings kept, by document, parameters, platform and timeout

log = logging.getLogger("zerorun.broker.rendering")

_HEADER = struct.Struct(">I")
MAX_FRAME = protocol.MAX_MESSAGE_BYTES + (1 << 20)


class RenderJob(msgspec.Struct, tag="render"):
    job: int
    send: protocol.SendCommand
    platform: str
    max_step_bytes: int
    max_command_bytes: int


class ValidateJob(msgspec.Struct, tag="validate"):
    job: int
    name: str
    content: str
    version: int = 0  # a stored version's number: its text passed before, it is parsed for show


class DocumentReply(msgspec.Struct, tag="document"):
    job: int
    name: str = ""
    version: str = ""  # the stored version it is
    content: str = ""
    error: str = ""
    code: str = ""  # the error's code


class Ready(msgspec.Struct, tag="ready"):
    """A worker has imported what it needs: deadlines start only now, never during its start."""

    job: int = 0


class NeedDocument(msgspec.Struct, tag="need"):
    job: int
    name: str
    version: str


class JobDone(msgspec.Struct, tag="done"):
    job: int
    ok: bool
    code: str = ""
    message: str = ""
    rendered: Rendered | None = None
    checked: CheckedDocument | None = None  # a ValidateJob's result
    parsed: int = 0  # documents the job parsed (ping: rendering.parsed_worker)


ToWorker = Union[RenderJob, ValidateJob, DocumentReply]
FromWorker = Union[Ready, NeedDocument, JobDone]
encode = msgspec.msgpack.Encoder().encode
to_worker = msgspec.msgpack.Decoder(ToWorker)
from_worker = msgspec.msgpack.Decoder(FromWorker)


def frame(message: Any) -> bytes:
    body = encode(message)
    return _HEADER.pack(len(body)) + body


@dataclass
class RenderSettings:
    workers: int = 2
    timeout: float = 2.0  # seconds one job may take
    memory_bytes: int = 768 * 1024 * 1024  # each worker's address space (RLIMIT_AS)
    max_queued: int = 64  # jobs waiting for a worker; more are refused at once
    limits: RenderLimits = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = RenderLimits()


Done = Callable[[Any, BrokerError | None], None]
"""A job's continuation: (result, None) or (None, error). Called from the loop, exactly once."""


@dataclass
class _Job:
    job: int
    request: RenderJob | ValidateJob
    done: Done


class _Worker:
    """One render worker process: a writer thread feeds its stdin, the loop reads its stdout."""

    def __init__(self, settings: RenderSettings):
        env = dict(os.environ, ZERORUN_RENDER_MEMORY=str(settings.memory_bytes))
        self.proc = subprocess.Popen([sys.executable, "-m", "zmq_broker.render_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, env=env, close_fds=True,
                                     start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self._inbox: bytes = b""
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, daemon=True, name=f"render-writer-{self.proc.pid}")
        self._writer.start()
        self.job: _Job | None = None
        self.deadline = 0.0
        self.ready = False

    def _write(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        while True:
            data = self._outbox.get()
            if data is None:
                break
            try:
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                break
        try:
            stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def send(self, message: Any) -> None:
        self._outbox.put(frame(message))

    def read(self) -> list[Any] | None:
        """Messages the worker wrote; None once it is gone (or wrote something unreadable)."""
        try:
            while True:
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    return None
                self._inbox += chunk
        except BlockingIOError:
            pass
        except OSError:
            return None
        out = []
        while len(self._inbox) >= 4:
            (size,) = _HEADER.unpack_from(self._inbox)
            if size > MAX_FRAME:
                return None
            if len(self._inbox) < 4 + size:
                break
            try:
                out.append(from_worker.decode(self._inbox[4:4 + size]))
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
            self._inbox = self._inbox[4 + size:]
        return out

    def kill(self) -> None:
        self._outbox.put(None)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _authors_patterns(doc: Any) -> bool:
    """Whether a document checks parameters with regular expressions that a user wrote: RE2
    matches in linear time, but compiling one is work of the pattern's size (a 250 KB pattern
    takes 30-90 ms here), so the loop leaves them to a worker. The built-ins' patterns are ours."""
    return any(spec.allowed_pattern for spec in doc.parameters.values()) and builtin_document(doc.name) is None


class Renderer:
    """Renders documents for the loop: inline when that is safe, else in a worker."""

    def __init__(self, settings: RenderSettings, documents: DocumentStore):
        self.settings = settings
        self.documents = documents
        self._workers: list[_Worker] = []
        self._queue: deque[_Job] = deque()
        self._next_job = 1
        self.on_fds_changed: Callable[[list[int], list[int]], None] | None = None  # (added, removed)
        self.stats = {"inline": 0, "worker": 0, "timeouts": 0, "refused_busy": 0, "parsed_worker": 0,
                      "parse_left_to_worker": 0}
        self._broken_until = 0.0  # a worker died before it was ready: do not respawn in a loop
        self._rendered: OrderedDict[tuple[Any, ...], Rendered] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._queue) or any(w.job is not None for w in self._workers)

    # -- what handlers call --------------------------------------------------------------------

    def render(self, msg: protocol.SendCommand, platform: str, done: Done) -> None:
        """Calls ``done(Rendered, None)`` or ``done(None, BrokerError)``, now or later."""
        if not msg.document_content:
            try:
                doc, version = load_named_if_cheap(msg, self.documents, PARSE_IN_LOOP_BYTES)
                if doc is None:  # long, and not parsed yet: a worker parses and renders it
                    self.stats["parse_left_to_worker"] += 1
                else:
                    rendered = self._inline(doc, version, msg, platform)
                    if rendered is not None:
                        self.stats["inline"] += 1
                        done(rendered, None)
                        return
                    if self._keeps(doc, msg):  # see _authors_patterns: a worker checks them, its result is kept
                        done = self._keeping(self._key(doc, version, msg, platform), doc.sha256, version, done)
            except BrokerError as exc:
                done(None, exc)
                return
        limits = self.settings.limits
        self._submit(RenderJob(0, msg, platform, limits.max_step_bytes, limits.max_command_bytes), done)

    def _inline(self, doc: Any, version: str, msg: protocol.SendCommand, platform: str) -> Rendered | None:
        """The rendering done here in the loop, or None when it is for a worker (see
        ``may_render_inline``). SSM substitution depends on the document, the parameters, the
        platform and the timeout alone, and a playbook in per-host mode sends one command per host
        with the same parameters: a rendering made before is copied (it passed the check then, and
        the limits do not change). The copy is shallow: a caller may rebind its lists (run_as
        does), never change what they hold."""
        key = self._key(doc, version, msg, platform)
        done = self._rendered.get(key)
        if done is not None:
            self._rendered.move_to_end(key)
            self.stats["inline_again"] = self.stats.get("inline_again", 0) + 1
            return done.copy()
        if not may_render_inline(doc, msg, self.settings.limits) or _authors_patterns(doc):
            return None
        done = render(doc, version, msg, platform, store_resolver(self.documents), self.settings.limits)
        self._keep(key, done)
        return done.copy()

    @staticmethod
    def _key(doc: Any, version: str, msg: protocol.SendCommand, platform: str) -> tuple[Any, ...]:
        return (doc.sha256, version, platform, msg.execution_timeout, msg.document_hash.lower(),
                msgspec.json.encode(msg.parameters, order="sorted"))

    def _keep(self, key: tuple[Any, ...], rendered: Rendered) -> None:
        self._rendered[key] = rendered
        if len(self._rendered) > RENDER_CACHE:
            self._rendered.popitem(last=False)

    def _keeps(self, doc: Any, msg: protocol.SendCommand) -> bool:
        """Whether a worker's rendering of this document is kept as an inline one would be: it
        would be rendered in the loop but for its author's ``allowedPattern``s."""
        return _authors_patterns(doc) and may_render_inline(doc, msg, self.settings.limits)

    def _keeping(self, key: tuple[Any, ...], sha256: str, version: str, done: Done) -> Done:
        """``done``, keeping a worker's rendering of the document the loop looked up (not one of a
        version stored meanwhile): the same parameters again are rendered from memory, checked."""
        def keep(rendered: Any, error: BrokerError | None) -> None:
            if error is None and rendered.sha256 == sha256 and rendered.version == version:
                self._keep(key, rendered)
                rendered = rendered.copy()
            done(rendered, error)

        return keep

    def validate(self, name: str, content: str, done: Done) -> None:
        """Checks a document for create/update in a worker: ``done(CheckedDocument, None)`` or an
        error."""
        self._submit(ValidateJob(0, name, content), done)

    def check_stored(self, name: str, version: int, content: str, done: Done) -> None:
        """Parses a stored version in a worker (for show: 0.5 s for 256 KiB, too long for the
        loop): ``done(CheckedDocument, None)``, its ``parameters`` filled in, or an error."""
        self._submit(ValidateJob(0, name, content, version), done)

    # -- the pool ------------------------------------------------------------------------------

    def _submit(self, request: RenderJob | ValidateJob, done: Done) -> None:
        if len(self._queue) >= self.settings.max_queued:
            self.stats["refused_busy"] += 1
            done(None, BrokerError("RenderBusy", "too many documents are being rendered; try again shortly"))
            return
        request.job = self._next_job
        self._next_job += 1
        self._queue.append(_Job(request.job, request, done))
        self._dispatch()

    def _dispatch(self) -> None:
        if self._queue and time.monotonic() < self._broken_until:
            while self._queue:
                self._queue.popleft().done(None, BrokerError(
                    "RenderFailed", "the broker's render workers cannot start (see its log); try again later"))
            return
        while self._queue:
            worker = next((w for w in self._workers if w.ready and w.job is None), None)
            if worker is None:
                if len(self._workers) < self.settings.workers and all(w.ready for w in self._workers):
                    self._spawn()  # takes the job once it says it is ready
                return
            job = self._queue.popleft()
            worker.job = job
            worker.deadline = time.monotonic() + self.settings.timeout
            worker.send(job.request)
            self.stats["worker"] += 1

    def _spawn(self) -> _Worker:
        worker = _Worker(self.settings)
        self._workers.append(worker)
        if self.on_fds_changed is not None:
            self.on_fds_changed([worker.fd], [])
        return worker

    def _retire(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        if self.on_fds_changed is not None:
            self.on_fds_changed([], [worker.fd])
        worker.kill()

    def collect(self) -> None:
        """Reads what the workers said (the loop calls this when a worker's fd is readable, and
        on every tick); finishes jobs, answers their document requests, replaces dead workers."""
        for worker in list(self._workers):
            messages = worker.read()
            for message in messages or ():
                if isinstance(message, Ready):
                    worker.ready = True
                    continue
                job = worker.job
                if job is None or message.job != job.job:
                    continue
                if isinstance(message, NeedDocument):
                    worker.send(self._document_for(job.job, message))
                    continue
                worker.job = None
                self.stats["parsed_worker"] += message.parsed
                if message.ok:
                    job.done(message.rendered if isinstance(job.request, RenderJob) else message.checked, None)
                else:
                    job.done(None, BrokerError(message.code, message.message))
            if messages is None:  # the worker died (its memory limit, or killed)
                job, worker.job = worker.job, None
                if not worker.ready:
                    log.error("a render worker exited before it was ready (exit %s); retrying in 5 s",
                              worker.proc.poll())
                    self._broken_until = time.monotonic() + 5.0
                self._retire(worker)
                if job is not None:
                    job.done(None, BrokerError(
                        "RenderFailed", "rendering this document failed: it needed more memory than a render "
                                        "worker may use"))
        self._dispatch()

    def _document_for(self, job: int, need: NeedDocument) -> DocumentReply:
        try:  # the content only: the worker parses it, the loop need not
            info = self.documents.read(need.name, need.version)
        except BrokerError as exc:
            return DocumentReply(job, error=exc.message, code=exc.code)
        return DocumentReply(job, info.name, str(info.version), info.content)

    def check_deadlines(self, now: float) -> None:
        for worker in list(self._workers):
            if worker.job is not None and now >= worker.deadline:
                job, worker.job = worker.job, None
                self.stats["timeouts"] += 1
                log.warning("a document took longer than %gs to render; its worker was stopped", self.settings.timeout)
                self._retire(worker)
                job.done(None, BrokerError(
                    "RenderTimeout", f"rendering this document took longer than {self.settings.timeout:g}s "
                                     "(--render-timeout); it was stopped"))
        self._dispatch()

    def fds(self) -> list[int]:
        return [w.fd for w in self._workers]

    def close(self) -> None:
        for worker in list(self._workers):
            worker.kill()
        self._workers.clear()
