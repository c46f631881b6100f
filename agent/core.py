"""The agent's protocol logic without I/O: what to say to the broker, what to journal, what to
start, cancel or refuse. It owns no socket, thread or event loop.

One ``AgentCore`` per agent connection. The daemon (``daemon.py``: a loop thread, the SQLite
journal, steps in worker threads) and the fleet simulator (``fleetsim.py``: thousands of cores in
one asyncio loop, in-memory journals, a noop or subprocess runner) drive the same core. A driver
owns the socket and the clock's wake-ups and calls:

- ``receive(frames)`` for every message from the broker;
- ``connection_opened()`` when it (re)opens its socket, ``connected()`` once the connection is
  up (the daemon on the handshake event, the simulator at once: the DEALER queues the HELLO),
  ``disconnected()`` / ``connection_lost()`` when it goes;
- ``finished(results)`` when its runner reports, ``output(chunks)`` for live output;
- ``tick()`` whenever ``next_wakeup()`` has passed: True means "the broker has been silent too
  long, rebuild the connection".

What it sends goes to the ``send`` callable it was given. The journal and the runner are the
interfaces below; recovery after a restart (``recover()``) is decided here, the runner is only
asked whether it can take an invocation back (``Runner.reattach``: the daemon's supervisors
outlive the agent, so a restart normally loses nothing).

Reboot and resume (exit code 194, ``steps.py``): the runner reports ``reboot_requested``; the
core journals where the invocation resumes, starts nothing new, and asks the driver to reboot
(``on_reboot``). The invocation stays running (InProgress for the broker) until the agent starts
again and ``recover()`` resumes it at the step that asked; a reboot that cannot be made ends it
Failed (``reboot_failed``), a cancel meanwhile ends it Cancelled.

The guarantees (with the journal): an invocation never runs twice (a delivery is journaled before
it is acknowledged, and marked running before it starts); no result is lost while the broker is
away (kept until the broker acknowledges it, sent again after every Welcome). A started
invocation's Ack waits up to ``ACK_HOLD``: one that ends by then is acknowledged by its Results
alone (two messages per short invocation instead of four).

A journal that cannot be written (a full disk, an I/O error: ``JOURNAL_ERRORS``) never stops the
agent; it logs one line when that begins and one when it ends, and keeps both guarantees:

- a result it cannot journal is kept in memory (``_unrecorded``) and sent all the same; the
  journal write is tried again every ``JOURNAL_RETRY`` seconds (``tick``) until it succeeds.
  What else holds the result (the daemon's run directory, ``on_stored``) stays until the result
  is journaled or the broker has acknowledged it: a restart meanwhile still finds it there (unless
  the run directory could not take it either: then the supervisor handed it over its socket,
  ``executor.py``, and memory is all that holds it);
- nothing starts that cannot be marked running first (a restart would run it again): what waited
  for a slot stays waiting, journaled as accepted, and starts once the mark is written;
- a delivery that cannot be journaled is not run: it ends Failed at once ("the agent cannot write
  its journal: ..."), a result the operator sees, kept and sent like any other. Not
  acknowledging it instead would leave it to the broker, which delivers an unacknowledged
  invocation again only after the agent's next HELLO (the connection may well stay up), and at
  most twice: the command would hang, then end Undeliverable with no word of the disk. Its id is
  remembered with its result, so a delivery again is answered with that result, never run.
"""

from __future__ import annotations

import logging
import random
import re
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Protocol

import msgspec

from zerorun import protocol
from zerorun.protocol import CANCELLED, FAILED, HEADER, Invocation, InvocationResult, OutputChunk

from .steps import (Resume, agent_error_result, cancelled_result, interrupted_result, journal_refused,
                    resumed_result)

log = logging.getLogger("zerorun.agent")

ACCEPTED = "accepted"
RUNNING = "running"
DONE = "done"

LIVENESS = 3  # broker silent for this many heartbeat intervals: rebuild the connection
CLOCK_SKEW_WARNING = 30.0  # seconds between this clock and the broker's worth a warning at Welcome
ACK_HOLD = 0.02  # seconds the Ack of a started invocation waits: a step done by then needs only Results
INVOCATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What an invocation id may look like: it names the invocation's run directory, so never a path."""
RESULTS_PER_MESSAGE = 200  # journaled results sent again after a Welcome, per Results message
JOURNAL_ERRORS = (OSError, sqlite3.Error)  # a journal write that fails with these is kept and retried
JOURNAL_RETRY = 1.0  # seconds between attempts to journal what could not be
TEXT_PER_MESSAGE = protocol.MAX_MESSAGE_BYTES // 2  # output text in one Results or Output message: a larger
# message is over the broker's MAXMSGSIZE, which drops the connection (results would be resent for ever)


