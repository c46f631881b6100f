"""``zerorun-fleet-sim``: N simulated agents in one process, for tests and benchmarks.

Each simulated agent is what a real one is on the wire, because it is the real agent's logic:
an ``AgentCore`` (``core.py``, the same protocol state machine the daemon drives) behind its own
DEALER socket, with its own CURVE keypair (made in memory) and real tags. Only the runner and the
journal differ:

- ``--executor noop`` answers every invocation at once with Success, exit 0 and no output (the
  core sends its Results alone, as the daemon does for a step that ends before its Ack is due),
  so a benchmark measures the broker;
- ``--executor real`` runs each step's script with /bin/sh (asyncio subprocess, its own session)
  through the same step flow as the daemon (``steps.py``), captures its output and honours its
  timeout and cancels. A step that exits 194 asks for a reboot exactly as on the daemon (the same
  core journals where to resume); the simulated reboot is instant, and the invocation resumes at
  that step.

The journal is in memory (``journal.MemoryJournal``): a restart of the simulator is a fleet of
new agents. The simulator retries HELLO more patiently than the daemon (a connect storm of
thousands must not be doubled by retries) and leaves reconnecting to its DEALERs.

One asyncio loop drives every socket: a reader on each socket's ZMQ_FD drains it without blocking,
a timer per agent runs its core's ticks (no ``await`` per message: pyzmq's asyncio poll made a
poller, futures and a timer each time). The simulator
raises RLIMIT_NOFILE to the hard limit and refuses to start (exit 2, one line) when N needs more
descriptors than the OS allows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.z85

from zerorun import __version__, protocol
from zerorun.daemon import parse_tag
from zerorun.protocol import Invocation, InvocationResult, Step, StepResult
from zerorun.zmqutil import NOBLOCK, readable, send_message

from . import steps as flow
from .core import LIVENESS, ACK_HOLD, AgentCore, Identity, Pacing
from .journal import MemoryJournal

log = logging.getLogger("zerorun.fleetsim")

FDS_PER_AGENT = 2  # the TCP connection plus the socket's mailbox (eventfd)
FDS_SPARE = 64  # the loop, the context's own threads, stdio, logging
FDS_PER_PROCESS = 4  # --executor real: stdout/stderr pipes and the pidfd of each child
ACKED_MEMORY = 256  # invocation ids remembered per agent after the broker acked their result
KILL_GRACE = 5.0


class FleetError(Exception):
    """A condition that stops the simulator before it starts (exit 2)."""


def parse_spread(text: str) -> tuple[str, list[str]]:
    key, values = parse_tag(text)
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"--tag-spread {text!r} needs KEY=V1,V2,...")
    return key, items


def tags_for(index: int, tags: dict[str, str], spreads: list[tuple[str, list[str]]]) -> dict[str, str]:
    out = dict(tags)
    for key, values in spreads:
        out[key] = values[index % len(values)]
    return out


def descriptors_needed(n: int, max_procs: int = 0) -> int:
    return n * FDS_PER_AGENT + FDS_SPARE + max_procs * FDS_PER_PROCESS


def raise_nofile(needed: int) -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; FleetError if that is still too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        raise FleetError(
            f"{needed} file descriptors are needed but the OS allows {soft} (hard limit {hard}); "
            f"raise it (ulimit -n / LimitNOFILE=) or use a smaller -n")
    return soft


# --------------------------------------------------------------------------------------------
# runners


class NoopRunner:
    """Every invocation succeeds at once, with no output (a benchmark then measures the broker)."""

    def start(self, inv: Invocation, resume: flow.Resume | None = None) -> InvocationResult:
        return flow.success_at_once(inv)

    def cancel(self, invocation_id: str) -> None:
        pass

    def reattach(self, inv: Invocation) -> bool:
        return False  # a restarted simulator is a fleet of new agents: nothing to take back


class RealRunner:
    """Runs steps with asyncio subprocesses through the daemon's step flow; a semaphore bounds
    processes at once across the fleet. Shared by every agent; ``AgentProcesses`` is one
    agent's view of it."""

    def __init__(self, max_procs: int, max_output: int, work_dir: Path):
        self.sem = asyncio.Semaphore(max_procs)
        self.max_output = max_output
        self.work_dir = work_dir
        self.base_env = dict(os.environ)

    async def run(self, inv: Invocation, cancelled: asyncio.Event, procs: dict[str, asyncio.subprocess.Process],
                  resume: flow.Resume | None = None) -> tuple[InvocationResult, flow.Resume | None]:
        """The result, and where to resume when a step asked for a reboot."""
        steps = flow.StepFlow(inv, "Linux", resume=resume)
        while (next_step := steps.next_step(cancelled.is_set())) is not None:
            steps.report(await self._step(inv, *next_step, cancelled, procs))
        return steps.result(), (steps.reboot if not cancelled.is_set() else None)

    def _argv(self, inv: Invocation, index: int, step: Step) -> tuple[list[str], Path | None]:
        if step.action == "runShellScript" and not step.script.startswith("#!"):
            return ["/bin/sh", "-c", step.script], None  # no script file: cheaper for thousands
        path = self.work_dir / f"{inv.invocation_id}-{index:02d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(flow.script_text(step))
        return flow.script_argv(step, str(path)), path

    async def _step(self, inv: Invocation, index: int, step: Step, cancelled: asyncio.Event,
                    procs: dict[str, asyncio.subprocess.Process]) -> StepResult:
        cwd = flow.working_directory(step.working_directory, str(self.work_dir))
        refused = flow.cannot_run(step, cwd)
        if refused is not None:
            return refused
        env = flow.step_env(self.base_env, inv, step)
        async with self.sem:
            if cancelled.is_set():
                return flow.cancelled_before_start(step)
            argv, script = self._argv(inv, index, step)
            started = time.time()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True)
            except OSError as exc:
                if script is not None:
                    script.unlink(missing_ok=True)
                return flow.cannot_start(step, exc, started)
            procs[inv.invocation_id] = proc
            timed_out = False
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout=max(1, step.timeout_seconds))
            except asyncio.TimeoutError:
                await stop_group(proc)
                out, err = b"", b""
                timed_out = True
            finally:
                procs.pop(inv.invocation_id, None)
                if script is not None:
                    script.unlink(missing_ok=True)
            code = proc.returncode if proc.returncode is not None else -1
        return flow.process_step_result(
            step, code, timed_out=timed_out, cancelled=cancelled.is_set(),
            stdout=flow.capped_text(out, len(out), self.max_output), stdout_size=len(out),
            stderr=flow.capped_text(err, len(err), self.max_output), stderr_size=len(err), started_at=started)


