"""A render worker: parses and renders documents for the broker, one job at a time, inside a
memory limit, with nothing but what each job carries (see ``rendering.py``).

``python -m zmq_broker.render_worker`` - started by the broker, never by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import sys
import traceback
from typing import Any, BinaryIO

from .documents import RenderLimits, check_content, load_local, render
from .errors import BrokerError
from .docstore import CheckedDocument, parameter_view
from .rendering import (_HEADER, MAX_FRAME, DocumentReply, JobDone, NeedDocument, Ready, RenderJob, ValidateJob,
                        frame, to_worker)


def _read(stream: BinaryIO) -> Any:
    header = stream.read(4)
    if len(header) < 4:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise EOFError
    return to_worker.decode(stream.read(size))


class Worker:
    def __init__(self, stdin: BinaryIO, stdout: BinaryIO):
        self.stdin, self.stdout = stdin, stdout
        self.parsed = 0  # documents the current job parsed: its JobDone says how many
        self._fetched: dict[tuple[str, str, bytes], Any] = {}  # the current job's documents, parsed

    def send(self, message: Any) -> None:
        self.stdout.write(frame(message))
        self.stdout.flush()

    def fetch(self, job: int, name: str, version: str) -> tuple[Any, str]:
        """A stored or built-in document, asked of the broker: (Document, its version)."""
        from zerorun import documents as engine

        self.send(NeedDocument(job, name, version))
        reply = _read(self.stdin)
        if not isinstance(reply, DocumentReply) or reply.job != job:
            raise BrokerError("RenderFailed", "the broker answered a document request out of turn")
        if reply.error:
            raise BrokerError(reply.code or "InvalidDocument", reply.error)
        key = (reply.name, reply.version, hashlib.sha256(reply.content.encode("utf-8", "surrogatepass")).digest())
        doc = self._fetched.get(key)
        if doc is None:  # parsed once per job, however the steps name it ("x", "x:1", "x:$LATEST")
            self.parsed += 1
            doc = self._fetched[key] = dataclasses.replace(
                engine.load_document(reply.content, name=reply.name), version=reply.version)
        return doc, reply.version

    def run_job(self, job: RenderJob | ValidateJob) -> JobDone:
        self.parsed, self._fetched = 0, {}
        try:
            done = self._run_job(job)
        finally:
            self._fetched = {}  # nothing of a job is kept for the next (memory; a worker is shared)
        done.parsed = self.parsed
        return done

    def _run_job(self, job: RenderJob | ValidateJob) -> JobDone:
        from zerorun import documents as engine

        try:
            if isinstance(job, ValidateJob):
                if not job.version:  # a stored version is shown whatever the limits were when it was stored
                    check_content(job.content)
                self.parsed += 1
                try:
                    doc = engine.load_document(job.content, name=job.name, checked=bool(job.version))
                except engine.DocumentError as exc:
                    where = f"{job.name} version {job.version} cannot be used" if job.version else job.name
                    raise BrokerError("InvalidDocument", f"document {where}: {exc}") from None
                return JobDone(job.job, True, checked=CheckedDocument(doc.name, doc.sha256, doc.description,
                                                                      parameter_view(doc)))
            msg = job.send
            limits = RenderLimits(job.max_step_bytes, job.max_command_bytes)

            def resolve(name: str, version: str) -> Any:
                try:
                    return self.fetch(job.job, name, version)[0]
                except BrokerError as exc:
                    raise engine.DocumentError(exc.message) from None

            if msg.document_content:
                self.parsed += 1
                doc, version = load_local(msg)
            else:
                if not msg.document:
                    raise BrokerError("InvalidDocument", "no document named")
                try:
                    doc, version = self.fetch(job.job, msg.document, msg.document_version)
                except BrokerError as exc:
                    raise BrokerError(exc.code if exc.code != "NotFound" else "InvalidDocument", exc.message) from None
                except engine.DocumentError as exc:
                    raise BrokerError("InvalidDocument", str(exc)) from None
            rendered = render(doc, version, msg, job.platform, resolve, limits)
            return JobDone(job.job, True, rendered=rendered)
        except BrokerError as exc:
            return JobDone(job.job, False, exc.code, exc.message)
        except MemoryError:
            return JobDone(job.job, False, "RenderFailed",
                           "rendering this document needs more memory than a render worker may use")
        except RecursionError:
            return JobDone(job.job, False, "InvalidDocument", "the document nests too deeply to render")
        except Exception as exc:  # a bug: answered, so the worker lives and nobody blames its memory
            traceback.print_exc(file=sys.stderr)  # the broker's log
            return JobDone(job.job, False, "RenderFailed",
                           f"the broker failed to handle this document ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"its log has the details")

    def serve(self) -> None:
        self.send(Ready())
        while True:
            try:
                job = _read(self.stdin)
            except EOFError:
                return
            if isinstance(job, (RenderJob, ValidateJob)):
                done = self.run_job(job)
                try:
                    data = frame(done)
                except Exception as exc:  # not msgpack (text that is not UTF-8): answered, not died of
                    traceback.print_exc(file=sys.stderr)
                    data = frame(JobDone(job.job, False, "RenderFailed", f"the result could not be sent back "
                                                                         f"({type(exc).__name__}: {str(exc)[:200]})"))
                self.stdout.write(data)
                self.stdout.flush()


def main() -> int:
    memory = int(os.environ.get("ZERORUN_RENDER_MEMORY", "0") or 0)
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    os.nice(5)  # the broker's loop comes first
    import jinja2.sandbox  # noqa: F401  (imported now, not during the first job's deadline)
    import yaml  # noqa: F401

    import zerorun.documents.render  # noqa: F401

    Worker(sys.stdin.buffer, sys.stdout.buffer).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

