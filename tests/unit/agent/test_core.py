"""The agent core without I/O: messages in, messages out, journal and runner as fakes or the
in-memory journal. The same core runs in the daemon and the fleet simulator (their real-process
tests: tests/integration/test_spine.py, test_faults*.py, test_fleetsim.py)."""

from __future__ import annotations

import sqlite3

import pytest

from agent.core import ACK_HOLD, ACCEPTED, DONE, RUNNING, AgentCore, Identity, Pacing
from agent.journal import Journal, MemoryJournal
from zerorun import protocol
from zerorun.protocol import (
    CANCELLED, FAILED, SUCCESS, Invocation, InvocationResult, Step)

INSTANCE = "i-1"


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Runner:
    """Records starts and cancels; finishes nothing by itself (unless ``at_once``)."""

    def __init__(self, at_once: bool = False, alive: frozenset[str] = frozenset()):
        self.at_once = at_once
        self.alive = alive
        self.started: list[str] = []
        self.cancelled: list[str] = []

    def start(self, inv: Invocation) -> InvocationResult | None:
        self.started.append(inv.invocation_id)
        return InvocationResult(inv.invocation_id, SUCCESS, exit_code=0) if self.at_once else None

    def cancel(self, invocation_id: str) -> None:
        self.cancelled.append(invocation_id)

    def reattach(self, inv: Invocation) -> bool:
        return inv.invocation_id in self.alive


class Agent:
    """A core with its outbox."""

    def __init__(self, journal=None, runner=None, clock=None, pacing=Pacing(), max_concurrency=2, welcome=True):
        self.clock = clock or Clock()
        self.journal = journal if journal is not None else MemoryJournal()
        self.runner = runner or Runner()
        self.sent: list[object] = []
        self.finished: list[tuple[str, str | None]] = []
        self.core = AgentCore(
            Identity(INSTANCE, {"role": "web"}, "host", "Linux", "6.1", "test"), self.journal, self.runner,
            self.sent.append, max_concurrency=max_concurrency, pacing=pacing,
            on_finished=lambda rs, invs: self.finished.extend(
                (r.invocation_id, i.invocation_id if i else None) for r, i in zip(rs, invs)),
            wall=lambda: self.clock.wall, monotonic=lambda: self.clock.mono)
        if welcome:
            self.core.connection_opened()
            self.core.connected()
            self.feed(protocol.Welcome(INSTANCE, 5.0, self.clock.wall))
            self.take()

    def feed(self, msg: object) -> None:
        self.core.receive(protocol.frames(msg))

    def take(self) -> list[object]:
        out, self.sent[:] = list(self.sent), []
        return out

    def deliver(self, *invs: Invocation) -> list[object]:
        self.feed(protocol.Deliver(list(invs)))
        return self.take()


def inv(iid: str, instance: str = INSTANCE, expires_in: float = 3600.0, now: float = 1_800_000_000.0) -> Invocation:
    return Invocation(iid, "cmd-1", instance, "AWS-RunShellScript", "1", "sha", [Step("s1", script="true")],
                      issued_at=now, expires_at=now + expires_in)


def done(iid: str, status: str = SUCCESS) -> InvocationResult:
    return InvocationResult(iid, status, exit_code=0)


def kinds(messages: list[object]) -> list[str]:
    return [type(m).__name__ for m in messages]


# -- connection -------------------------------------------------------------------------------


def test_hello_says_who_it_is_what_runs_and_what_waits_for_an_ack():
    a = Agent()
    a.deliver(inv("a"))
    a.core.finished([done("a")])
    a.take()
    a.deliver(inv("b"))
    a.feed(protocol.PleaseHello())
    [hello] = a.take()
    assert isinstance(hello, protocol.Hello)
    assert (hello.instance_id, hello.tags, hello.hostname, hello.agent_version) == (INSTANCE, {"role": "web"}, "host", "test")
    assert hello.running == ["b"] and hello.unacked == ["a"] and hello.max_concurrency == 2
    assert not a.core.welcomed


