"""Active commands: creation, rate-controlled dispatch, status aggregation, timeouts, cancel.

Pure bookkeeping over in-memory records; the server does the I/O. Every change is queued to the
store; ``deliver`` and ``cancel`` callbacks hand messages to the server's per-agent outboxes.

Rate control follows SSM Run Command, with the rule stated exactly:
- at most ``max_concurrency`` invocations are in flight (sent to an agent and not yet terminal);
- an *error* is an invocation that ends Failed or TimedOut (Cancelled and Undeliverable are not);
- dispatch stops as soon as ``errors > max_errors``: with max_errors = 0 the first error stops it,
  with 50 targets and 10% (max_errors = 5) the 6th error stops it. Invocations already in flight
  may still finish (and may add errors); those never dispatched end Cancelled / Terminated.

Canary (``first = N``, which SSM lacks): only N invocations are dispatched until all N have
succeeded; if any of them ends in an error, nothing else is dispatched (whatever max_errors
says) and the rest end Cancelled / Terminated.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from zerorun import protocol
from zerorun.identifiers import time_ordered_ids
from zerorun.protocol import (
    CANCELLED, CANCELLING, FAILED, IN_PROGRESS, PENDING, SUCCESS, TERMINAL_STATUSES, TIMED_OUT,
    UNDELIVERABLE, InvocationView)

from .errors import BrokerError
from .model import CommandRecord
from .store import Store

log = logging.getLogger("zerorun.broker.commands")

DEFAULT_MAX_CONCURRENCY = "50"
DEFAULT_MAX_ERRORS = "0"
ERROR_STATUSES = frozenset({FAILED, TIMED_OUT})
MAX_DELIVERIES = 2  # an invocation goes to its agent at most this often before it is acknowledged
MAX_DETAIL = 1024  # characters kept of a status detail or step name an agent reports


def parse_rate(value: str, targets: int, default: str, *, minimum: int, what: str) -> int:
    """'50' or '10%' of the target count (percentages of errors round down, of concurrency up).
    As in SSM, a number below ``minimum`` (a concurrency of 0) or a percentage outside
    ``minimum``-100% is refused, never quietly raised to the minimum."""
    text = (value or default).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not minimum <= pct <= 100:
                raise ValueError
            raw = targets * pct / 100.0
            number = math.floor(raw) if what == "max_errors" else math.ceil(raw)
        else:
            number = int(text)
            if number < minimum:
                raise ValueError
    except ValueError:
        allowed = f"a whole number from {minimum}, or a percentage from {minimum}% to 100%"
        raise BrokerError("InvalidRate", f"{what} must be {allowed}, not {value!r}") from None
    return max(minimum, number)


def unacknowledged(attempts: int) -> str:
    """Why an invocation its agent never acknowledged is Undeliverable (wherever it was sent)."""
    return f"the agent did not acknowledge it after {attempts} deliveries"


@dataclass
class ActiveCommand:
    rec: CommandRecord
    queue: deque[str] = field(default_factory=deque)  # not yet dispatched, in order
    in_flight: set[str] = field(default_factory=set)  # dispatched, not terminal
    errors: int = 0
    open: int = 0  # invocations not terminal
    dispatched: int = 0
    succeeded: int = 0

    @property
    def in_canary(self) -> bool:
        return self.rec.first > 0 and self.succeeded < self.rec.first


class CommandBook:
    def __init__(self, store: Store, deliver: Callable[[InvocationView, CommandRecord], str],
                 cancel: Callable[[InvocationView], None], is_online: Callable[[str], bool],
                 on_complete: Callable[[CommandRecord], None]):
        self.store = store
        self._deliver = deliver
        self._cancel = cancel
        self._is_online = is_online
        self._on_complete = on_complete
        self.active: dict[str, ActiveCommand] = {}
        self.invocations: dict[str, InvocationView] = {}
        self.by_instance: dict[str, set[str]] = {}  # instance id -> open invocation ids
        self.finished_invocations: Counter[str] = Counter()
        self.finished_commands: Counter[str] = Counter()
        self.observer: Callable[[InvocationView], None] | None = None  # metrics, when enabled
        self.secrets_dropped = False  # a finished command's secret values were overwritten in the store
        self._attempts: dict[str, int] = {}  # deliveries of invocations not yet acknowledged
        self.owner = ""  # this broker's id when several share the store: recorded on its commands
        self.durable_dispatch = False  # record each dispatch, so that another owner counts it in flight
        self.on_invocation_end: Callable[[CommandRecord, InvocationView], None] | None = None  # webhooks
        self.completed_counts: dict[str, int] = {}  # of the command on_complete is called for
        # while on_complete runs: the command and its invocations, so that its waiters are answered
        # from memory, not from the store (which would read and decode each invocation again)
        self._completing: tuple[CommandRecord, list[InvocationView]] | None = None

    # -- recovery -------------------------------------------------------------------------------

    def load(self, records: list[CommandRecord] | None = None) -> None:
        """Rebuilds live state after a restart (or a command another broker owned): nothing
        acknowledged is lost or repeated. ``records``: only these active commands."""
        if records is None:
            records = self.store.load_active_commands()
        invs_by_cmd: dict[str, list[InvocationView]] = {}
        for inv in self.store.bulk_invocations(r.command_id for r in records):
            invs_by_cmd.setdefault(inv.command_id, []).append(inv)
        for rec in records:
            ac = ActiveCommand(rec)
            self.active[rec.command_id] = ac
            order = {iid: n for n, iid in enumerate(rec.invocation_ids)}
            for inv in sorted(invs_by_cmd.get(rec.command_id, []), key=lambda i: order.get(i.invocation_id, 0)):
                self.invocations[inv.invocation_id] = inv
                if inv.status in TERMINAL_STATUSES:
                    if inv.status in ERROR_STATUSES:
                        ac.errors += 1
                    elif inv.status == SUCCESS:
                        ac.succeeded += 1
                    if inv.status != UNDELIVERABLE and (inv.delivered_at or inv.status == SUCCESS):
                        ac.dispatched += 1
                    continue
                ac.open += 1
                self.by_instance.setdefault(inv.instance_id, set()).add(inv.invocation_id)
                if inv.delivered_at or inv.dispatched_at or inv.status in (IN_PROGRESS, CANCELLING):
                    ac.in_flight.add(inv.invocation_id)
                    ac.dispatched += 1
                else:
                    ac.queue.append(inv.invocation_id)
        if records:
            log.info("recovered %d active command(s), %d open invocation(s)", len(records),
                     sum(a.open for a in self.active.values()))

    # -- creation -------------------------------------------------------------------------------

    def adopt(self, records: list[CommandRecord]) -> None:
        """Takes over active commands whose owner died: rebuilt from the store, then everything in
        flight is delivered again (agents acknowledge a repeat, never run it twice)."""
        records = [r for r in records if r.command_id not in self.active]
        if not records:
            return
        for rec in records:
            rec.owner = self.owner
            self.store.put_command(rec)
        self.load(records)
        for rec in records:
            ac = self.active[rec.command_id]
            for iid in list(ac.in_flight):
                inv = self.invocations[iid]
                if self._is_online(inv.instance_id):
                    if inv.status == CANCELLING:
                        self._cancel(inv)
                    else:
                        self._send(ac, inv)
            self._settle(ac)

    def release(self, command_ids: Iterable[str]) -> dict[str, str]:
        """Forgets active commands another broker owns now (it adopted them while this broker was
        cut off from the store), without a write: their state is the other's to keep. Returns
        their open invocations (id -> instance)."""
        released: dict[str, str] = {}
        for command_id in command_ids:
            ac = self.active.pop(command_id, None)
            if ac is None:
                continue
            for iid in ac.rec.invocation_ids:
                inv = self.invocations.pop(iid, None)
                self._attempts.pop(iid, None)
                if inv is None or inv.instance_id not in self.by_instance:
                    continue
                open_ids = self.by_instance[inv.instance_id]
                if iid in open_ids:
                    released[iid] = inv.instance_id
                    open_ids.discard(iid)
                    if not open_ids:
                        del self.by_instance[inv.instance_id]
        return released

    def create(self, rec: CommandRecord, instance_ids: list[str], unknown_ids: Iterable[str]) -> ActiveCommand:
        rec.owner = self.owner
        now = rec.requested_at
        ac = ActiveCommand(rec)
        self.active[rec.command_id] = ac
        unknown_ids = list(unknown_ids)
        ids = iter(time_ordered_ids(len(instance_ids) + len(unknown_ids)))
        for instance_id in instance_ids:
            inv = InvocationView(invocation_id=next(ids), command_id=rec.command_id,
                                 instance_id=instance_id, status=PENDING, requested_at=now)
            self._add(ac, inv)
            ac.queue.append(inv.invocation_id)
            ac.open += 1
            self.by_instance.setdefault(instance_id, set()).add(inv.invocation_id)
        for instance_id in unknown_ids:
            inv = InvocationView(invocation_id=next(ids), command_id=rec.command_id,
                                 instance_id=instance_id, status=UNDELIVERABLE,
                                 status_details="unknown instance", requested_at=now, ended_at=now)
            self._add(ac, inv)
        self.store.put_command(rec, new=True)
        self._settle(ac)
        return ac

    def _add(self, ac: ActiveCommand, inv: InvocationView) -> None:
        ac.rec.invocation_ids.append(inv.invocation_id)
        self.invocations[inv.invocation_id] = inv
        self.store.put_invocation(inv)

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, ac: ActiveCommand) -> None:
        rec = ac.rec
        if rec.cancel_requested or not ac.queue:
            return
        if ac.errors > rec.max_errors or (ac.in_canary and ac.errors):
            self._terminate_queue(ac)
            return
        limit = rec.max_concurrency
        if ac.in_canary:
            limit = min(limit, rec.first - ac.dispatched + len(ac.in_flight))
        skipped: list[str] = []
        while ac.queue and len(ac.in_flight) < limit:
            iid = ac.queue.popleft()
            inv = self.invocations[iid]
            if not self._is_online(inv.instance_id):
                skipped.append(iid)
                continue
            ac.in_flight.add(iid)
            ac.dispatched += 1
            if self.durable_dispatch and not inv.dispatched_at:
                inv.dispatched_at = time.time()  # committed before the delivery goes out
                self.store.put_invocation(inv)
            self._send(ac, inv)
        if skipped:
            ac.queue.extendleft(reversed(skipped))
        if rec.status == PENDING and ac.in_flight:
            self._set_command_status(ac, IN_PROGRESS)

    def instance_online(self, instance_id: str) -> None:
        """An agent said HELLO: send it what it is owed, in command order."""
        owed = sorted(self.by_instance.get(instance_id, ()), key=lambda i: self.invocations[i].requested_at)
        commands = {self.invocations[i].command_id for i in owed}
        for iid in owed:
            inv = self.invocations[iid]
            ac = self.active[inv.command_id]
            if inv.status == CANCELLING:
                self._cancel(inv)
            elif iid in ac.in_flight:
                self._send(ac, inv)  # agents dedupe by id: re-acks, or resends the result
        for cid in commands:
            self._settle(self.active[cid])

    def _send(self, ac: ActiveCommand, inv: InvocationView) -> None:
        """Hands an invocation to its agent's session, unless the agent cannot take it: too large
        for it, or sent MAX_DELIVERIES times without an acknowledgement (an agent that drops its
        connection on it would otherwise get it again on every HELLO, and nothing else)."""
        iid = inv.invocation_id
        if not inv.delivered_at and inv.status == PENDING:
            attempts = self._attempts.get(iid, 0)
            if attempts >= MAX_DELIVERIES:
                self._undeliverable(ac, inv, unacknowledged(attempts))
                return
        problem = self._deliver(inv, ac.rec)
        if problem:
            self._undeliverable(ac, inv, problem)

    def sent(self, invocation_ids: list[str]) -> None:
        """These deliveries left the broker (a delivery queued but never sent, during a store
        outage or to a connection that closed, does not count as an attempt)."""
        for iid in invocation_ids:
            inv = self.invocations.get(iid)
            if inv is not None and not inv.delivered_at and inv.status == PENDING:
                self._attempts[iid] = self._attempts.get(iid, 0) + 1

    def undeliverable(self, instance_id: str, iid: str, why: str) -> None:
        """The broker holding the agent's session could not deliver this broker's invocation."""
        inv = self.invocations.get(iid)
        if inv is None or inv.instance_id != instance_id or inv.delivered_at or inv.status != PENDING:
            return
        ac = self.active[inv.command_id]
        self._undeliverable(ac, inv, why)
        self._settle(ac)

    def _undeliverable(self, ac: ActiveCommand, inv: InvocationView, why: str) -> None:
        log.warning("invocation %s on %s is undeliverable: %s", inv.invocation_id[:8], inv.instance_id, why)
        inv.stderr = why
        ac.in_flight.discard(inv.invocation_id)
        self._finish(ac, inv, UNDELIVERABLE, why, time.time())

    def _terminate_queue(self, ac: ActiveCommand) -> None:
        now = time.time()
        while ac.queue:
            inv = self.invocations[ac.queue.popleft()]
            self._finish(ac, inv, CANCELLED, protocol.TERMINATED, now)

    # -- agent events ---------------------------------------------------------------------------

    def acked(self, instance_id: str, iid: str) -> None:
        inv = self.invocations.get(iid)
        if inv is None or inv.instance_id != instance_id or inv.delivered_at:
            return
        inv.delivered_at = time.time()
        self._attempts.pop(iid, None)
        self.store.put_invocation(inv)

    def started(self, instance_id: str, iid: str, at: float) -> None:
        inv = self.invocations.get(iid)
        if inv is None or inv.instance_id != instance_id or inv.status != PENDING:
            return
        inv.status, inv.started_at = IN_PROGRESS, at
        inv.delivered_at = inv.delivered_at or at
        self.store.put_invocation(inv)

    def result(self, instance_id: str, res: protocol.InvocationResult, max_output: int) -> bool:
        """Stores a result once. False when it is not this instance's open invocation."""
        inv = self.invocations.get(res.invocation_id)
        if inv is None:
            return True  # already terminal and stored (a retried report), or long gone
        if inv.instance_id != instance_id:
            log.warning("refused result for invocation %s from instance %s (it belongs to %s)",
                        res.invocation_id, instance_id, inv.instance_id)
            return False
        if inv.status in TERMINAL_STATUSES:
            return True
        ac = self.active[inv.command_id]
        inv.exit_code = res.exit_code
        inv.stdout, inv.stdout_size = _cap(res.stdout, res.stdout_size, max_output)
        inv.stderr, inv.stderr_size = _cap(res.stderr, res.stderr_size, max_output)
        inv.steps = _capped_steps(res.steps, len(ac.rec.steps), max_output)
        inv.started_at = res.started_at or inv.started_at
        inv.delivered_at = inv.delivered_at or inv.started_at
        status = res.status if res.status in TERMINAL_STATUSES else FAILED
        self._finish(ac, inv, status, res.status_details[:MAX_DETAIL], res.ended_at or time.time())
        self._settle(ac)
        return True

    def refused(self, instance_id: str, refusal: protocol.Refusal) -> None:
        inv = self.invocations.get(refusal.invocation_id)
        if inv is None or inv.instance_id != instance_id or inv.status in TERMINAL_STATUSES:
            return
        ac = self.active[inv.command_id]
        status = TIMED_OUT if refusal.reason == "expired" else FAILED
        detail = protocol.DELIVERY_TIMED_OUT if refusal.reason == "expired" else refusal.reason
        inv.stderr = refusal.message[:MAX_DETAIL]
        self._finish(ac, inv, status, detail, time.time())
        self._settle(ac)

    def _finish(self, ac: ActiveCommand, inv: InvocationView, status: str, detail: str, at: float) -> None:
        inv.status, inv.status_details, inv.ended_at = status, detail, at
        self._attempts.pop(inv.invocation_id, None)
        self.store.put_invocation(inv)
        self.finished_invocations[status] += 1
        if self.observer is not None:
            self.observer(inv)
        if self.on_invocation_end is not None:
            self.on_invocation_end(ac.rec, inv)
        ac.in_flight.discard(inv.invocation_id)
        ac.open -= 1
        open_ids = self.by_instance.get(inv.instance_id)
        if open_ids is not None:
            open_ids.discard(inv.invocation_id)
            if not open_ids:
                del self.by_instance[inv.instance_id]
        if status in ERROR_STATUSES:
            ac.errors += 1
        elif status == SUCCESS:
            ac.succeeded += 1
        log.debug("invocation %s on %s: %s%s (exit %s)", inv.invocation_id[:8], inv.instance_id, status,
                 f"/{detail}" if detail else "", inv.exit_code)

    def _settle(self, ac: ActiveCommand) -> None:
        """After any change: dispatch what may go now, complete the command if all is done."""
        if ac.rec.command_id not in self.active:
            return
        self.dispatch(ac)
        self._maybe_complete(ac)

    # -- operator actions -----------------------------------------------------------------------

    def cancel(self, command_id: str, instance_ids: set[str] | None = None) -> None:
        ac = self.active.get(command_id)
        if ac is None:
            return
        now = time.time()
        if not instance_ids:
            ac.rec.cancel_requested = True
            self.store.put_command(ac.rec)
        for iid in list(ac.rec.invocation_ids):
            inv = self.invocations[iid]
            if inv.status in TERMINAL_STATUSES or (instance_ids and inv.instance_id not in instance_ids):
                continue
            if iid in ac.in_flight:
                if inv.status != CANCELLING:
                    inv.status = CANCELLING
                    self.store.put_invocation(inv)
                    self._cancel(inv)
            else:
                try:
                    ac.queue.remove(iid)
                except ValueError:
                    pass
                self._finish(ac, inv, CANCELLED, "", now)
        self._maybe_complete(ac)
        if ac.rec.command_id in self.active:
            self._set_command_status(ac, ac.rec.status)

    def instance_gone(self, instance_id: str, why: str) -> None:
        """The instance's key was rejected or deleted: what it was owed is undeliverable."""
        now = time.time()
        touched = {}
        for iid in list(self.by_instance.get(instance_id, ())):
            inv = self.invocations[iid]
            ac = touched.setdefault(inv.command_id, self.active[inv.command_id])
            try:
                ac.queue.remove(iid)
            except ValueError:
                pass
            ac.in_flight.discard(iid)
            self._finish(ac, inv, UNDELIVERABLE, why, now)
        for ac in touched.values():
            self._settle(ac)

    def check_timeouts(self, now: float) -> None:
        for ac in list(self.active.values()):
            if now < ac.rec.expires_at:
                continue
            for iid in list(ac.rec.invocation_ids):
                inv = self.invocations[iid]
                if inv.status == PENDING and not inv.delivered_at:
                    try:
                        ac.queue.remove(iid)
                    except ValueError:
                        pass
                    ac.in_flight.discard(iid)
                    self._finish(ac, inv, TIMED_OUT, protocol.DELIVERY_TIMED_OUT, now)
            self._settle(ac)

    # -- aggregation ----------------------------------------------------------------------------

    def _maybe_complete(self, ac: ActiveCommand) -> None:
        if ac.open > 0:
            return
        rec = ac.rec
        invs = [self.invocations[i] for i in rec.invocation_ids]
        statuses = [i.status for i in invs]
        if rec.cancel_requested and CANCELLED in statuses:
            status, detail = CANCELLED, CANCELLED
        elif statuses and all(s == UNDELIVERABLE for s in statuses):
            status, detail = FAILED, UNDELIVERABLE
        elif ac.errors > rec.max_errors or (rec.first and ac.errors and ac.succeeded < rec.first):
            status, detail = FAILED, "MaxErrorsExceeded" if rec.max_errors else FAILED
        else:
            status, detail = SUCCESS, SUCCESS
        rec.status, rec.status_details, rec.completed_at = status, detail, time.time()
        if rec.display_steps:  # no invocation needs the steps any more: secret values leave the store
            if rec.steps != rec.display_steps:
                self.secrets_dropped = True
            rec.steps = []
        self.store.put_command(rec)
        self.finished_commands[status] += 1
        del self.active[rec.command_id]
        for iid in rec.invocation_ids:
            self.invocations.pop(iid, None)
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        log.info("command %s %s (%s)", rec.command_id, status, ", ".join(f"{s}={n}" for s, n in sorted(counts.items())))
        self.completed_counts = counts
        self._completing = (rec, sorted(invs, key=lambda inv: inv.instance_id))  # the store's order
        try:
            self._on_complete(rec)
        finally:
            self._completing = None

    def _set_command_status(self, ac: ActiveCommand, status: str) -> None:
        if ac.rec.cancel_requested and status not in TERMINAL_STATUSES:
            status = CANCELLING
        if ac.rec.status != status:
            ac.rec.status = ac.rec.status_details = status
            self.store.put_command(ac.rec)

    def record(self, command_id: str) -> CommandRecord | None:
        active = self.active.get(command_id)
        return active.rec if active is not None else self.store.get_command(command_id)

    def view(self, command_id: str, include_output: bool = True) -> protocol.CommandView | None:
        found = self.record_and_view(command_id, include_output)
        return None if found is None else found[1]

    def record_and_view(self, command_id: str, include_output: bool = True
                        ) -> tuple[CommandRecord, protocol.CommandView] | None:
        """The command's record with its view: a finished command's record is read from the store
        once for both."""
        ac = self.active.get(command_id)
        if ac is not None:
            return ac.rec, ac.rec.view([self.invocations[i] for i in ac.rec.invocation_ids], include_output)
        completing = self._completing
        if completing is not None and completing[0].command_id == command_id:
            return completing[0], completing[0].view(completing[1], include_output)
        rec = self.store.get_command(command_id)
        if rec is None:
            return None
        return rec, rec.view(self.store.get_invocations(command_id), include_output)


def _capped_steps(steps: list[protocol.StepResult], count: int, limit: int) -> list[protocol.StepResult]:
    """An agent's step results as kept: no more than the steps it was given, each step's output
    capped as the invocation's is, its name and detail cut."""
    steps = steps[:count]
    for step in steps:
        if len(step.stdout) > limit:
            step.stdout, step.stdout_size = _cap(step.stdout, step.stdout_size, limit)
        if len(step.stderr) > limit:
            step.stderr, step.stderr_size = _cap(step.stderr, step.stderr_size, limit)
        step.name, step.detail = step.name[:MAX_DETAIL], step.detail[:MAX_DETAIL]
    return steps


def _cap(text: str, size: int, limit: int) -> tuple[str, int]:
    size = max(size, len(text))
    if len(text) > limit:
        text = text[:limit] + f"\n[output truncated by the broker: {size} bytes in all]\n"
    return text, size
