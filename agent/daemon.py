"""The agent's loop: one DEALER connection out to the broker, nothing listening on the instance.

One thread owns the socket and the journal; executions run in worker threads and hand their
results back through a queue and a wake-up pipe. The agent says HELLO after every (re)connect
(seen through the socket monitor) and whenever the broker asks, heartbeats from this loop (so a
frozen agent is noticed even though libzmq would still answer ZMTP pings), and rebuilds its
connection with jittered exponential backoff when the broker goes quiet.
"""

from __future__ import annotations

import json
import logging
import os
import platform as platform_mod
import queue
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from zerorun import __version__, keys as keyfiles, protocol
from zerorun.zmqutil import recv_monitor_event
from zerorun.protocol import CANCELLED, HEADER, Invocation, InvocationResult, StepResult

from .executor import Execution
from .interactive import Interactive
from .journal import ACCEPTED, DONE, RUNNING, Journal

log = logging.getLogger("zerorun.agent")

LIVENESS = 3  # broker silent for this many heartbeat intervals: rebuild the connection
ACK_HOLD = 0.02  # seconds the Ack of a started invocation waits: a step done by then needs only Results


@dataclass
class AgentConfig:
    broker: str
    instance_id: str
    state_dir: Path
    broker_key: bytes = b""  # z85; empty only with insecure
    tags: dict[str, str] = field(default_factory=dict)
    max_concurrency: int = 5
    heartbeat_interval: float = 5.0
    max_output_bytes: int = 4 * 1024 * 1024
    reconnect_base: float = 1.0
    reconnect_max: float = 30.0
    insecure: bool = False
    platform: str = ""
    metrics_bind: str = ""  # host:port for Prometheus metrics; "" = off
    drain_timeout: float = 10.0  # on SIGTERM, seconds running invocations get to finish


