"""The agent daemon: one DEALER connection out to the broker, nothing listening on the instance.

This is the agent core's driver (``core.py`` decides what to say, journal, start and cancel):
one thread owns the socket, the SQLite journal and the core; invocations run in supervisor
processes that outlive the agent (``executor.SupervisorRunner``): this loop waits on their
sockets too and takes their results itself; what the runner's watcher thread finds (supervisors
taken back after a restart, live output) comes through a queue and a wake-up pipe. The agent says HELLO after every (re)connect (seen through the socket
monitor) and whenever the broker asks, heartbeats from this loop (so a frozen agent is noticed
even though libzmq would still answer ZMTP pings), and rebuilds its connection with jittered
exponential backoff when the core finds the broker quiet for too long.

Signals: SIGTERM stops the agent (running invocations get ``drain_timeout`` seconds to finish and
be reported; what still runs then goes on under its supervisor and is reported by the next
start); SIGHUP reloads; SIGUSR2 restarts the agent in place (the same pid re-executes itself, as
installed now: how an upgrade takes effect). After each Welcome the agent writes ``agent.json``
in its state dir (pid, version, when welcomed, its command line) for upgrades to check.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import platform as platform_mod
import queue
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

import zmq

from zerorun import __version__, keys as keyfiles, protocol
from zerorun.zmqutil import close_monitor, connect_monitored, monitor_socket, recv_monitor_event
from zerorun.protocol import Invocation, InvocationResult

from .config import AgentConfig
from .core import AgentCore, Identity, Pacing
from .executor import SupervisorRunner
from .facts import FactsWatcher
from .journal import Journal

log = logging.getLogger("zerorun.agent")

TRIM_AFTER_IDLE = 2.0  # seconds after the start, and after the last result, before the heap is trimmed


@functools.cache
def _libc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None under another C library."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


ENROLLED_MARKER = "enrolled"  # in the state dir: the broker accepted this agent's key once


def read_enrol_token(path: os.PathLike[str] | str) -> str:
    """The enrolment token in ``path`` (one line); OSError with the reason when it cannot be used."""
    with open(path, encoding="utf-8") as handle:
        if os.fstat(handle.fileno()).st_mode & 0o077:
            log.warning("enrolment token file %s can be read by other users: make it 0600", path)
        token = handle.read().strip()
    if not token or len(token) > 256 or not token.isprintable() or any(c.isspace() for c in token):
        raise OSError(f"{path}: not an enrolment token (one line, as `zerorun tokens create` printed it)")
    return token


def detect_platform() -> tuple[str, str]:
    system = platform_mod.system()
    name = {"Linux": "Linux", "Darwin": "MacOS", "Windows": "Windows"}.get(system, system)
    return name, platform_mod.release()


class Agent:
    def __init__(self, config: AgentConfig, broker_key: bytes = b""):
        """``broker_key``: the broker's public key (z85); empty only with ``insecure``."""
        self.config = config
        self.broker_key = broker_key
        state = config.state_dir
        os.umask(0o077)  # everything the agent writes is its own (scripts and outputs hold secrets)
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        self.public_key, self.secret_key = ((b"", b"") if config.insecure
                                            else keyfiles.ensure_keypair(state, "agent"))
        self.journal = Journal(state / "journal.db")
        fd = os.open(state / "executions.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._execution_log = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        self._status_failing = False  # agent.json: said once while it cannot be written
        self.work_root = state / "work"
        self.work_root.mkdir(exist_ok=True, mode=0o700)
        self.platform, self.platform_version = detect_platform()
        if config.platform:
            self.platform = config.platform
        self.hostname = socket.gethostname()
        token = ""
        if config.enrol_token_file and not (state / ENROLLED_MARKER).exists():
            token = read_enrol_token(config.enrol_token_file)
        self._enrolling = bool(token)
        self._ctx = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._stop = False
        self._failures = 0
        self._endpoint = 0  # which of config.broker this agent talks to
        self._lost = False  # several brokers: the current one went away; move on
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._interactive: Any = None  # made on first use: most agents never see a session
        self._sessions: Any = None
        self._trim_at = time.monotonic() + TRIM_AFTER_IDLE  # see _trim_heap
        self._loop_thread = threading.get_ident()
        self.runner = SupervisorRunner(self.work_root, self.platform, config.max_output_bytes,
                                       on_result=self._result_ready, on_output=self._live_output,
                                       on_reboot=self._reboot_ready, env=self._step_env())
        self.runner.channels_changed = self._wake
        self._polled_channels: tuple[Any, set[int]] = (None, set())  # (poller, supervisor sockets registered)
        self._results_here = False  # a supervisor's result was taken in this thread: collect it now
        self.facts = FactsWatcher(max(0.5, config.facts_interval), on_resolved=lambda: self._event("facts", None))
        self.core = AgentCore(
            Identity(config.instance_id, dict(config.tags), self.hostname, self.platform,
                     self.platform_version, __version__, facts=self.facts.current, enrol_token=token),
            self.journal, self.runner, self._send, max_concurrency=config.max_concurrency,
            pacing=Pacing(heartbeat=config.heartbeat_interval), on_welcome=self._on_welcome,
            on_finished=self._on_finished, on_reboot=self._reboot, on_stored=self.runner.release,
            interactive=self._interactive_message,
            whole_output=self._whole_output)
        self._restart = False
        self._execution_log_failing = False  # executions.jsonl could not be written (said once)
        self.reconnects = 0
        self.metrics = _AgentMetrics(config.metrics_bind, self.core) if config.metrics_bind else None

    @property
    def interactive(self) -> Any:
        """Exec and file transfers for the connection plugin (``interactive.py``)."""
        if self._interactive is None:
            from .interactive import Interactive

            self._interactive = Interactive(self._interactive_reply)
        return self._interactive

    @property
    def sessions(self) -> Any:
        """Shells and port forwards (``sessions.py``; a thread of their own once one starts)."""
        if self._sessions is None:
            from .sessions import AgentSessions

            self._sessions = AgentSessions(self._interactive_reply)
        return self._sessions

    def _trim_heap(self) -> None:
        """Hands the heap's free pages back to the system once nothing runs: glibc keeps what a
        burst of work freed, and an agent idles for most of its life (about 0.7 MB of an idle
        agent's RSS)."""
        self._trim_at = float("inf")
        if self.core.running:
            return
        gc.collect()
        trim = _libc_malloc_trim()
        if trim is not None:
            trim(0)

    # -- connection -------------------------------------------------------------------------

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        base_ms = int(self.config.reconnect_base * 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, base_ms + random.randint(0, base_ms))  # jitter
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.config.reconnect_max * 1000))
        # A dead broker host or a half-open connection is found by the kernel's TCP keepalive
        # (free for the broker: no ZMTP pings for its I/O thread to decrypt and answer, 500/s
        # at 5,000 agents); a hung broker by the core's heartbeat liveness check.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if not self.config.insecure:
            sock.curve_serverkey = self.broker_key
            sock.curve_publickey = self.public_key
            sock.curve_secretkey = self.secret_key
        self._monitor = monitor_socket(
            sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECT_RETRIED)
        connect_monitored(sock, self._monitor, self.broker)
        self._socket = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        # the first HELLO goes out on the handshake event; the core retries it as a fallback
        self.core.connection_opened()

    def _close(self) -> None:
        if self._socket is not None:
            if self._monitor is not None:
                close_monitor(self._socket, self._monitor)
            self._socket.close(0)
            self._socket = None
        self._monitor = None

    @property
    def broker(self) -> str:
        """The broker endpoint this agent talks to now."""
        return self.config.broker[self._endpoint]

    def _reconnect(self, why: str) -> None:
        """A new connection after a jittered, growing pause: to the next broker of the list when
        there are several (their sessions, commands and keys are shared), else the same one."""
        self._failures += 1
        self._lost = False
        if len(self.config.broker) > 1:
            self._endpoint = (self._endpoint + 1) % len(self.config.broker)
            why += f"; next broker {self.broker}"
        delay = min(self.config.reconnect_max, self.config.reconnect_base * 2 ** min(self._failures, 8))
        delay = random.uniform(delay / 2, delay)  # full jitter: no thundering herd
        log.warning("%s; reconnecting in %.1fs", why, delay)
        self.core.connection_lost()
        if self._sessions is not None:
            self._sessions.close_all("the connection to the broker was rebuilt")
        self._close()
        self.reconnects += 1
        if self.metrics is not None:
            self.metrics.reconnects.inc()
        deadline = time.monotonic() + delay
        while not self._stop and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            self._collect_events()  # keep journaling results while away
        if not self._stop:
            self._open()

    def _send(self, message: Any) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send_multipart(protocol.frames(message), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # not connected yet / HWM: it is all in the journal
            log.debug("send failed: %s", exc)

    def _on_welcome(self, first: bool) -> None:
        self._failures = 0
        self._write_status()
        if self._enrolling:  # the token did its work: never presented again from this state dir
            self._enrolling = False
            log.info("enrolled: the broker accepted this agent's key")
            try:
                (self.config.state_dir / ENROLLED_MARKER).touch(mode=0o600)
            except OSError as exc:  # the token is presented again at the next start: the key speaks first
                log.warning("cannot record the enrolment in %s: %s", self.config.state_dir, exc)

    def _write_status(self) -> None:
        """``agent.json``: who runs here, and since when the broker takes it (what an upgrade
        waits for: the new version welcomed)."""
        status = {"pid": os.getpid(), "version": __version__, "welcomed_at": time.time(),
                  "broker": self.broker, "argv": list(sys.orig_argv), "python": sys.executable}
        path = self.config.state_dir / "agent.json"
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(status))
            os.replace(tmp, path)
        except OSError as exc:
            try:  # a half-written file (a full disk) is left to no one
                tmp.unlink()
            except OSError:
                pass
            if not self._status_failing:  # one line while it lasts: it is written after every Welcome
                log.warning("cannot write %s: %s", path, exc.strerror or exc)
            self._status_failing = True
            return
        if self._status_failing:
            self._status_failing = False
            log.info("can write %s again", path)

    def _step_env(self) -> dict[str, str]:
        """The environment steps start from: the agent's, plus where the agent is (for the
        upgrade document; the other variables are the step flow's)."""
        env = dict(os.environ)
        env.update(ZERORUN_AGENT_PID=str(os.getpid()), ZERORUN_AGENT_PYTHON=sys.executable,
                   ZERORUN_AGENT_STATE_DIR=str(self.config.state_dir), ZERORUN_AGENT_VERSION=__version__)
        return env

    def _check_facts(self) -> None:
        changed = self.facts.check()
        if changed is not None:
            log.info("facts changed; telling the broker")
            self.core.set_facts(changed)

    # -- loop -------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stop = True
        self.core.draining = True  # start nothing new; what waits stays journaled
        self._wake()

    def restart(self, *_: Any) -> None:
        """SIGUSR2: stop without draining, then execute the agent again in this process (the
        code installed now runs; supervisors keep running and are taken back)."""
        self._restart = True
        self.stop()

    reload_hook: Any = None  # set by main: re-reads the config, returns the new tags
    _reload = False

    def request_reload(self, *_: Any) -> None:
        self._reload = True
        self._wake()

    def _apply_reload(self) -> None:
        self._reload = False
        tags = self.reload_hook() if self.reload_hook is not None else None
        if tags is not None and self.core.set_tags(tags):  # the broker learns the new tags at once
            self.config.tags = tags
            log.info("SIGHUP: tags are now %s", ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-")
        log.info("SIGHUP: configuration reloaded")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        signal.signal(signal.SIGUSR2, self.restart)
        self.core.recover()
        self.runner.sweep(set(self.core.running))
        self._open()
        log.info("agent %s (%s) connecting to %s; key %s", self.config.instance_id, self.hostname,
                 ", ".join(self.config.broker), keyfiles.fingerprint(self.public_key) if self.public_key else "none")
        core = self.core
        last_prune = time.monotonic()
        next_transfer_sweep = last_prune + 60.0
        try:
            while not self._stop:
                timeout = max(0.0, min(core.next_wakeup(), self._trim_at) - time.monotonic())
                events = self._poll(timeout * 1000)
                if self._monitor in events:
                    self._on_monitor()
                if self._socket in events:
                    self._drain_socket()
                if self._wake_r in events or self._results_here:
                    self._collect_events()
                if self._reload:
                    self._apply_reload()
                if self.facts.due():
                    self._check_facts()
                if core.tick():
                    self._reconnect("no word from the broker")
                    continue
                if self._lost:
                    self._reconnect(f"lost the broker {self.broker}")
                    continue
                now = time.monotonic()
                if now >= self._trim_at:
                    self._trim_heap()
                if now >= next_transfer_sweep:
                    next_transfer_sweep = now + 60.0
                    if self._interactive is not None:
                        self._interactive.drop_idle()
                    self.runner.expire_outputs(time.time())
                if now - last_prune > 3600:
                    last_prune = now
                    try:
                        self.journal.prune()
                    except (OSError, sqlite3.Error) as exc:  # a full disk: the next hour's prune does it
                        log.warning("cannot prune the journal: %s", exc)
        finally:
            self._shutdown()

    def _on_monitor(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_event(self._monitor)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("connected to broker %s", self.broker)
                self.core.connected()
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.error("the broker refused this agent's key %s (rejected, or too many pending keys)",
                          keyfiles.fingerprint(self.public_key))
            elif event == zmq.EVENT_DISCONNECTED:
                log.warning("disconnected from broker %s", self.broker)
                self.core.disconnected()
                if self._sessions is not None:
                    self._sessions.close_all("the connection to the broker closed")
                self._lost = len(self.config.broker) > 1  # another broker of the cluster takes over
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._lost = len(self.config.broker) > 1 and not self.core.welcomed

    def _drain_socket(self) -> None:
        receive = self.core.receive
        for _ in range(1000):
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            receive(parts)

    def _whole_output(self, msg: Any) -> None:
        """The broker reads a whole output the result could not carry, a chunk per OutputRead
        (it paces the reads), and says when it is done with it."""
        if isinstance(msg, protocol.OutputDone):
            self.runner.drop_output(msg.invocation_ids)
            return
        length = max(0, min(msg.length, protocol.MAX_MESSAGE_BYTES // 4))
        data = self.runner.read_output(msg.invocation_id, msg.stream, msg.offset, length)
        if data is None:
            self._send(protocol.OutputData(msg.invocation_id, msg.stream, msg.offset,
                                           error="this agent no longer holds that output (it restarted, or "
                                                 "the broker did not read it for an hour)"))
        else:
            self._send(protocol.OutputData(msg.invocation_id, msg.stream, msg.offset, data))

    # -- results from the worker threads -------------------------------------------------------

    def _poll(self, timeout_ms: float) -> dict[Any, int]:
        """The loop's wait: the broker's socket and its monitor, the wake-up pipe, and the sockets
        of the supervisors running invocations, whose results are taken here at once (see
        executor.py): a result reaches the journal and the broker without waking another thread."""
        poller = self._poller
        registered_in, registered = self._polled_channels
        if registered_in is not poller:  # a new connection, a new poller
            registered = set()
        channels = self.runner.channel_fds()
        if registered or channels:
            wanted = set(channels)
            for fd in registered - wanted:
                poller.unregister(fd)
            for fd in wanted - registered:
                poller.register(fd, zmq.POLLIN)
            self._polled_channels = (poller, wanted)
        events = dict(poller.poll(timeout_ms))
        for fd in channels:
            if fd in events:
                self.runner.channel_ready(fd)
        return events

    def _result_ready(self, result: InvocationResult) -> None:
        """A result goes to the loop: from the loop itself (a supervisor's socket), or from the
        watcher thread (a supervisor taken back after a restart)."""
        self._events.put(("done", result))
        if threading.get_ident() == self._loop_thread:
            self._results_here = True
        else:
            self._wake()

    def _reboot_ready(self, invocation_id: str, resume: Any) -> None:
        """A step asked for a reboot (seen by the loop or by the watcher thread)."""
        self._events.put(("reboot", (invocation_id, resume)))
        self._wake()

    def _reboot(self) -> None:
        """The core journaled where to resume: run the reboot command (once, in a thread; its
        failure ends what waited for it Failed)."""
        if getattr(self, "_rebooting", False):
            return
        self._rebooting = True
        command = self.config.reboot_command
        log.warning("rebooting: %s", command)

        def run() -> None:
            env = dict(os.environ, ZERORUN_AGENT_PID=str(os.getpid()))
            try:
                done = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, env=env, start_new_session=True, timeout=120)
                problem = (f"the reboot command {command!r} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[:500]}") if done.returncode else ""
            except (OSError, subprocess.TimeoutExpired) as exc:
                problem = f"the reboot command {command!r} failed: {exc}"
            if problem:
                self._events.put(("reboot_failed", problem))
                self._wake()

        threading.Thread(target=run, name="reboot", daemon=True).start()

    def _live_output(self, chunks: list[protocol.OutputChunk]) -> None:
        """Worker thread: live output goes to the loop, which coalesces it per wake-up."""
        self._events.put(("out", chunks))
        self._wake()

    def _interactive_message(self, msg: Any) -> None:
        """A broker message for interactive work: sessions to their thread, exec and files to theirs."""
        if isinstance(msg, (protocol.SessionStart, protocol.SessionData)):
            self.sessions.handle(msg)
        else:
            self.interactive.handle(msg)

    def _interactive_reply(self, message: Any) -> None:
        """Worker thread: an interactive answer goes out through the loop, which owns the socket."""
        self._events.put(("send", message))
        self._wake()

    def _event(self, kind: str, payload: Any) -> None:
        """Any thread: something for the loop."""
        self._events.put((kind, payload))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _collect_events(self) -> None:
        self._results_here = False
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        done: list[InvocationResult] = []
        output: list[protocol.OutputChunk] = []
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "done":
                done.append(payload)
            elif kind == "out":
                output.extend(payload)
            elif kind == "send":  # an interactive answer (ExecDone / FileDone)
                self._send(payload)
            elif kind == "reboot":
                invocation_id, resume = payload
                self.core.reboot_requested(invocation_id, resume)
                if invocation_id in self.core.rebooting:  # journaled: the run before the reboot can go
                    self.runner.release([invocation_id])
            elif kind == "reboot_failed":
                log.error("%s", payload)
                self._rebooting = False
                self.core.reboot_failed(payload)
            elif kind == "facts":  # the FQDN lookup finished
                self._check_facts()
        self.core.output(output)
        if done:
            self.core.finished(done)

    def _on_finished(self, results: list[InvocationResult], invocations: list[Invocation | None]) -> None:
        # their run directories go once the results are journaled (or acknowledged): core.on_stored
        self._trim_at = min(self._trim_at, time.monotonic() + TRIM_AFTER_IDLE)
        for result, inv in zip(results, invocations):
            log.info("finished %s: %s (exit %s)", result.invocation_id[:8], result.status, result.exit_code)
            self._log_execution(result, inv)
            if self.metrics is not None:
                self.metrics.executions.labels(result.status).inc()

    def _log_execution(self, result: InvocationResult, inv: Invocation | None) -> None:
        """The agent's own record of what ran here (JSON lines in the state dir)."""
        entry = {"ts": round(time.time(), 3), "invocation_id": result.invocation_id,
                 "status": result.status, "details": result.status_details, "exit_code": result.exit_code,
                 "started_at": result.started_at, "ended_at": result.ended_at}
        if inv is not None:
            entry.update(command_id=inv.command_id, document=inv.document_name,
                         version=inv.document_version, sha256=inv.document_sha256)
        try:
            self._execution_log.write(json.dumps(entry) + "\n")
        except OSError as exc:  # a full disk: the journal and the broker have the result all the same
            if not self._execution_log_failing:
                log.warning("cannot write executions.jsonl: %s; entries may be missing until it can be written",
                            exc)
            self._execution_log_failing = True
            return
        if self._execution_log_failing:
            self._execution_log_failing = False
            log.info("executions.jsonl can be written again")

    # -- shutdown -----------------------------------------------------------------------------

    def _drain(self) -> None:
        """SIGTERM: start nothing new (what waits stays journaled and runs after the next
        start), let running invocations finish for up to drain_timeout so that their results
        go out now, keep talking to the broker meanwhile. What still runs then goes on under
        its supervisor, and the next start reports it (nothing is cancelled)."""
        core = self.core
        core.draining = True
        deadline = time.monotonic() + (0.0 if self._restart else self.config.drain_timeout)
        core.flush_acks()
        if len(core.running) > len(core.rebooting) and deadline > time.monotonic():
            log.info("draining: waiting up to %gs for %d running invocation(s)", self.config.drain_timeout,
                     len(core.running))
        while (len(core.running) > len(core.rebooting) and time.monotonic() < deadline
               and self._socket is not None):
            events = self._poll(100)
            if self._socket in events:
                self._drain_socket()
            if self._wake_r in events or self._results_here:
                self._collect_events()
        left = len(core.running) - len(core.rebooting)
        if left:
            log.info("%d invocation(s) keep running under their supervisors; the next start of the agent "
                     "reports them", left)

    def _shutdown(self) -> None:
        log.info("agent restarting" if self._restart else "agent stopping")
        self._drain()
        if self._interactive is not None:
            self._interactive.close()
        if self._sessions is not None:
            self._sessions.shutdown()
        self._collect_events()  # journaled; sent now if connected, else after the next start
        self.core.retry_journal()  # a last try at what a full disk kept from the journal (still in its run directory)
        self.runner.shutdown()
        if self.core.bye():
            time.sleep(0.05)  # let the I/O thread flush the last frames
        self._close()
        self.journal.close()
        try:
            self._execution_log.close()
        except OSError as exc:
            log.warning("cannot write executions.jsonl: %s", exc)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()
        if self.metrics is not None:
            self.metrics.server.shutdown()
            self.metrics.server.server_close()
        if self._restart:
            self._exec_again()

    def _exec_again(self) -> None:
        """The same process, the same command line, the code installed now."""
        log.info("re-executing %s", " ".join(sys.orig_argv))
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


class _AgentMetrics:
    """The agent's small Prometheus set: what runs now, what ran, how often it reconnected."""

    def __init__(self, bind: str, core: AgentCore):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        host, _, port = bind.rpartition(":")
        registry = CollectorRegistry()
        self.running = Gauge("zerorun_agent_running_invocations", "Invocations executing now",
                             registry=registry)
        self.running.set_function(lambda: len(core.running))
        self.executions = Counter("zerorun_agent_executions", "Invocations finished, by status",
                                  ["status"], registry=registry)
        self.reconnects = Counter("zerorun_agent_reconnects", "Connections rebuilt after broker silence",
                                  registry=registry)
        self.server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
