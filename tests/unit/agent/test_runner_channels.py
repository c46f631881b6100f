"""The supervisor runner as the daemon's loop drives it: a real zygote and real supervisors; the
loop waits on the supervisors' sockets (``channel_fds``) and takes each result itself
(``channel_ready``), one result per invocation, even when reading the outcome fails."""

from __future__ import annotations

import select
import time
import uuid

import pytest

from agent import executor
from agent import supervisor as sup
from zerorun.protocol import FAILED, SUCCESS, Invocation, Step


def _invocation(script: str = "true") -> Invocation:
    iid = str(uuid.uuid4())
    return Invocation(iid, "cmd-1", "i-1", "AWS-RunShellScript", "1", "0" * 64, [Step("run", script=script)],
                      time.time(), time.time() + 60)


@pytest.fixture
def runner(tmp_path):
    results = []
    (tmp_path / "work").mkdir(mode=0o700)
    made = executor.SupervisorRunner(tmp_path / "work", "Linux", 10_000, on_result=results.append, env={})
    made.results = results
    yield made
    made.shutdown()


def _loop_until(runner, count: int, seconds: float = 20.0) -> None:
    """What the daemon's loop does with the supervisors' sockets, until ``count`` results came."""
    deadline = time.monotonic() + seconds
    while len(runner.results) < count and time.monotonic() < deadline:
        fds = runner.channel_fds()
        ready, _, _ = select.select(fds, [], [], 0.1) if fds else ([], [], time.sleep(0.05))
        for fd in ready:
            runner.channel_ready(fd)
    assert len(runner.results) >= count, f"{len(runner.results)} of {count} results"


def test_results_are_taken_from_the_supervisors_sockets_once_each(runner):
    invocations = [_invocation(f"echo {n}") for n in range(5)]  # more than the warm supervisors
    for inv in invocations:
        runner.start(inv)
    _loop_until(runner, 5)
    time.sleep(0.3)
    _loop_until(runner, 5)
    assert sorted(r.invocation_id for r in runner.results) == sorted(i.invocation_id for i in invocations)
    assert {r.status for r in runner.results} == {SUCCESS}
    assert sorted(r.stdout for r in runner.results) == [f"{n}\n" for n in range(5)]
    assert runner.channel_fds() == []


def test_an_outcome_that_cannot_be_read_reports_the_invocation_once(runner, monkeypatch):
    def broken(run_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sup, "read_outcome", broken)
    inv = _invocation()
    runner.start(inv)
    _loop_until(runner, 1)
    time.sleep(0.3)
    assert len(runner.results) == 1
    result = runner.results[0]
    assert result.invocation_id == inv.invocation_id and result.status == FAILED
    assert "could not read its outcome (disk on fire)" in result.stderr
    assert runner.channel_fds() == []


# -- an outcome the run directory cannot take comes on the socket ------------------------------

# The step itself makes the outcome's file a directory (it runs in the run directory): the
# supervisor's write fails as it does on a full disk, with no disk to fill.
SPOIL_OUTCOME = "rm -f outcome.tmp; mkdir outcome.tmp"


def test_an_outcome_the_run_directory_cannot_take_comes_on_the_socket(runner):
    """It used to be lost (Failed, SupervisorLost: no exit code, no output); now the result is
    the step's, saying its output may be cut. That supervisor exits (its run directory has no
    outcome: it must not name a process that runs something else); the next ones run as ever."""
    inv = _invocation(f"echo out; echo err >&2; {SPOIL_OUTCOME}; exit 7")
    runner.start(inv)
    _loop_until(runner, 1)
    [result] = runner.results
    assert (result.invocation_id, result.status, result.exit_code, result.stdout) == (
        inv.invocation_id, FAILED, 7, "out\n"), result
    cut = "[output may be cut: the run directory could not take the result (Is a directory); "
    assert result.stderr.startswith("err\n" + cut), result.stderr
    assert result.steps[0].stderr == result.stderr and result.steps[0].exit_code == 7
    assert runner.channel_fds() == []
    identity = sup.read_identity(runner.work_root / inv.invocation_id)
    assert identity is not None
    deadline = time.monotonic() + 10
    while sup.is_alive(identity) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sup.is_alive(identity)
    with runner._lock:
        assert identity.pid not in [warm.pid for warm in runner._warm]
    for n in range(4):
        runner.start(_invocation(f"echo again {n}"))
    _loop_until(runner, 5)
    assert sorted(r.stdout for r in runner.results[1:]) == [f"again {n}\n" for n in range(4)]


