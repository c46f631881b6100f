"""What a real agent does with deliveries a broker should never send: a broker's ROUTER driven by
hand (without CURVE: the agent runs with --insecure) says exactly what each test makes it say."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from agent import supervisor
from zerorun import protocol
from zerorun.protocol import Invocation, Step

INSTANCE = "hand-1"


class HandBroker:
    """A ROUTER the agent connects to; ``run`` holds the agent's routing id after its HELLO."""

    def __init__(self, root: Path):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.state_dir = root / "agent"
        self.log_path = root / "agent.log"
        self.routing_id = b""
        self.start_agent()

    def start_agent(self) -> protocol.Hello:
        """Starts the agent (again: its log goes on) and welcomes it; returns its HELLO."""
        with open(self.log_path, "ab") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "--broker", f"tcp://127.0.0.1:{self.port}", "--insecure",
                 "--instance-id", INSTANCE, "--state-dir", str(self.state_dir), "--heartbeat-interval", "5",
                 "--log-level", "info", "--drain-timeout", "3"], stdout=log, stderr=subprocess.STDOUT)
        hello = self.receive(protocol.Hello, timeout=30)
        assert hello and isinstance(hello[-1], protocol.Hello), self.log()
        self.send(protocol.Welcome(INSTANCE, 5.0, time.time()))
        return hello[-1]

    def stop_agent(self) -> None:
        self.agent.send_signal(signal.SIGTERM)
        assert self.agent.wait(timeout=15) == 0, self.log()[-3000:]

    def receive(self, until: type, timeout: float = 10.0) -> list:
        """What the agent says until a message of type ``until`` (or the timeout)."""
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                routing_id, _header, body = self.sock.recv_multipart()
                self.routing_id = routing_id
                out.append(protocol.agent_message_decoder.decode(body))
                if isinstance(out[-1], until):
                    return out
        return out

    def send(self, message: object) -> None:
        self.sock.send_multipart([self.routing_id, *protocol.frames(message)])

    def results(self, invocation_ids: set[str], timeout: float = 20.0, settle: float = 2.0) -> list:
        """Every result the agent sends until each of ``invocation_ids`` has one, and for
        ``settle`` seconds more (anything said twice shows)."""
        got: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not invocation_ids <= {r.invocation_id for r in got}:
            got += [r for m in self.receive(protocol.Results, timeout=0.5) if isinstance(m, protocol.Results)
                    for r in m.results]
        end = time.monotonic() + settle
        while time.monotonic() < end:
            got += [r for m in self.receive(protocol.Results, timeout=0.5) if isinstance(m, protocol.Results)
                    for r in m.results]
        return got

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        subprocess.run([sys.executable, "-m", "agent", "stop-commands", "--state-dir", str(self.state_dir)],
                       capture_output=True, timeout=60)
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def broker(tmp_path):
    hand = HandBroker(tmp_path)
    try:
        yield hand
    finally:
        hand.close()


def invocation(invocation_id: str, script: str) -> Invocation:
    now = time.time()
    return Invocation(invocation_id, "cmd-1", INSTANCE, "doc", "1", "sha", [Step("s1", script=script)],
                      issued_at=now, expires_at=now + 600)


def test_an_invocation_listed_twice_in_one_delivery_runs_once(broker):
    """The second copy used to be started too: its run directory existed, so it ended at once
    with "agent error: File exists"; that result was journaled and the run directory released,
    under the first copy's supervisor, which then ended without a result (SupervisorLost)."""
    inv = invocation("0123abcd0123abcd", "sleep 0.5; echo ran")
    broker.send(protocol.Deliver([inv, inv]))
    results = broker.results({inv.invocation_id})
    assert [(r.invocation_id, r.status, r.stdout) for r in results] == [(inv.invocation_id, "Success", "ran\n")], \
        broker.log()[-3000:]


