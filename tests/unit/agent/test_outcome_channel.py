"""The outcome on a supervisor's socket (``supervisor.send_outcome``, ``receive_outcome``): the
framing, an outcome that comes in parts, a peer that is gone or stopped reading (the supervisor
must not wait for ever), and what the agent must not believe."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from agent import supervisor as sup
from zerorun.protocol import FAILED, Invocation, InvocationResult, Step, StepResult


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def _outcome(text: str = "out\n") -> sup.Outcome:
    return sup.Outcome(InvocationResult("inv-1", FAILED, exit_code=7, stdout=text,
                                        steps=[StepResult("s1", FAILED, exit_code=7, stdout=text, started_at=1.0)]),
                       kept={"stdout": [("00.stdout", 12)]})


def test_an_outcome_comes_in_parts_and_is_read_once_all_came(pair):
    supervisor_end, agent_end = pair
    data = sup._encode(_outcome())
    message = sup.outcome_message(data)
    assert message[:1] == sup.CHANNEL_OUTCOME and message[1:5] == len(data).to_bytes(4, "big")
    heard = bytearray()
    assert sup.receive_outcome(agent_end, heard, 1 << 20) is None  # nothing yet: no wait
    supervisor_end.sendall(message[1:3])  # the length itself cut in two
    assert sup.receive_outcome(agent_end, heard, 1 << 20) is None
    supervisor_end.sendall(message[3:20])
    assert sup.receive_outcome(agent_end, heard, 1 << 20) is None
    supervisor_end.sendall(message[20:] + b"D")  # what follows is not read with it
    got = sup.receive_outcome(agent_end, heard, 1 << 20)
    assert got == data and sup.decode_outcome(got) == _outcome()
    assert agent_end.recv(1) == b"D"


def test_an_outcome_larger_than_the_socket_buffer_is_sent_as_it_is_read(pair):
    supervisor_end, agent_end = pair
    data = sup._encode(_outcome("x" * (4 << 20)))
    sender = threading.Thread(target=sup.send_outcome, args=(supervisor_end, data, 30.0))
    sender.start()
    assert agent_end.recv(1) == sup.CHANNEL_OUTCOME
    heard, got = bytearray(), None
    while got is None:
        got = sup.receive_outcome(agent_end, heard, 16 << 20)
    sender.join()
    assert sup.decode_outcome(got).result.stdout == "x" * (4 << 20)
    assert supervisor_end.gettimeout() is None  # blocking again, for the next Launch


def test_the_supervisor_does_not_wait_for_an_agent_that_is_gone(pair):
    supervisor_end, agent_end = pair
    agent_end.close()
    started = time.monotonic()
    with pytest.raises(OSError):  # BrokenPipeError: at once
        sup.send_outcome(supervisor_end, sup._encode(_outcome("x" * (1 << 20))), 30.0)
    assert time.monotonic() - started < 5


def test_the_supervisor_gives_up_on_an_agent_that_stopped_reading(pair):
    supervisor_end, _agent_end = pair  # open, never read
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        sup.send_outcome(supervisor_end, sup._encode(_outcome("x" * (4 << 20))), 0.5)
    assert 0.4 < time.monotonic() - started < 5  # the whole send, not each part of it
    assert supervisor_end.gettimeout() is None


def test_an_outcome_that_ends_part_way_or_is_too_large_is_not_believed(pair):
    supervisor_end, agent_end = pair
    supervisor_end.sendall(sup.OUTCOME_LENGTH.pack(1 << 30))
    with pytest.raises(ValueError, match="more than one can be"):
        sup.receive_outcome(agent_end, bytearray(), 1 << 20)  # nothing allocated for it
    message = sup.outcome_message(sup._encode(_outcome()))
    a, b = socket.socketpair()
    try:
        a.sendall(message[1:30])
        a.close()
        heard = bytearray()
        with pytest.raises(EOFError):
            sup.receive_outcome(b, heard, 1 << 20)
    finally:
        b.close()


def _supervisor(tmp_path, channel):
    run_dir = tmp_path / "run"
    sup.make_spare(run_dir)
    inv = Invocation("inv-1", "cmd-1", "i-1", "doc", "1", "sha", [Step("s1", script="true")],
                     issued_at=0.0, expires_at=0.0)
    return sup.Supervisor(sup.Launch(inv, str(run_dir), "Linux", 4096), dict(os.environ), channel), run_dir


def test_the_outcome_file_stays_the_way_when_it_can_be_written(tmp_path, pair):
    supervisor_end, agent_end = pair
    worker, run_dir = _supervisor(tmp_path, supervisor_end)
    assert worker._write_outcome(_outcome()) == 0
    assert sup.read_outcome(run_dir) == _outcome() and not worker.outcome_sent
    agent_end.setblocking(False)
    with pytest.raises(BlockingIOError):
        agent_end.recv(1)  # nothing on the socket: the zygote's loop says D


def test_an_outcome_the_run_directory_cannot_take_goes_on_the_socket(tmp_path, pair):
    supervisor_end, agent_end = pair
    worker, run_dir = _supervisor(tmp_path, supervisor_end)
    (run_dir / "outcome.tmp").unlink()
    (run_dir / "outcome.tmp").mkdir()
    assert worker._write_outcome(_outcome()) == 0 and worker.outcome_sent
    assert sup.read_outcome(run_dir) is None
    assert agent_end.recv(1) == sup.CHANNEL_OUTCOME
    got = sup.decode_outcome(sup.receive_outcome(agent_end, bytearray(), 1 << 20))
    said = "[output may be cut: the run directory could not take the result (Is a directory); "
    assert got.result.exit_code == 7 and got.kept == _outcome().kept
    assert got.result.stderr.startswith(said) and got.result.steps[0].stderr == got.result.stderr


def test_with_no_agent_to_take_it_the_outcome_is_lost_as_before(tmp_path, pair):
    supervisor_end, agent_end = pair
    agent_end.close()
    worker, run_dir = _supervisor(tmp_path, supervisor_end)
    (run_dir / "outcome.tmp").unlink()
    (run_dir / "outcome.tmp").mkdir()
    with pytest.raises(IsADirectoryError):  # the zygote's child says it, and exits without an outcome
        worker._write_outcome(_outcome())
    assert not worker.outcome_sent
