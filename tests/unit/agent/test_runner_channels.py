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
