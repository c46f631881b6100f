"""The daemon's runner: every invocation runs in a supervisor process that outlives the agent.

``SupervisorRunner`` is the agent core's ``Runner`` in the daemon. ``start`` hands the
invocation to a warm supervisor (``supervisor.py``), one the zygote (``zygote.py``) forked ahead
of need, and asks the zygote for the next one. The supervisor's socket says when the outcome is
on disk: the daemon's loop waits on those sockets itself (``channel_fds``, ``channel_ready``), so
that a result goes from the supervisor to the journal and the broker without waking another
thread on the way. One watcher thread waits on the rest (a pidfd, for a supervisor taken back
after a restart, says when it exits; the zygote's replies), and tails the running steps' output
files for live output. Either reads the outcome from the run directory and hands the result to
the daemon. ``cancel`` is a signal to the supervisor (through its pidfd: never a recycled pid).
After an agent restart, ``reattach`` takes back a supervisor that still runs, or the outcome of
one that ended meanwhile; a supervisor that is gone (the machine rebooted, or it was killed)
means the invocation is lost: the process group of the step it was running is killed, and the
core reports the invocation Failed with the reason.

The run directory of an invocation is removed (``release``) only once the daemon has journaled
its result, so an agent killed in between finds the outcome again and reports it once.

When the run directory cannot take the outcome (its disk filled while a step ran), the supervisor
sends the outcome itself on its socket (``supervisor.py``): the loop reads it as it comes (``_ended``;
megabytes of output never hold the loop) and it goes on exactly as one read from the file: the
same result, journaled before it is sent (or, when the journal cannot be written either, kept in
memory and sent again, ``core.py``). Nothing holds it on disk then: an agent killed before the
result is journaled loses it. Only a supervisor with no agent to send it to (the agent restarted:
a supervisor taken back has no socket to the new one) leaves no outcome at all; the invocation is
then lost, saying the disk is full (``_full_disk``).

Steps with ``run_as`` are spawned as that user by the supervisor (``supervisor.py``). A stream the
result cannot carry whole (longer than ``max_output``, or not UTF-8) is named in the outcome: its
steps' output files are opened here before the run directory goes, and held (``KeptOutput``)
until the broker has read them (``OutputRead``/``OutputDone``). Whole outputs are held by this
agent process: an agent restart between the result and the broker's read loses them (the result
itself is not lost).
"""

from __future__ import annotations

import codecs
import logging
import os
import queue
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import msgspec

from zerorun.protocol import FAILED, Invocation, InvocationResult, OutputChunk

from . import steps as flow
from . import supervisor as sup
from .zygote import DONE, HAS_PIDFD, HEADER, REPLY, WANT

LIVE_OUTPUT_INTERVAL = 0.25  # seconds between live-output reads of running steps
SPARES = 2  # run directories made ahead (supervisor.SPARE_FILES): the hot path creates no file
SPARES_FAILING_SAID_EVERY = 3600.0  # seconds: how often "cannot make run directories ahead" is logged at most
WARM = 2  # supervisors forked ahead (zygote.py): the hot path forks nothing
MAX_IDLE = 4  # supervisors kept for reuse after their invocation; beyond, they are let go
SPARE_PREFIX = ".spare-"
KILL_GRACE_SECONDS = sup.KILL_GRACE_SECONDS
KEEP_OUTPUT_SECONDS = 3600.0  # a whole output the broker has not read for this long is dropped
MAX_KEPT_OUTPUTS = 64  # whole outputs held at once (descriptors, disk): beyond, the oldest is dropped
_utf8_decoder = codecs.getincrementaldecoder("utf-8")

OutputSink = Callable[[list[OutputChunk]], None]
ResultSink = Callable[[InvocationResult], None]
RebootSink = Callable[[str, flow.Resume], None]

log = logging.getLogger("zerorun.agent")

