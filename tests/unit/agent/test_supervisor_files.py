"""The supervisor's run-directory files: opened without O_TRUNC (ext4 flushes a truncated file
when it is closed), so what must be empty is made empty by ``_open_empty`` itself."""

from __future__ import annotations

import os

from agent import supervisor


def test_a_leftover_file_is_emptied_and_an_empty_one_left_as_it_is(tmp_path):
    leftover = tmp_path / "00.stdout"
    leftover.write_bytes(b"output of the run before the reboot\n")
    fd = supervisor._open_empty(leftover, supervisor._OPEN_RW, 0o600)
    try:
        os.write(fd, b"new\n")
    finally:
        os.close(fd)
    assert leftover.read_bytes() == b"new\n"

    supervisor.make_spare(tmp_path / "spare")
    for name, mode in supervisor.SPARE_FILES:
        path = tmp_path / "spare" / name
        assert path.stat().st_size == 0 and path.stat().st_mode & 0o777 == mode
        os.close(supervisor._open_empty(path, supervisor._OPEN, 0o600))
        assert path.stat().st_size == 0 and path.stat().st_mode & 0o777 == mode  # the spare's mode stays


def test_a_missing_file_is_made_with_its_mode(tmp_path):
    path = tmp_path / "01_script.sh"
    os.close(supervisor._open_empty(path, supervisor._OPEN, 0o700))
    assert path.stat().st_size == 0 and path.stat().st_mode & 0o777 == 0o700


class _JumpingClock:
    """The ``time`` module as the supervisor sees it, with a wall clock that NTP steps back by a
    day once ``jump()`` is called (a machine that booted with its clock ahead); the monotonic
    clock goes on as it does."""

    def __init__(self) -> None:
        import time

        self._time = time
        self.offset = 0.0
        self.monotonic, self.sleep = time.monotonic, time.sleep

    def jump(self) -> None:
        self.offset = -86400.0

    def time(self) -> float:
        return self._time.time() + self.offset


def test_a_wall_clock_stepped_back_does_not_stretch_the_step_timeout(tmp_path, monkeypatch):
    """The step's deadline was wall-clock time: a clock stepped back while a step ran let it run
    past its timeoutSeconds by the size of the step (a day here: the step ran to its end). The
    deadline is now on the monotonic clock."""
    from zerorun.protocol import Invocation, Step

    clock = _JumpingClock()
    monkeypatch.setattr(supervisor, "time", clock)
    run_dir = tmp_path / "run"
    supervisor.make_spare(run_dir)
    marker = tmp_path / "started"
    step = Step("s1", script=f"touch {marker}; sleep 4; echo done", timeout_seconds=1)
    inv = Invocation("inv-1", "cmd-1", "i-1", "doc", "1", "sha", [step], issued_at=0.0, expires_at=0.0)
    sup = supervisor.Supervisor(supervisor.Launch(inv, str(run_dir), "Linux", 4096, kill_grace=1.0),
                                dict(os.environ))
    sup._write_identity()
    sup._wake_r, wake_w = os.pipe()
    import threading

    def jump_once_started() -> None:
        while not marker.exists():
            clock.sleep(0.01)
        clock.jump()

    jumper = threading.Thread(target=jump_once_started)
    jumper.start()
    started = clock.monotonic()
    try:
        result = sup._run_step(0, step)
    finally:
        jumper.join()
        for fd in (sup._wake_r, wake_w, sup._identity_fd):
            os.close(fd)
    assert (result.status, result.stdout) == ("TimedOut", ""), (result.status, result.stdout)
    assert clock.monotonic() - started < 3.5


def test_the_output_cap_counts_the_steps_run_before_a_reboot(tmp_path):
    """A result carries each stream up to the cap for all its steps together; after a reboot the
    steps run before it are in the result too, and were not counted: a resumed invocation could
    carry twice the cap (and, not UTF-8 on both streams, outgrow a message)."""
    from agent import steps as flow
    from zerorun.protocol import Invocation, Step, StepResult

    inv = Invocation("inv-1", "cmd-1", "i-1", "doc", "1", "sha", [Step("s0"), Step("s1")], issued_at=0.0,
                     expires_at=0.0)
    before = StepResult("s0", "Success", exit_code=0, stdout="x" * 900, stderr="\u00e9" * 300)  # 600 bytes
    run_dir = tmp_path / "run"
    supervisor.make_spare(run_dir)
    sup = supervisor.Supervisor(supervisor.Launch(inv, str(run_dir), "Linux", 1000,
                                                  resume=flow.Resume(1, [before])), dict(os.environ))
    path = tmp_path / "out"
    path.write_bytes(b"y" * 500)
    fd = os.open(path, os.O_RDONLY)
    try:
        stdout, size = sup._read_capped(fd, "01.stdout", "stdout")
        stderr, _ = sup._read_capped(fd, "01.stderr", "stderr")
    finally:
        os.close(fd)
    assert size == 500 and stdout.startswith("y" * 100 + "\n[output truncated by the agent: 500 bytes in all, 100 kept]")
    assert stderr.startswith("y" * 400 + "\n[output truncated by the agent: 500 bytes in all, 400 kept]")
    assert sup._output_whole == {"stdout": False, "stderr": False}, "the rest is served from the kept files"