class Journal(Protocol):
    """Where deliveries and results survive (``journal.Journal``, ``journal.MemoryJournal``). A
    write may raise ``JOURNAL_ERRORS`` (a full disk): the core keeps what it could not write and
    tries again (see the module's doc)."""

    def state_of(self, invocation_id: str) -> tuple[str, bool] | None:
        """(state, result acknowledged) of a known invocation, None if never delivered here."""

    def accept(self, invocations: list[Invocation], running: Collection[str]) -> None:
        """Journals deliveries; those in ``running`` are recorded as started, in the same write."""

    def mark_running(self, invocation_ids: list[str]) -> None: ...

    def record_results(self, results: list[InvocationResult]) -> None: ...

    def mark_acked(self, invocation_ids: list[str]) -> None: ...

    def unacked_results(self) -> list[InvocationResult]: ...

    def unacked_ids(self) -> list[str]: ...

    def result(self, invocation_id: str) -> InvocationResult | None: ...

    def in_state(self, state: str) -> list[Invocation]: ...

    def save_resume(self, invocation_id: str, resume: Resume | None) -> None: ...

    def resume_point(self, invocation_id: str) -> Resume | None: ...


class Runner(Protocol):
    """Runs journaled invocations. ``start`` returns the result when it is there at once (the
    simulator's noop runner); otherwise the driver hands it to ``AgentCore.finished`` later
    (or, for a step that asked for a reboot, to ``AgentCore.reboot_requested``)."""

    def start(self, invocation: Invocation, resume: Resume | None = None) -> InvocationResult | None:
        """Runs it; with ``resume``, from that step on (after a reboot)."""

    def cancel(self, invocation_id: str) -> None:
        """Stop it if it runs; its result (Cancelled) still comes through ``finished``."""

    def reattach(self, invocation: Invocation) -> bool | str:
        """After a restart: True if the invocation is still running, or ended meanwhile (it
        will report through ``finished``); else it is lost: False, or why (a sentence)."""


class Identity(msgspec.Struct):
    """What the agent says about itself in every HELLO."""

    instance_id: str
    tags: dict[str, str]  # proposed: the broker owns the tags, an operator approves a change
    hostname: str = ""
    platform: str = "Linux"
    platform_version: str = ""
    agent_version: str = ""
    facts: protocol.Facts | None = None
    enrol_token: str = ""  # sent until the first Welcome (then forgotten)


class Pacing(msgspec.Struct, frozen=True):
    """When the agent speaks unprompted. The defaults are the daemon's; the simulator retries
    HELLO more patiently (a connect storm of thousands must not be doubled by retries), may fix
    its heartbeat, and never gives up on a silent broker (its DEALER reconnects on its own)."""

    heartbeat: float = 5.0  # until the broker's Welcome or Pong says otherwise
    broker_sets_heartbeat: bool = True
    liveness: int = LIVENESS  # silent intervals before tick() says "reconnect"; 0: never
    hello_retry_floor: float = 1.0  # an unanswered HELLO is repeated after
    hello_retry_intervals: float = 1.0  # max(floor, intervals x heartbeat) + uniform(0, jitter)
    hello_retry_jitter: float = 0.0