def test_an_invocation_id_that_is_no_plain_name_is_refused_and_removes_nothing(broker, tmp_path):
    """The id names the run directory (``<state dir>/work/<id>``), removed once the result is
    journaled: "" used to remove the whole work directory (every running invocation's), an
    absolute path or ``..`` a directory anywhere, once its start had failed ("File exists")."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    (broker.state_dir / "precious").mkdir()
    bad = ["", str(victim), "../precious", ".", "a/b"]
    broker.send(protocol.Deliver([invocation(iid, "echo ran") for iid in bad] + [invocation("ok-1", "echo ran")]))
    said = broker.receive(protocol.Refuse)
    refused = [r for m in said if isinstance(m, protocol.Refuse) for r in m.items]
    assert sorted(r.invocation_id for r in refused) == sorted(bad), broker.log()[-3000:]
    assert {r.reason for r in refused} == {"invalid"}
    results = broker.results({"ok-1"})
    assert [(r.invocation_id, r.status) for r in results] == [("ok-1", "Success")], broker.log()[-3000:]
    assert (victim / "keep").exists() and (broker.state_dir / "precious").is_dir()
    assert (broker.state_dir / "work").is_dir()


def test_an_ack_that_comes_before_the_result_does_not_lose_it(broker):
    """An ack for an invocation still running acknowledges nothing: the SQLite journal used to mark
    it acked, so the result that ended while the broker was not listening was never sent (nor
    listed as unacknowledged in the next HELLO)."""
    inv = invocation("0123abcd0123abce", "sleep 1; echo ran")
    broker.send(protocol.Deliver([inv]))
    broker.send(protocol.ResultAck([inv.invocation_id]))
    broker.send(protocol.KeyPending("held for a moment", 3.0))  # not welcomed: the result waits
    hello = broker.receive(protocol.Hello, timeout=15)
    assert isinstance(hello[-1], protocol.Hello) and hello[-1].unacked == [inv.invocation_id], broker.log()[-3000:]
    broker.send(protocol.Welcome(INSTANCE, 5.0, time.time()))
    results = broker.results({inv.invocation_id}, settle=0.5)
    assert [(r.invocation_id, r.status, r.stdout) for r in results] == [(inv.invocation_id, "Success", "ran\n")]


def test_a_step_timeout_beyond_what_select_takes_still_runs_the_step(broker, tmp_path):
    """A timeoutSeconds the broker never renders (it caps them) but may send: the supervisor's
    wait raised OverflowError ("timestamp out of range for platform time_t"), the invocation
    ended Failed "agent error" at once, and the step ran on, unsupervised."""
    marker = tmp_path / "ran"
    now = time.time()
    inv = Invocation("0123abcd0123abcf", "cmd-1", INSTANCE, "doc", "1", "sha",
                     [Step("s1", script=f"sleep 1; touch {marker}; echo ran", timeout_seconds=10 ** 15)],
                     issued_at=now, expires_at=now + 600)
    broker.send(protocol.Deliver([inv]))
    results = broker.results({inv.invocation_id}, settle=0.5)
    assert [(r.status, r.stdout) for r in results] == [("Success", "ran\n")], (results, broker.log()[-2000:])
    assert marker.exists()


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def journal_on_small_disk(tmp_path, small_disk):
    """A hand broker whose agent keeps its journal (and executions.jsonl) on ``small_disk``: the
    rest of its state dir (the run directories of the running invocations) is on the big one."""
    state = tmp_path / "agent"
    state.mkdir(mode=0o700)
    for name in ("journal.db", "executions.jsonl"):
        (state / name).symlink_to(small_disk.path / name)  # SQLite keeps its -wal and -shm beside the target
    hand = HandBroker(tmp_path)
    try:
        yield hand, small_disk
    finally:
        hand.close()


def wait_for_log(broker: HandBroker, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in broker.log():
        assert time.monotonic() < deadline, f"no {text!r} in the agent's log:\n{broker.log()[-3000:]}"
        time.sleep(0.1)


JOURNAL_FULL = "the agent cannot write its journal: database or disk is full"


def test_a_full_disk_keeps_the_agent_up_and_loses_no_result(journal_on_small_disk, tmp_path):
    """The journal write of a finished invocation's result used to raise out of the agent's loop:
    the agent exited, and after its restart the invocation was reported interrupted, its exit code
    and output lost. Now the result is sent all the same, kept, journaled once there is space again
    (no restart needed), and a restarted agent reports it whole."""
    broker, disk = journal_on_small_disk
    first = invocation("full-disk-result", "sleep 1.5; echo kept; exit 3")
    broker.send(protocol.Deliver([first]))
    time.sleep(0.5)  # journaled and running
    disk.fill()
    results = broker.results({first.invocation_id}, settle=1.0)
    assert [(r.invocation_id, r.status, r.exit_code, r.stdout) for r in results] == [
        (first.invocation_id, "Failed", 3, "kept\n")], broker.log()[-3000:]
    assert broker.agent.poll() is None, broker.log()[-3000:]
    # while the disk is full a new delivery cannot be journaled: it fails at once, not run
    marker = tmp_path / "ran"
    second = invocation("full-disk-refused", f"touch {marker}; echo ran")
    broker.send(protocol.Deliver([second]))
    [refused] = broker.results({second.invocation_id}, settle=0.5)
    assert refused.status == "Failed" and JOURNAL_FULL in refused.stderr, refused
    assert broker.log().count("cannot write its journal") == 1, broker.log()[-3000:]  # said once
    disk.free()
    wait_for_log(broker, "the agent can write its journal again")
    assert broker.agent.poll() is None and not marker.exists()
    # a restart finds the result journaled: sent again whole, never reported interrupted
    broker.stop_agent()
    hello = broker.start_agent()
    assert sorted(hello.unacked) == sorted([first.invocation_id, second.invocation_id]), broker.log()[-3000:]
    again = {r.invocation_id: r for r in broker.results({first.invocation_id, second.invocation_id}, settle=0.5)}
    assert (again[first.invocation_id].status, again[first.invocation_id].exit_code,
            again[first.invocation_id].stdout) == ("Failed", 3, "kept\n"), broker.log()[-3000:]
    assert "interrupted" not in broker.log()
    broker.send(protocol.ResultAck([first.invocation_id, second.invocation_id]))
    third = invocation("full-disk-after", "echo back")
    broker.send(protocol.Deliver([third]))
    assert [(r.status, r.stdout) for r in broker.results({third.invocation_id}, settle=0.5)] == [("Success", "back\n")]
    assert not marker.exists()


def test_a_delivery_while_the_disk_is_full_fails_once_and_never_runs(journal_on_small_disk, tmp_path):
    """It used to be dropped with an exception in the log, unacknowledged: the broker sends such
    a delivery again only after the agent's next HELLO (twice at most, then Undeliverable, with
    no word of the disk). Now it ends Failed at once, saying why, and its id is remembered: sent
    again (before or after the space returns, or after a restart), it is never run."""
    broker, disk = journal_on_small_disk
    disk.fill()
    marker = tmp_path / "ran"
    inv = invocation("full-disk-delivery", f"touch {marker}; echo ran")
    broker.send(protocol.Deliver([inv]))
    [result] = broker.results({inv.invocation_id}, settle=0.5)
    assert (result.status, result.exit_code) == ("Failed", -1) and JOURNAL_FULL in result.stderr, result
    assert "nothing was run" in result.stderr and result.steps[0].status == "Failed"
    broker.send(protocol.Deliver([inv]))  # again while full: the same answer
    assert [r.stderr for r in broker.results({inv.invocation_id}, settle=0.5)] == [result.stderr]
    disk.free()
    wait_for_log(broker, "the agent can write its journal again")
    broker.send(protocol.Deliver([inv]))  # again with space: known, not run
    said = broker.receive(protocol.Ack, timeout=5)
    assert any(isinstance(m, protocol.Ack) and inv.invocation_id in m.invocation_ids for m in said), said
    broker.send(protocol.ResultAck([inv.invocation_id]))
    broker.stop_agent()
    broker.start_agent()
    broker.send(protocol.Deliver([inv]))  # and after a restart: still known
    said = broker.receive(protocol.Ack, timeout=5)
    assert any(isinstance(m, protocol.Ack) and inv.invocation_id in m.invocation_ids for m in said), said
    time.sleep(1.0)
    assert not marker.exists() and broker.agent.poll() is None, broker.log()[-3000:]


def test_a_full_state_dir_keeps_the_agent_up_and_the_result_whole(small_disk, tmp_path):
    """The whole state dir on a disk that fills while a step runs: its supervisor cannot write the
    outcome (a file of the run directory), and sends it to the agent on its socket instead (the
    exit code and output used to be lost: "SupervisorLost"); the agent cannot journal the result
    either, and sends it all the same, kept in memory until it can. It stays up (its journal write
    of the result used to stop it), and runs the next command once there is space."""
    (tmp_path / "agent").symlink_to(small_disk.path)
    broker = HandBroker(tmp_path)
    try:
        running = invocation("full-state-dir", "echo kept; sleep 1.5; exit 3")
        broker.send(protocol.Deliver([running]))
        time.sleep(0.5)
        small_disk.fill()
        [result] = broker.results({running.invocation_id}, settle=0.5)
        assert (result.status, result.exit_code, result.stdout) == ("Failed", 3, "kept\n"), (
            result, broker.log()[-3000:])
        assert "[output may be cut: the run directory could not take the result (No space left on device)" \
            in result.stderr, result
        assert "cannot write its journal" in broker.log(), broker.log()[-3000:]
        assert broker.agent.poll() is None, broker.log()[-3000:]
        small_disk.free()
        wait_for_log(broker, "the agent can write its journal again")
        after = invocation("full-state-dir-after", "echo back")
        broker.send(protocol.Deliver([after]))
        results = broker.results({after.invocation_id}, settle=0.5)
        assert [(r.status, r.stdout) for r in results] == [("Success", "back\n")], broker.log()[-3000:]
    finally:
        broker.close()


def test_a_full_disk_loses_the_result_only_when_no_agent_is_there_to_take_it(small_disk, tmp_path):
    """The run directories' disk fills while the agent is away (restarted): a supervisor whose step
    ends then cannot write its outcome, nor send it (its socket was the old agent's), and exits;
    one taken back by the new agent cannot send it either (it has no socket to the new one). Those
    invocations alone are lost, each saying the disk is full; the agent stays up and runs the next
    command once there is space."""
    state = tmp_path / "agent"
    state.mkdir(mode=0o700)
    (small_disk.path / "work").mkdir(mode=0o700)
    (state / "work").symlink_to(small_disk.path / "work")  # the journal stays on the big disk
    go_away, go_back = tmp_path / "go-away", tmp_path / "go-back"
    broker = HandBroker(tmp_path)
    try:
        away, back = (invocation(f"full-work-{name}", f"echo kept; while [ ! -e {go} ]; do sleep 0.1; done; exit 3")
                      for name, go in (("away", go_away), ("back", go_back)))
        broker.send(protocol.Deliver([away, back]))
        time.sleep(0.5)
        broker.stop_agent()  # the supervisors run on
        small_disk.fill()
        go_away.touch()
        identity = supervisor.read_identity(state / "work" / away.invocation_id)
        assert identity is not None
        deadline = time.monotonic() + 10
        while supervisor.is_alive(identity):  # it ended, with nowhere to leave its outcome
            assert time.monotonic() < deadline, broker.log()[-3000:]
            time.sleep(0.05)
        broker.start_agent()
        wait_for_log(broker, "still runs it")  # the other one is taken back: by its pidfd, no socket
        wait_for_log(broker, f"invocation {away.invocation_id[:8]} is lost")
        small_disk.fill()  # what the lost one's run directory, removed, left
        go_back.touch()
        results = {r.invocation_id: r for r in broker.results({away.invocation_id, back.invocation_id}, settle=0.5)}
        assert len(results) == 2, broker.log()[-3000:]
        for result in results.values():
            assert result.status == "Failed" and result.exit_code != 3, (result, broker.log()[-3000:])
            assert "is full" in result.stderr and "could not write the result" in result.stderr, result
        assert results[back.invocation_id].status_details == "SupervisorLost"
        assert "its supervisor is gone" in results[away.invocation_id].stderr
        assert broker.agent.poll() is None, broker.log()[-3000:]
        assert "OSError(" not in broker.log(), broker.log()[-3000:]  # a supervisor says why in words
        small_disk.free()
        after = invocation("full-work-after", "echo back")
        broker.send(protocol.Deliver([after]))
        results = broker.results({after.invocation_id}, settle=0.5)
        assert [(r.status, r.stdout) for r in results] == [("Success", "back\n")], broker.log()[-3000:]
    finally:
        broker.close()
