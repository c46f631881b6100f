"""The agent side of interactive work for the Ansible connection plugin: exec and file transfer.

Nothing here is journaled: an interactive request is answered once, now, or not at all (the
broker answers the client with an error when the agent goes away). Every request runs in a
worker thread of this module's own small pool, never in the agent's loop, and its answer goes
back through ``reply`` (which hands it to the loop; the loop owns the socket).

- exec: ``/bin/sh -c COMMAND`` in its own process group, stdin fed from the request, stdout and
  stderr captured as raw bytes into temporary files (so a chatty command cannot fill memory, and a
  background child that keeps a descriptor open cannot hang the answer), the whole group killed
  on timeout.
- put: ``open-put`` creates a 0600 temporary file next to the target; ``write`` writes at an
  offset; ``commit`` checks the sha256 of the whole file, sets the mode (given, else the replaced
  file's, else 0644), keeps the replaced file's owner when it can, fsyncs and renames atomically.
- fetch: ``open-fetch`` opens the file and answers its size, mode and sha256 (computed
  streaming); ``read`` answers ``length`` bytes at an offset; ``close`` / ``abort`` clean up.
  Transfers idle for more than ``IDLE_TRANSFER_SECONDS`` are dropped (their temp files removed).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from zerorun import protocol

log = logging.getLogger("zerorun.agent.interactive")

DEFAULT_EXEC_TIMEOUT = 3600.0
MAX_OUTPUT_BYTES = 24 * 1024 * 1024  # per stream; the whole answer must stay under MAX_MESSAGE_BYTES
MAX_READ_BYTES = 8 * 1024 * 1024
IDLE_TRANSFER_SECONDS = 600.0
WORKERS = 16
HASH_BLOCK = 1 << 20
# A failed file operation's reason as a code the client can act on (Ansible's fetch needs
# "not found" apart from other failures), never a message to parse.
FILE_ERROR_CODES = {errno.ENOENT: "FileNotFound", errno.ENOTDIR: "FileNotFound", errno.EACCES: "PermissionDenied",
                    errno.EPERM: "PermissionDenied", errno.EISDIR: "IsADirectory"}
CLOCK_SKEW_ALLOWANCE = 300.0  # expires_at is the broker's clock: tolerate this much skew


@dataclass
class Transfer:
    transfer_id: str
    kind: str  # put | fetch
    path: str  # the target (put) or the source (fetch)
    fd: int
    temp_path: str = ""  # put only
    mode: int = -1
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


def _resolve(path: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser("~"), path)
    return os.path.normpath(path)


def _sha256_fd(fd: int) -> str:
    import hashlib  # here: OpenSSL's libcrypto is 3.4 MB of an idle agent's RSS

    digest = hashlib.sha256()
    offset = 0
    while True:
        block = os.pread(fd, HASH_BLOCK, offset)
        if not block:
            return digest.hexdigest()
        digest.update(block)
        offset += len(block)


def _read_capped(handle: Any, limit: int) -> tuple[bytes, int]:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    return handle.read(min(size, limit)), size


class Interactive:
    """Runs AgentExec / AgentFileOp requests; ``reply(message)`` is called from worker threads."""

    def __init__(self, reply: Callable[[Any], None], workers: int = WORKERS,
                 default_timeout: float = DEFAULT_EXEC_TIMEOUT):
        self._reply = reply
        self._default_timeout = default_timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="interactive")
        self._transfers: dict[str, Transfer] = {}
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._closed = False

    # -- entry points (agent loop thread) ---------------------------------------------------

    def handle(self, msg: Any) -> None:
        if self._closed:
            return
        now = time.time()
        if msg.expires_at and now > msg.expires_at + CLOCK_SKEW_ALLOWANCE:
            if isinstance(msg, protocol.AgentExec):
                self._reply(protocol.ExecDone(msg.request_id, error="expired before it reached the agent"))
            else:
                self._reply(protocol.FileDone(msg.request_id, ok=False, error="expired before it reached the agent"))
            return
        self.drop_idle()
        if isinstance(msg, protocol.AgentExec):
            self._pool.submit(self._guarded_exec, msg)
        elif isinstance(msg, protocol.AgentFileOp):
            self._pool.submit(self._guarded_file, msg)

    def close(self) -> None:
        """Agent shutdown: kill running commands, drop transfers and their temp files."""
        self._closed = True
        with self._lock:
            procs = list(self._procs.values())
            transfers = list(self._transfers.values())
            self._transfers.clear()
        for proc in procs:
            _kill_group(proc)
        for transfer in transfers:
            self._discard(transfer)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- exec -------------------------------------------------------------------------------

    def _guarded_exec(self, msg: protocol.AgentExec) -> None:
        try:
            done = self._exec(msg)
        except Exception as exc:  # never leave the client waiting for a deadline
            log.exception("exec %s failed", msg.request_id[:8])
            done = protocol.ExecDone(msg.request_id, error=f"agent error: {exc}")
        self._reply(done)

    def _exec(self, msg: protocol.AgentExec) -> protocol.ExecDone:
        timeout = msg.timeout if msg.timeout > 0 else self._default_timeout
        env = dict(os.environ)
        env.update(msg.env)
        cwd = os.path.expanduser("~")
        if not os.path.isdir(cwd):
            cwd = "/"
        started = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", msg.command], stdin=subprocess.PIPE, stdout=out,
                                        stderr=err, env=env, cwd=cwd, start_new_session=True)
            except OSError as exc:
                return protocol.ExecDone(msg.request_id, error=f"cannot start /bin/sh: {exc}")
            with self._lock:
                self._procs[msg.request_id] = proc
            timed_out = False
            try:
                proc.communicate(msg.stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(msg.request_id, None)
            stdout, stdout_size = _read_capped(out, MAX_OUTPUT_BYTES)
            stderr, stderr_size = _read_capped(err, MAX_OUTPUT_BYTES)
        log.info("exec %s: exit %s in %.3fs", msg.request_id[:8], proc.returncode, time.monotonic() - started)
        if timed_out:
            return protocol.ExecDone(msg.request_id, rc=-1, stdout=stdout, stderr=stderr,
                                     error=f"timed out after {timeout:g}s; its process group was killed")
        if stdout_size > MAX_OUTPUT_BYTES or stderr_size > MAX_OUTPUT_BYTES:
            return protocol.ExecDone(
                msg.request_id, rc=proc.returncode, error=(
                    f"output too large: stdout {stdout_size} bytes, stderr {stderr_size} bytes "
                    f"(limit {MAX_OUTPUT_BYTES} per stream); redirect it to a file and fetch that"))
        return protocol.ExecDone(msg.request_id, rc=proc.returncode, stdout=stdout, stderr=stderr)

    # -- files ------------------------------------------------------------------------------

    def _guarded_file(self, msg: protocol.AgentFileOp) -> None:
        try:
            done = self._file(msg)
        except OSError as exc:
            done = protocol.FileDone(msg.request_id, ok=False, code=FILE_ERROR_CODES.get(exc.errno, ""),
                                     error=f"{msg.op} {msg.path or msg.transfer_id}: {exc.strerror or exc}")
        except Exception as exc:
            log.exception("file op %s failed", msg.op)
            done = protocol.FileDone(msg.request_id, ok=False, error=f"agent error: {exc}")
        self._reply(done)

    def _file(self, msg: protocol.AgentFileOp) -> protocol.FileDone:
        if msg.op == "open-put":
            return self._open_put(msg)
        if msg.op == "open-fetch":
            return self._open_fetch(msg)
        with self._lock:
            transfer = self._transfers.get(msg.transfer_id)
        if transfer is None:
            if msg.op in ("abort", "close"):
                return protocol.FileDone(msg.request_id)
            return protocol.FileDone(msg.request_id, ok=False,
                                     error=f"unknown or expired transfer {msg.transfer_id[:64]!r}")
        with transfer.lock:
            transfer.last_used = time.monotonic()
            if transfer.closed:
                return protocol.FileDone(msg.request_id, ok=False, error="transfer already finished")
            if msg.op == "write" and transfer.kind == "put":
                if msg.offset < 0:
                    return protocol.FileDone(msg.request_id, ok=False, error="negative offset")
                view = memoryview(msg.data)
                offset = msg.offset
                while view:
                    written = os.pwrite(transfer.fd, view, offset)
                    view, offset = view[written:], offset + written
                return protocol.FileDone(msg.request_id, size=len(msg.data))
            if msg.op == "read" and transfer.kind == "fetch":
                length = max(0, min(msg.length, MAX_READ_BYTES))
                return protocol.FileDone(msg.request_id, data=os.pread(transfer.fd, length, max(0, msg.offset)))
            if msg.op == "commit" and transfer.kind == "put":
                return self._commit(transfer, msg)
            if msg.op in ("close", "abort"):
                self._forget(transfer)
                return protocol.FileDone(msg.request_id)
        return protocol.FileDone(msg.request_id, ok=False,
                                 error=f"operation {msg.op!r} is not valid for a {transfer.kind} transfer")

    def _register(self, transfer: Transfer) -> None:
        with self._lock:
            old = self._transfers.get(transfer.transfer_id)
            self._transfers[transfer.transfer_id] = transfer
        if old is not None:
            self._discard(old)

    def _open_put(self, msg: protocol.AgentFileOp) -> protocol.FileDone:
        target = _resolve(msg.path)
        directory, name = os.path.split(target)
        if not name:
            return protocol.FileDone(msg.request_id, ok=False, error=f"{msg.path!r} names a directory")
        if os.path.isdir(target):
            return protocol.FileDone(msg.request_id, ok=False, error=f"{target} is a directory")
        temp = os.path.join(directory, f".{name[:180]}.zerorun-{msg.transfer_id[:16]}.tmp")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._register(Transfer(msg.transfer_id, "put", target, fd, temp_path=temp, mode=msg.mode))
        return protocol.FileDone(msg.request_id)

    def _commit(self, transfer: Transfer, msg: protocol.AgentFileOp) -> protocol.FileDone:
        """Called with transfer.lock held."""
        fd = transfer.fd
        digest = _sha256_fd(fd)
        if msg.sha256 and digest != msg.sha256.lower():
            self._forget(transfer)
            return protocol.FileDone(msg.request_id, ok=False, sha256=digest,
                                     error=f"checksum mismatch for {transfer.path}: got {digest}, "
                                           f"expected {msg.sha256}; the file was not replaced")
        try:
            existing = os.stat(transfer.path)
        except FileNotFoundError:
            existing = None
        mode = transfer.mode if transfer.mode >= 0 else msg.mode
        if mode < 0:
            mode = stat.S_IMODE(existing.st_mode) if existing is not None else 0o644
        os.fchmod(fd, stat.S_IMODE(mode))
        if existing is not None and os.geteuid() == 0:
            try:
                os.fchown(fd, existing.st_uid, existing.st_gid)
            except OSError:
                pass
        os.fsync(fd)
        size = os.fstat(fd).st_size
        os.replace(transfer.temp_path, transfer.path)
        transfer.temp_path = ""
        self._forget(transfer)
        return protocol.FileDone(msg.request_id, size=size, sha256=digest, mode=stat.S_IMODE(mode))

    def _open_fetch(self, msg: protocol.AgentFileOp) -> protocol.FileDone:
        path = _resolve(msg.path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IsADirectoryError(21, "not a regular file")
            digest = _sha256_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        self._register(Transfer(msg.transfer_id, "fetch", path, fd))
        return protocol.FileDone(msg.request_id, size=info.st_size, sha256=digest,
                                 mode=stat.S_IMODE(info.st_mode))

    def _forget(self, transfer: Transfer) -> None:
        with self._lock:
            if self._transfers.get(transfer.transfer_id) is transfer:
                del self._transfers[transfer.transfer_id]
        self._discard(transfer)

    @staticmethod
    def _discard(transfer: Transfer) -> None:
        if transfer.closed:
            return
        transfer.closed = True
        try:
            os.close(transfer.fd)
        except OSError:
            pass
        if transfer.temp_path:
            try:
                os.unlink(transfer.temp_path)
            except OSError:
                pass

    def drop_idle(self) -> None:
        """Forgets transfers nobody touched for IDLE_TRANSFER_SECONDS (a client that died
        mid-transfer), removing their temporary files. Called on every request and by the
        agent's loop once a minute."""
        now = time.monotonic()
        with self._lock:
            idle = [t for t in self._transfers.values() if now - t.last_used > IDLE_TRANSFER_SECONDS]
            for t in idle:
                del self._transfers[t.transfer_id]
        for t in idle:
            log.warning("dropped idle transfer %s (%s)", t.transfer_id[:8], t.path)
            with t.lock:
                self._discard(t)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