def detect_platform() -> tuple[str, str]:
    system = platform_mod.system()
    name = {"Linux": "Linux", "Darwin": "MacOS", "Windows": "Windows"}.get(system, system)
    return name, platform_mod.release()


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        self.public_key, self.secret_key = ((b"", b"") if config.insecure
                                            else keyfiles.ensure_keypair(state, "agent"))
        self.journal = Journal(state / "journal.db")
        fd = os.open(state / "executions.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._execution_log = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        self.work_root = state / "work"
        self.work_root.mkdir(exist_ok=True, mode=0o700)
        self.platform, self.platform_version = detect_platform()
        if config.platform:
            self.platform = config.platform
        self.hostname = socket.gethostname()
        self._ctx = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._stop = False
        self._welcomed = False
        self._heartbeat = config.heartbeat_interval
        self._last_heard = time.monotonic()
        self._next_hello = 0.0
        self._failures = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.interactive = Interactive(self._interactive_reply)  # exec / files for the connection plugin
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.max_concurrency),
                                        thread_name_prefix="exec")
        self._waiting: list[Invocation] = []  # journaled, waiting for a free slot
        self._running: dict[str, Execution] = {}
        self._held_acks: list[str] = []  # started invocations whose Ack waits up to ACK_HOLD
        self._held_since = 0.0
        self._ack_due = 0.0
        self._cancelled_early: set[str] = set()
        self._finished_meta: dict[str, Invocation] = {}  # for the execution log
        self.reconnects = 0
        self.metrics = _AgentMetrics(config.metrics_bind) if config.metrics_bind else None

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
        # at 5,000 agents); a hung broker by the heartbeat liveness check in run().
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if not self.config.insecure:
            sock.curve_serverkey = self.config.broker_key
            sock.curve_publickey = self.public_key
            sock.curve_secretkey = self.secret_key
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
        sock.connect(self.config.broker)
        self._socket = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._welcomed = False
        self._last_heard = time.monotonic()
        # the first HELLO goes out on the handshake event; this is only the fallback
        self._next_hello = time.monotonic() + max(self._heartbeat, 1.0)

    def _close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self._socket.close(0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None

    def _reconnect(self, why: str) -> None:
        self._failures += 1
        delay = min(self.config.reconnect_max, self.config.reconnect_base * 2 ** min(self._failures, 8))
        delay = random.uniform(delay / 2, delay)  # full jitter: no thundering herd
        log.warning("%s; reconnecting in %.1fs", why, delay)
        self._held_acks = []  # the broker delivers again after HELLO and hears them then
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

    def _hello(self) -> None:
        unacked = [r.invocation_id for r in self.journal.unacked_results()]
        self._send(protocol.Hello(
            instance_id=self.config.instance_id, tags=self.config.tags, hostname=self.hostname,
            platform=self.platform, platform_version=self.platform_version, agent_version=__version__,
            running=sorted(self._running), unacked=unacked, max_concurrency=self.config.max_concurrency))
        self._next_hello = time.monotonic() + max(self._heartbeat, 1.0)

    # -- loop -------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stop = True
        self._wake()

    reload_hook: Any = None  # set by main: re-reads the config, returns the new tags
    _reload = False

    def request_reload(self, *_: Any) -> None:
        self._reload = True
        self._wake()

    def _apply_reload(self) -> None:
        self._reload = False
        tags = self.reload_hook() if self.reload_hook is not None else None
        if tags is not None and tags != self.config.tags:
            self.config.tags = tags
            log.info("SIGHUP: tags are now %s", ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-")
            if self._welcomed:
                self._hello()  # the broker learns the new tags at once
        log.info("SIGHUP: configuration reloaded")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self._recover()
        self._open()
        log.info("agent %s (%s) connecting to %s; key %s", self.config.instance_id, self.hostname,
                 self.config.broker, keyfiles.fingerprint(self.public_key) if self.public_key else "none")
        next_beat = time.monotonic()
        last_prune = time.monotonic()
        next_transfer_sweep = last_prune + 60.0
        try:
            while not self._stop:
                wake = min(next_beat, self._next_hello if not self._welcomed else next_beat)
                if self._held_acks:
                    wake = min(wake, self._ack_due)
                timeout = max(0.0, wake - time.monotonic())
                events = dict(self._poller.poll(timeout * 1000))
                if self._monitor in events:
                    self._on_monitor()
                if self._socket in events:
                    self._drain_socket()
                if self._wake_r in events:
                    self._collect_events()
                if self._reload:
                    self._apply_reload()
                now = time.monotonic()
                if self._held_acks and now >= self._ack_due:
                    self._send_held_acks()
                if not self._welcomed and now >= self._next_hello:
                    self._hello()
                if now >= next_beat:
                    next_beat = now + self._heartbeat
                    if self._welcomed:
                        self._send(protocol.Heartbeat(running=len(self._running)))
                    if now - self._last_heard > self._heartbeat * LIVENESS:
                        self._reconnect("no word from the broker")
                        next_beat = time.monotonic()
                        continue
                if now >= next_transfer_sweep:
                    next_transfer_sweep = now + 60.0
                    self.interactive.drop_idle()
                if now - last_prune > 3600:
                    last_prune = now
                    self.journal.prune()
        finally:
            self._shutdown()

    def _on_monitor(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_event(self._monitor)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("connected to broker %s", self.config.broker)
                self._last_heard = time.monotonic()
                self._hello()
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.error("the broker refused this agent's key %s (rejected, or too many pending keys)",
                          keyfiles.fingerprint(self.public_key))
            elif event == zmq.EVENT_DISCONNECTED:
                log.warning("disconnected from broker")
                self._welcomed = False

    def _drain_socket(self) -> None:
        for _ in range(1000):
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            if len(parts) != 2 or parts[0] != HEADER:
                log.warning("ignored a message with an unknown header or framing")
                continue
            try:
                msg = protocol.broker_to_agent_decoder.decode(parts[1])
            except (protocol.DecodeError, protocol.ValidationError) as exc:
                log.warning("ignored a malformed message from the broker: %s", exc)
                continue
            try:
                self._handle(msg)
            except Exception:
                log.exception("error handling %s", type(msg).__name__)

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, protocol.Deliver):
            if msg.results_acked:
                self.journal.mark_acked(msg.results_acked)
            self._on_deliver(msg.invocations)
        elif isinstance(msg, protocol.ResultAck):
            self.journal.mark_acked(msg.invocation_ids)
        elif isinstance(msg, protocol.Cancel):
            self._on_cancel(msg.invocation_ids)
        elif isinstance(msg, protocol.Pong):
            if msg.heartbeat_interval > 0:  # the broker spreads a larger fleet's heartbeats
                self._heartbeat = max(0.2, msg.heartbeat_interval)
        elif isinstance(msg, (protocol.AgentExec, protocol.AgentFileOp)):
            self.interactive.handle(msg)
        elif isinstance(msg, protocol.Welcome):
            self._welcomed = True
            self._failures = 0
            self._heartbeat = max(0.2, msg.heartbeat_interval)
            log.info("registered with the broker as %s", msg.instance_id)
            pending = self.journal.unacked_results()
            for i in range(0, len(pending), 200):
                self._send(protocol.Results(pending[i:i + 200]))
        elif isinstance(msg, protocol.PleaseHello):
            self._welcomed = False
            self._hello()
        elif isinstance(msg, protocol.KeyPending):
            log.warning("%s", msg.message)
            self._welcomed = False
            self._next_hello = time.monotonic() + max(0.5, msg.retry_after)
        elif isinstance(msg, protocol.Denied):
            log.error("the broker denied this agent: %s", msg.reason)
            self._welcomed = False
            self._next_hello = time.monotonic() + max(1.0, msg.retry_after)

    # -- work -------------------------------------------------------------------------------

    def _on_deliver(self, invocations: list[Invocation]) -> None:
        now = time.time()
        fresh: list[Invocation] = []
        acks: list[str] = []
        refusals: list[protocol.Refusal] = []
        resend: list[InvocationResult] = []
        for inv in invocations:
            known = self.journal.state_of(inv.invocation_id)
            if known is not None:
                state, acked = known
                acks.append(inv.invocation_id)  # the ack was lost: repeat it, never re-run
                if state == DONE and not acked:
                    result = self.journal.result(inv.invocation_id)
                    if result is not None:
                        resend.append(result)
                continue
            if inv.instance_id != self.config.instance_id:
                refusals.append(protocol.Refusal(inv.invocation_id, "invalid",
                                                 f"delivered to {self.config.instance_id}, addressed to {inv.instance_id}"))
                continue
            if inv.expires_at and now > inv.expires_at:
                refusals.append(protocol.Refusal(inv.invocation_id, "expired",
                                                 "delivery arrived after the command expired"))
                continue
            fresh.append(inv)
        started: list[str] = []
        if fresh:
            runnable = [i for i in fresh if i.invocation_id not in self._cancelled_early]
            free = max(0, self.config.max_concurrency - len(self._running) - len(self._waiting))
            now_running = {i.invocation_id for i in runnable[:free]}
            self.journal.accept(fresh, running=now_running)  # one commit: journaled and started
            acks.extend(i.invocation_id for i in fresh)
            for inv in fresh:
                if inv.invocation_id in self._cancelled_early:
                    self._cancelled_early.discard(inv.invocation_id)
                    self._finished_meta[inv.invocation_id] = inv
                    self._finish([_cancelled_result(inv)])
                elif inv.invocation_id in now_running:
                    self._launch(inv)
                    started.append(inv.invocation_id)
                else:
                    self._waiting.append(inv)
        if started:  # journaled and running: said with the result if that comes within ACK_HOLD
            if not self._held_acks:
                self._held_since, self._ack_due = time.time(), time.monotonic() + ACK_HOLD
            self._held_acks.extend(started)
            held = set(started)
            acks = [i for i in acks if i not in held]
        if acks:
            self._send(protocol.Ack(acks))
        if refusals:
            self._send(protocol.Refuse(refusals))
        if resend:
            self._send(protocol.Results(resend))

    def _start_waiting(self) -> None:
        """Starts what waited for a free slot, and says so (Started)."""
        batch: list[Invocation] = []
        while self._waiting and len(self._running) + len(batch) < self.config.max_concurrency:
            batch.append(self._waiting.pop(0))
        if not batch:
            return
        ids = [i.invocation_id for i in batch]
        self.journal.mark_running(ids)  # before it starts: after a crash it is never re-run
        self._send(protocol.Started(ids, time.time()))
        for inv in batch:
            self._launch(inv)

    def _launch(self, inv: Invocation) -> None:
        """Hands a journaled-as-running invocation to a worker thread."""
        execution = Execution(inv, self.work_root / inv.invocation_id, self.platform,
                              self.config.max_output_bytes, on_output=self._live_output)
        self._running[inv.invocation_id] = execution
        log.info("running %s (command %s, %s)", inv.invocation_id[:8], inv.command_id, inv.document_name)
        self._pool.submit(self._execute, execution)
        if self.metrics is not None:
            self.metrics.running.set(len(self._running))

    def _execute(self, execution: Execution) -> None:
        """Worker thread: run, then hand the result to the loop."""
        try:
            result = execution.run()
        except Exception as exc:  # the executor itself failed: report, never lose the invocation
            log.exception("execution of %s failed", execution.invocation.invocation_id)
            now = time.time()
            result = InvocationResult(execution.invocation.invocation_id, protocol.FAILED,
                                      status_details="agent error", stderr=f"agent error: {exc}\n",
                                      started_at=now, ended_at=now)
        self._events.put(("done", result))
        self._wake()

    def _live_output(self, chunks: list[protocol.OutputChunk]) -> None:
        """Worker thread: live output goes to the loop, which coalesces it per wake-up."""
        self._events.put(("out", chunks))
        self._wake()

    def _interactive_reply(self, message: Any) -> None:
        """Worker thread: an interactive answer goes out through the loop, which owns the socket."""
        self._events.put(("send", message))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _collect_events(self) -> None:
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
                execution = self._running.pop(payload.invocation_id, None)
                if execution is not None:
                    self._finished_meta[payload.invocation_id] = execution.invocation
                done.append(payload)
            elif kind == "out":
                output.extend(payload)
            elif kind == "send":  # an interactive answer (ExecDone / FileDone)
                self._send(payload)
        if output and self._welcomed:  # best effort: the full output comes with the result
            self._send(protocol.Output(output))
        if done:
            self._finish(done)
            if not self._stop:
                self._start_waiting()

    def _finish(self, results: list[InvocationResult]) -> None:
        self.journal.record_results(results)
        for r in results:
            log.info("finished %s: %s (exit %s)", r.invocation_id[:8], r.status, r.exit_code)
            self._log_execution(r)
            if self.metrics is not None:
                self.metrics.executions.labels(r.status).inc()
        if self.metrics is not None:
            self.metrics.running.set(len(self._running))
        if self._held_acks:  # these Results stand for their Acks
            done = {r.invocation_id for r in results}
            self._held_acks = [i for i in self._held_acks if i not in done]
        if self._welcomed:
            self._send(protocol.Results(results))

    def _send_held_acks(self) -> None:
        if self._held_acks:
            self._send(protocol.Ack(self._held_acks, started=self._held_acks, at=self._held_since))
            self._held_acks = []

    def _log_execution(self, result: InvocationResult) -> None:
        """The agent's own record of what ran here (JSON lines in the state dir)."""
        execution = self._running.get(result.invocation_id) or self._finished_meta.pop(result.invocation_id, None)
        inv = execution.invocation if isinstance(execution, Execution) else execution
        entry = {"ts": round(time.time(), 3), "invocation_id": result.invocation_id,
                 "status": result.status, "details": result.status_details, "exit_code": result.exit_code,
                 "started_at": result.started_at, "ended_at": result.ended_at}
        if inv is not None:
            entry.update(command_id=inv.command_id, document=inv.document_name,
                         version=inv.document_version, sha256=inv.document_sha256)
        self._execution_log.write(json.dumps(entry) + "\n")

    def _on_cancel(self, invocation_ids: list[str]) -> None:
        for iid in invocation_ids:
            execution = self._running.get(iid)
            if execution is not None:
                log.info("cancelling %s", iid[:8])
                execution.cancel()
                continue
            waiting = next((i for i in self._waiting if i.invocation_id == iid), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                self._finished_meta[waiting.invocation_id] = waiting
                self._finish([_cancelled_result(waiting)])
                continue
            known = self.journal.state_of(iid)
            if known is None:
                self._cancelled_early.add(iid)  # the delivery may still be on its way
            elif known[0] == DONE and not known[1]:
                result = self.journal.result(iid)
                if result is not None and self._welcomed:
                    self._send(protocol.Results([result]))

    # -- restart and shutdown -----------------------------------------------------------------

    def _recover(self) -> None:
        """After a restart: what was running was interrupted (report it, never re-run it);
        what was journaled but not started may start now."""
        interrupted = self.journal.in_state(RUNNING)
        if interrupted:
            now = time.time()
            results = [InvocationResult(
                inv.invocation_id, protocol.FAILED, status_details=protocol.INTERRUPTED,
                stderr="the agent restarted while this invocation was running; it was not re-run\n",
                started_at=inv.issued_at, ended_at=now) for inv in interrupted]
            self.journal.record_results(results)
            log.warning("%d invocation(s) were interrupted by an agent restart", len(results))
        self._waiting.extend(self.journal.in_state(ACCEPTED))

    def _drain(self) -> None:
        """SIGTERM: start nothing new (what waits stays journaled and runs after the next
        start), let running invocations finish for up to drain_timeout, keep talking to the
        broker meanwhile; then cancel what is left."""
        deadline = time.monotonic() + self.config.drain_timeout
        self._send_held_acks()
        if self._running:
            log.info("draining: waiting up to %gs for %d running invocation(s)", self.config.drain_timeout,
                     len(self._running))
        while self._running and time.monotonic() < deadline and self._socket is not None:
            events = dict(self._poller.poll(100))
            if self._socket in events:
                self._drain_socket()
            if self._wake_r in events:
                self._collect_events()
        for execution in list(self._running.values()):
            log.warning("cancelling %s: still running at the end of the drain",
                        execution.invocation.invocation_id[:8])
            execution.cancel()

    def _shutdown(self) -> None:
        log.info("agent stopping")
        self._drain()
        self.interactive.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._collect_events()  # journaled; sent now if connected, else after the next start
        if self._welcomed:
            self._send(protocol.Bye())
            time.sleep(0.05)  # let the I/O thread flush the last frames
        self._close()
        self.journal.close()
        self._execution_log.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()


class _AgentMetrics:
    """The agent's small Prometheus set: what runs now, what ran, how often it reconnected."""

    def __init__(self, bind: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        host, _, port = bind.rpartition(":")
        registry = CollectorRegistry()
        self.running = Gauge("zerorun_agent_running_invocations", "Invocations executing now",
                             registry=registry)
        self.executions = Counter("zerorun_agent_executions", "Invocations finished, by status",
                                  ["status"], registry=registry)
        self.reconnects = Counter("zerorun_agent_reconnects", "Connections rebuilt after broker silence",
                                  registry=registry)
        self.server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)


def _cancelled_result(inv: Invocation) -> InvocationResult:
    now = time.time()
    return InvocationResult(inv.invocation_id, CANCELLED, status_details="cancelled before it started",
                            started_at=now, ended_at=now,
                            steps=[StepResult(s.name, CANCELLED) for s in inv.steps])
