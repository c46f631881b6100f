"""A full disk for real: a small tmpfs of its own, filled and freed (mounting one takes root:
the test is skipped without, saying so)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


class SmallDisk:
    def __init__(self, path: Path, inodes: int | None = None):
        self.path = path
        self.inodes = inodes

    def fill(self) -> None:
        """No byte left; and, on a disk of few ``inodes``, no file or directory can be made
        either (a tmpfs makes those with no room for bytes)."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        if self.inodes is not None:
            (self.path / "fillers").mkdir(exist_ok=True)
            try:
                for n in range(self.inodes):
                    os.close(os.open(self.path / "fillers" / str(n), os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc

    def free(self) -> None:
        (self.path / "filler").unlink()
        if self.inodes is not None:
            for path in (self.path / "fillers").iterdir():
                path.unlink()


@contextlib.contextmanager
def small_disk_at(path: Path, size: str = "2m", inodes: int | None = None) -> Iterator[SmallDisk]:
    """A tmpfs of ``size`` (and at most ``inodes`` files and directories) mounted on ``path``
    (made if missing) while the block runs; what writes there should stop before it ends."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes is not None else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (it takes root): {done.stderr.strip()}")
    try:
        yield SmallDisk(path, inodes)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