def test_welcome_sends_every_unacknowledged_result_in_batches():
    journal = MemoryJournal()
    journal.accept([inv(f"r{i}") for i in range(450)], running=())
    journal.record_results([done(f"r{i}") for i in range(450)])
    a = Agent(journal=journal, welcome=False)
    a.core.connection_opened()
    a.core.connected()
    a.feed(protocol.Welcome(INSTANCE, 2.0, 0.0))
    sent = a.take()
    assert kinds(sent) == ["Hello", "Results", "Results", "Results"]
    assert [len(m.results) for m in sent[1:]] == [200, 200, 50]
    assert a.core.welcomed and a.core.heartbeat == 2.0


def test_results_are_batched_under_the_message_size_limit():
    """Big results (a result may carry up to about 48 MiB of text: 4 MiB of bytes that are not
    UTF-8 become 12 MiB of U+FFFD, in the step and in the invocation, on both streams) used to go
    in one message, over the broker's 64 MiB MAXMSGSIZE: the connection dropped and they were sent
    again after every Welcome, for ever."""
    text = "\ufffd" * (4 * 1024 * 1024)  # 12 MiB in UTF-8

    def big(iid: str) -> InvocationResult:
        return InvocationResult(iid, SUCCESS, exit_code=0, stdout=text,
                                steps=[protocol.StepResult("s1", SUCCESS, exit_code=0, stdout=text)])

    journal = MemoryJournal()
    journal.accept([inv(f"r{i}") for i in range(5)], running=())
    journal.record_results([big(f"r{i}") for i in range(3)] + [done("r3"), done("r4")])
    a = Agent(journal=journal, welcome=False)
    a.core.connection_opened()
    a.core.connected()
    a.feed(protocol.Welcome(INSTANCE, 2.0, 0.0))
    sent = a.take()[1:]
    assert [[r.invocation_id for r in m.results] for m in sent] == [["r0"], ["r1"], ["r2", "r3", "r4"]]
    assert all(len(b"".join(protocol.frames(m))) < protocol.MAX_MESSAGE_BYTES for m in sent)
    # results that end together are sent the same way
    a.deliver(inv("x"), inv("y"))
    a.core.finished([big("x"), big("y")])
    assert [[r.invocation_id for r in m.results] for m in a.take()] == [["x"], ["y"]]


def test_unanswered_hello_is_retried_and_key_pending_or_denied_delay_it():
    a = Agent(welcome=False)
    a.core.connection_opened()
    a.core.connected()
    assert kinds(a.take()) == ["Hello"]
    a.clock.advance(4.9)
    a.core.tick()
    assert "Hello" not in kinds(a.take())
    a.clock.advance(0.2)  # max(1 s, one heartbeat interval of 5 s)
    a.core.tick()
    assert "Hello" in kinds(a.take())
    a.feed(protocol.KeyPending("waiting for approval", retry_after=30.0))
    a.clock.advance(29.0)
    a.core.tick()
    assert "Hello" not in kinds(a.take())
    a.clock.advance(1.5)
    a.core.tick()
    assert "Hello" in kinds(a.take())
    a.feed(protocol.Denied("instance id taken", retry_after=0.0))
    a.clock.advance(0.9)  # at least a second
    a.core.tick()
    assert "Hello" not in kinds(a.take())
    a.clock.advance(0.2)
    a.core.tick()
    assert "Hello" in kinds(a.take())


def test_heartbeats_only_when_welcomed_and_liveness_says_reconnect():
    a = Agent()
    a.clock.advance(5.1)
    assert a.core.tick() is False
    assert [m.running for m in a.take() if isinstance(m, protocol.Heartbeat)] == [0]
    a.clock.advance(5.0)
    assert a.core.tick() is False  # 10.1 s of silence: not yet three intervals
    a.clock.advance(5.0)
    assert a.core.tick() is True  # 15.1 s
    a.core.connection_lost()
    a.core.connection_opened()
    a.take()
    a.clock.advance(5.1)
    assert a.core.tick() is False
    assert "Heartbeat" not in kinds(a.take())  # not welcomed on the new connection yet


