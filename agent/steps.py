"""The SSM step flow, without running anything: which step runs next, what a step's exit means,
and what the invocation's result is. Runners (the daemon's threads in ``executor.py``, the
simulator's asyncio subprocesses in ``fleetsim.py``) only spawn and wait; the rules live here.

Exit code 0 succeeds; 168 succeeds and skips the remaining steps; 169 fails and skips them; any
other code fails the step but later steps still run unless ``onFailure: exit`` (stop, Failed) or
``onFailure: successAndExit`` (stop, counted as success). ``onSuccess: exit`` stops after a
successful step. Steps marked ``finallyStep`` run whatever happened before (documents put it
on the last step only, as SSM does). A step whose precondition does not match this platform is
Skipped, never failed. A cancel stops the flow: the step it stops (or the next one) is reported
Cancelled, the later ones Skipped, and finally steps do not run either: each is reported Cancelled.

A step that runs out of its ``timeoutSeconds`` is TimedOut, with exit code 137 (``EXIT_STOPPED``)
whatever ended its process, and, as in amazon-ssm-agent
(``runpluginutil.getShouldPluginSkipBasedOnControlFlow`` stops only after 168, 169, a Failed
step with ``onFailure: exit`` or a successful one with ``onSuccess: exit``), the later steps
still run. One difference, kept on purpose: SSM ignores ``onFailure`` on a timed-out step (its
status is TimedOut, not Failed); here ``onFailure: exit`` or ``successAndExit`` stops the flow
after a timeout too, and the step stays TimedOut (a timeout is never turned into a success).
The invocation's status takes SSM's precedence (``contracts.DocumentResultAggregator``): Failed
over TimedOut, TimedOut over Cancelled, Cancelled over Success (a step that failed before a
cancel leaves the invocation Failed).

A composite document's nested steps (an ``aws:runDocument`` step expanded by the broker) carry
their ``scope``: amazon-ssm-agent runs the nested document as one plugin step of the document
that runs it (``plugins/rundocument``: ``runpluginutil.RunPlugins`` over the nested document's
steps alone; read at commit 1c217c89b42d), and so does the flow here. Each nested document has
a flow of its own: its ``onFailure: exit``, ``onSuccess: exit``, exits 168/169 skip its later
steps only, and its ``finallyStep`` runs whatever happened in it, but only when the
runDocument step runs. When its last step is done, the runDocument step's outcome is its steps'
statuses merged as SSM's ``contracts.MergeResultStatus`` merges them (TimedOut > Cancelled >
Failed > Success > Skipped; exit codes 168/169 do not reach the parent, whose plugin step has
exit code 0) and the runDocument step's own ``onFailure``/``onSuccess`` decide about the
parent's flow (``onFailure: successAndExit`` marks the nested steps that failed as succeeded);
the parent skips a runDocument step (all its steps) after an exit unless it is ``finallyStep``.
The invocation's status is then taken over the command document's steps, a runDocument step
counting with its merged status.

Exit code 194 asks for a reboot, with amazon-ssm-agent's semantics (its ``runpluginutil`` and
``pluginutil_unix.go``, read at commit 1c217c89b42d): the flow stops there (no later step runs
before the reboot, finally steps included), the invocation stays InProgress, and after the
reboot the flow resumes at **the same step**, which runs again from its start; the steps before
it keep their results and never run again, and the re-run's output replaces the first run's
(``Resume``). On Linux, 3010 is an ordinary failure: it means "reboot" only on Windows.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping

import msgspec

from zerorun import protocol
from zerorun.protocol import (
    CANCELLED, FAILED, SKIPPED, SUCCESS, TIMED_OUT, Invocation, InvocationResult, Scope, Step, StepResult)

EXIT_SUCCESS_AND_STOP = 168
EXIT_FAILURE_AND_STOP = 169
EXIT_REBOOT = 194
EXIT_STOPPED = 137
"""A timed-out or cancelled step's exit code, whatever ended its process (a trap's own exit after
the SIGTERM, the SIGTERM itself, or the SIGKILL after the grace period): amazon-ssm-agent's
``appconfig.CommandStoppedPreemptivelyExitCode``, which ``executers.ExecuteCommand`` sets itself
when a step runs out of its time or is cancelled."""
REBOOT_REQUESTED = "reboot requested (exit 194)"
DOWNLOAD_ACTION = "downloadContent"
SUPPORTED_ACTIONS = ("runShellScript", "runScript", DOWNLOAD_ACTION)


class Resume(msgspec.Struct, omit_defaults=True):
    """Where an invocation goes on after the reboot a step asked for: the step at ``index``
    runs again; ``steps`` are the results of the steps before it."""

    index: int
    steps: list[StepResult] = []
    started_at: float = 0.0


class _Level:
    """One document's flow in an invocation: the command's own (``scope`` None), or one an
    ``aws:runDocument`` step runs, whose steps' results start at ``start``."""

    __slots__ = ("scope", "start", "stopped", "skipped")

    def __init__(self, scope: Scope | None, start: int, skipped: bool = False):
        self.scope = scope
        self.start = start
        self.stopped = False  # a step of this document stopped its flow: only a finally step runs
        self.skipped = skipped  # the runDocument step does not run: every step of it is Skipped


