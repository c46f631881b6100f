"""``zerorun-fleet-sim``: N simulated agents in one process, for tests and benchmarks.

Each simulated agent is what a real one is on the wire: its own DEALER socket, its own CURVE
keypair (made in memory), the real protocol from ``zerorun.protocol`` (HELLO on connect and on
PleaseHello, heartbeats at the interval the broker's Welcome gives, Ack + Started + Results for
every Deliver, or Results alone for an answer ready at once as a real agent does for a step that
ends before its Ack is due; ResultAck, Cancel) and real tags. Only the executor and the journal differ:

- ``--executor noop`` answers every invocation at once with Success, exit 0 and no output, so a
  benchmark measures the broker alone;
- ``--executor real`` runs each step's script with /bin/sh (asyncio subprocess, its own session),
  captures its output and honours its timeout and cancels.

The journal is in memory: a restart of the simulator is a fleet of new agents.

One asyncio loop (``zmq.asyncio``) drives every socket. Each agent's task polls its socket (never
``asyncio.wait_for`` around a receive: pyzmq#1925) and drains it without blocking. The simulator
raises RLIMIT_NOFILE to the hard limit and refuses to start (exit 2, one line) when N needs more
descriptors than the OS allows.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.z85

from zerorun import __version__, protocol
from zerorun.protocol import (
    CANCELLED, FAILED, HEADER, SKIPPED, SUCCESS, TIMED_OUT, Invocation, InvocationResult, Step,
    StepResult)

log = logging.getLogger("zerorun.fleetsim")

FDS_PER_AGENT = 2  # the TCP connection plus the socket's mailbox (eventfd)
FDS_SPARE = 64  # the loop, the context's own threads, stdio, logging
FDS_PER_PROCESS = 4  # --executor real: stdout/stderr pipes and the pidfd of each child
ACKED_MEMORY = 256  # invocation ids remembered per agent after the broker acked their result
KILL_GRACE = 5.0
EXIT_SUCCESS_AND_STOP = 168
EXIT_FAILURE_AND_STOP = 169


class FleetError(Exception):
    """A condition that stops the simulator before it starts (exit 2)."""


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"tag {text!r} must look like KEY=VALUE")
    return key.strip(), value.strip()


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
# executors


def _now() -> float:
    return time.time()


def noop_result(inv: Invocation) -> InvocationResult:
    now = _now()
    return InvocationResult(inv.invocation_id, SUCCESS, exit_code=0, started_at=now, ended_at=now,
                            steps=[StepResult(s.name, SUCCESS, exit_code=0, started_at=now, ended_at=now)
                                   for s in inv.steps])


def cancelled_result(inv: Invocation, detail: str = "cancelled before it started") -> InvocationResult:
    now = _now()
    return InvocationResult(inv.invocation_id, CANCELLED, status_details=detail, started_at=now,
                            ended_at=now, steps=[StepResult(s.name, CANCELLED) for s in inv.steps])


class RealRunner:
    """Runs steps with asyncio subprocesses; a global semaphore bounds processes at once."""

    def __init__(self, max_procs: int, max_output: int, work_dir: Path):
        self.sem = asyncio.Semaphore(max_procs)
        self.max_output = max_output
        self.work_dir = work_dir
        self.base_env = dict(os.environ)

    async def run(self, inv: Invocation, cancelled: asyncio.Event,
                  procs: dict[str, asyncio.subprocess.Process]) -> InvocationResult:
        from agent.executor import Execution, _summarise  # the real agent's step flow

        started = _now()
        results: list[StepResult] = []
        stop = False
        for index, step in enumerate(inv.steps):
            if stop and not step.finally_step:
                results.append(StepResult(step.name, SKIPPED, detail="skipped after an earlier exit"))
                continue
            if cancelled.is_set():
                results.append(StepResult(step.name, CANCELLED, detail="cancelled"))
                stop = True
                continue
            pre = step.precondition
            if pre is not None:
                values = ["Linux" if v == "platformType" else v for v in pre.operands]
                if not (pre.op == "StringEquals" and len(values) == 2 and values[0] == values[1]):
                    results.append(StepResult(step.name, SKIPPED, detail="precondition not met"))
                    continue
            res = await self._step(inv, index, step, cancelled, procs)
            results.append(res)
            stop = stop or Execution._stops_after(step, res)
        return _summarise(inv.invocation_id, results, started, _now())

    def _argv(self, inv: Invocation, index: int, step: Step) -> tuple[list[str], Path | None]:
        if step.action == "runShellScript" and not step.script.startswith("#!"):
            return ["/bin/sh", "-c", step.script], None
        path = self.work_dir / f"{inv.invocation_id}-{index:02d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(step.script if step.script.endswith("\n") else step.script + "\n")
        if step.action == "runScript" and step.interpreter:
            return [*step.interpreter, str(path)], path
        if step.script.startswith("#!"):
            return [str(path)], path
        return ["/bin/sh", str(path)], path

    async def _step(self, inv: Invocation, index: int, step: Step, cancelled: asyncio.Event,
                    procs: dict[str, asyncio.subprocess.Process]) -> StepResult:
        name = step.name
        if step.action not in ("runShellScript", "runScript"):
            return StepResult(name, FAILED, detail=f"action {step.action!r} is not supported by this agent")
        cwd = step.working_directory or str(self.work_dir)
        if not os.path.isdir(cwd):
            return StepResult(name, FAILED, detail=f"working directory {cwd} does not exist",
                              stderr=f"working directory {cwd} does not exist\n")
        env = dict(self.base_env)
        env.update(step.env)
        env.update({"ZERORUN_COMMAND_ID": inv.command_id, "ZERORUN_INSTANCE_ID": inv.instance_id,
                    "ZERORUN_INVOCATION_ID": inv.invocation_id, "ZERORUN_STEP_NAME": name,
                    "SSM_COMMAND_ID": inv.command_id, "AWS_SSM_INSTANCE_ID": inv.instance_id})
        async with self.sem:
            if cancelled.is_set():
                now = _now()
                return StepResult(name, CANCELLED, detail="cancelled", started_at=now, ended_at=now)
            argv, script = self._argv(inv, index, step)
            started = _now()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True)
            except OSError as exc:
                if script is not None:
                    script.unlink(missing_ok=True)
                return StepResult(name, FAILED, detail=f"cannot start: {exc.strerror}",
                                  stderr=f"cannot start step {name}: {exc}\n", started_at=started,
                                  ended_at=_now())
            procs[inv.invocation_id] = proc
            status, detail = SUCCESS, ""
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout=max(1, step.timeout_seconds))
            except asyncio.TimeoutError:
                await stop_group(proc)
                out, err = b"", b""
                status, detail = TIMED_OUT, protocol.EXECUTION_TIMED_OUT
            finally:
                procs.pop(inv.invocation_id, None)
                if script is not None:
                    script.unlink(missing_ok=True)
            code = proc.returncode if proc.returncode is not None else -1
        if status == SUCCESS and cancelled.is_set():
            status, detail = CANCELLED, "cancelled"
        elif status == SUCCESS and code not in (0, EXIT_SUCCESS_AND_STOP):
            status = FAILED
        if code < 0:
            code = 128 - code
        stdout, stdout_size = self._cap(out)
        stderr, stderr_size = self._cap(err)
        return StepResult(name, status, exit_code=code, stdout=stdout, stderr=stderr,
                          stdout_size=stdout_size, stderr_size=stderr_size, started_at=started,
                          ended_at=_now(), detail=detail)

    def _cap(self, data: bytes) -> tuple[str, int]:
        size = len(data)
        text = data[:self.max_output].decode("utf-8", errors="replace")
        if size > self.max_output:
            text += f"\n[output truncated by the agent: {size} bytes in all, {self.max_output} kept]\n"
        return text, size


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
    def __init__(self, fleet: "Fleet", index: int, instance_id: str, tags: dict[str, str]):
        self.fleet = fleet
        self.index = index
        self.instance_id = instance_id
        self.tags = tags
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
        self.welcomed = False
        self.ever_welcomed = False
        self.heartbeat = fleet.heartbeat_override or 5.0
        self.next_beat = 0.0
        self.next_hello = 0.0
        self.states: dict[str, str] = {}  # invocation id -> accepted | running | done
        self.unacked: dict[str, InvocationResult] = {}
        self.acked: OrderedDict[str, None] = OrderedDict()
        self.cancel_events: dict[str, asyncio.Event] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.waiting: list[Invocation] = []
        self.cancelled_early: set[str] = set()

    # -- wire -------------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        fut = self.sock.send_multipart(protocol.frames(message), flags=zmq.NOBLOCK)
        if fut.done():
            exc = fut.exception()  # retrieved, so asyncio never warns about it
            if exc is not None:
                self.fleet.stats["send_failures"] += 1
                return
        self.fleet.stats["messages_out"] += 1

    def hello(self) -> None:
        self.send(protocol.Hello(
            instance_id=self.instance_id, tags=self.tags, hostname=self.fleet.hostname,
            platform="Linux", platform_version=self.fleet.platform_version,
            agent_version=f"{__version__}+fleetsim", running=sorted(self.procs),
            unacked=list(self.unacked), max_concurrency=self.fleet.max_concurrency))
        # retry while not welcomed; generous, so a connect storm is not doubled by retries
        self.next_hello = time.monotonic() + max(10.0, 2 * self.heartbeat) + random.uniform(0, 5)

    async def run(self, connect_at: float) -> None:
        delay = connect_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.sock.connect(self.fleet.broker)
        self.hello()  # queued by the DEALER until the CURVE handshake completes
        raw = self.raw
        poll = self.sock.poll
        while True:
            now = time.monotonic()
            due = self.next_beat if self.welcomed else self.next_hello
            timeout_ms = max(0, int((due - now) * 1000)) + 1
            if await poll(timeout_ms):
                for _ in range(1000):
                    try:
                        parts = raw.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_message(parts)
            now = time.monotonic()
            if self.welcomed:
                if now >= self.next_beat:
                    self.next_beat = now + self.heartbeat
                    self.send(protocol.Heartbeat(running=len(self.procs)))
            elif now >= self.next_hello:
                self.hello()

    def on_message(self, parts: list[bytes]) -> None:
        stats = self.fleet.stats
        stats["messages_in"] += 1
        if len(parts) != 2 or parts[0] != HEADER:
            stats["bad_messages"] += 1
            return
        try:
            msg = protocol.broker_to_agent_decoder.decode(parts[1])
        except (protocol.DecodeError, protocol.ValidationError):
            stats["bad_messages"] += 1
            return
        try:
            self.handle(msg)
        except Exception:
            stats["internal_errors"] += 1
            log.exception("%s: error handling %s", self.instance_id, type(msg).__name__)

    def on_results_acked(self, invocation_ids: list[str]) -> None:
        for iid in invocation_ids:
            if self.unacked.pop(iid, None) is not None or iid in self.states:
                self.states.pop(iid, None)
                self.acked[iid] = None
                if len(self.acked) > ACKED_MEMORY:
                    self.acked.popitem(last=False)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, protocol.Deliver):
            self.on_results_acked(msg.results_acked)
            self.on_deliver(msg.invocations)
        elif isinstance(msg, protocol.ResultAck):
            self.on_results_acked(msg.invocation_ids)
        elif isinstance(msg, protocol.Cancel):
            self.on_cancel(msg.invocation_ids)
        elif isinstance(msg, protocol.Pong):
            if msg.heartbeat_interval > 0 and not self.fleet.heartbeat_override:
                self.heartbeat = max(0.2, msg.heartbeat_interval)
        elif isinstance(msg, protocol.Welcome):
            first = not self.ever_welcomed
            self.welcomed = self.ever_welcomed = True
            if not self.fleet.heartbeat_override:
                self.heartbeat = max(0.2, msg.heartbeat_interval)
            # spread the fleet's heartbeats over the interval
            self.next_beat = time.monotonic() + random.uniform(0.1, 1.0) * self.heartbeat
            pending = list(self.unacked.values())
            for i in range(0, len(pending), 200):
                self.send(protocol.Results(pending[i:i + 200]))
            self.fleet.on_welcome(self, first)
        elif isinstance(msg, protocol.PleaseHello):
            self.welcomed = False
            self.hello()
        elif isinstance(msg, protocol.KeyPending):
            self.welcomed = False
            self.next_hello = time.monotonic() + max(0.5, msg.retry_after)
        elif isinstance(msg, protocol.Denied):
            log.error("%s: the broker denied this agent: %s", self.instance_id, msg.reason)
            self.welcomed = False
            self.next_hello = time.monotonic() + max(1.0, msg.retry_after)

    # -- work -------------------------------------------------------------------------------

    def on_deliver(self, invocations: list[Invocation]) -> None:
        now = _now()
        fresh: list[Invocation] = []
        acks: list[str] = []
        refusals: list[protocol.Refusal] = []
        resend: list[InvocationResult] = []
        for inv in invocations:
            iid = inv.invocation_id
            if iid in self.states or iid in self.acked:
                acks.append(iid)  # the ack was lost: repeat it, never re-run
                if iid in self.unacked:
                    resend.append(self.unacked[iid])
                continue
            if inv.instance_id != self.instance_id:
                refusals.append(protocol.Refusal(iid, "invalid",
                                                 f"delivered to {self.instance_id}, addressed to {inv.instance_id}"))
                continue
            if inv.expires_at and now > inv.expires_at:
                refusals.append(protocol.Refusal(iid, "expired", "delivery arrived after the command expired"))
                continue
            self.states[iid] = "accepted"
            fresh.append(inv)
            acks.append(iid)
        self.fleet.stats["invocations"] += len(fresh)
        noop = self.fleet.runner is None
        if noop:  # finished at once: the Results below stand for their Acks (as the agent's do)
            fresh_ids = {i.invocation_id for i in fresh}
            acks = [i for i in acks if i not in fresh_ids]
        if acks:
            self.send(protocol.Ack(acks))
        if refusals:
            self.send(protocol.Refuse(refusals))
        if resend:
            self.send(protocol.Results(resend))
        if not fresh:
            return
        if noop:  # started (in the Ack) and finished at once
            results = []
            for inv in fresh:
                if inv.invocation_id in self.cancelled_early:
                    self.cancelled_early.discard(inv.invocation_id)
                    results.append(cancelled_result(inv))
                else:
                    results.append(noop_result(inv))
            self.finish(results)
            return
        for inv in fresh:
            if inv.invocation_id in self.cancelled_early:
                self.cancelled_early.discard(inv.invocation_id)
                self.finish([cancelled_result(inv)])
            else:
                self.waiting.append(inv)
        self.start_waiting()

    def start_waiting(self) -> None:
        batch: list[Invocation] = []
        while self.waiting and len(self.cancel_events) + len(batch) < self.fleet.max_concurrency:
            batch.append(self.waiting.pop(0))
        if not batch:
            return
        self.send(protocol.Started([i.invocation_id for i in batch], _now()))
        for inv in batch:
            self.states[inv.invocation_id] = "running"
            event = asyncio.Event()
            self.cancel_events[inv.invocation_id] = event
            task = asyncio.get_running_loop().create_task(self.execute(inv, event))
            self.fleet.exec_tasks.add(task)
            task.add_done_callback(self.fleet.exec_tasks.discard)

    async def execute(self, inv: Invocation, cancelled: asyncio.Event) -> None:
        try:
            result = await self.fleet.runner.run(inv, cancelled, self.procs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the executor itself failed: report, never lose the invocation
            log.exception("%s: execution of %s failed", self.instance_id, inv.invocation_id)
            now = _now()
            result = InvocationResult(inv.invocation_id, FAILED, status_details="agent error",
                                      stderr=f"agent error: {exc}\n", started_at=now, ended_at=now)
        self.cancel_events.pop(inv.invocation_id, None)
        self.finish([result])
        self.start_waiting()

    def finish(self, results: list[InvocationResult]) -> None:
        for r in results:
            self.states[r.invocation_id] = "done"
            self.unacked[r.invocation_id] = r
        self.fleet.stats["results"] += len(results)
        if self.welcomed:
            self.send(protocol.Results(results))

    def on_cancel(self, invocation_ids: list[str]) -> None:
        for iid in invocation_ids:
            event = self.cancel_events.get(iid)
            if event is not None:
                event.set()
                proc = self.procs.get(iid)
                if proc is not None:
                    asyncio.get_running_loop().create_task(stop_group(proc))
                continue
            waiting = next((i for i in self.waiting if i.invocation_id == iid), None)
            if waiting is not None:
                self.waiting.remove(waiting)
                self.finish([cancelled_result(waiting)])
                continue
            if iid in self.unacked and self.welcomed:
                self.send(protocol.Results([self.unacked[iid]]))
            elif iid not in self.states and iid not in self.acked:
                self.cancelled_early.add(iid)  # the delivery may still be on its way


# --------------------------------------------------------------------------------------------
# the fleet


class Fleet:
    def __init__(self, args: argparse.Namespace, broker_key: bytes):
        self.args = args
        self.broker = args.broker
        self.broker_key = broker_key
        self.n = args.n
        self.heartbeat_override = args.heartbeat_interval or 0.0
        self.max_concurrency = args.max_concurrency
        self.key_seed = args.key_seed
        self.hostname = socket.gethostname()
        self.platform_version = os.uname().release
        self.stats: dict[str, int] = {k: 0 for k in (
            "messages_in", "messages_out", "send_failures", "bad_messages", "internal_errors",
            "invocations", "results")}
        self.welcomed = 0
        self.started_at = time.monotonic()
        self.all_welcomed = asyncio.Event()
        self.exec_tasks: set[asyncio.Task[None]] = set()
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
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
                  f"heartbeat {agent.heartbeat:g}s, pid {os.getpid()})", flush=True)
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
            if agent.welcomed:
                agent.send(protocol.Bye())
        for task in tasks:
            task.cancel()
        for agent in self.agents:
            for proc in list(agent.procs.values()):
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
            log.debug("stats %s", self.stats)

    def close(self) -> None:
        for agent in self.agents:
            agent.sock.close(0)
        self.ctx.term()
        if self.tmp is not None:
            self.tmp.cleanup()
        log.info("fleetsim stopped: %s", " ".join(f"{k}={v}" for k, v in self.stats.items()))


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerorun-fleet-sim",
                                description="N simulated Zerorun agents in one process (tests, benchmarks).")
    p.add_argument("--broker", required=True, help="broker agent endpoint, e.g. tcp://127.0.0.1:7450")
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
    log.info("starting %d simulated agents (%s executor) against %s", args.n, args.executor, args.broker)
    try:
        await fleet.run(stop)
    finally:
        fleet.close()


if __name__ == "__main__":
    sys.exit(main())