class AgentProcesses:
    """One simulated agent's runner over the shared ``RealRunner``: a task per invocation,
    its result to the agent's core when done."""

    def __init__(self, agent: "SimAgent", shared: RealRunner):
        self.agent = agent
        self.shared = shared
        self.cancel_events: dict[str, asyncio.Event] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    def start(self, inv: Invocation, resume: flow.Resume | None = None) -> None:
        event = asyncio.Event()
        self.cancel_events[inv.invocation_id] = event
        tasks = self.agent.fleet.exec_tasks
        task = asyncio.get_running_loop().create_task(self._execute(inv, event, resume))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return None

    async def _execute(self, inv: Invocation, cancelled: asyncio.Event, resume: flow.Resume | None) -> None:
        reboot = None
        try:
            result, reboot = await self.shared.run(inv, cancelled, self.procs, resume)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the runner itself failed: report, never lose the invocation
            log.exception("%s: execution of %s failed", self.agent.instance_id, inv.invocation_id)
            result = flow.agent_error_result(inv.invocation_id, exc)
        self.cancel_events.pop(inv.invocation_id, None)
        if reboot is not None:
            self.agent.core.reboot_requested(inv.invocation_id, reboot)
        else:
            self.agent.core.finished([result])

    def cancel(self, invocation_id: str) -> None:
        event = self.cancel_events.get(invocation_id)
        if event is None:
            return
        event.set()
        proc = self.procs.get(invocation_id)
        if proc is not None:
            asyncio.get_running_loop().create_task(stop_group(proc))

    def reattach(self, inv: Invocation) -> bool:
        return False


async def stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE if sig == signal.SIGTERM else None)
            break
        except asyncio.TimeoutError:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the shell left behind
    except (ProcessLookupError, PermissionError):
        pass


def agent_keypair(instance_id: str, seed: str = "") -> tuple[bytes, bytes]:
    """A fresh CURVE keypair in memory; with a seed, the same one on every run (so a simulated
    instance id stays bound to its key across simulator restarts against one broker)."""
    if not seed:
        return zmq.curve_keypair()
    import hashlib

    secret = zmq.utils.z85.encode(hashlib.sha256(f"{seed}\0{instance_id}".encode()).digest())
    return zmq.curve_public(secret), secret


# --------------------------------------------------------------------------------------------
# one simulated agent