def test_without_liveness_a_silent_broker_never_means_reconnect():
    a = Agent(pacing=Pacing(liveness=0))
    for _ in range(10):
        a.clock.advance(5.1)
        assert a.core.tick() is False


def test_pong_changes_the_heartbeat_unless_it_is_fixed():
    a = Agent()
    a.feed(protocol.Pong(0.0, heartbeat_interval=12.5))
    assert a.core.heartbeat == 12.5
    fixed = Agent(pacing=Pacing(heartbeat=0.5, broker_sets_heartbeat=False))
    fixed.feed(protocol.Pong(0.0, heartbeat_interval=12.5))
    assert fixed.core.heartbeat == 0.5


def test_changed_tags_are_said_at_once():
    a = Agent()
    assert a.core.set_tags({"role": "web"}) is False
    assert a.take() == []
    assert a.core.set_tags({"role": "db"}) is True
    [hello] = a.take()
    assert hello.tags == {"role": "db"}


# -- deliveries -------------------------------------------------------------------------------


def test_a_step_done_within_the_ack_hold_is_acknowledged_by_its_results_alone():
    a = Agent()
    assert a.deliver(inv("a")) == []  # journaled, started, its Ack held
    assert a.runner.started == ["a"] and a.journal.state_of("a") == (RUNNING, False)
    assert a.core.next_wakeup() == pytest.approx(a.clock.mono + ACK_HOLD)
    a.clock.advance(ACK_HOLD / 2)
    a.core.finished([done("a")])
    [results] = a.take()
    assert isinstance(results, protocol.Results) and results.results[0].invocation_id == "a"
    a.clock.advance(ACK_HOLD)
    a.core.tick()
    assert a.take() == []
    assert a.finished == [("a", "a")]


def test_a_longer_step_gets_its_ack_with_started_when_the_hold_ends():
    a = Agent()
    t0 = a.clock.wall
    assert a.core.acks_due() == 0.0
    a.deliver(inv("a"))
    assert a.core.acks_due() == pytest.approx(a.clock.mono + ACK_HOLD)
    assert a.core.next_wakeup(acks=False) == a.core.next_beat  # for a driver that times Acks apart
    a.clock.advance(ACK_HOLD)
    a.core.tick()
    [ack] = a.take()
    assert ack == protocol.Ack(["a"], started=["a"], at=t0)


def test_a_runner_that_answers_at_once_sends_results_and_no_ack():
    a = Agent(runner=Runner(at_once=True))
    sent = a.deliver(inv("a"), inv("b"))
    assert kinds(sent) == ["Results"] and [r.invocation_id for r in sent[0].results] == ["a", "b"]
    assert a.journal.state_of("a") == (DONE, False) and a.core.running == {}


def test_redelivery_is_acknowledged_again_never_rerun_and_its_result_resent():
    a = Agent()
    a.deliver(inv("a"))
    assert a.deliver(inv("a")) == [protocol.Ack(["a"])]
    a.core.finished([done("a")])
    a.take()
    sent = a.deliver(inv("a"))
    assert kinds(sent) == ["Ack", "Results"] and sent[1].results[0].invocation_id == "a"
    a.feed(protocol.ResultAck(["a"]))
    assert a.deliver(inv("a")) == [protocol.Ack(["a"])]
    assert a.runner.started == ["a"]


def test_an_invocation_listed_twice_in_one_delivery_starts_once():
    a = Agent(max_concurrency=1)
    a.deliver(inv("a"), inv("a"), inv("b"), inv("b"))
    assert a.runner.started == ["a"] and [i.invocation_id for i in a.core.waiting] == ["b"]