class StepFlow:
    """One invocation's walk through its steps: ``next_step()`` names the step to run (or None
    when the invocation is over), the runner runs it and hands its result to ``report()``;
    ``result()`` summarises. Steps that do not run get their Skipped/Cancelled result here."""

    __slots__ = ("invocation_id", "steps", "platform", "started_at", "results", "_index", "_levels",
                 "_current", "reboot")

    def __init__(self, invocation: Invocation, platform: str, started_at: float | None = None,
                 resume: Resume | None = None):
        self.invocation_id = invocation.invocation_id
        self.steps = invocation.steps
        self.platform = platform
        self.started_at = time.time() if started_at is None else started_at
        self.results: list[StepResult] = []
        self._index = 0
        self._levels = [_Level(None, 0)]
        self._current: Step | None = None
        self.reboot: Resume | None = None  # set when a step asked for a reboot: the flow stops there
        if resume is not None:  # after a reboot: the step that asked for it runs again
            self.results = list(resume.steps)
            self._index = resume.index
            self.started_at = resume.started_at or self.started_at
            self._reopen(resume.index)

    def next_step(self, cancelled: bool) -> tuple[int, Step] | None:
        """The next step to run and its index, or None when no step is left to run."""
        results = self.results
        if self.reboot is not None:
            return None
        while self._index < len(self.steps):
            index = self._index
            step = self.steps[index]
            self._enter(step.scope)
            level = self._levels[-1]
            self._index += 1
            if level.skipped or (level.stopped and not step.finally_step):
                results.append(StepResult(step.name, SKIPPED, detail="skipped after an earlier exit"))
                continue
            if cancelled:
                results.append(StepResult(step.name, CANCELLED, detail="cancelled"))
                level.stopped = True
                continue
            if not precondition_holds(step, self.platform):
                results.append(StepResult(step.name, SKIPPED, detail="precondition not met"))
                continue
            self._current = step
            return index, step
        self._enter([])
        return None

    def report(self, result: StepResult) -> None:
        """The result of the step ``next_step`` named."""
        assert self._current is not None, "report() without a step from next_step()"
        if result.exit_code == EXIT_REBOOT and result.status == SUCCESS:
            self.reboot = Resume(self._index - 1, list(self.results), self.started_at)
        self.results.append(result)
        if stops_after(self._current, result):
            self._levels[-1].stopped = True
        self._current = None

    def result(self, ended_at: float | None = None) -> InvocationResult:
        return summarise(self.invocation_id, self.results, self.started_at,
                         time.time() if ended_at is None else ended_at, self.steps)

    def _enter(self, scope: list[Scope]) -> None:
        """The documents a step with this ``scope`` is in: those it is not in end (the flow of
        the document that ran each goes on with its outcome), those it starts are begun."""
        levels = self._levels
        same = 0
        while same < min(len(scope), len(levels) - 1) and levels[same + 1].scope.name == scope[same].name:  # type: ignore[union-attr]
            same += 1
        while len(levels) - 1 > same:
            self._leave()
        for nested in scope[same:]:
            parent = levels[-1]
            levels.append(_Level(nested, len(self.results),
                                 parent.skipped or (parent.stopped and not nested.finally_step)))

    def _leave(self) -> None:
        """A nested document is over: its runDocument step's outcome, in the parent's flow."""
        level = self._levels.pop()
        if level.skipped or level.scope is None:
            return
        done = self.results[level.start:]
        merged = StepResult(level.scope.name, merged_status(r.status for r in done), exit_code=0)
        if merged.status == SKIPPED:  # nothing ran: no outcome to act on, as for a skipped step
            return
        failed = merged.status == FAILED
        if stops_after(level.scope, merged):
            self._levels[-1].stopped = True
            if failed and merged.status == SUCCESS:  # onFailure: successAndExit of the runDocument step
                for r in done:
                    if r.status == FAILED:
                        r.status = SUCCESS
                        r.detail = f"failure treated as success (onFailure: successAndExit of {level.scope.name})"

    def _reopen(self, index: int) -> None:
        """After a reboot: the documents the step at ``index`` is in, begun where their steps begin."""
        if index >= len(self.steps):
            return
        scope = self.steps[index].scope
        for depth, nested in enumerate(scope):
            start = index
            while start > 0 and _within(self.steps[start - 1].scope, scope[:depth + 1]):
                start -= 1
            self._levels.append(_Level(nested, start))


