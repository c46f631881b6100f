"""Runs one invocation's steps the way amazon-ssm-agent does.

Each step's script is written to a file (0700) and run with /bin/sh, or by its own ``#!`` line,
or by the step's interpreter; in its own session and process group, so that a timeout or a cancel
stops the whole tree: SIGTERM first (cleanup traps run), SIGKILL after a grace period. Output goes
to files, not pipes: no deadlock, no memory spent on huge output, and the live-output reader can
tail them.

Step flow (SSM): exit code 0 succeeds; 168 succeeds and skips the remaining steps; 169 fails and
skips them; any other code fails the step but later steps still run unless ``onFailure: exit``
(stop, Failed) or ``onFailure: successAndExit`` (stop, counted as success). ``onSuccess: exit``
stops after a successful step. Steps marked ``finallyStep`` run whatever happened before. A step
whose precondition does not match this platform is Skipped, never failed.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from zerorun import protocol
from zerorun.protocol import (
    CANCELLED, FAILED, SKIPPED, SUCCESS, TIMED_OUT, Invocation, InvocationResult, OutputChunk, Step,
    StepResult)

EXIT_SUCCESS_AND_STOP = 168
EXIT_FAILURE_AND_STOP = 169
KILL_GRACE_SECONDS = 5.0
LIVE_OUTPUT_INTERVAL = 0.25  # seconds between live-output reads of a running step

OutputSink = Callable[[list[OutputChunk]], None]


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

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            if self._proc is not None:
                _stop_group(self._proc)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def run(self) -> InvocationResult:
        inv = self.invocation
        started = time.time()
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        results: list[StepResult] = []
        stop = False
        try:
            for index, step in enumerate(inv.steps):
                if stop and not step.finally_step:
                    results.append(StepResult(step.name, SKIPPED, detail="skipped after an earlier exit"))
                    continue
                if self.cancelled:
                    results.append(StepResult(step.name, CANCELLED, detail="cancelled"))
                    stop = True
                    continue
                if not self._precondition_holds(step):
                    results.append(StepResult(step.name, SKIPPED, detail="precondition not met"))
                    continue
                res = self._run_step(index, step)
                results.append(res)
                stop = stop or self._stops_after(step, res)
        finally:
            self._clean_up()
        return _summarise(inv.invocation_id, results, started, time.time())

    def _clean_up(self) -> None:
        """Removes what this execution created: the files it knows first (cheap), the whole
        directory only when a step left something of its own in it."""
        for path in self._created:
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            os.rmdir(self.work_dir)
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- one step ---------------------------------------------------------------------------

    def _precondition_holds(self, step: Step) -> bool:
        pre = step.precondition
        if pre is None:
            return True
        values = [self.platform if v == "platformType" else v for v in pre.operands]
        if pre.op == "StringEquals" and len(values) == 2:
            return values[0] == values[1]
        return False

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

    @staticmethod
    def _stops_after(step: Step, res: StepResult) -> bool:
        if res.status == CANCELLED or res.status == TIMED_OUT:
            return True
        if res.exit_code in (EXIT_SUCCESS_AND_STOP, EXIT_FAILURE_AND_STOP):
            return True
        if res.status == SUCCESS:
            return step.on_success in ("exit", "successAndExit")
        if step.on_failure == "successAndExit":
            res.status, res.detail = SUCCESS, "failure treated as success (onFailure: successAndExit)"
            return True
        return step.on_failure == "exit"

    def _command(self, step: Step, script: Path) -> list[str]:
        if step.action == "runScript" and step.interpreter:
            return [*step.interpreter, str(script)]
        if step.script.startswith("#!"):
            return [str(script)]
        return ["/bin/sh", str(script)]

    def _run_step(self, index: int, step: Step) -> StepResult:
        name = step.name
        if step.action not in ("runShellScript", "runScript"):
            return StepResult(name, FAILED, detail=f"action {step.action!r} is not supported by this agent")
        prefix = self.work_dir / f"{index:02d}"
        script = Path(f"{prefix}_script.sh" if step.action == "runShellScript" else f"{prefix}_script")
        self._created.append(script)
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(step.script if step.script.endswith("\n") else step.script + "\n")
        cwd = step.working_directory or str(self.work_dir)
        if not os.path.isdir(cwd):
            return StepResult(name, FAILED, detail=f"working directory {cwd} does not exist",
                              stderr=f"working directory {cwd} does not exist\n")
        inv = self.invocation
        env = dict(self.base_env)
        env.update(step.env)
        env.update({"ZERORUN_COMMAND_ID": inv.command_id, "ZERORUN_INSTANCE_ID": inv.instance_id,
                    "ZERORUN_INVOCATION_ID": inv.invocation_id, "ZERORUN_STEP_NAME": name,
                    "SSM_COMMAND_ID": inv.command_id, "AWS_SSM_INSTANCE_ID": inv.instance_id})
        started = time.time()
        status, detail = SUCCESS, ""
        with _OutputFile(self.work_dir, prefix, "stdout") as out, _OutputFile(self.work_dir, prefix, "stderr") as err:
            try:
                with self._lock:
                    if self.cancelled:
                        return StepResult(name, CANCELLED, detail="cancelled", started_at=started,
                                          ended_at=started)
                    self._proc = subprocess.Popen(
                        self._command(step, script), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                        stdout=out.fd, stderr=err.fd, start_new_session=True, close_fds=True)
            except OSError as exc:
                return StepResult(name, FAILED, detail=f"cannot start: {exc.strerror}",
                                  stderr=f"cannot start step {name}: {exc}\n", started_at=started,
                                  ended_at=time.time())
            proc = self._proc
            try:
                code = self._wait(proc, name, out.fd, err.fd, started + max(1, step.timeout_seconds))
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                code = proc.wait()
                status, detail = TIMED_OUT, protocol.EXECUTION_TIMED_OUT
            finally:
                with self._lock:
                    self._proc = None
            stdout, stdout_size = _read_capped(out.fd, self.max_output)
            stderr, stderr_size = _read_capped(err.fd, self.max_output)
        if status == SUCCESS and self.cancelled:
            status, detail = CANCELLED, "cancelled"
        elif status == SUCCESS and code not in (0, EXIT_SUCCESS_AND_STOP):
            status = FAILED
        if code < 0:  # killed by a signal: report it the shell's way
            code = 128 - code
        return StepResult(name, status, exit_code=code, stdout=stdout, stderr=stderr,
                          stdout_size=stdout_size, stderr_size=stderr_size, started_at=started,
                          ended_at=time.time(), detail=detail)


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


def _read_capped(fd: int, limit: int) -> tuple[str, int]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, limit), 0)
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n[output truncated by the agent: {size} bytes in all, {limit} kept]\n"
    return text, size


def _summarise(invocation_id: str, steps: list[StepResult], started: float, ended: float) -> InvocationResult:
    ran = [s for s in steps if s.status != SKIPPED]
    status, detail = SUCCESS, ""
    for s in steps:
        if s.status == CANCELLED:
            status, detail = CANCELLED, ""
            break
        if s.status == TIMED_OUT:
            status, detail = TIMED_OUT, protocol.EXECUTION_TIMED_OUT
        elif s.status == FAILED and status == SUCCESS:
            status, detail = FAILED, f"step {s.name} failed"
    failed = [s for s in ran if s.status in (FAILED, TIMED_OUT)]
    last = failed[-1] if failed else (ran[-1] if ran else None)
    exit_code = last.exit_code if last is not None else 0
    if not ran and status == SUCCESS:
        detail = "every step was skipped"
    return InvocationResult(
        invocation_id=invocation_id, status=status, status_details=detail, exit_code=exit_code,
        stdout="".join(s.stdout for s in steps), stderr="".join(s.stderr for s in steps),
        stdout_size=sum(s.stdout_size for s in steps), stderr_size=sum(s.stderr_size for s in steps),
        started_at=started, ended_at=ended, steps=steps)
