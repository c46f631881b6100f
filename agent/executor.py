"""The daemon's runner: each invocation in a worker thread, each step a process.

Each step's script is written to a file (0700) and run with /bin/sh, or by its own ``#!`` line,
or by the step's interpreter; in its own session and process group, so that a timeout or a cancel
stops the whole tree: SIGTERM first (cleanup traps run), SIGKILL after a grace period. Output goes
to files, not pipes: no deadlock, no memory spent on huge output, and the live-output reader can
tail them. Which step runs and what its exit code means is ``steps.StepFlow`` (the SSM rules,
shared with the fleet simulator's runner).

A step with ``run_as`` is spawned as that user (``runas.py``: ids, groups, environment, directory,
script file); the users are looked up before the first step. A stream the result cannot carry
whole (longer than ``max_output``, or not UTF-8) is kept after the result: its steps' output files
stay open (``KeptOutput``) until the broker has read them (``OutputRead``/``OutputDone``).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from zerorun.protocol import Invocation, InvocationResult, OutputChunk, Step, StepResult

from . import runas, steps as flow

KILL_GRACE_SECONDS = 5.0
LIVE_OUTPUT_INTERVAL = 0.25  # seconds between live-output reads of a running step
KEEP_OUTPUT_SECONDS = 3600.0  # a whole output the broker has not read for this long is dropped
MAX_KEPT_OUTPUTS = 64  # whole outputs held at once (descriptors, disk): beyond, the oldest is dropped

OutputSink = Callable[[list[OutputChunk]], None]
ResultSink = Callable[[InvocationResult], None]

log = logging.getLogger("zerorun.agent")


class ThreadRunner:
    """The agent core's runner in the daemon: a fixed pool of worker threads. ``start`` and
    ``cancel`` are called by the agent's loop; each result, and live output while a step runs,
    is handed to the sinks from the worker thread (the daemon queues them for its loop)."""

    def __init__(self, work_root: Path, platform: str, max_output: int, workers: int,
                 on_result: ResultSink, on_output: OutputSink | None = None):
        self.work_root = work_root
        self.platform = platform
        self.max_output = max_output
        self.on_result = on_result
        self.on_output = on_output
        self._executions: dict[str, Execution] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="exec")
        self._kept: dict[str, KeptOutput] = {}  # whole outputs the broker reads after the result
        self._kept_lock = threading.Lock()

    def start(self, inv: Invocation) -> None:
        execution = Execution(inv, self.work_root / inv.invocation_id, self.platform, self.max_output,
                              on_output=self.on_output)
        self._executions[inv.invocation_id] = execution
        log.info("running %s (command %s, %s)", inv.invocation_id[:8], inv.command_id, inv.document_name)
        self._pool.submit(self._execute, execution)
        return None

    def cancel(self, invocation_id: str) -> None:
        execution = self._executions.get(invocation_id)
        if execution is not None:
            execution.cancel()

    def reattach(self, inv: Invocation) -> bool:
        return False  # a step's process dies with the agent (issue 19: supervisors outlive it)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._kept_lock:
            kept, self._kept = self._kept, {}
        for output in kept.values():
            output.close()

    # -- whole outputs, read by the broker after the result (OutputRead) ---------------------

    def read_output(self, invocation_id: str, stream: str, offset: int, length: int) -> bytes | None:
        """Bytes of a kept whole output; None when this agent does not hold it (any more)."""
        with self._kept_lock:
            output = self._kept.get(invocation_id)
        return None if output is None else output.read(stream, offset, length)

    def drop_output(self, invocation_ids: list[str]) -> None:
        with self._kept_lock:
            dropped = [self._kept.pop(i) for i in invocation_ids if i in self._kept]
        for output in dropped:
            output.close()

    def expire_outputs(self, now: float) -> None:
        with self._kept_lock:
            stale = [i for i, o in self._kept.items() if now - o.touched > KEEP_OUTPUT_SECONDS]
        if stale:
            log.warning("dropping the whole output of %d invocation(s) the broker did not read", len(stale))
            self.drop_output(stale)

    def _execute(self, execution: Execution) -> None:
        """Worker thread: run, then hand the result over."""
        iid = execution.invocation.invocation_id
        try:
            result = execution.run()
        except Exception as exc:  # the executor itself failed: report, never lose the invocation
            log.exception("execution of %s failed", iid)
            result = flow.agent_error_result(iid, exc)
        kept = execution.kept_output()
        if kept is not None:
            result.stdout_follows, result.stderr_follows = kept.size("stdout"), kept.size("stderr")
            with self._kept_lock:
                self._kept[iid] = kept
                excess = list(self._kept)[:-MAX_KEPT_OUTPUTS] if len(self._kept) > MAX_KEPT_OUTPUTS else []
            if excess:
                log.warning("holding %d whole outputs the broker has not read: dropping the oldest",
                            MAX_KEPT_OUTPUTS)
                self.drop_output(excess)
        self._executions.pop(iid, None)
        self.on_result(result)


class Execution:
    """One running invocation; ``cancel()`` may be called from another thread."""

    def __init__(self, invocation: Invocation, work_dir: Path, platform: str, max_output: int,
                 base_env: dict[str, str] | None = None, on_output: OutputSink | None = None):
        self.invocation = invocation
        self.on_output = on_output
        self.work_dir = work_dir
        self.platform = platform
        self.max_output = max_output
        self.base_env = base_env if base_env is not None else dict(os.environ)
        self._cancelled = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._created: list[Path] = []
        self._accounts: dict[str, runas.Account] = {}  # run-as users, looked up before the first step
        self._script_dirs: dict[str, Path] = {}  # another user's scripts go to a directory of theirs
        # every step's output files, kept until the end: the broker reads a whole output that the
        # result could not carry (truncated, or not UTF-8) after the result
        self._outputs: dict[str, list[tuple[int, int]]] = {"stdout": [], "stderr": []}
        self._output_whole = {"stdout": True, "stderr": True}  # the result's text is the whole stream

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            if self._proc is not None:
                _stop_group(self._proc)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def run(self) -> InvocationResult:
        try:
            self._accounts = runas.resolve(step.run_as for step in self.invocation.steps)
        except runas.RunAsError as exc:  # before anything runs
            return flow.run_as_refused(self.invocation, str(exc))
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        steps = flow.StepFlow(self.invocation, self.platform)
        try:
            while (next_step := steps.next_step(self.cancelled)) is not None:
                steps.report(self._run_step(*next_step))
        finally:
            self._clean_up()
        return steps.result()

    def _clean_up(self) -> None:
        """Removes what this execution created: the files it knows first (cheap), the whole
        directory only when a step left something of its own in it."""
        for path in self._created:
            try:
                os.unlink(path)
            except OSError:
                pass
        for path in self._script_dirs.values():
            if path != self.work_dir:
                runas.remove_directory(path)
        try:
            os.rmdir(self.work_dir)
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- one step ---------------------------------------------------------------------------

    def _wait(self, proc: subprocess.Popen[bytes], step_name: str, out_fd: int, err_fd: int,
              deadline: float) -> int:
        """Waits for the step, streaming new output to ``on_output`` while it runs.

        Waits on a pidfd where the kernel has them: woken the instant the step exits, where
        ``Popen.wait(timeout)`` would poll with growing sleeps (milliseconds on short steps).
        """
        tails = [_Tail(out_fd, "stdout", self.max_output), _Tail(err_fd, "stderr", self.max_output)]
        with _ExitWatch(proc) as watch:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(proc.args, 0)
                code = watch.wait(min(remaining, LIVE_OUTPUT_INTERVAL))
                if code is not None:
                    return code
                if self.on_output is not None:
                    chunks = [OutputChunk(self.invocation.invocation_id, t.stream, text, step_name)
                              for t in tails if (text := t.read())]
                    if chunks:
                        self.on_output(chunks)

    def _run_step(self, index: int, step: Step) -> StepResult:
        account = self._accounts.get(step.run_as) if step.run_as else None
        cwd = step.working_directory or str(self.work_dir)
        if account is not None:
            try:
                cwd = runas.working_directory(step.working_directory, account)
            except runas.RunAsError as exc:
                return flow.cannot_run_as(step, str(exc))
        refused = flow.cannot_run(step, cwd)
        if refused is not None:
            return refused
        directory = self.work_dir
        if account is not None:
            directory = self._script_dirs.get(account.name) or self._script_dirs.setdefault(
                account.name, runas.script_directory(self.work_dir, account))
        prefix = directory / f"{index:02d}"
        script = Path(f"{prefix}_script.sh" if step.action == "runShellScript" else f"{prefix}_script")
        self._created.append(script)
        runas.write_script(script, flow.script_text(step), account)
        base_env = self.base_env if account is None else runas.environment(self.base_env, account)
        env = flow.step_env(base_env, self.invocation, step)
        spawn = {} if account is None else runas.spawn_options(account)
        started = time.time()
        timed_out = False
        with _OutputFile(self.work_dir, prefix, "stdout") as out, _OutputFile(self.work_dir, prefix, "stderr") as err:
            try:
                with self._lock:
                    if self.cancelled:
                        return flow.cancelled_before_start(step)
                    self._proc = subprocess.Popen(
                        flow.script_argv(step, str(script)), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                        stdout=out.fd, stderr=err.fd, start_new_session=True, close_fds=True, **spawn)
            except OSError as exc:
                return flow.cannot_start(step, exc, started)
            proc = self._proc
            try:
                code = self._wait(proc, step.name, out.fd, err.fd, started + max(1, step.timeout_seconds))
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                code = proc.wait()
                timed_out = True
            finally:
                with self._lock:
                    self._proc = None
            stdout, stdout_size = self._read_capped(out, "stdout")
            stderr, stderr_size = self._read_capped(err, "stderr")
        return flow.process_step_result(step, code, timed_out=timed_out, cancelled=self.cancelled,
                                        stdout=stdout, stdout_size=stdout_size, stderr=stderr,
                                        stderr_size=stderr_size, started_at=started)

    def _read_capped(self, output: "_OutputFile", stream: str) -> tuple[str, int]:
        """The step's output as the result carries it; the file itself is kept (its descriptor
        duplicated) for the whole output the broker may read after the result."""
        fd = output.fd
        size = os.fstat(fd).st_size
        data = os.pread(fd, min(size, self.max_output), 0)
        if size > self.max_output or not _is_utf8(data):
            self._output_whole[stream] = False
        self._outputs[stream].append((os.dup(fd), size))
        return flow.capped_text(data, size, self.max_output), size

    def kept_output(self) -> "KeptOutput | None":
        """The whole output of the streams the result could not carry; None when it carried all.
        Called once, after ``run``; the other descriptors are closed."""
        keep = {stream: parts for stream, parts in self._outputs.items()
                if not self._output_whole[stream] and parts}
        for stream, parts in self._outputs.items():
            if stream not in keep:
                for fd, _ in parts:
                    os.close(fd)
        self._outputs = {"stdout": [], "stderr": []}
        return KeptOutput(keep) if keep else None


class KeptOutput:
    """An invocation's whole stdout and/or stderr: each step's output file (by descriptor, in step
    order), read by offset in the concatenated stream."""

    def __init__(self, streams: dict[str, list[tuple[int, int]]]):
        self.streams = streams
        self.touched = time.time()

    def size(self, stream: str) -> int:
        return sum(size for _, size in self.streams.get(stream, []))

    def read(self, stream: str, offset: int, length: int) -> bytes:
        self.touched = time.time()
        out = bytearray()
        start = 0
        for fd, size in self.streams.get(stream, []):
            if length <= 0:
                break
            if offset < start + size:
                at = max(0, offset - start)
                data = os.pread(fd, min(length, size - at), at)
                out += data
                offset += len(data)
                length -= len(data)
            start += size
        return bytes(out)

    def close(self) -> None:
        for parts in self.streams.values():
            for fd, _ in parts:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.streams = {}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _ExitWatch:
    """Waits for a child's exit with a timeout, on a pidfd when available."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self.fd = -1
        if hasattr(os, "pidfd_open"):
            try:
                self.fd = os.pidfd_open(proc.pid)
            except OSError:  # old kernel, or already reaped
                self.fd = -1

    def __enter__(self) -> "_ExitWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the child still runs after ``timeout`` seconds."""
        if self.fd >= 0:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            return self.proc.wait()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class _OutputFile:
    """A step's stdout or stderr: a file in the work directory without a name (O_TMPFILE, else
    created and unlinked at once), read back through its descriptor: nothing to clean up, and
    no open/stat by path per read."""

    def __init__(self, work_dir: Path, prefix: Path, stream: str):
        try:
            self.fd = os.open(work_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (AttributeError, OSError):  # no O_TMPFILE here (kernel or file system)
            path = f"{prefix}_{stream}"
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.unlink(path)

    def __enter__(self) -> "_OutputFile":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class _Tail:
    """Reads what a running step appended to its output file since the last read."""

    def __init__(self, fd: int, stream: str, limit: int):
        self.fd, self.stream, self.limit = fd, stream, limit
        self.offset = 0
        self._pending = b""

    def read(self) -> str:
        if self.offset >= self.limit:
            return ""
        available = os.fstat(self.fd).st_size - self.offset  # pread allocates what it is asked for
        if available <= 0:
            return ""
        data = os.pread(self.fd, min(available, self.limit - self.offset), self.offset)
        self.offset += len(data)
        data = self._pending + data
        text = data.decode("utf-8", errors="ignore")  # an incomplete UTF-8 tail waits for more
        consumed = len(text.encode("utf-8"))
        self._pending = data[consumed:]
        return text


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group now, SIGKILL it after the grace period if still there."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def finish() -> None:
        try:
            proc.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threading.Thread(target=finish, daemon=True).start()