def test_an_outcome_larger_than_the_socket_buffer_comes_whole(tmp_path):
    """Megabytes of output: the supervisor sends as the agent reads, and the loop reads what is
    there each time the socket is readable (it never waits for the rest)."""
    results = []
    (tmp_path / "work").mkdir(mode=0o700)
    runner = executor.SupervisorRunner(tmp_path / "work", "Linux", 4 << 20, on_result=results.append, env={})
    runner.results = results
    try:
        inv = _invocation(f"head -c 3000000 /dev/zero | tr '\\0' a; {SPOIL_OUTCOME}")
        runner.start(inv)
        _loop_until(runner, 1, seconds=60)
        [result] = results
        assert result.status == SUCCESS and result.stdout == "a" * 3_000_000 and result.stdout_size == 3_000_000
        assert "output may be cut" in result.stderr
    finally:
        runner.shutdown()


def test_a_whole_output_is_still_served_when_the_outcome_came_on_the_socket(runner):
    """More than the result carries (``max_output`` is 10 000 here): the output files are in the
    run directory, named in the outcome, and served whole as ever."""
    inv = _invocation(f"seq 1 20000; {SPOIL_OUTCOME}")
    runner.start(inv)
    _loop_until(runner, 1)
    [result] = runner.results
    whole = "".join(f"{n}\n" for n in range(1, 20001)).encode()
    assert result.stdout_follows == len(whole) and "output truncated by the agent" in result.stdout
    assert runner.read_output(inv.invocation_id, "stdout", 0, len(whole) + 10) == whole


def test_a_step_does_not_inherit_its_supervisors_socket(runner):
    """The outcome on the socket is the supervisor's word: a step must not be able to speak
    there (nor hold the socket open, or read what the agent sends)."""
    inv = _invocation('for fd in /proc/$$/fd/*; do echo "$fd $(readlink $fd)"; done')
    runner.start(inv)
    _loop_until(runner, 1)
    [result] = runner.results
    assert result.status == SUCCESS and "/proc/" in result.stdout, result
    assert "socket:" not in result.stdout, result.stdout


def test_a_step_whose_files_cannot_be_made_fails_alone_and_the_earlier_steps_keep_their_results(runner):
    """The disk fills in the first step: the next step's script cannot be written (here the first
    step makes its file a directory). That used to end the whole invocation "agent error", the
    first step's exit code and output lost with it; now that step alone fails, saying why, and
    the flow goes on (a later step, ``finally`` here, is tried as ever)."""
    iid = str(uuid.uuid4())
    steps = [Step("fill", script=f"echo one; echo warned >&2; rm -f 01_script.sh; mkdir 01_script.sh; "
                                 f"{SPOIL_OUTCOME}; exit 5"),
             Step("next", script="echo two"),
             Step("last", script="echo three", finally_step=True)]
    inv = Invocation(iid, "cmd-1", "i-1", "AWS-RunShellScript", "1", "0" * 64, steps, time.time(), time.time() + 60)
    runner.start(inv)
    _loop_until(runner, 1)
    [result] = runner.results
    fill, nxt, last = result.steps
    assert (fill.status, fill.exit_code, fill.stdout, fill.stderr) == (FAILED, 5, "one\n", "warned\n"), result
    assert nxt.status == FAILED and nxt.detail == "cannot start: Is a directory", nxt
    assert "cannot start step next: " in nxt.stderr and "01_script.sh" in nxt.stderr, nxt
    assert (last.status, last.stdout) == (SUCCESS, "three\n"), last
    assert result.status == FAILED and result.stdout == "one\nthree\n", result
    assert "output may be cut" in result.stderr and "agent error" not in result.stderr, result