def _within(scope: list[Scope], outer: list[Scope]) -> bool:
    return len(scope) >= len(outer) and all(a.name == b.name for a, b in zip(scope, outer))


_MERGE_ORDER = {SKIPPED: 0, SUCCESS: 1, FAILED: 2, CANCELLED: 3, TIMED_OUT: 4}


def merged_status(statuses: Iterable[str]) -> str:
    """A nested document's steps' statuses as its runDocument step's: amazon-ssm-agent's
    ``contracts.MergeResultStatus`` (TimedOut > Cancelled > Failed > Success > Skipped),
    Skipped when there is none."""
    merged = SKIPPED
    for status in statuses:
        if _MERGE_ORDER.get(status, 2) > _MERGE_ORDER[merged]:
            merged = status
    return merged


def precondition_holds(step: Step, platform: str) -> bool:
    """``platformType`` matches the platform in any case, as amazon-ssm-agent's lower-cased
    comparison does (``linux``, ``Linux``); other operands (parameters' values) match exactly."""
    pre = step.precondition
    if pre is None:
        return True
    if pre.op == "StringEquals" and len(pre.operands) == 2:
        a, b = pre.operands
        if "platformType" in (a, b):
            return (b if a == "platformType" else a).lower() == platform.lower()
        return a == b
    return False


def stops_after(step: Step | Scope, res: StepResult) -> bool:
    """Whether the flow stops after this step; ``onFailure: successAndExit`` turns the failure
    into a success here (the step's result says so). A timed-out step stops the flow only when
    ``onFailure`` asks (SSM runs the later steps even then: see the module's doc)."""
    if res.status == CANCELLED:
        return True
    if res.status == TIMED_OUT:
        return step.on_failure in ("exit", "successAndExit")
    if res.exit_code in (EXIT_SUCCESS_AND_STOP, EXIT_FAILURE_AND_STOP, EXIT_REBOOT):
        return True
    if res.status == SUCCESS:
        return step.on_success in ("exit", "successAndExit")  # documents refuse successAndExit here; older
        # brokers' commands may still carry it
    if step.on_failure == "successAndExit":
        res.status, res.detail = SUCCESS, "failure treated as success (onFailure: successAndExit)"
        return True
    return step.on_failure == "exit"


def working_directory(requested: str, default: str) -> str:
    """The directory a step runs in, by amazon-ssm-agent's rule (its runscript plugin): an
    absolute one as given; a relative one inside ``default`` (the invocation's directory, where
    aws:downloadContent writes a relative destinationPath), or ``default`` when it is not there."""
    if not requested:
        return default
    if os.path.isabs(requested):
        return requested
    inside = os.path.join(default, requested)
    return inside if os.path.isdir(inside) else default


def cannot_run(step: Step, cwd: str) -> StepResult | None:
    """The result of a step that cannot start here (an action this agent lacks, a working
    directory that is not there), or None when it can."""
    if step.action not in SUPPORTED_ACTIONS:
        return StepResult(step.name, FAILED, detail=f"action {step.action!r} is not supported by this agent")
    if not os.path.isdir(cwd):
        return StepResult(step.name, FAILED, detail=f"working directory {cwd} does not exist",
                          stderr=f"working directory {cwd} does not exist\n")
    return None