LOST_WITHOUT_OUTCOME = "its supervisor ended without recording a result (it was killed, or failed)"
SUPERVISOR_LOST = "SupervisorLost"


class _Warm(msgspec.Struct):
    """A supervisor waiting for its invocation: its pid, pidfd and socket."""

    pid: int
    pidfd: int
    channel: socket.socket | None


class _Watch(msgspec.Struct):
    """One supervisor the watcher waits on."""

    invocation: Invocation
    run_dir: Path
    pid: int = 0
    pidfd: int = -1
    channel: socket.socket | None = None  # says when the outcome is written (not after a restart)
    heard: bytearray | None = None  # an outcome coming on the channel, as far as it came (``_ended``)
    identity: sup.Identity | None = None
    launch: bytes = b""  # not yet handed to a supervisor (none was warm)
    tails: dict[str, "_Tail"] = msgspec.field(default_factory=dict)
    skip_existing: bool = False  # taken back after a restart: live output starts from now
    since: float = msgspec.field(default_factory=time.monotonic)  # live output is read once it ran this long


class SupervisorRunner:
    def __init__(self, work_root: Path, platform: str, max_output: int, on_result: ResultSink,
                 on_output: OutputSink | None = None, on_reboot: RebootSink | None = None,
                 env: dict[str, str] | None = None, python: str = sys.executable,
                 kill_grace: float = KILL_GRACE_SECONDS):
        self.work_root = work_root
        self.platform = platform
        self.max_output = max_output
        self.on_result = on_result
        self.on_output = on_output
        self.on_reboot = on_reboot
        self.env = dict(os.environ) if env is None else env
        self.python = python
        self.kill_grace = kill_grace
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}  # by invocation id, until its outcome was handed on
        self._warm: list[_Warm] = []  # supervisors waiting for an invocation
        self._queued: list[_Watch] = []  # invocations waiting for a warm supervisor
        self._asked = 0  # warm supervisors asked of the zygote, not yet there
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._zygote: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._stopping = False
        self._channels: dict[int, _Watch] = {}  # socket fd -> its running invocation: the daemon's loop waits on these
        self._loop_thread = threading.get_ident()  # the daemon's loop (this runner is made there)
        self.channels_changed: Callable[[], None] | None = None  # wakes the loop when another thread adds one
        self._watcher_asleep = True  # nothing was running at the watcher's last look: no live output to read
        self._spares: list[Path] = []  # made by the watcher thread, taken by start()
        self._spare_count = 0
        self._spares_failing_said = -SPARES_FAILING_SAID_EVERY  # when (monotonic) spares could not be made, said
        self._kept: dict[str, KeptOutput] = {}  # whole outputs the broker reads after the result
        self._kept_lock = threading.Lock()
        self._start_zygote()
        self._chores: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()  # see _housekeeping
        self._thread = threading.Thread(target=self._watch_loop, name="supervisors", daemon=True)
        self._thread.start()
        self._chores_thread = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        self._chores_thread.start()
        with self._lock:
            self._ask_warm(WARM)

    # -- the core's Runner ----------------------------------------------------------------------

    def start(self, inv: Invocation, resume: flow.Resume | None = None) -> None:
        iid = inv.invocation_id
        run_dir = self.work_root / iid
        if resume is not None and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # the run before the reboot
        self._make_run_dir(run_dir)
        watch = _Watch(inv, run_dir, launch=sup.encode_launch(sup.Launch(
            inv, str(run_dir), self.platform, self.max_output, resume=resume, kill_grace=self.kill_grace)))
        with self._lock:
            self._watches[iid] = watch
            self._launch(watch)
        log.info("running %s (command %s, %s)%s", iid[:8], inv.command_id, inv.document_name,
                 f", resumed at step {resume.index + 1} after a reboot" if resume is not None else "")
        return None

    def _make_run_dir(self, run_dir: Path) -> None:
        with self._lock:
            spare = self._spares.pop() if self._spares else None
        if spare is not None:
            try:
                os.rename(spare, run_dir)
                return
            except OSError:
                shutil.rmtree(spare, ignore_errors=True)
        os.mkdir(run_dir, 0o700)

    def cancel(self, invocation_id: str) -> None:
        with self._lock:
            watch = self._watches.get(invocation_id)
            if watch is None:
                return
            if watch.launch:  # no supervisor had it yet: it ends here, nothing ran
                self._queued.remove(watch)
                del self._watches[invocation_id]
                self.on_result(flow.cancelled_result(watch.invocation))
                return
            self._signal(watch, sup.CANCEL_SIGNAL)

    def reattach(self, inv: Invocation) -> bool | str:
        """After a restart: True if its supervisor runs (or ended with an outcome, which is
        reported next); else why the invocation is lost (its step's process group is killed)."""
        iid = inv.invocation_id
        run_dir = self.work_root / iid
        if not run_dir.is_dir():
            return "no supervisor was started for it (the agent stopped first)"
        watch = _Watch(inv, run_dir, skip_existing=True)
        if sup.read_outcome(run_dir) is not None:
            with self._lock:
                self._watches[iid] = watch
            self._command("ended", watch)
            log.info("%s ended while the agent was away: its result is reported now", iid[:8])
            return True
        identity = sup.read_identity(run_dir)
        if identity is not None and sup.is_alive(identity):
            pidfd = _pidfd(identity.pid)
            if pidfd < 0 or sup.is_alive(identity):  # still the same process once the pidfd is open
                watch.pid, watch.pidfd, watch.identity = identity.pid, pidfd, identity
                with self._lock:
                    self._watches[iid] = watch
                self._command("watch", watch)
                log.info("took back %s: its supervisor %d still runs it", iid[:8], identity.pid)
                return True
            os.close(pidfd)
        killed = sup.kill_leftovers(run_dir, identity)
        shutil.rmtree(run_dir, ignore_errors=True)
        why = ("its supervisor is gone (the machine rebooted, or the supervisor was killed)" + _full_disk(run_dir)
               if identity is not None else "its supervisor never recorded itself")
        if killed:
            why += f"; {killed} process(es) of its running step were killed"
        log.warning("invocation %s is lost: %s", iid[:8], why)
        return why

    def release(self, invocation_ids: list[str]) -> None:
        """Their results are journaled: their run directories go (in the watcher thread)."""
        if invocation_ids:
            self._command("release", invocation_ids)

    def sweep(self, keep: set[str]) -> None:
        """At start, after recovery: run directories of invocations that are not running (their
        results are journaled) are removed."""
        try:
            entries = list(os.scandir(self.work_root))
        except OSError:
            return
        for entry in entries:
            if entry.name not in keep and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
        self._command("spare", None)

    def running(self) -> int:
        with self._lock:
            return len(self._watches)

    def shutdown(self) -> None:
        """Stops watching; the supervisors run on (the next agent takes them back)."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        self._chores.put(None)  # what it was given goes first
        self._chores_thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()  # the zygote reads EOF and exits
        if self._zygote is not None:
            try:
                self._zygote.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()
        with self._kept_lock:
            kept, self._kept = self._kept, {}
        for output in kept.values():
            output.close()
        with self._lock:
            self._channels.clear()
            for watch in self._watches.values():
                _close_watch(watch)
                _close_tails(watch)
            for warm in self._warm:
                _close_warm(warm)  # a warm supervisor whose socket closes exits
            self._warm.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

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

    def _keep_output(self, watch: _Watch, outcome: sup.Outcome) -> None:
        """Before the result goes on (in the loop or the watcher thread): the streams named in the
        outcome are opened (the run directory is removed once the result is journaled; the
        descriptors stay)."""
        streams: dict[str, list[tuple[int, int]]] = {}
        try:
            for stream, parts in outcome.kept.items():
                streams[stream] = [(os.open(watch.run_dir / name, os.O_RDONLY | os.O_CLOEXEC), size)
                                   for name, size in parts]
        except OSError as exc:
            log.warning("cannot keep the whole output of %s: %s", watch.invocation.invocation_id[:8], exc)
            KeptOutput(streams).close()
            return
        kept = KeptOutput(streams)
        result = outcome.result
        result.stdout_follows, result.stderr_follows = kept.size("stdout"), kept.size("stderr")
        iid = watch.invocation.invocation_id
        with self._kept_lock:
            self._kept[iid] = kept
            excess = list(self._kept)[:-MAX_KEPT_OUTPUTS] if len(self._kept) > MAX_KEPT_OUTPUTS else []
        if excess:
            log.warning("holding %d whole outputs the broker has not read: dropping the oldest", MAX_KEPT_OUTPUTS)
            self.drop_output(excess)

    # -- the zygote ----------------------------------------------------------------------------

    def _start_zygote(self) -> None:
        """(Under the lock, once the watcher runs.) A zygote, the first or a new one; the
        watcher thread swaps its socket in."""
        old, self._sock = self._sock, None
        if self._zygote is not None and self._zygote.poll() is None:
            self._zygote.kill()
            self._zygote.wait()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._zygote = subprocess.Popen(
                # -P: the working directory is not on sys.path (a directory with an "agent" package
                # of its own must not replace the agent's code)
                [self.python, "-P", "-m", "agent.zygote", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, env=self.env, close_fds=True)
        finally:
            theirs.close()
        self._sock = ours
        self._asked = 0
        self._command("zygote", (ours, old))

    def _ask_warm(self, n: int) -> None:
        """Under the lock: n more warm supervisors (a new zygote if the old one is gone)."""
        if n <= 0 or self._stopping:
            return
        try:
            if self._sock is None:
                raise OSError("no zygote")
            self._sock.sendall(WANT * n)
        except OSError:
            log.warning("the supervisor zygote is gone; starting a new one")
            self._start_zygote()
            assert self._sock is not None
            self._sock.sendall(WANT * n)
        self._asked += n

    def _launch(self, watch: _Watch) -> None:
        """Under the lock: the invocation to a warm supervisor, or queued until one is there;
        either way the next warm one is asked for."""
        while self._warm:
            warm = self._warm.pop()
            try:
                assert warm.channel is not None
                warm.channel.sendall(HEADER.pack(len(watch.launch)) + watch.launch)
            except OSError:  # it died waiting: the next one
                _close_warm(warm)
                continue
            watch.pid, watch.pidfd, watch.channel, watch.launch = warm.pid, warm.pidfd, warm.channel, b""
            self._channels[warm.channel.fileno()] = watch
            if threading.get_ident() != self._loop_thread and self.channels_changed is not None:
                self.channels_changed()  # launched by the watcher (a queued invocation): the loop must look
            if self._watcher_asleep and self.on_output is not None:  # live output from now on
                self._watcher_asleep = False
                self._wake()
            break
        else:
            self._queued.append(watch)
        self._ask_warm(WARM + len(self._queued) - len(self._warm) - self._asked)

    def channel_fds(self) -> list[int]:
        """The sockets of the supervisors running invocations, for the daemon's loop to wait on."""
        with self._lock:
            return list(self._channels)

    def channel_ready(self, fd: int) -> None:
        """The daemon's loop: a supervisor's socket is readable (its outcome is on disk, or comes
        on the socket, or it died): the result goes on now, from this thread (an outcome on the
        socket once all of it came)."""
        with self._lock:
            watch = self._channels.get(fd)
        if watch is None:
            return
        try:
            self._ended(watch)
        except Exception as exc:  # never out into the daemon's loop; the invocation is reported
            log.exception("reading the outcome of %s failed", watch.invocation.invocation_id[:8])
            self._lost(watch, f"the agent could not read its outcome ({exc})")

    def _signal(self, watch: _Watch, sig: int) -> None:
        """Under the lock: a signal to a supervisor, never to a process that took its pid."""
        try:
            if watch.pidfd >= 0:
                signal.pidfd_send_signal(watch.pidfd, sig)
            elif watch.identity is None or sup.is_alive(watch.identity):
                os.kill(watch.pid, sig)
        except (ProcessLookupError, OSError):
            pass  # it ended meanwhile: its outcome says what happened

    # -- the watcher thread --------------------------------------------------------------------

    def _command(self, kind: str, payload: object, at_once: bool = True) -> None:
        self._commands.put((kind, payload))
        if at_once:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _watch_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        zygote: socket.socket | None = None
        polled: dict[str, _Watch] = {}  # supervisors without a pidfd: polled with the tails
        released: list[str] = []  # run directories of journaled results, removed once per wake-up
        spares_wanted = False
        next_tick = 0.0  # live output and polling, every LIVE_OUTPUT_INTERVAL while something runs
        try:
            while not self._stopping:
                with self._lock:  # a launch after this look wakes the watcher (see _launch)
                    ticking = bool(self._watches) and (self.on_output is not None or bool(polled))
                    self._watcher_asleep = not ticking
                now = time.monotonic()
                timeout: float | None = None
                if ticking:
                    timeout = max(0.0, next_tick - now) if next_tick > now else LIVE_OUTPUT_INTERVAL
                events = selector.select(timeout)
                for key, _ in events:
                    tag = key.data
                    if tag == "wake":
                        _drain_pipe(self._wake_r)
                    elif tag == "zygote":
                        if not self._zygote_reply(key.fileobj):  # type: ignore[arg-type]
                            selector.unregister(key.fileobj)
                            with self._lock:
                                if self._sock is key.fileobj and not self._stopping:
                                    log.warning("the supervisor zygote exited; starting a new one")
                                    self._start_zygote()
                                    self._ask_warm(WARM + len(self._queued) - len(self._warm))
                            zygote = None
                    else:
                        selector.unregister(key.fileobj)
                        self._ended(tag)
                while True:
                    try:
                        kind, payload = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "zygote":
                        new, old = payload  # type: ignore[misc]
                        if zygote is not None:
                            try:
                                selector.unregister(zygote)
                            except (KeyError, ValueError):
                                pass
                        if old is not None:
                            old.close()
                        zygote = new
                        selector.register(zygote, selectors.EVENT_READ, "zygote")
                    elif kind == "watch":
                        self._add(payload, selector, polled)  # type: ignore[arg-type]
                    elif kind == "ended":
                        self._ended(payload)  # type: ignore[arg-type]
                    elif kind == "tails":  # of an invocation that ended in the daemon's loop
                        _close_tails(payload)  # type: ignore[arg-type]
                    elif kind == "release":  # removed, and new spares made, below
                        released.extend(payload)  # type: ignore[arg-type]
                        spares_wanted = True
                    elif kind == "spare":
                        spares_wanted = True
                if released or spares_wanted:  # after the results went on: ready for the next ones
                    self._chores.put(released)
                    released = []
                    spares_wanted = False
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + LIVE_OUTPUT_INTERVAL
                    for iid, watch in list(polled.items()):
                        if not _running(watch):
                            del polled[iid]
                            self._ended(watch)
                    if self.on_output is not None:
                        self._tail_output(now)
        except Exception:  # never silently: a dead watcher would leave results unreported
            log.exception("the supervisor watcher failed")
        finally:
            selector.close()
            while True:  # journaled results' directories go now, not at the next start
                try:
                    kind, payload = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "release":
                    released.extend(payload)  # type: ignore[arg-type]
            if released:
                self._chores.put(released)  # removed by the housekeeping thread, before it stops

    def _housekeeping(self) -> None:
        """Its own thread, at the lowest priority: journaled results' run directories are removed
        and spares made (about 0.3 ms of file-system work per invocation), when nothing more
        urgent wants the CPU (right after a result, the broker and the client do); never in the
        watcher's way when a step ends."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except OSError:
            pass
        while True:
            chores = [self._chores.get()]
            while True:
                try:
                    chores.append(self._chores.get_nowait())
                except queue.Empty:
                    break
            for released in chores:
                for iid in released or ():
                    shutil.rmtree(self.work_root / iid, ignore_errors=True)
            if None in chores:
                return
            try:
                self._make_spares()
            except Exception:  # never silently; the hot path makes its directories itself meanwhile
                log.exception("cannot make spare run directories")

    def _make_spares(self) -> None:
        """Housekeeping thread: run directories for the next invocations, made off the hot path."""
        while True:
            with self._lock:
                if len(self._spares) >= SPARES:
                    return
            self._spare_count += 1
            path = self.work_root / f"{SPARE_PREFIX}{os.getpid()}-{self._spare_count}"
            try:
                sup.make_spare(path)
            except OSError as exc:
                shutil.rmtree(path, ignore_errors=True)
                # Tried after every run, and a full disk can fail and succeed by turns (each run's
                # directory removed makes room for a spare): one line an hour at most, not one a run.
                if time.monotonic() - self._spares_failing_said >= SPARES_FAILING_SAID_EVERY:
                    self._spares_failing_said = time.monotonic()
                    log.warning("cannot make run directories ahead in %s: %s (each run makes its own "
                                "meanwhile)", self.work_root, exc.strerror or exc)
                return
            with self._lock:
                self._spares.append(path)

    def _zygote_reply(self, sock: socket.socket) -> bool:
        """A warm supervisor from the zygote: to the queued invocation first, else kept."""
        try:
            data, fds, _, _ = socket.recv_fds(sock, REPLY.size, 2)
        except OSError:
            data, fds = b"", []
        for fd in fds:  # received descriptors are inheritable: not into an exec of the agent, or its children
            os.set_inheritable(fd, False)
        if len(data) != REPLY.size:
            for fd in fds:
                os.close(fd)
            return False  # the zygote is gone: the next start makes a new one
        pid, error, flags = REPLY.unpack(data)
        with self._lock:
            self._asked = max(0, self._asked - 1)
            if pid <= 0:
                log.error("cannot fork a supervisor: %s", os.strerror(error) if error else "fork failed")
                return True
            channel = socket.socket(fileno=fds[0]) if fds else None
            pidfd = fds[1] if flags & HAS_PIDFD and len(fds) > 1 else -1
            self._warm.append(_Warm(pid, pidfd, channel))
            if self._queued:
                self._launch(self._queued.pop(0))
        return True

    def _add(self, watch: _Watch, selector: selectors.BaseSelector, polled: dict[str, _Watch]) -> None:
        """A supervisor taken back after a restart (one the agent launched is the loop's)."""
        if watch.pidfd >= 0:  # readable once it exited
            selector.register(watch.pidfd, selectors.EVENT_READ, watch)
        else:  # no pidfds on this kernel: polled every LIVE_OUTPUT_INTERVAL
            polled[watch.invocation.invocation_id] = watch

    def _ended(self, watch: _Watch) -> None:
        """A supervisor said it is done, or exited (or had already): its outcome goes on,
        exactly once. One that said so (``DONE`` on its socket) waits for the next invocation:
        it is kept for reuse (up to ``MAX_IDLE``)."""
        iid = watch.invocation.invocation_id
        done, unreadable = False, ""
        outcome: sup.Outcome | None = None  # here already when it came on the channel, not the disk
        if watch.channel is not None:
            try:
                said = watch.channel.recv(1) if watch.heard is None else sup.CHANNEL_OUTCOME
            except OSError:
                said = b""
            done = said == DONE
            if said == sup.CHANNEL_OUTCOME:  # the run directory could not take the outcome: it comes here
                if watch.heard is None:
                    watch.heard = bytearray()
                try:
                    sent = sup.receive_outcome(watch.channel, watch.heard, self.max_channel_outcome)
                    if sent is None:
                        return  # part of it came: the loop calls again for the rest
                    outcome = sup.decode_outcome(sent)  # not done: that supervisor exits now (zygote.py)
                except (EOFError, OSError):
                    pass  # it ended part way: as if it had said nothing
                except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                    unreadable = f"the outcome its supervisor sent could not be read ({exc})"
        with self._lock:
            if watch.channel is not None and self._channels.get(watch.channel.fileno()) is watch:
                del self._channels[watch.channel.fileno()]  # the loop stops waiting on it in any case
            if self._watches.get(iid) is not watch:
                return
            del self._watches[iid]
            if done and not self._stopping and len(self._warm) < MAX_IDLE:
                self._warm.append(_Warm(watch.pid, watch.pidfd, watch.channel))
                watch.pidfd, watch.channel = -1, None
                if self._queued:
                    self._launch(self._queued.pop(0))
            _close_watch(watch)
        if threading.get_ident() == self._thread.ident:
            _close_tails(watch)
        else:  # the watcher may be reading them now: it closes them, and any it opens meanwhile
            self._command("tails", watch, at_once=False)
        if unreadable:
            self._lost(watch, unreadable)
            return
        if outcome is not None:
            log.warning("%s: its outcome came on its supervisor's socket, its run directory could not take "
                        "it%s", iid[:8], _full_disk(watch.run_dir))
        else:
            outcome = sup.read_outcome(watch.run_dir)
        if outcome is None:
            self._lost(watch, LOST_WITHOUT_OUTCOME + _full_disk(watch.run_dir), sup.read_identity(watch.run_dir))
            return
        if outcome.reboot is not None and self.on_reboot is not None:
            self.on_reboot(iid, outcome.reboot)
            return
        if outcome.kept:
            self._keep_output(watch, outcome)
        self.on_result(outcome.result)

    @property
    def max_channel_outcome(self) -> int:
        """The most an outcome on a channel may be: the result's text and its steps' for two
        streams, each ``max_output`` bytes of output that may triple as text (U+FFFD), and room."""
        return 12 * self.max_output + (1 << 20)

    def _lost(self, watch: _Watch, why: str, identity: sup.Identity | None = None) -> None:
        iid = watch.invocation.invocation_id
        with self._lock:
            self._watches.pop(iid, None)
            if watch.channel is not None:
                self._channels.pop(watch.channel.fileno(), None)
            _close_watch(watch)
        killed = sup.kill_leftovers(watch.run_dir, identity or sup.read_identity(watch.run_dir))
        if killed:
            why += f"; {killed} process(es) of its running step were killed"
        log.error("invocation %s: %s", iid[:8], why)
        self.on_result(lost_result(watch.invocation, why))

    # -- live output ---------------------------------------------------------------------------

    def _tail_output(self, now: float) -> None:
        """Live output of the steps that have run for a while (a short one's output comes with
        its result): what they appended since the last read."""
        assert self.on_output is not None
        with self._lock:
            watches = list(self._watches.values())
        chunks: list[OutputChunk] = []
        for watch in watches:
            if watch.pid <= 0 or watch.launch or now - watch.since < LIVE_OUTPUT_INTERVAL:
                continue
            steps = watch.invocation.steps
            try:
                names = [e.name for e in os.scandir(watch.run_dir) if e.name.endswith((".stdout", ".stderr"))]
            except OSError:
                continue
            for name in sorted(names):
                tail = watch.tails.get(name)
                if tail is None:
                    index_text, _, stream = name.partition(".")
                    try:
                        step_name = steps[int(index_text)].name
                    except (ValueError, IndexError):
                        continue
                    tail = _Tail.open(watch.run_dir / name, stream, step_name, self.max_output,
                                      at_end=watch.skip_existing)
                    if tail is None:
                        continue
                    watch.tails[name] = tail
                text = tail.read()
                if text:
                    chunks.append(OutputChunk(watch.invocation.invocation_id, tail.stream, text, tail.step))
            watch.skip_existing = False
        if chunks:
            self.on_output(chunks)


FULL_DISK_BYTES = 1 << 20  # free space below which a supervisor's missing outcome is put down to a full disk


def _full_disk(run_dir: Path) -> str:
    """Why a supervisor may have recorded no result, if its run directory's file system is full
    (the outcome is a file there; without space it goes on the supervisor's socket, and is lost,
    the exit code and output with it, only when that is not the running agent's: after a restart)."""
    try:
        fs = os.statvfs(run_dir.parent)
    except OSError:
        return ""
    free = fs.f_bavail * fs.f_frsize
    if free >= FULL_DISK_BYTES and (fs.f_favail or not fs.f_files):
        return ""
    return (f"; the file system of {run_dir.parent} is full ({free // 1024} KiB free): the supervisor could "
            "not write the result there")


def lost_result(inv: Invocation, why: str) -> InvocationResult:
    """A supervisor that ended without an outcome, under a running agent."""
    now = time.time()
    return InvocationResult(inv.invocation_id, FAILED, status_details=SUPERVISOR_LOST,
                            stderr=f"the invocation was lost: {why}\n", started_at=inv.issued_at, ended_at=now)


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


class _Tail:
    """Reads what a running step appended to one of its output files since the last read, decoded
    as the result will be (``steps.capped_text``: bytes that are not UTF-8 become U+FFFD), so that
    the live text is the start of the final one: a follower's cursor counts characters in both."""

    def __init__(self, fd: int, stream: str, step: str, limit: int, offset: int):
        self.fd, self.stream, self.step, self.limit = fd, stream, step, limit
        self.offset = offset
        self._decoder = _utf8_decoder(errors="replace")  # keeps a character cut between two reads

    @classmethod
    def open(cls, path: Path, stream: str, step: str, limit: int, at_end: bool) -> "_Tail | None":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        offset = os.fstat(fd).st_size if at_end else 0
        return cls(fd, stream, step, limit, offset)

    def read(self) -> str:
        if self.offset >= self.limit or self.fd < 0:
            return ""
        try:
            available = os.fstat(self.fd).st_size - self.offset  # pread allocates what it is asked for
            if available <= 0:
                return ""
            data = os.pread(self.fd, min(available, self.limit - self.offset), self.offset)
        except OSError:
            return ""
        self.offset += len(data)
        text = self._decoder.decode(data)
        # live output is best effort, and a NUL is what a text column (PostgreSQL) cannot hold
        return text.replace("\x00", "\ufffd") if "\x00" in text else text

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _close_watch(watch: _Watch) -> None:
    if watch.pidfd >= 0:
        os.close(watch.pidfd)
        watch.pidfd = -1
    if watch.channel is not None:
        watch.channel.close()
        watch.channel = None


def _close_tails(watch: _Watch) -> None:
    for tail in watch.tails.values():
        tail.close()
    watch.tails.clear()


def _close_warm(warm: _Warm) -> None:
    if warm.pidfd >= 0:
        os.close(warm.pidfd)
    if warm.channel is not None:
        warm.channel.close()


def _running(watch: _Watch) -> bool:
    """Without a pidfd: the supervisor (its identity once recorded, else its pid) still runs."""
    if watch.identity is not None and watch.identity.start:
        return sup.is_alive(watch.identity)
    identity = sup.read_identity(watch.run_dir)
    if identity is not None:
        watch.identity = identity
        return sup.is_alive(identity)
    stat = sup.proc_stat(watch.pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