def test_an_invocation_id_that_is_no_plain_name_is_refused():
    a = Agent()
    sent = a.deliver(inv(""), inv("../x"), inv("/etc"), inv("ok.1-a_b"))
    [refuse] = [m for m in sent if isinstance(m, protocol.Refuse)]
    assert [(r.invocation_id, r.reason) for r in refuse.items] == [("", "invalid"), ("../x", "invalid"),
                                                                  ("/etc", "invalid")]
    assert a.runner.started == ["ok.1-a_b"] and a.journal.state_of("../x") is None


def test_misaddressed_and_expired_deliveries_are_refused():
    a = Agent()
    sent = a.deliver(inv("x", instance="i-2"), inv("y", expires_in=-1))
    [refuse] = sent
    assert [(r.invocation_id, r.reason) for r in refuse.items] == [("x", "invalid"), ("y", "expired")]
    assert a.runner.started == [] and a.journal.state_of("x") is None


def test_results_acked_in_a_delivery_are_forgotten():
    a = Agent()
    a.deliver(inv("a"))
    a.core.finished([done("a")])
    a.feed(protocol.Deliver([], results_acked=["a"]))
    assert a.journal.unacked_ids() == [] and a.journal.state_of("a") == (DONE, True)


def test_slots_bound_what_runs_and_the_rest_starts_as_slots_free():
    a = Agent(max_concurrency=2)
    sent = a.deliver(inv("a"), inv("b"), inv("c"), inv("d"))
    assert sent == [protocol.Ack(["c", "d"])]  # waiting: acknowledged now
    assert a.runner.started == ["a", "b"] and [i.invocation_id for i in a.core.waiting] == ["c", "d"]
    assert a.journal.state_of("c") == (ACCEPTED, False)
    t = a.clock.wall
    a.core.finished([done("a")])
    assert kinds(a.take()) == ["Results", "Started"]
    assert a.runner.started == ["a", "b", "c"] and a.journal.state_of("c") == (RUNNING, False)
    a.core.finished([done("b"), done("c")])
    sent = a.take()
    assert sent[1] == protocol.Started(["d"], t)


def test_draining_starts_nothing_that_waits():
    a = Agent(max_concurrency=1)
    a.deliver(inv("a"), inv("b"))
    a.core.draining = True
    a.core.finished([done("a")])
    assert a.runner.started == ["a"] and a.journal.state_of("b") == (ACCEPTED, False)


def test_a_runner_that_fails_to_start_reports_an_agent_error():
    class Broken(Runner):
        def start(self, inv):
            raise RuntimeError("pool is gone")

    a = Agent(runner=Broken())
    [results] = a.deliver(inv("a"))
    assert results.results[0].status == FAILED and "pool is gone" in results.results[0].stderr


# -- cancels ----------------------------------------------------------------------------------


def test_cancel_of_a_running_invocation_goes_to_the_runner():
    a = Agent()
    a.deliver(inv("a"))
    a.feed(protocol.Cancel(["a"]))
    assert a.runner.cancelled == ["a"]


def test_cancel_of_a_waiting_invocation_ends_it_cancelled_without_running():
    a = Agent(max_concurrency=1)
    a.deliver(inv("a"), inv("b"))
    a.feed(protocol.Cancel(["b"]))
    [results] = a.take()
    assert results.results[0].invocation_id == "b" and results.results[0].status == CANCELLED
    a.core.finished([done("a")])
    assert a.runner.started == ["a"]


def test_a_cancel_that_comes_before_its_delivery_applies_to_it():
    a = Agent()
    a.feed(protocol.Cancel(["a"]))
    assert a.take() == []
    sent = a.deliver(inv("a"))
    assert kinds(sent) == ["Ack", "Results"] and sent[1].results[0].status == CANCELLED
    assert a.runner.started == [] and a.finished == [("a", "a")]


def test_cancel_of_a_finished_unacknowledged_invocation_resends_its_result():
    a = Agent()
    a.deliver(inv("a"))
    a.core.finished([done("a")])
    a.take()
    a.feed(protocol.Cancel(["a"]))
    [results] = a.take()
    assert results.results[0].invocation_id == "a"


# -- away from the broker, and restarts ----------------------------------------------------------


