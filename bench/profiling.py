"""py-spy (sampling, attaches by pid) around a benchmark phase, summarised as top self/inclusive costs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


class Profiler:
    """``with Profiler(pid, out) as prof: ...`` then ``prof.summary()``; a no-op without py-spy."""

    def __init__(self, pid: int, out: Path, rate: int = 250, gil: bool = True):
        """``gil``: sample only the thread that holds the GIL, so the summary shows where the
        Python time goes; without it a loop waiting in ``poll`` counts as busy, and the profile
        of the broker's main thread looked flat (bench/README.md, round ten)."""
        self.pid = pid
        self.out = out
        self.rate = rate
        self.gil = gil
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""

    def __enter__(self) -> "Profiler":
        exe = py_spy()
        if exe is None:
            self.error = "py-spy not installed (pip install py-spy)"
            return self
        self.proc = subprocess.Popen([exe, "record", "-p", str(self.pid), "-o", str(self.out), "-f", "raw",
                                      "-r", str(self.rate), "--nonblocking", *(["--gil"] if self.gil else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.out.exists():
            self.error = (self.proc.stderr.read().decode(errors="replace")[-500:] if self.proc.stderr else "")
        if self.proc.stderr:
            self.proc.stderr.close()

    def summary(self, top: int = 15) -> dict[str, Any]:
        if not self.out.exists():
            return {"error": self.error or "no profile"}
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
        skip = ("<module>", "_run_code", "_run_module_as_main", "main (")
        return {
            "samples": total, "rate_hz": self.rate,
            "busy_seconds": round(total / self.rate, 2),
            "top_self": [[f, round(100.0 * c / total, 1)] for f, c in own.most_common(top)],
            "top_inclusive": [[f, round(100.0 * c / total, 1)] for f, c in incl.most_common(top + 12)
                              if not f.startswith(skip)][:top],
        }