class SimAgent:
    """One simulated agent: a socket and its task, driving an ``AgentCore``."""

    def __init__(self, fleet: "Fleet", index: int, instance_id: str, tags: dict[str, str]):
        self.fleet = fleet
        self.index = index
        self.instance_id = instance_id
        public, secret = agent_keypair(instance_id, fleet.key_seed)
        sock = fleet.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        base_ms = 1000
        sock.setsockopt(zmq.RECONNECT_IVL, base_ms + random.randint(0, base_ms))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 30_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.curve_serverkey = fleet.broker_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        self.sock: zmq.asyncio.Socket = sock
        self.raw = zmq.Socket.shadow(sock.underlying)  # non-blocking drains from this agent's task
        self.runner: NoopRunner | AgentProcesses = (
            fleet.noop if fleet.runner is None else AgentProcesses(self, fleet.runner))
        self.core = AgentCore(
            Identity(instance_id, tags, fleet.hostname, "Linux", fleet.platform_version,
                     f"{__version__}+fleetsim"),
            MemoryJournal(ACKED_MEMORY), self.runner, self.send, max_concurrency=fleet.max_concurrency,
            pacing=fleet.pacing, on_welcome=self._on_welcome, on_reboot=self._reboot,
            logger=_Labelled(log, instance_id))
        self._ack_timer: asyncio.TimerHandle | None = None
        self._tick_timer: asyncio.TimerHandle | None = None
        self._tick_at = float("inf")
        self._broker = 0  # which of the fleet's brokers it is connected to
        self._reconnecting = False  # between a silent broker and the next one
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(self, message: Any) -> None:
        # on the plain socket: the asyncio one makes a future per message, never needed here
        try:
            send_message(self.raw, protocol.HEADER, protocol.encode(message))
        except zmq.ZMQError:
            self.fleet.stats["send_failures"] += 1
            return
        self.fleet.stats["messages_out"] += 1
        if self._loop is not None and readable(self.raw):
            # a send processes the socket's pending commands and may take the edge that would
            # have woken the reader for a message that came in meanwhile
            self._loop.call_soon(self._drain)

    def _on_welcome(self, first: bool) -> None:
        self.fleet.on_welcome(self, first)

    def _reboot(self) -> None:
        """A simulated reboot: instant; what asked for it resumes at the step that asked."""
        asyncio.get_running_loop().call_soon(self.core.resume_rebooted)

    async def run(self, connect_at: float) -> None:
        """Connects, then lives in callbacks until cancelled: a reader on the socket's ZMQ_FD
        drains it, a timer runs the core's ticks. (An ``await sock.poll()`` per wake-up made a
        poller, futures and a timer each time: most of a 10,000-agent simulator's CPU.)"""
        delay = connect_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        loop = self._loop = asyncio.get_running_loop()
        self.sock.connect(self.fleet.brokers[self._broker])
        self.core.connection_opened()
        self.core.connected()  # the HELLO is queued by the DEALER until the CURVE handshake completes
        fd = self.raw.getsockopt(zmq.FD)
        loop.add_reader(fd, self._drain)
        self._schedule_tick()
        self._drain()
        try:
            await loop.create_future()  # until the fleet stops
        finally:
            loop.remove_reader(fd)
            if self._tick_timer is not None:
                self._tick_timer.cancel()

    def _drain(self) -> None:
        raw, core, stats = self.raw, self.core, self.fleet.stats
        for _ in range(1000):
            if not readable(raw):
                break
            try:
                parts = raw.recv_multipart(NOBLOCK)
            except zmq.Again:
                break
            stats["messages_in"] += 1
            core.receive(parts)
        else:  # more than a batch waits: go on after the other agents' turn
            self._loop.call_soon(self._drain)
        if self._ack_timer is None and core.acks_due():
            self._ack_timer = self._loop.call_later(ACK_HOLD, self._acks_due)
        if not self._reconnecting and self.core.next_wakeup(False) < self._tick_at:
            self._schedule_tick()  # a message moved the next tick earlier

    def _schedule_tick(self) -> None:
        if self._tick_timer is not None:
            self._tick_timer.cancel()
        self._tick_at = self.core.next_wakeup(False)
        self._tick_timer = self._loop.call_at(self._loop.time() + max(0.0, self._tick_at - time.monotonic()) + 0.001,
                                              self._tick)

    def _tick(self) -> None:
        self._tick_timer = None
        if self.core.tick():  # several brokers and this one is silent: the next one, after a jittered pause
            brokers = self.fleet.brokers
            self.sock.disconnect(brokers[self._broker])
            self.core.connection_lost()
            self._reconnecting = True
            self._tick_timer = self._loop.call_later(random.uniform(0.2, 1.0), self._reconnect)
            return
        self._schedule_tick()

    def _reconnect(self) -> None:
        self._tick_timer, self._reconnecting = None, False
        self._broker = (self._broker + 1) % len(self.fleet.brokers)
        self.sock.connect(self.fleet.brokers[self._broker])
        self.core.connection_opened()
        self.core.connected()
        self._schedule_tick()
        self._drain()

    def _acks_due(self) -> None:
        """Held Acks go out from a plain loop timer: waking this agent's socket poll for them
        would cost a poll cycle per delivery."""
        self._ack_timer = None
        due = self.core.acks_due()
        if not due:
            return  # every held invocation ended in time: its Results said it all
        delay = due - time.monotonic()
        if delay > 0.001:
            self._ack_timer = self._loop.call_later(delay, self._acks_due)
        else:
            self.core.flush_acks()