def test_results_while_away_are_journaled_and_sent_after_the_next_welcome():
    a = Agent()
    a.deliver(inv("a"))
    a.core.connection_lost()
    a.core.finished([done("a")])
    assert a.take() == []
    a.core.connection_opened()
    a.core.connected()
    a.feed(protocol.Welcome(INSTANCE, 5.0, 0.0))
    assert kinds(a.take()) == ["Hello", "Results"]


def test_live_output_only_while_welcomed():
    a = Agent()
    chunk = protocol.OutputChunk("a", "stdout", "hi\n")
    a.core.output([chunk])
    assert a.take() == [protocol.Output([chunk])]
    a.core.disconnected()
    a.core.output([chunk])
    assert a.take() == []


def test_live_output_is_batched_under_the_message_size_limit():
    """One read of the running steps' files may bring 4 MiB of each (12 MiB once bytes that are not
    UTF-8 are U+FFFD): three steps' stdout and stderr were one Output message over the 64 MiB
    MAXMSGSIZE, and the broker dropped the connection."""
    a = Agent()
    text = "\ufffd" * (4 * 1024 * 1024)
    chunks = [protocol.OutputChunk(iid, stream, text, "s1") for iid in "abc" for stream in ("stdout", "stderr")]
    a.core.output(chunks)
    sent = a.take()
    assert kinds(sent) == ["Output"] * 3 and [c for m in sent for c in m.chunks] == chunks
    assert all(len(b"".join(protocol.frames(m))) < protocol.MAX_MESSAGE_BYTES for m in sent)


@pytest.fixture(params=["memory", "sqlite"])
def journal(request, tmp_path):
    j = MemoryJournal() if request.param == "memory" else Journal(tmp_path / "journal.db")
    yield j
    j.close()


def test_restart_reports_what_ran_as_interrupted_and_starts_what_waited(journal):
    first = Agent(journal=journal, max_concurrency=1)
    first.deliver(inv("a"), inv("b"))
    assert first.runner.started == ["a"]
    # the agent process dies here; the next one finds the journal
    second = Agent(journal=journal, max_concurrency=1, welcome=False)
    assert second.core.recover() == 1
    result = journal.result("a")
    assert result.status == FAILED and result.status_details == protocol.INTERRUPTED
    assert second.runner.started == ["b"] and journal.state_of("b") == (RUNNING, False)
    second.core.connection_opened()
    second.core.connected()
    second.feed(protocol.Welcome(INSTANCE, 5.0, 0.0))
    sent = second.take()
    assert kinds(sent) == ["Started", "Hello", "Results"] and sent[1].running == ["b"]
    assert sent[1].unacked == ["a"]


def test_restart_keeps_what_the_runner_takes_back():
    journal = MemoryJournal()
    Agent(journal=journal).deliver(inv("a"))
    second = Agent(journal=journal, runner=Runner(alive=frozenset({"a"})), welcome=False)
    assert second.core.recover() == 0
    assert "a" in second.core.running and journal.state_of("a") == (RUNNING, False)
    second.core.finished([done("a")])
    assert journal.result("a").status == SUCCESS


def test_journals_agree(journal):
    """The SQLite and in-memory journals behave alike for everything the core asks."""
    journal.accept([inv("a"), inv("b")], running={"a"})
    assert journal.state_of("a") == (RUNNING, False) and journal.state_of("b") == (ACCEPTED, False)
    assert [i.invocation_id for i in journal.in_state(ACCEPTED)] == ["b"]
    journal.mark_running(["b"])
    journal.record_results([done("a")])
    assert journal.unacked_ids() == ["a"] and journal.result("a").status == SUCCESS
    assert [i.invocation_id for i in journal.in_state(RUNNING)] == ["b"]
    journal.mark_acked(["a"])
    assert journal.state_of("a") == (DONE, True) and journal.result("a") is None
    assert journal.unacked_results() == [] and journal.state_of("zzz") is None