def step_env(base: Mapping[str, str], inv: Invocation, step: Step) -> dict[str, str]:
    """The step's environment: the agent's, the step's own, then the ids SSM scripts expect."""
    env = dict(base)
    env.update(step.env)
    env.update({"ZERORUN_COMMAND_ID": inv.command_id, "ZERORUN_INSTANCE_ID": inv.instance_id,
                "ZERORUN_INVOCATION_ID": inv.invocation_id, "ZERORUN_STEP_NAME": step.name,
                "SSM_COMMAND_ID": inv.command_id, "AWS_SSM_INSTANCE_ID": inv.instance_id})
    return env


def script_argv(step: Step, script: str) -> list[str]:
    """How a step's script file runs: its interpreter, its own ``#!`` line, or /bin/sh. A
    download's "script" is its JSON spec, run by ``agent.download`` with the agent's interpreter
    (a process like any step: its timeout, cancel, output and user work the same)."""
    if step.action == DOWNLOAD_ACTION:
        return [sys.executable, "-P", "-m", "agent.download", script]  # -P: not the step's directory on sys.path
    if step.action == "runScript" and step.interpreter:
        return [*step.interpreter, script]
    if step.script.startswith("#!"):
        return [script]
    return ["/bin/sh", script]


def script_text(step: Step) -> str:
    return step.script if step.script.endswith("\n") else step.script + "\n"


def cannot_run_as(step: Step, reason: str) -> StepResult:
    """A step whose run-as user cannot run it here (a working directory it cannot enter)."""
    now = time.time()
    return StepResult(step.name, FAILED, detail=reason, stderr=reason + "\n", started_at=now, ended_at=now)


def cannot_start(step: Step, exc: OSError, started_at: float) -> StepResult:
    return StepResult(step.name, FAILED, detail=f"cannot start: {exc.strerror}",
                      stderr=f"cannot start step {step.name}: {exc}\n", started_at=started_at,
                      ended_at=time.time())


def cancelled_before_start(step: Step) -> StepResult:
    now = time.time()
    return StepResult(step.name, CANCELLED, detail="cancelled", started_at=now, ended_at=now)


def capped_text(data: bytes, size: int, limit: int) -> str:
    """Output as kept: at most ``limit`` bytes, and a marker that says what was dropped."""
    text = data[:limit].decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n[output truncated by the agent: {size} bytes in all, {limit} kept]\n"
    return text


def process_step_result(step: Step, code: int, *, timed_out: bool, cancelled: bool, stdout: str,
                        stdout_size: int, stderr: str, stderr_size: int, started_at: float) -> StepResult:
    """A step whose process ran and exited (or was stopped): its status from the exit code."""
    status, detail = SUCCESS, ""
    if timed_out:
        status, detail = TIMED_OUT, protocol.EXECUTION_TIMED_OUT
    elif cancelled:
        status, detail = CANCELLED, "cancelled"
    elif code == EXIT_REBOOT:
        detail = REBOOT_REQUESTED
    elif code not in (0, EXIT_SUCCESS_AND_STOP):
        status = FAILED
    if code < 0:  # killed by a signal: report it the shell's way
        code = 128 - code
    if timed_out or cancelled:  # SSM's code, whatever ended the process (the SIGTERM, a trap's exit, SIGKILL)
        code = EXIT_STOPPED
    return StepResult(step.name, status, exit_code=code, stdout=stdout, stderr=stderr,
                      stdout_size=stdout_size, stderr_size=stderr_size, started_at=started_at,
                      ended_at=time.time(), detail=detail)