class _Labelled(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The simulator's log lines say which agent they are about."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra}: {msg}", kwargs


# --------------------------------------------------------------------------------------------
# the fleet


class Fleet:
    def __init__(self, args: argparse.Namespace, broker_key: bytes):
        self.args = args
        self.brokers = [part.strip() for arg in args.broker for part in arg.split(",") if part.strip()]
        self.broker_key = broker_key
        self.n = args.n
        fixed_heartbeat = args.heartbeat_interval or 0.0
        # one broker: its DEALER reconnects by itself, no liveness check; several: a silent broker
        # makes the agent move to the next (as the daemon does)
        self.pacing = Pacing(heartbeat=fixed_heartbeat or 5.0, broker_sets_heartbeat=not fixed_heartbeat,
                             liveness=LIVENESS if len(self.brokers) > 1 else 0, hello_retry_floor=10.0,
                             hello_retry_intervals=2.0, hello_retry_jitter=5.0)
        self.max_concurrency = args.max_concurrency
        self.key_seed = args.key_seed
        self.hostname = socket.gethostname()
        self.platform_version = os.uname().release
        self.stats: dict[str, int] = {k: 0 for k in ("messages_in", "messages_out", "send_failures")}
        self.welcomed = 0
        self.started_at = time.monotonic()
        self.all_welcomed = asyncio.Event()
        self.exec_tasks: set[asyncio.Task[None]] = set()
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.noop = NoopRunner()
        self.runner: RealRunner | None = None
        if args.executor == "real":
            self.tmp = tempfile.TemporaryDirectory(prefix="zerorun-fleetsim-")
            self.runner = RealRunner(args.max_procs, args.max_output_bytes, Path(self.tmp.name))
        self.ctx = zmq.asyncio.Context(io_threads=args.io_threads)
        self.ctx.set(zmq.MAX_SOCKETS, self.n + 64)
        tags = dict(args.tags)
        self.agents = [SimAgent(self, i, f"{args.prefix}-{i + args.start:05d}",
                                tags_for(i, tags, args.tag_spread)) for i in range(self.n)]

    def on_welcome(self, agent: SimAgent, first: bool) -> None:
        if not first:
            return
        self.welcomed += 1
        if self.welcomed == self.n:
            took = time.monotonic() - self.started_at
            print(f"fleetsim: all {self.n} agents welcomed in {took:.2f}s "
                  f"(prefix {self.args.prefix}, executor {self.args.executor}, "
                  f"heartbeat {agent.core.heartbeat:g}s, pid {os.getpid()})", flush=True)
            self.all_welcomed.set()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        rate = max(1.0, self.args.connect_rate)
        t0 = time.monotonic()
        tasks = [loop.create_task(a.run(t0 + i / rate)) for i, a in enumerate(self.agents)]
        progress = loop.create_task(self._progress(stop))
        await stop.wait()
        progress.cancel()
        for agent in self.agents:  # say goodbye, as a stopping agent does
            agent.core.bye()
        for task in tasks:
            task.cancel()
        for agent in self.agents:
            if not isinstance(agent.runner, AgentProcesses):
                continue
            for proc in list(agent.runner.procs.values()):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for task in list(self.exec_tasks):
            task.cancel()
        await asyncio.gather(*tasks, *self.exec_tasks, progress, return_exceptions=True)
        await asyncio.sleep(0.2)  # let the I/O thread flush the goodbyes

    async def _progress(self, stop: asyncio.Event) -> None:
        last = -1
        while not stop.is_set():
            await asyncio.sleep(2.0)
            if self.welcomed != last and not self.all_welcomed.is_set():
                last = self.welcomed
                log.info("%d/%d agents welcomed", self.welcomed, self.n)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("stats %s", self.totals())

    def totals(self) -> dict[str, int]:
        """The fleet's message counts, and what its agents' cores counted."""
        cores = [a.core for a in self.agents]
        return {**self.stats, "bad_messages": sum(c.bad_messages for c in cores),
                "internal_errors": sum(c.internal_errors for c in cores),
                "invocations": sum(c.delivered for c in cores),
                "results": sum(c.finished_count for c in cores)}

    def close(self) -> None:
        for agent in self.agents:
            agent.sock.close(0)
        self.ctx.term()
        if self.tmp is not None:
            self.tmp.cleanup()
        log.info("fleetsim stopped: %s", " ".join(f"{k}={v}" for k, v in self.totals().items()))


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerorun-fleet-sim",
                                description="N simulated Zerorun agents in one process (tests, benchmarks).")
    p.add_argument("--broker", required=True, action="append",
                   help="broker agent endpoint, e.g. tcp://127.0.0.1:7450; repeat it for the brokers of a cluster "
                        "(each agent starts on the first and moves on when its broker is silent)")
    p.add_argument("--broker-key", required=True, help="file with the broker's public key (broker.key)")
    p.add_argument("-n", type=int, default=100, help="number of simulated agents (default 100)")
    p.add_argument("--prefix", default="sim", help="instance ids are PREFIX-00000, PREFIX-00001, ...")
    p.add_argument("--start", type=int, default=0, help="number of the first instance id")
    p.add_argument("--tag", dest="tags", action="append", type=parse_tag, default=[], metavar="KEY=VALUE",
                   help="a tag of every simulated instance (repeatable)")
    p.add_argument("--tag-spread", action="append", type=parse_spread, default=[], metavar="KEY=V1,V2,...",
                   help="values given round-robin to the instances (repeatable)")
    p.add_argument("--executor", choices=["noop", "real"], default="noop",
                   help="noop: answer Success at once; real: run each step with /bin/sh")
    p.add_argument("--heartbeat-interval", type=float, default=0.0,
                   help="seconds between heartbeats (default: what the broker's Welcome says)")
    p.add_argument("--max-concurrency", type=int, default=5, help="invocations run at once per agent")
    p.add_argument("--max-procs", type=int, default=64,
                   help="processes at once across the fleet (--executor real)")
    p.add_argument("--max-output-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--connect-rate", type=float, default=2000.0,
                   help="new connections per second (a gentle ramp instead of a SYN flood)")
    p.add_argument("--key-seed", default="",
                   help="derive each agent's key from this seed and its instance id (default: random "
                        "keys, so a restarted simulator is a fleet of new agents)")
    p.add_argument("--io-threads", type=int, default=1, help="ZeroMQ I/O threads")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.n < 1:
        print("zerorun-fleet-sim: -n must be at least 1", file=sys.stderr)
        return 2
    try:
        from zerorun.keys import KeyFileError, load_public

        try:
            broker_key = load_public(Path(args.broker_key))
        except KeyFileError as exc:
            raise FleetError(str(exc)) from None
        raise_nofile(descriptors_needed(args.n, args.max_procs if args.executor == "real" else 0))
        probe = zmq.Context()
        socket_limit = probe.get(zmq.SOCKET_LIMIT)
        probe.term()
        if args.n + 64 > socket_limit:
            raise FleetError(f"{args.n} agents need {args.n + 64} ZeroMQ sockets; this libzmq allows {socket_limit}")
    except FleetError as exc:
        print(f"zerorun-fleet-sim: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_amain(args, broker_key))
    except KeyboardInterrupt:
        pass
    return 0


async def _amain(args: argparse.Namespace, broker_key: bytes) -> None:
    loop = asyncio.get_running_loop()
    if args.executor == "real" and hasattr(asyncio, "PidfdChildWatcher"):
        try:  # one pidfd per child instead of one waiting thread per child (3.11's default)
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(loop)
            asyncio.set_child_watcher(watcher)
        except (OSError, RuntimeError, NotImplementedError):
            pass
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fleet = Fleet(args, broker_key)
    # thousands of agents are long-lived objects: leave them out of every garbage collection
    # (a full collection would walk them all, for nothing)
    gc.freeze()
    log.info("starting %d simulated agents (%s executor) against %s", args.n, args.executor, ", ".join(args.broker))
    try:
        await fleet.run(stop)
    finally:
        fleet.close()


if __name__ == "__main__":
    sys.exit(main())