def test_an_ack_before_the_result_is_ignored(journal):
    """An ack for an invocation that is still running (or waiting) acknowledges no result: the
    SQLite journal used to mark it acked, so its result, once there, was never sent again after a
    reconnect (nor listed as unacknowledged in HELLO), and pruning could forget it while it ran."""
    journal.accept([inv("a"), inv("b")], running={"a"})
    journal.mark_acked(["a", "b"])
    assert journal.state_of("a") == (RUNNING, False) and journal.state_of("b") == (ACCEPTED, False)
    journal.record_results([done("a")])
    assert journal.unacked_ids() == ["a"] and [r.invocation_id for r in journal.unacked_results()] == ["a"]


# -- malformed input ----------------------------------------------------------------------------


def test_bad_frames_are_counted_and_dropped():
    a = Agent()
    a.core.receive([b"nope", b"x"])
    a.core.receive([protocol.HEADER, b"\x93garbage"])
    a.core.receive([protocol.HEADER])
    assert a.core.bad_messages == 3 and a.take() == []


def test_an_error_in_a_handler_is_counted_not_raised():
    class Exploding(MemoryJournal):
        def mark_acked(self, invocation_ids):
            raise RuntimeError("disk full")

    a = Agent(journal=Exploding())
    a.feed(protocol.ResultAck(["a"]))
    assert a.core.internal_errors == 1


# -- a journal that cannot be written (a full disk) ----------------------------------------------


class FullDisk(MemoryJournal):
    """The in-memory journal, whose writes fail as SQLite's do on a full disk while ``full``."""

    WRITES = ("accept", "mark_running", "record_results", "mark_acked", "save_resume")

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.failed: list[str] = []

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name in FullDisk.WRITES and super().__getattribute__("full"):
            def fail(*args, **kwargs):
                self.failed.append(name)
                raise sqlite3.OperationalError("database or disk is full")
            return fail
        return attr


def full_agent(**kwargs) -> tuple[Agent, FullDisk, list[str]]:
    journal = FullDisk()
    a = Agent(journal=journal, **kwargs)
    stored: list[str] = []
    a.core.on_stored = stored.extend
    return a, journal, stored


def results_of(messages: list[object]) -> list[InvocationResult]:
    return [r for m in messages if isinstance(m, protocol.Results) for r in m.results]


def test_a_result_the_journal_cannot_take_is_sent_kept_and_journaled_once_it_can(caplog):
    """A full disk used to raise out of ``finished`` (the daemon's loop) and stop the agent: the
    result was lost, the invocation reported interrupted after the restart."""
    a, journal, stored = full_agent()
    a.deliver(inv("a"), inv("b"))
    journal.full = True
    caplog.set_level("INFO", logger="zerorun.agent")
    a.core.finished([InvocationResult("a", FAILED, exit_code=3, stdout="out\n")])
    a.core.finished([InvocationResult("b", SUCCESS, exit_code=0)])
    assert [(r.invocation_id, r.exit_code, r.stdout) for r in results_of(a.take())] == [("a", 3, "out\n"), ("b", 0, "")]
    assert journal.state_of("a") == (RUNNING, False) and stored == []  # its run directory stays
    assert a.core.journal_problem == "database or disk is full"
    a.feed(protocol.PleaseHello())
    [hello] = a.take()
    assert sorted(hello.unacked) == ["a", "b"]
    a.feed(protocol.Welcome(INSTANCE, 5.0, a.clock.wall))  # sent again after every Welcome
    assert sorted(r.invocation_id for r in results_of(a.take())) == ["a", "b"]
    a.clock.advance(5.0)
    a.core.tick()  # still full: kept, tried again
    assert journal.state_of("a") == (RUNNING, False)
    journal.full = False
    a.clock.advance(1.0)
    assert a.core.next_wakeup() <= a.clock.mono
    a.core.tick()
    assert journal.state_of("a") == (DONE, False) and journal.result("a").exit_code == 3
    assert sorted(stored) == ["a", "b"] and a.core.journal_problem is None
    said = [r.getMessage() for r in caplog.records if "journal" in r.getMessage()]
    assert len(said) == 2, said  # one line when it begins, one when it ends
    assert "cannot write its journal: database or disk is full" in said[0] and "again" in said[1]
    a.take()
    a.clock.advance(5.0)
    a.core.tick()
    assert not results_of(a.take()) and a.core.next_wakeup() > a.clock.mono  # nothing owed any more


