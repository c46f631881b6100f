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
    def __init__(self, path: Path):
        self.path = path

    def fill(self) -> None:
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / "filler").unlink()


@contextlib.contextmanager
def small_disk_at(path: Path, size: str = "2m") -> Iterator[SmallDisk]:
    """A tmpfs of ``size`` mounted on ``path`` (made if missing) while the block runs; what
    writes there should stop before it ends."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (it takes root): {done.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
