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