def test_an_acknowledged_result_kept_in_memory_is_done_with_and_journaled_small():
    a, journal, stored = full_agent()
    a.deliver(inv("a"))
    journal.full = True
    a.core.finished([InvocationResult("a", SUCCESS, exit_code=0, stdout="x" * 10_000)])
    a.take()
    a.feed(protocol.ResultAck(["a"]))
    assert stored == ["a"]  # the broker has it: the run directory can go
    a.feed(protocol.Welcome(INSTANCE, 5.0, a.clock.wall))
    assert not results_of(a.take())  # acknowledged: never sent again
    assert a.deliver(inv("a")) == [protocol.Ack(["a"])]  # delivered again: known, not run again
    assert a.runner.started == ["a"]
    journal.full = False
    a.clock.advance(2.0)
    a.core.tick()
    assert journal.state_of("a") == (DONE, True) and a.core.journal_problem is None


def test_a_delivery_the_journal_cannot_take_fails_at_once_and_never_runs():
    """It used to be dropped with an exception logged (no Ack, no result): the broker sends an
    unacknowledged invocation again only after a HELLO, twice at most, then calls it Undeliverable."""
    a, journal, stored = full_agent()
    journal.full = True
    sent = a.deliver(inv("a"))
    [result] = results_of(sent)
    assert kinds(sent) == ["Results"] and a.runner.started == []
    assert result.status == FAILED and "the agent cannot write its journal: database or disk is full" in result.stderr
    assert "nothing was run" in result.stderr and result.steps[0].status == FAILED
    again = a.deliver(inv("a"))  # the same delivery again: its result again, still not run
    assert kinds(again) == ["Ack", "Results"] and results_of(again) == [result] and a.runner.started == []
    journal.full = False
    a.clock.advance(2.0)
    a.core.tick()
    a.take()  # a heartbeat, perhaps
    assert journal.state_of("a") == (DONE, False) and a.runner.started == []
    assert kinds(a.deliver(inv("a"))) == ["Ack", "Results"] and a.runner.started == []  # known to the journal now
    a.deliver(inv("b"))
    assert a.runner.started == ["b"]  # back to normal


def test_nothing_starts_that_cannot_be_marked_running_first():
    a, journal, _ = full_agent(max_concurrency=1)
    a.deliver(inv("a"), inv("b"))
    assert a.runner.started == ["a"]
    journal.full = True
    a.core.finished([done("a")])
    sent = a.take()
    assert a.runner.started == ["a"] and "Started" not in kinds(sent)  # b waits, journaled as accepted
    assert [i.invocation_id for i in a.core.waiting] == ["b"] and journal.state_of("b") == (ACCEPTED, False)
    a.clock.advance(2.0)
    a.core.tick()
    assert a.runner.started == ["a"]
    journal.full = False
    a.clock.advance(2.0)
    a.core.tick()
    assert a.runner.started == ["a", "b"] and journal.state_of("b") == (RUNNING, False)
    assert journal.state_of("a") == (DONE, False)


def test_a_reboot_that_cannot_be_journaled_is_not_made():
    from agent.steps import Resume

    rebooted: list[bool] = []
    a, journal, _ = full_agent()
    a.core.on_reboot = lambda: rebooted.append(True)
    a.deliver(inv("a"))
    journal.full = True
    a.core.reboot_requested("a", Resume(index=0, steps=[], started_at=a.clock.wall))
    [result] = results_of(a.take())
    assert rebooted == [] and result.status == FAILED and "cannot write its journal" in result.stderr
    assert not a.core.running and not a.core.rebooting