class AgentCore:
    __slots__ = ("identity", "journal", "runner", "send", "max_concurrency", "pacing", "log",
                 "on_welcome", "on_finished", "on_reboot", "on_stored", "interactive", "whole_output", "_wall",
                 "_mono", "journal_problem", "_unrecorded", "_acks_owed", "_start_blocked", "_retry_at",
                 "rebooting",
                 "welcomed", "ever_welcomed", "heartbeat", "last_heard", "next_beat", "next_hello",
                 "running", "waiting", "draining", "_held", "_held_since", "_ack_due", "_cancelled_early",
                 "delivered", "finished_count", "bad_messages", "internal_errors")

    def __init__(self, identity: Identity, journal: Journal, runner: Runner, send: Callable[[Any], None], *,
                 max_concurrency: int = 5, pacing: Pacing = Pacing(),
                 on_welcome: Callable[[bool], None] | None = None,
                 on_finished: Callable[[list[InvocationResult], list[Invocation | None]], None] | None = None,
                 on_reboot: Callable[[], None] | None = None,
                 on_stored: Callable[[list[str]], None] | None = None,
                 interactive: Callable[[Any], None] | None = None,
                 whole_output: Callable[[Any], None] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter[Any] = log,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.identity = identity
        self.journal = journal
        self.runner = runner
        self.send = send
        self.max_concurrency = max(1, max_concurrency)
        self.pacing = pacing
        self.log = logger
        self.on_welcome = on_welcome  # (first welcome of this core)
        self.on_finished = on_finished  # results ended (journaled, or kept), with their invocations where known
        self.on_stored = on_stored  # results journaled or acknowledged: what else held them can go
        self.on_reboot = on_reboot  # a step asked for a reboot (journaled): the driver makes it
        self.whole_output = whole_output  # OutputRead / OutputDone: the broker reads kept whole outputs
        self.interactive = interactive  # AgentExec / AgentFileOp / sessions (the daemon's interactive work)
        self._wall = wall
        self._mono = monotonic
        now = monotonic()
        self.welcomed = False
        self.ever_welcomed = False
        self.heartbeat = pacing.heartbeat
        self.last_heard = now
        self.next_beat = now
        self.next_hello = now
        self.running: dict[str, Invocation] = {}
        self.waiting: deque[Invocation] = deque()  # journaled, waiting for a free slot
        self.draining = False  # stopping: what waits stays journaled for the next start
        self.rebooting: dict[str, Resume] = {}  # running, waiting for the reboot a step asked for
        self._held: list[str] = []  # started invocations whose Ack waits up to ACK_HOLD
        self._held_since = 0.0
        self._ack_due = 0.0
        self._cancelled_early: set[str] = set()  # cancels that came before their delivery
        self.delivered = 0  # counters for the driver's statistics
        self.finished_count = 0
        self.bad_messages = 0
        self.internal_errors = 0
        self.journal_problem: str | None = None  # why the last journal write failed; None once one succeeds
        self._unrecorded: dict[str, InvocationResult] = {}  # results not journaled yet (see the module's doc)
        self._acks_owed: set[str] = set()  # acknowledged by the broker, not yet so in the journal
        self._start_blocked = False  # what waits could not be marked running
        self._retry_at = 0.0

    # -- connection -------------------------------------------------------------------------

    def connection_opened(self) -> None:
        now = self._mono()
        self.welcomed = False
        self.last_heard = now
        self.next_beat = now + self.heartbeat
        self.next_hello = now + self._hello_retry()  # only the fallback if hello() is not called

    def connected(self) -> None:
        """The transport is up (a handshake completed): say HELLO now."""
        self.last_heard = self._mono()
        self.hello()

    def hello(self) -> None:
        ident = self.identity
        self.send(protocol.Hello(
            instance_id=ident.instance_id, tags=ident.tags, hostname=ident.hostname,
            platform=ident.platform, platform_version=ident.platform_version,
            agent_version=ident.agent_version, running=sorted(self.running),
            unacked=self._unacked_ids(), max_concurrency=self.max_concurrency,
            max_message_bytes=protocol.MAX_MESSAGE_BYTES, facts=ident.facts, enrol_token=ident.enrol_token))
        self.next_hello = self._mono() + self._hello_retry()

    def disconnected(self) -> None:
        self.welcomed = False

    def connection_lost(self) -> None:
        """The driver gives up on this connection: held Acks are dropped (the broker delivers
        again after the next HELLO, and hears them then)."""
        self.welcomed = False
        self._held = []

    def bye(self) -> bool:
        if self.welcomed:
            self.send(protocol.Bye())
        return self.welcomed

    def set_tags(self, tags: dict[str, str]) -> bool:
        """New tags (a reloaded configuration); the broker learns them at once. False if unchanged."""
        if tags == self.identity.tags:
            return False
        self.identity.tags = tags
        if self.welcomed:
            self.hello()
        return True

    def set_facts(self, facts: protocol.Facts) -> None:
        """Changed facts: in the next HELLO, and told to the broker now if it listens."""
        self.identity.facts = facts
        if self.welcomed:
            self.send(protocol.FactsUpdate(facts))

    def _hello_retry(self) -> float:
        p = self.pacing
        delay = max(p.hello_retry_floor, p.hello_retry_intervals * self.heartbeat)
        return delay + random.uniform(0, p.hello_retry_jitter) if p.hello_retry_jitter else delay

    # -- time -------------------------------------------------------------------------------

    def next_wakeup(self, acks: bool = True) -> float:
        """The monotonic time by which ``tick()`` wants to be called; with ``acks=False``
        without the held Acks' deadline (a driver that times those apart, see ``acks_due``)."""
        wake = self.next_beat if self.welcomed else min(self.next_beat, self.next_hello)
        if acks and self._held and self._ack_due < wake:
            wake = self._ack_due
        if self._retry_at < wake and self._journal_owed():
            wake = self._retry_at
        return wake

    def acks_due(self) -> float:
        """The monotonic time the held Acks are due, 0.0 when none is held."""
        return self._ack_due if self._held else 0.0

    def tick(self) -> bool:
        """Held Acks, HELLO retries, heartbeats. True: the broker has been silent for
        ``liveness`` intervals, the driver should rebuild its connection (and call
        ``connection_lost``, then ``connection_opened``)."""
        now = self._mono()
        if self._held and now >= self._ack_due:
            self.flush_acks()
        if now >= self._retry_at and self._journal_owed():
            self.retry_journal()
        if not self.welcomed and now >= self.next_hello:
            self.hello()
        if now >= self.next_beat:
            self.next_beat = now + self.heartbeat
            if self.welcomed:
                self.send(protocol.Heartbeat(running=len(self.running)))
            liveness = self.pacing.liveness
            if liveness and now - self.last_heard > self.heartbeat * liveness:
                return True
        return False

    def flush_acks(self) -> None:
        """Sends the held Acks now (their time is up, or the agent is stopping)."""
        if self._held:
            held, self._held = self._held, []
            self.send(protocol.Ack(held, started=held, at=self._held_since))

    # -- from the broker ----------------------------------------------------------------------

    def receive(self, frames: list[bytes]) -> None:
        """One message from the broker as its frames; bad ones are counted and dropped."""
        self.last_heard = self._mono()
        if len(frames) != 2 or frames[0] != HEADER:
            self.bad_messages += 1
            self.log.warning("ignored a message with an unknown header or framing")
            return
        try:
            msg = _decode(frames[1])
        except (protocol.DecodeError, protocol.ValidationError) as exc:
            self.bad_messages += 1
            self.log.warning("ignored a malformed message from the broker: %s", exc)
            return
        self.handle(msg)

    def handle(self, msg: Any) -> None:
        """One decoded message from the broker."""
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            return
        try:
            handler(self, msg)
        except Exception:
            self.internal_errors += 1
            self.log.exception("error handling %s", type(msg).__name__)

    def _on_welcome(self, msg: protocol.Welcome) -> None:
        first = not self.ever_welcomed
        self.welcomed = self.ever_welcomed = True
        self.identity.enrol_token = ""  # accepted: the key speaks for itself from now on
        if self.pacing.broker_sets_heartbeat:
            self.heartbeat = max(0.2, msg.heartbeat_interval)
        # a fleet welcomed at once (a broker restart) spreads its heartbeats over the interval
        self.next_beat = self._mono() + random.uniform(0.1, 1.0) * self.heartbeat
        self.log.info("registered with the broker as %s", msg.instance_id)
        skew = msg.broker_time - self._wall() if msg.broker_time else 0.0
        if abs(skew) > CLOCK_SKEW_WARNING:  # deliveries carry the broker's expiry times
            self.log.warning("this machine's clock differs from the broker's by %.0f s: commands may be refused "
                             "as expired (or run after their expiry); keep clocks in sync (NTP)", skew)
        self._send_results(self._unacked_results())
        if self.on_welcome is not None:
            self.on_welcome(first)

    def _on_please_hello(self, msg: protocol.PleaseHello) -> None:
        self.welcomed = False
        self.hello()

    def _on_key_pending(self, msg: protocol.KeyPending) -> None:
        self.log.warning("%s", msg.message)
        self.welcomed = False
        self.next_hello = self._mono() + max(0.5, msg.retry_after)

    def _on_denied(self, msg: protocol.Denied) -> None:
        self.log.error("the broker denied this agent: %s", msg.reason)
        self.welcomed = False
        self.next_hello = self._mono() + max(1.0, msg.retry_after)

    def _on_pong(self, msg: protocol.Pong) -> None:
        if msg.heartbeat_interval > 0 and self.pacing.broker_sets_heartbeat:
            self.heartbeat = max(0.2, msg.heartbeat_interval)  # the broker spreads a larger fleet's

    def _on_result_ack(self, msg: protocol.ResultAck) -> None:
        self.results_acked(msg.invocation_ids)

    def _on_deliver(self, msg: protocol.Deliver) -> None:
        if msg.results_acked:
            self.results_acked(msg.results_acked)
        self.deliver(msg.invocations)

    def _on_cancel(self, msg: protocol.Cancel) -> None:
        self.cancel(msg.invocation_ids)

    def _on_interactive(self, msg: Any) -> None:
        if self.interactive is not None:
            self.interactive(msg)

    def _on_whole_output(self, msg: Any) -> None:
        if self.whole_output is not None:
            self.whole_output(msg)
        elif isinstance(msg, protocol.OutputRead):  # a runner that keeps no output: say so
            self.send(protocol.OutputData(msg.invocation_id, msg.stream, msg.offset, error="not held by this agent"))

    # -- work -------------------------------------------------------------------------------

    def deliver(self, invocations: list[Invocation]) -> None:
        """Dedupes (a known id is acknowledged again and its unacknowledged result resent,
        never re-run), refuses what is misaddressed or expired, journals the rest and starts
        what the free slots allow, in one journal write."""
        now = self._wall()
        journal = self.journal
        instance_id = self.identity.instance_id
        fresh: list[Invocation] = []
        acks: list[str] = []
        refusals: list[protocol.Refusal] = []
        resend: list[InvocationResult] = []
        listed: set[str] = set()
        for inv in invocations:
            iid = inv.invocation_id
            if iid in listed:
                continue  # twice in one delivery: one invocation (a second start would wreck the first)
            listed.add(iid)
            if INVOCATION_ID.fullmatch(iid) is None:  # "", "/etc", "../x": its run directory is removed after
                refusals.append(protocol.Refusal(iid, "invalid", "an invocation id is 1-128 letters, digits, "
                                                                 "'.', '_' and '-', starting with a letter or digit"))
                continue
            kept = self._unrecorded.get(iid)
            if kept is not None:  # its result is not journaled yet: known all the same
                acks.append(iid)
                if iid not in self._acks_owed:
                    resend.append(kept)
                continue
            known = journal.state_of(iid)
            if known is not None:
                acks.append(iid)  # the ack was lost: repeat it, never re-run
                if known[0] == DONE and not known[1]:
                    result = journal.result(iid)
                    if result is not None:
                        resend.append(result)
                continue
            if inv.instance_id != instance_id:
                refusals.append(protocol.Refusal(iid, "invalid", f"delivered to {instance_id}, addressed to {inv.instance_id}"))
                continue
            if inv.expires_at and now > inv.expires_at:
                refusals.append(protocol.Refusal(iid, "expired", "delivery arrived after the command expired"))
                continue
            fresh.append(inv)
        done: list[InvocationResult] = []
        done_invs: list[Invocation | None] = []
        if fresh:
            self.delivered += len(fresh)
            early = self._cancelled_early
            runnable = [i for i in fresh if i.invocation_id not in early] if early else fresh
            free = 0 if self.rebooting else self.max_concurrency - len(self.running) - len(self.waiting)
            now_running = {i.invocation_id for i in runnable[:free]} if free > 0 else ()
            # one write: journaled, and started where it runs now
            if not self._write(journal.accept, fresh, now_running):  # not journaled: nothing of it runs
                for inv in fresh:
                    if inv.invocation_id in early:
                        early.discard(inv.invocation_id)
                        done.append(cancelled_result(inv))
                    else:
                        done.append(journal_refused(inv, f"the agent cannot write its journal: {self.journal_problem}"))
                    done_invs.append(inv)
                fresh = []
            held = self._held
            runner = self.runner
            for inv in fresh:
                iid = inv.invocation_id
                if iid in now_running:  # journaled and running: said with the result if that comes within ACK_HOLD
                    try:
                        result = runner.start(inv)
                    except Exception as exc:  # the runner failed: report, never lose the invocation
                        result = self._start_failed(inv, exc)
                    if result is None:
                        self.running[iid] = inv
                        if not held:
                            self._held_since, self._ack_due = now, self._mono() + ACK_HOLD
                        held.append(iid)
                    else:  # done already: the Results below stand for its Ack
                        done.append(result)
                        done_invs.append(inv)
                    continue
                acks.append(iid)
                if iid in early:
                    early.discard(iid)
                    done.append(cancelled_result(inv))
                    done_invs.append(inv)
                else:
                    self.waiting.append(inv)
        if acks:
            self.send(protocol.Ack(acks))
        if refusals:
            self.send(protocol.Refuse(refusals))
        if resend:
            self._send_results(resend)
        if done:
            self._finish(done, done_invs)
            if self.waiting and not self.draining:
                self._start_waiting()

    def cancel(self, invocation_ids: list[str]) -> None:
        for iid in invocation_ids:
            if iid in self.rebooting:  # nothing runs until the reboot: it ends here
                self.log.info("cancelling %s (it waited for a reboot)", iid[:8])
                inv = self.running.pop(iid)
                self._finish([resumed_result(inv, self.rebooting.pop(iid), CANCELLED, "cancelled")], [inv])
                continue
            if iid in self.running:
                self.log.info("cancelling %s", iid[:8])
                self.runner.cancel(iid)
                continue
            waiting = next((i for i in self.waiting if i.invocation_id == iid), None)
            if waiting is not None:
                self.waiting.remove(waiting)
                self._finish([cancelled_result(waiting)], [waiting])
                continue
            kept = self._unrecorded.get(iid)
            if kept is not None:  # ended, its result kept in memory
                if iid not in self._acks_owed and self.welcomed:
                    self.send(protocol.Results([kept]))
                continue
            known = self.journal.state_of(iid)
            if known is None:
                self._cancelled_early.add(iid)  # the delivery may still be on its way
            elif known[0] == DONE and not known[1] and self.welcomed:
                result = self.journal.result(iid)
                if result is not None:
                    self.send(protocol.Results([result]))

    def finished(self, results: list[InvocationResult]) -> None:
        """Results from the runner: journaled, sent (if welcomed), and their slots reused."""
        running = self.running
        self._finish(results, [running.pop(r.invocation_id, None) for r in results])
        if self.waiting and not self.draining and not self.rebooting:
            self._start_waiting()

    def reboot_requested(self, invocation_id: str, resume: Resume) -> None:
        """A step exited 194: where to resume is journaled, nothing new starts, the driver
        reboots (``on_reboot``). The invocation stays running until the agent starts again."""
        if invocation_id not in self.running or invocation_id in self.rebooting:
            return
        if not self._write(self.journal.save_resume, invocation_id, resume):
            # without it the invocation cannot resume after the reboot: it ends here, no reboot
            inv = self.running.pop(invocation_id)
            self._finish([resumed_result(inv, resume, FAILED, "reboot not made",
                                         f"step {resume.index + 1} asked for a reboot, but the agent cannot write "
                                         f"its journal ({self.journal_problem}): it could not resume after the "
                                         "reboot, so none was made\n")], [inv])
            if self.waiting and not self.draining and not self.rebooting:
                self._start_waiting()
            return
        self.rebooting[invocation_id] = resume
        self.log.warning("%s asked for a reboot (step %d exited 194): it resumes at that step when the agent "
                         "starts again", invocation_id[:8], resume.index + 1)
        if self.on_reboot is not None:
            self.on_reboot()

    def reboot_failed(self, reason: str) -> None:
        """The reboot could not be made: what waited for it ends Failed, with the reason."""
        for iid, resume in list(self.rebooting.items()):
            inv = self.running.pop(iid)
            del self.rebooting[iid]
            self._finish([resumed_result(inv, resume, FAILED, "reboot failed", f"{reason}\n")], [inv])
        if self.waiting and not self.draining:
            self._start_waiting()

    def resume_rebooted(self) -> None:
        """The reboot is done (the simulator's, which restarts nothing): resume what waited."""
        waiting, self.rebooting = self.rebooting, {}
        for iid, resume in waiting.items():
            inv = self.running[iid]
            self.journal.save_resume(iid, None)
            self._resume(inv, resume)
        if self.waiting and not self.draining:
            self._start_waiting()

    def _resume(self, inv: Invocation, resume: Resume) -> None:
        iid = inv.invocation_id
        try:
            result = self.runner.start(inv, resume)
        except Exception as exc:
            result = self._start_failed(inv, exc)
        if result is not None:
            self.running.pop(iid, None)
            self._finish([result], [inv])

    def output(self, chunks: list[OutputChunk]) -> None:
        """Live output of running steps: best effort, the whole output comes with the result. In
        messages of at most ``TEXT_PER_MESSAGE`` of text: one read of the running steps' files
        may bring several of them up to the output cap each."""
        if not chunks or not self.welcomed:
            return
        batch: list[OutputChunk] = []
        size = 0
        for chunk in chunks:
            weight = 128 + _text_bytes(chunk.data)
            if batch and size + weight > TEXT_PER_MESSAGE:
                self.send(protocol.Output(batch))
                batch, size = [], 0
            batch.append(chunk)
            size += weight
        self.send(protocol.Output(batch))

    def _start(self, inv: Invocation) -> InvocationResult | None:
        try:
            return self.runner.start(inv)
        except Exception as exc:  # the runner failed: report, never lose the invocation
            return self._start_failed(inv, exc)

    def _start_failed(self, inv: Invocation, exc: Exception) -> InvocationResult:
        if isinstance(exc, OSError):  # a full disk, say: the reason is all there is to say
            self.log.error("cannot start %s: %s", inv.invocation_id, exc)
        else:
            self.log.exception("cannot start %s", inv.invocation_id)
        return agent_error_result(inv.invocation_id, exc)

    def _start_waiting(self) -> None:
        """Starts what waited for a free slot, and says so (Started)."""
        if self.rebooting:
            return  # a reboot is coming: what waits stays journaled, and starts after it
        while self.waiting and len(self.running) < self.max_concurrency:
            batch: list[Invocation] = []
            while self.waiting and len(self.running) + len(batch) < self.max_concurrency:
                batch.append(self.waiting.popleft())
            ids = [i.invocation_id for i in batch]
            if not self._write(self.journal.mark_running, ids):  # before it starts: after a crash it is never re-run
                self.waiting.extendleft(reversed(batch))  # journaled as accepted: they start once it can be written
                self._start_blocked = True
                return
            self._start_blocked = False
            self.send(protocol.Started(ids, self._wall()))
            done: list[InvocationResult] = []
            for inv in batch:
                result = self._start(inv)
                if result is None:
                    self.running[inv.invocation_id] = inv
                else:
                    done.append(result)
            if not done:
                return
            self._finish(done, [i for i in batch if i.invocation_id not in self.running])

    def _finish(self, results: list[InvocationResult], invocations: list[Invocation | None]) -> None:
        self._record(results)
        self.finished_count += len(results)
        if self.on_finished is not None:
            self.on_finished(results, invocations)
        if self._held:  # these Results stand for their Acks
            ended = {r.invocation_id for r in results}
            self._held = [i for i in self._held if i not in ended]
        if self.welcomed:
            self._send_results(results)

    def _send_results(self, results: list[InvocationResult]) -> None:
        """Results in as few messages as the limits allow: at most ``RESULTS_PER_MESSAGE`` each,
        and ``TEXT_PER_MESSAGE`` of output text (a result alone may weigh more: it goes alone)."""
        if len(results) == 1:
            self.send(protocol.Results(results))
            return
        batch: list[InvocationResult] = []
        size = 0
        for result in results:
            weight = result_bytes(result)
            if batch and (size + weight > TEXT_PER_MESSAGE or len(batch) >= RESULTS_PER_MESSAGE):
                self.send(protocol.Results(batch))
                batch, size = [], 0
            batch.append(result)
            size += weight
        if batch:
            self.send(protocol.Results(batch))

    # -- a journal that cannot be written -----------------------------------------------------

    def _write(self, write: Callable[..., None], *args: Any) -> bool:
        """One journal write; False (and the trouble logged, once) if it failed."""
        try:
            write(*args)
        except JOURNAL_ERRORS as exc:
            self._retry_at = self._mono() + JOURNAL_RETRY
            if self.journal_problem is None:
                self.log.error("the agent cannot write its journal: %s. It runs nothing it cannot record, keeps "
                               "results in memory (sent to the broker all the same) and retries every %gs; "
                               "free space in its state dir", exc, JOURNAL_RETRY)
            self.journal_problem = str(exc) or type(exc).__name__
            return False
        if self.journal_problem is not None:
            self.journal_problem = None
            self.log.warning("the agent can write its journal again%s",
                             f"; journaling the {len(self._unrecorded)} result(s) kept in memory"
                             if self._unrecorded else "")
            self._retry_at = self._mono()  # what is owed, at the next tick
        return True

    def _record(self, results: list[InvocationResult]) -> bool:
        """Journals results, or keeps them until it can (``retry_journal``)."""
        if not self._write(self.journal.record_results, results):
            for result in results:
                self._unrecorded[result.invocation_id] = result
            return False
        if self.on_stored is not None:
            self.on_stored([r.invocation_id for r in results])
        return True

    def _journal_owed(self) -> bool:
        return bool(self._unrecorded or self._acks_owed or (self._start_blocked and self.waiting))

    def retry_journal(self) -> None:
        """Writes what could not be journaled (results, acknowledgements, starts), as far as it can
        now. The core's ``tick`` calls it every ``JOURNAL_RETRY`` seconds while anything is owed."""
        self._retry_at = self._mono() + JOURNAL_RETRY
        if self._unrecorded:
            results = list(self._unrecorded.values())
            if not self._write(self.journal.record_results, results):
                return
            for result in results:
                self._unrecorded.pop(result.invocation_id, None)
            if self.on_stored is not None:
                self.on_stored([r.invocation_id for r in results])
        if self._acks_owed:
            owed = list(self._acks_owed)
            if not self._write(self.journal.mark_acked, owed):
                return
            self._acks_owed.difference_update(owed)
        if self._start_blocked:
            self._start_blocked = False
            if self.waiting and not self.draining and not self.rebooting:
                self._start_waiting()

    def results_acked(self, invocation_ids: list[str]) -> None:
        """The broker stored these results: they need not be sent again. One only kept in memory
        is done with (its run directory can go); its journal entry, a small one (no output), is
        still written when the journal can be, for the id to be known after a restart."""
        kept = [i for i in invocation_ids if i in self._unrecorded]
        journaled = [i for i in invocation_ids if i not in self._unrecorded] if kept else invocation_ids
        if kept:
            for iid in kept:
                r = self._unrecorded[iid]
                self._unrecorded[iid] = InvocationResult(iid, r.status, r.status_details, r.exit_code,
                                                         started_at=r.started_at, ended_at=r.ended_at)
            self._acks_owed.update(kept)
            if self.on_stored is not None:
                self.on_stored(kept)
        if journaled and not self._write(self.journal.mark_acked, journaled):
            # only results the journal holds: an ack before the result acknowledges nothing
            state_of = self.journal.state_of
            self._acks_owed.update(i for i in journaled if (state_of(i) or ("", True)) == (DONE, False))

    def _unacked_ids(self) -> list[str]:
        ids = self.journal.unacked_ids()
        if self._unrecorded:
            ids += [i for i in self._unrecorded if i not in self._acks_owed]
        return ids

    def _unacked_results(self) -> list[InvocationResult]:
        results = self.journal.unacked_results()
        if self._unrecorded:
            results += [r for i, r in self._unrecorded.items() if i not in self._acks_owed]
        return results

    # -- restart ----------------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: what was running is taken back by the runner if it still runs (or
        ended meanwhile), else reported interrupted with the reason (never re-run); what waited
        for a reboot resumes at the step that asked for it (once: a crash after this is an
        interruption); what was journaled but not started starts now, as slots allow. Returns
        how many were interrupted."""
        interrupted: list[InvocationResult] = []
        now = self._wall()
        for inv in self.journal.in_state(RUNNING):
            iid = inv.invocation_id
            resume = self.journal.resume_point(iid)
            if resume is not None:
                if not self._write(self.journal.save_resume, iid, None):  # resumed once only: else never
                    self._record([resumed_result(inv, resume, FAILED, "not resumed",
                                                 f"the agent cannot write its journal ({self.journal_problem}): "
                                                 "it resumes nothing it cannot record, so that no step runs "
                                                 "twice\n")])
                    continue
                self.log.info("resuming %s at step %d after the reboot it asked for", iid[:8], resume.index + 1)
                self.running[iid] = inv
                self._resume(inv, resume)
                continue
            attached = self.runner.reattach(inv)
            if attached is True:
                self.running[iid] = inv
            else:
                interrupted.append(interrupted_result(inv, now, attached if isinstance(attached, str) else ""))
        if interrupted:
            self._record(interrupted)
            self.log.warning("%d invocation(s) were interrupted by an agent restart", len(interrupted))
        self.waiting.extend(self.journal.in_state(ACCEPTED))
        if self.waiting:
            self._start_waiting()
        return len(interrupted)


def _text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def result_bytes(result: InvocationResult) -> int:
    """About what a result weighs in a message: its texts' UTF-8 bytes, and a little for the rest."""
    size = 256 + _text_bytes(result.stdout) + _text_bytes(result.stderr) + _text_bytes(result.status_details)
    for step in result.steps:
        size += 128 + _text_bytes(step.stdout) + _text_bytes(step.stderr) + _text_bytes(step.name + step.detail)
    return size


_decode = protocol.broker_to_agent_decoder.decode
_HANDLERS: dict[type, Callable[[AgentCore, Any], None]] = {
    protocol.Deliver: AgentCore._on_deliver,
    protocol.ResultAck: AgentCore._on_result_ack,
    protocol.Cancel: AgentCore._on_cancel,
    protocol.Pong: AgentCore._on_pong,
    protocol.Welcome: AgentCore._on_welcome,
    protocol.PleaseHello: AgentCore._on_please_hello,
    protocol.KeyPending: AgentCore._on_key_pending,
    protocol.Denied: AgentCore._on_denied,
    protocol.AgentExec: AgentCore._on_interactive,
    protocol.AgentFileOp: AgentCore._on_interactive,
    protocol.OutputRead: AgentCore._on_whole_output,
    protocol.OutputDone: AgentCore._on_whole_output,
    protocol.SessionStart: AgentCore._on_interactive,
    protocol.SessionData: AgentCore._on_interactive,
}