def summarise(invocation_id: str, steps: list[StepResult], started: float, ended: float,
              definitions: list[Step] | None = None) -> InvocationResult:
    """The invocation's result from its steps' (``definitions``: the steps they are the results
    of, whose ``scope`` says which are one runDocument step of the command's document)."""
    ran = [s for s in steps if s.status != SKIPPED]
    status, detail = SUCCESS, ""
    # SSM's precedence over the command document's steps (``contracts.DocumentResultAggregator``):
    # Failed > TimedOut > Cancelled > Success. A cancel ends the flow, yet what failed before it
    # still says Failed.
    for unit in _units(steps, definitions or []):
        unit_status = unit[0].status if len(unit) == 1 else merged_status(s.status for s in unit)
        if unit_status == FAILED and status != FAILED:
            first = next(s for s in unit if s.status == FAILED)
            status, detail = FAILED, f"step {first.name} failed"
        elif unit_status == TIMED_OUT and status in (SUCCESS, CANCELLED):
            status, detail = TIMED_OUT, protocol.EXECUTION_TIMED_OUT
        elif unit_status == CANCELLED and status == SUCCESS:
            status, detail = CANCELLED, ""
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


def _units(results: list[StepResult], definitions: list[Step]) -> list[list[StepResult]]:
    """The results by step of the command's own document: those of one runDocument step together."""
    units: list[list[StepResult]] = []
    outer = None
    for i, res in enumerate(results):
        scope = definitions[i].scope if i < len(definitions) else []
        name = scope[0].name if scope else None
        if name is not None and name == outer:
            units[-1].append(res)
        else:
            units.append([res])
        outer = name
    return units


# -- results of invocations that did not run through their steps ---------------------------------


def success_at_once(inv: Invocation) -> InvocationResult:
    """Every step succeeded at once with no output (the simulator's noop runner)."""
    now = time.time()
    return InvocationResult(inv.invocation_id, SUCCESS, exit_code=0, started_at=now, ended_at=now,
                            steps=[StepResult(s.name, SUCCESS, exit_code=0, started_at=now, ended_at=now)
                                   for s in inv.steps])


def cancelled_result(inv: Invocation, detail: str = "cancelled before it started") -> InvocationResult:
    now = time.time()
    return InvocationResult(inv.invocation_id, CANCELLED, status_details=detail, started_at=now,
                            ended_at=now, steps=[StepResult(s.name, CANCELLED) for s in inv.steps])


def run_as_refused(inv: Invocation, reason: str) -> InvocationResult:
    """A run-as user the invocation names cannot be used here: it fails before anything runs."""
    now = time.time()
    return InvocationResult(inv.invocation_id, FAILED, status_details=reason, stderr=reason + "\n",
                            started_at=now, ended_at=now,
                            steps=[StepResult(s.name, FAILED, detail=f"not run: {reason}") for s in inv.steps])


def journal_refused(inv: Invocation, reason: str) -> InvocationResult:
    """A delivery the agent cannot journal (its disk is full, say): it fails before anything
    runs, as nothing may run that a restart would not know of (it would run again)."""
    now = time.time()
    text = f"{reason}; nothing was run (free space in the agent's state dir, then run the command again)"
    return InvocationResult(inv.invocation_id, FAILED, status_details=reason[:256], stderr=text + "\n",
                            started_at=now, ended_at=now,
                            steps=[StepResult(s.name, FAILED, detail="not run: the agent cannot write its journal")
                                   for s in inv.steps])


def agent_error_result(invocation_id: str, exc: BaseException) -> InvocationResult:
    """The runner itself failed: the invocation is reported, never lost."""
    now = time.time()
    return InvocationResult(invocation_id, FAILED, status_details="agent error",
                            stderr=f"agent error: {exc}\n", started_at=now, ended_at=now)


def interrupted_result(inv: Invocation, now: float, why: str = "") -> InvocationResult:
    why = why or "the agent restarted while this invocation was running"
    return InvocationResult(
        inv.invocation_id, FAILED, status_details=protocol.INTERRUPTED,
        stderr=f"{why}; it was not re-run\n", started_at=inv.issued_at, ended_at=now)


def resumed_result(inv: Invocation, resume: Resume, status: str, detail: str, stderr: str = "") -> InvocationResult:
    """An invocation that waited for a reboot and ends without running on (cancelled, or the
    reboot could not be made): the steps it ran, the rest marked with ``status``."""
    now = time.time()
    rest = [StepResult(s.name, CANCELLED if status == CANCELLED else SKIPPED, detail=detail)
            for s in inv.steps[len(resume.steps):]]
    result = summarise(inv.invocation_id, [*resume.steps, *rest], resume.started_at or inv.issued_at, now, inv.steps)
    result.status, result.status_details = status, detail  # type: ignore[assignment]
    result.stderr += stderr
    return result
