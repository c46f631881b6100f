"""A supervisor: the process that owns one running invocation and outlives the agent.

The agent starts one per invocation (forked by ``zygote.py``, in a session of its own, with no
broker connection). It runs the invocation's steps through the step flow (``steps.py``): each
step a process in its own process group inside the supervisor's session, its output in files of
the run directory, its execution timeout and cancel enforced here (SIGTERM to the group, SIGKILL
after the grace period). When the flow is over it writes the outcome (the invocation's result,
or where to resume after the reboot a step asked for) and exits. An agent restart changes
nothing for it: the next agent finds it through its run directory and takes it back
(``executor.py``). This is amazon-ssm-agent's design (document workers outlive the agent, whose
unit has ``KillMode=process``); its process identity (pid and start time) is kept the same way.

The run directory (``<state dir>/work/<invocation id>``, 0700) is the contract between a
supervisor and whichever agent takes it back, across agent versions:

- ``supervisor``: JSON ``{"format", "pid", "start", "boot"}`` (its first line), written before
  any step runs: the pid, its start time in clock ticks since boot, and the boot id (a reboot
  ends every supervisor); at byte ``STEP_RECORD_AT``, ``"PGID START"`` while a step's process
  runs (blank otherwise): the group to kill if the supervisor dies with it;
- ``NN_script.sh`` (``NN_script``), ``NN.stdout``, ``NN.stderr``: step ``NN``'s script and
  output (the agent reads the output files for live output);
- ``outcome``: msgpack ``Outcome``, written last (``outcome.tmp``, renamed), read once by the agent.

When the run directory cannot take the outcome (its disk filled while a step ran: ENOSPC,
EDQUOT, or any other ``OSError``), the supervisor sends it to the agent that launched it over its
socket instead (``outcome_message``: ``[b"O"][u32 length][msgpack Outcome]``, in place of the
``D`` of ``zygote.py``), within ``SEND_OUTCOME_SECONDS`` (an agent that stopped reading must not
hold it for ever), and the agent takes it from there exactly as from the file; the supervisor
then exits (not reused: its run directory has no outcome, and must not name a process that runs
something else, ``zygote.py``). The result's stderr then says that the output may be cut
(``OUTPUT_MAY_BE_CUT``): the step's own writes to its output files failed too once the disk was
full, and no error of theirs reached the supervisor. Only when no agent is there to receive it
(the agent restarted: its end of the socket is closed, or it never read) is the outcome lost:
the supervisor exits without one, and the next agent reports the invocation lost, saying the disk
is full (``executor._full_disk``). The socket is the supervisor's alone: a step never inherits it
(``close_fds``, and it is ``O_CLOEXEC``), so only the supervisor speaks there. On such a disk a
later step's script or output files may not be made either: that step fails alone ("cannot
start: No space left on device"), the steps before keep their results, and the flow goes on.

Creating a file costs up to a millisecond on some file systems, renaming one microseconds: the
agent hands each supervisor a directory made beforehand with the files of a one-step invocation
already there (``SPARE_FILES``), so the hot path creates nothing. Files are therefore opened
without ``O_EXCL`` (the directory is the agent's, 0700), and without ``O_TRUNC`` (``_open_empty``):
ext4 flushes a file truncated to zero when it is closed (``auto_da_alloc``), even one that was
empty, which costs about 20 us per file; a spare's files are empty, a leftover is truncated.

Signals: SIGUSR1 cancels (the running step is stopped, the invocation ends Cancelled); SIGTERM
stops it too and ends it Failed (``systemctl kill`` of the agent's unit sends it to every
process of the unit). The signals are blocked until the handlers are set (the zygote forks with
them blocked), so a cancel that arrives at once is never lost. A supervisor is reused by the
agent that started it (``zygote.py``): between invocations SIGUSR1 is ignored (a cancel that
came too late for the last invocation is discarded by the kernel, never applied to the next)
and SIGTERM ends the idle process; a supervisor waiting for an invocation ends when the agent's
end of its socket closes.

Running a step as another user happens here too (``runas.py``): the users are looked up before
the first step (an unknown one fails the invocation, nothing runs); the step's process gets the
user's ids, groups and environment from ``Popen``; its script goes to a directory of that user's;
its output files stay in the run directory (the step inherits them as descriptors).

A stream the result cannot carry whole (more than ``max_output`` bytes over all the invocation's
steps, so that a result of many steps still fits in one message; or not UTF-8) is named in the
outcome (``Outcome.kept``: each step's output file and its size); the agent opens those files
before it removes the run directory and serves them to the broker (``OutputRead``).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from zerorun.protocol import FAILED, Invocation, InvocationResult, Step, StepResult

from . import runas, steps as flow

FORMAT = 1
KILL_GRACE_SECONDS = 5.0
MAX_WAIT_SECONDS = 86400.0
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
CANCEL_SIGNAL = signal.SIGUSR1
STOPPED_BY_SIGTERM = "stopped by SIGTERM to its supervisor (the agent's service was killed)"

IDENTITY_FILE = "supervisor"
STEP_RECORD_AT = 256  # the step record's offset in the identity file
OUTCOME_FILE = "outcome"
SPARE_FILES = ((IDENTITY_FILE, 0o600), ("00_script.sh", 0o700), ("00.stdout", 0o600), ("00.stderr", 0o600),
               (f"{OUTCOME_FILE}.tmp", 0o600))
CHANNEL_OUTCOME = b"O"  # on the socket: the outcome itself follows (the run directory could not take it)
OUTCOME_LENGTH = struct.Struct("!I")
SEND_OUTCOME_SECONDS = 60.0  # to send an outcome on the socket, all of it: the agent reads it as it comes
OUTPUT_MAY_BE_CUT = ("[output may be cut: the run directory could not take the result ({why}); what the steps "
                     "wrote there once that began is missing]\n")
_OPEN = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # no O_TRUNC: see _open_empty
_OPEN_RW = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class Launch(msgspec.Struct, omit_defaults=True):
    """What the agent hands a new supervisor."""

    invocation: Invocation
    run_dir: str
    platform: str
    max_output: int
    resume: flow.Resume | None = None
    kill_grace: float = KILL_GRACE_SECONDS


class Outcome(msgspec.Struct, omit_defaults=True):
    """What a supervisor leaves behind: the result, or (``reboot``) where to resume."""

    result: InvocationResult
    reboot: flow.Resume | None = None
    format: int = FORMAT
    kept: dict[str, list[tuple[str, int]]] = {}  # stream -> [(output file in the run dir, size)]


class Identity(msgspec.Struct):
    pid: int
    start: int  # clock ticks since boot (/proc/<pid>/stat field 22)
    boot: str
    format: int = FORMAT


_BOOT_ID = ""  # read once by the zygote, for every supervisor it forks
_PROCESS: dict[str, object] = {}  # per supervisor process, kept across the invocations it runs
_encode = msgspec.msgpack.Encoder().encode
_decode_launch = msgspec.msgpack.Decoder(Launch).decode
_decode_outcome = msgspec.msgpack.Decoder(Outcome).decode


# -- process identity (also used by the agent) ------------------------------------------------


def set_boot_id(value: str) -> None:
    """The zygote reads the boot id once, for every supervisor it forks."""
    global _BOOT_ID
    _BOOT_ID = value


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, session, start time) of a process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[2]), int(fields[3]), int(fields[19])


def read_identity(run_dir: Path) -> Identity | None:
    try:
        data = (run_dir / IDENTITY_FILE).read_bytes()
        return msgspec.json.decode(data[:STEP_RECORD_AT].strip(), type=Identity)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None  # not there, or not written yet (the file may exist empty)


def read_step_record(run_dir: Path) -> tuple[int, int] | None:
    """(process group, start time) of the step running, None when none runs."""
    try:
        data = (run_dir / IDENTITY_FILE).read_bytes()[STEP_RECORD_AT:].split()
        return (int(data[0]), int(data[1])) if len(data) == 2 else None
    except (OSError, ValueError):
        return None


def make_spare(path: Path) -> None:
    """A run directory with the files of a one-step invocation already made (see above)."""
    os.mkdir(path, 0o700)
    for name, mode in SPARE_FILES:
        os.close(os.open(path / name, _OPEN | os.O_EXCL, mode))


def is_alive(identity: Identity) -> bool:
    """The very process that wrote ``identity`` is running (same boot, pid and start time)."""
    if identity.boot and identity.boot != boot_id():
        return False
    stat = proc_stat(identity.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[3] == identity.start


def read_outcome(run_dir: Path) -> Outcome | None:
    try:
        return _decode_outcome((run_dir / OUTCOME_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def kill_leftovers(run_dir: Path, identity: Identity | None) -> int:
    """After its supervisor is gone: kills the process group of the step that was running
    (checked: same session, started after the supervisor), so that nothing of the invocation
    runs on unsupervised. Returns how many processes were signalled."""
    if identity is None or (identity.boot and identity.boot != boot_id()):
        return 0  # never started a step, or the machine rebooted: nothing of it can run
    record = read_step_record(run_dir)
    if record is None:
        return 0  # no step was running
    pgid, started = record
    killed = 0
    for pid in _pids():
        stat = proc_stat(pid)
        if stat is None or stat[1] != pgid or stat[2] != identity.pid or stat[3] < min(started, identity.start):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


# -- the supervisor process ----------------------------------------------------------------------


class Supervisor:
    """One invocation's steps, in this process (forked by the zygote, a session leader)."""

    def __init__(self, launch: Launch, base_env: dict[str, str], channel: socket.socket | None = None):
        self.launch = launch
        self.channel = channel  # to the agent: where the outcome goes when the run directory cannot take it
        self.outcome_sent = False  # it went there (no ``D`` follows, and this process exits)
        self.invocation = launch.invocation
        self.run_dir = Path(launch.run_dir)
        self.base_env = base_env
        self.cancelled = False
        self.terminated = False
        self._wake_r = self._wake_w = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_sent_at = 0.0
        self._identity_fd = -1
        self._accounts: dict[str, runas.Account] = {}
        self._script_dirs: dict[str, Path] = {}  # another user's scripts go to a directory of theirs
        self._outputs: dict[str, list[tuple[str, int]]] = {"stdout": [], "stderr": []}
        self._output_whole = {"stdout": True, "stderr": True}  # the result's text is the whole stream
        self._carried = {"stdout": 0, "stderr": 0}  # bytes of each stream the result's steps carry so far
        for before in launch.resume.steps if launch.resume is not None else ():  # the steps run before a reboot
            self._carried["stdout"] += len(before.stdout.encode("utf-8", "surrogatepass"))  # are in the result too
            self._carried["stderr"] += len(before.stderr.encode("utf-8", "surrogatepass"))

    def run(self) -> int:
        """Everything a supervisor does, up to its exit code (0 once the outcome is written, or
        sent on the socket)."""
        self._write_identity()
        self._wake_r = _process_setup()
        _drain(self._wake_r)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a cancel sent already lands now
        launch = self.launch
        steps = flow.StepFlow(self.invocation, launch.platform, resume=launch.resume)
        try:
            self._accounts = runas.resolve(step.run_as for step in self.invocation.steps)
        except runas.RunAsError as exc:  # before anything runs
            try:
                return self._write_outcome(Outcome(flow.run_as_refused(self.invocation, str(exc))))
            finally:
                self._idle()
        try:
            while (next_step := steps.next_step(self.cancelled)) is not None:
                steps.report(self._run_step(*next_step))
            result = steps.result()
        except Exception as exc:  # report, never lose the invocation
            result = flow.agent_error_result(self.invocation.invocation_id, exc)
        finally:
            for path in self._script_dirs.values():
                if path != self.run_dir:
                    runas.remove_directory(path)
        if self.terminated:
            result.status, result.status_details = FAILED, STOPPED_BY_SIGTERM
        reboot = steps.reboot if not self.cancelled else None
        kept = {} if reboot is not None else {
            stream: parts for stream, parts in self._outputs.items() if parts and not self._output_whole[stream]}
        try:
            return self._write_outcome(Outcome(result, reboot=reboot, kept=kept))
        finally:
            self._idle()

    def _idle(self) -> None:
        """The invocation is over: a late cancel is discarded, SIGTERM ends the idle process; this
        run's descriptors are closed (the process may run the agent's next invocation)."""
        signal.signal(CANCEL_SIGNAL, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._identity_fd >= 0:
            os.close(self._identity_fd)
        self._identity_fd = -1

    def _write_outcome(self, outcome: Outcome) -> int:
        tmp = self.run_dir / f"{OUTCOME_FILE}.tmp"
        try:
            with os.fdopen(_open_empty(tmp, _OPEN, 0o600), "wb") as f:
                f.write(_encode(outcome))
            os.rename(tmp, self.run_dir / OUTCOME_FILE)
        except OSError as exc:  # a full disk, say: the outcome goes to the agent on the socket
            self._send_outcome(outcome, exc)
        return 0

    def _send_outcome(self, outcome: Outcome, exc: OSError) -> None:
        """The run directory cannot take the outcome: it goes to the agent on the socket. Raises
        ``exc`` when it cannot go there either (no socket, or no agent reading it): the
        invocation is lost, as before."""
        try:
            os.unlink(self.run_dir / f"{OUTCOME_FILE}.tmp")  # what the failed write took goes back
        except OSError:
            pass
        if self.channel is None:
            raise exc
        said = OUTPUT_MAY_BE_CUT.format(why=exc.strerror or exc)
        result = outcome.result
        ran = [step for step in result.steps if step.started_at]
        for holder in (result, *ran[-1:]):  # the invocation's stderr, and the last step's that ran
            holder.stderr += said if not holder.stderr or holder.stderr.endswith("\n") else "\n" + said
        try:
            send_outcome(self.channel, _encode(outcome), SEND_OUTCOME_SECONDS)
        except OSError as sent:  # the agent is gone, or stopped reading: nobody will have it
            raise exc from sent
        self.outcome_sent = True

    def _write_identity(self) -> None:
        pid = os.getpid()
        if _PROCESS.get("pid") != pid:  # the same for every invocation this process runs
            stat = proc_stat(pid)
            _PROCESS.clear()
            _PROCESS.update(pid=pid, start=stat[3] if stat else 0)
            record = msgspec.json.encode(Identity(pid, stat[3] if stat else 0, _BOOT_ID or boot_id()))
            _PROCESS["record"] = record.ljust(STEP_RECORD_AT) + b" " * 32
        self._identity_fd = _open_empty(self.run_dir / IDENTITY_FILE, _OPEN, 0o600)
        os.write(self._identity_fd, _PROCESS["record"])  # type: ignore[arg-type]  # one write: all or nothing

    def _step_record(self, text: str) -> None:
        os.pwrite(self._identity_fd, text.encode().ljust(32), STEP_RECORD_AT)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.cancelled = True
        if signum == signal.SIGTERM:
            self.terminated = True
        self._stop_step()

    def _stop_step(self) -> None:
        """SIGTERM to the running step's group (once); the wait loop sends SIGKILL after the grace."""
        proc = self._proc
        if proc is not None and not self._stop_sent_at:
            self._stop_sent_at = time.monotonic()
            _signal_group(proc.pid, signal.SIGTERM)

    # -- one step ---------------------------------------------------------------------------

    def _run_step(self, index: int, step: Step) -> StepResult:
        account = self._accounts.get(step.run_as) if step.run_as else None
        cwd = flow.working_directory(step.working_directory, str(self.run_dir))
        if account is not None:
            try:  # a relative directory is inside the user's default one, where its downloads go
                requested = step.working_directory and flow.working_directory(
                    step.working_directory, runas.working_directory("", account))
                cwd = runas.working_directory(requested, account)
            except runas.RunAsError as exc:
                return flow.cannot_run_as(step, str(exc))
        refused = flow.cannot_run(step, cwd)
        if refused is not None:
            return refused
        prefix = self.run_dir / f"{index:02d}"
        try:  # its files cannot be made (a full disk): this step fails, and the steps before keep their results
            script, spawn = self._write_script(index, step, account)
        except OSError as exc:
            return flow.cannot_start(step, exc, time.time())
        base_env = self.base_env if account is None else runas.environment(self.base_env, account)
        env = flow.step_env(base_env, self.invocation, step)
        started = time.time()
        try:
            out_fd = _open_empty(f"{prefix}.stdout", _OPEN_RW, 0o600)
        except OSError as exc:
            return flow.cannot_start(step, exc, started)
        try:
            err_fd = _open_empty(f"{prefix}.stderr", _OPEN_RW, 0o600)
        except OSError as exc:
            os.close(out_fd)
            return flow.cannot_start(step, exc, started)
        try:
            if self.cancelled:
                return flow.cancelled_before_start(step)
            try:
                proc = subprocess.Popen(
                    flow.script_argv(step, script), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                    stdout=out_fd, stderr=err_fd, process_group=0, close_fds=True, **spawn)  # type: ignore[arg-type]
            except OSError as exc:
                return flow.cannot_start(step, exc, started)
            self._proc, self._stop_sent_at = proc, 0.0
            # the step started after its supervisor: the supervisor's start time bounds it
            self._step_record(f"{proc.pid} {_PROCESS.get('start', 0)}")
            if self.cancelled:  # a signal between the check above and the Popen
                self._stop_step()
            # the deadline is on the monotonic clock: a wall clock stepped back must not stretch it
            code, timed_out = self._wait(proc, time.monotonic() + max(1, step.timeout_seconds))
            self._proc = None
            self._step_record("")
            stdout, stdout_size = self._read_capped(out_fd, f"{index:02d}.stdout", "stdout")
            stderr, stderr_size = self._read_capped(err_fd, f"{index:02d}.stderr", "stderr")
        finally:
            os.close(out_fd)
            os.close(err_fd)
        return flow.process_step_result(step, code, timed_out=timed_out, cancelled=self.cancelled,
                                        stdout=stdout, stdout_size=stdout_size, stderr=stderr,
                                        stderr_size=stderr_size, started_at=started)

    def _write_script(self, index: int, step: Step, account: runas.Account | None) -> tuple[str, dict[str, object]]:
        """The step's script file (in the run directory, or for another user in a directory of
        theirs), and how to spawn it; ``OSError`` when it cannot be written."""
        suffix = "_script.sh" if step.action == "runShellScript" else "_script"
        if account is not None and account.switches:
            directory = self._script_dirs.get(account.name) or self._script_dirs.setdefault(
                account.name, runas.script_directory(self.run_dir, account))
            script = str(directory / f"{index:02d}{suffix}")
            runas.write_script(Path(script), flow.script_text(step), account)
            return script, runas.spawn_options(account)
        prefix = self.run_dir / f"{index:02d}"
        script = f"{prefix}{suffix}"
        if index == 0 and step.action != "runShellScript":
            try:  # the spare directory's script file has the shell name: renaming costs nothing
                os.rename(f"{prefix}_script.sh", script)
            except FileNotFoundError:
                pass
        with os.fdopen(_open_empty(script, _OPEN, 0o700), "wb") as f:
            f.write(flow.script_text(step).encode())
        return script, {}

    def _read_capped(self, fd: int, name: str, stream: str) -> tuple[str, int]:
        """The step's output as the result carries it: ``max_output`` bytes of each stream for all
        the steps together (each step's text is also in the invocation's, so a per-step cap let a
        result of a few steps outgrow the largest message, and the agent resent it for ever); the
        file is named in the outcome when the result cannot carry the stream whole."""
        limit = max(0, self.launch.max_output - self._carried[stream])
        size = os.fstat(fd).st_size
        data = os.pread(fd, min(size, limit), 0)
        if size > limit or not _is_utf8(data):
            self._output_whole[stream] = False
        self._carried[stream] += len(data)
        self._outputs[stream].append((name, size))
        return flow.capped_text(data, size, limit), size

    def _wait(self, proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, bool]:
        """Waits for the step's exit, woken at once by it (a pidfd) or by a signal (the wakeup
        fd); enforces the timeout. After a SIGTERM to the group, whatever is left of it gets
        SIGKILL once the grace period is over (also when the main process exited earlier).
        ``deadline`` is ``time.monotonic()`` time."""
        timed_out = False
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = -1
        grace = self.launch.kill_grace
        try:
            while True:
                now = time.monotonic()
                if not timed_out and now >= deadline:
                    timed_out = True
                    self._stop_step()
                waits = [deadline - now] if not timed_out else []
                if self._stop_sent_at:
                    kill_at = self._stop_sent_at + grace
                    if now >= kill_at:
                        _signal_group(proc.pid, signal.SIGKILL)
                        return proc.wait(), timed_out
                    waits.append(kill_at - now)
                # at most a day per wait: select() refuses a timeout past time_t (a step's timeout is
                # whatever the broker sent), and the loop looks at the deadline again anyway
                timeout = min(max(0.0, min(waits)), MAX_WAIT_SECONDS) if waits else None
                if pidfd >= 0:
                    ready, _, _ = select.select([pidfd, self._wake_r], [], [], timeout)
                    if self._wake_r in ready:
                        _drain(self._wake_r)
                    code = proc.poll()
                else:
                    try:
                        code = proc.wait(timeout=min(timeout, 0.05) if timeout is not None else 0.05)
                    except subprocess.TimeoutExpired:
                        code = None
                if code is not None:
                    if self._stop_sent_at:  # stopped: the rest of the group gets its grace, then SIGKILL
                        remaining = self._stop_sent_at + grace - time.monotonic()
                        if remaining > 0 and _group_exists(proc.pid):
                            time.sleep(min(remaining, 0.2))
                            continue
                        _signal_group(proc.pid, signal.SIGKILL)
                    return code, timed_out
        finally:
            if pidfd >= 0:
                os.close(pidfd)


def _process_setup() -> int:
    """Once per supervisor process: the signal wake-up pipe (its read end is returned), SIGHUP
    and SIGINT ignored."""
    if _PROCESS.get("wake_pid") != os.getpid():
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        _PROCESS.update(wake_pid=os.getpid(), wake_r=wake_r)
    return _PROCESS["wake_r"]  # type: ignore[return-value]


def _open_empty(path: str | Path, flags: int, mode: int) -> int:
    """An empty file to write, truncated only when something was left in it: ``O_TRUNC``, even on
    an empty file, makes ext4 flush the file's data when it is closed (see above)."""
    fd = os.open(path, flags, mode)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def outcome_message(data: bytes) -> bytes:
    """An encoded outcome as it goes on the socket: ``[b"O"][u32 length][msgpack Outcome]``."""
    return CHANNEL_OUTCOME + OUTCOME_LENGTH.pack(len(data)) + data


def send_outcome(channel: socket.socket, data: bytes, timeout: float) -> None:
    """Sends an encoded outcome on the socket, all of it within ``timeout`` seconds (an outcome
    is larger than the socket's buffer: the agent must read as it comes), or raises ``OSError``
    (``TimeoutError``: the agent stopped reading; then the stream is cut mid-message, and the
    supervisor must exit). The socket is blocking again afterwards, for the next Launch."""
    channel.settimeout(timeout)  # for the whole sendall, not each part of it
    try:
        channel.sendall(outcome_message(data))
    finally:
        channel.settimeout(None)


def receive_outcome(channel: socket.socket, heard: bytearray, limit: int) -> bytes | None:
    """The agent's side of ``send_outcome``, once ``CHANNEL_OUTCOME`` came: reads what is there
    of the rest into ``heard`` (kept by the caller between calls), never waiting for more (the
    agent's loop calls again when the socket is readable). Returns the encoded outcome once all
    of it came, None while only part did; raises ``EOFError`` when the supervisor ended part way,
    ``ValueError`` when it announces more than ``limit`` bytes (nonsense: nothing is allocated
    for it)."""
    head = OUTCOME_LENGTH.size
    while True:
        if len(heard) < head:
            want = head - len(heard)
        else:
            length = OUTCOME_LENGTH.unpack_from(heard)[0]
            if length > limit:
                raise ValueError(f"an outcome of {length} bytes announced, more than one can be ({limit})")
            want = head + length - len(heard)
            if not want:
                return bytes(heard[head:])
        try:
            chunk = channel.recv(min(want, 1 << 20), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not chunk:
            raise EOFError(f"the outcome ended after {max(0, len(heard) - head)} bytes")
        heard += chunk


def decode_outcome(data: bytes) -> Outcome:
    return _decode_outcome(data)


def decode_launch(data: bytes) -> Launch:
    return _decode_launch(data)


def encode_launch(launch: Launch) -> bytes:
    return _encode(launch)


# -- stopping every supervisor of an agent (operators; test harnesses) ---------------------------


def stop_all(work_root: Path, grace: float = KILL_GRACE_SECONDS + 2.0) -> int:
    """SIGTERM to every live supervisor under ``work_root`` (each stops its step and records the
    invocation Failed, for the next agent start to report); SIGKILL to what is left after
    ``grace``. Returns how many supervisors were running."""
    live: list[tuple[Path, Identity]] = []
    try:
        run_dirs = [p for p in work_root.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return 0
    for run_dir in run_dirs:
        identity = read_identity(run_dir)
        if (run_dir / OUTCOME_FILE).exists():
            continue  # over: its supervisor may be idle, or running another invocation
        if identity is not None and is_alive(identity):
            live.append((run_dir, identity))
            try:
                os.kill(identity.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline and any(is_alive(i) for _, i in live):
        time.sleep(0.05)
    for run_dir, identity in live:
        if is_alive(identity):
            try:
                os.kill(identity.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_leftovers(run_dir, identity)
    return len(live)


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.supervisor --stop-all STATE_DIR``: stop the running commands of an agent."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--stop-all":
        print("usage: python -m agent.supervisor --stop-all STATE_DIR", file=sys.stderr)
        return 2
    count = stop_all(Path(args[1]) / "work")
    print(f"stopped {count} running command(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
