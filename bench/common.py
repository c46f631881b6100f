"""Shared machinery of the benchmarks: a broker on 127.0.0.1, simulated fleets, figures, JSON.

Every benchmark bounds its own run time (``Bench(max_seconds=...)``: a watchdog stops every process
the benchmark started, by pid, and exits) and stops everything it started when it ends.
"""

from __future__ import annotations

import compileall
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zerorun.testing import LocalFleet  # noqa: E402

PYTHON = sys.executable


# --------------------------------------------------------------------------------------------
# figures


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "min": min(values) if values else float("nan"),
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else float("nan"),
            "mean": sum(values) / len(values) if values else float("nan")}


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform(),
            "git_revision": git_revision(), "loadavg_at_start": [round(x, 2) for x in load]}


def write_result(name: str, figures: dict[str, Any], params: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    doc = {"benchmark": name, "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(), "params": params or {}, "figures": figures}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1000.0


# --------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_stats() -> dict[int, list[str]]:
    """Every live process's /proc/<pid>/stat fields after the command name (field 3 on: state,
    ppid, ...; utime, stime, cutime, cstime are [11:15])."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return stats


def cluster_cpu_seconds(postmaster_pid: int) -> float:
    """CPU of a PostgreSQL cluster: the postmaster, its live children (backends, WAL writer,
    checkpointer...) and the children it has already reaped (cutime + cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid, fields in proc_stats().items():
        if pid == postmaster_pid:
            total += sum(int(x) for x in fields[11:15]) / tick
        elif int(fields[1]) == postmaster_pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process and its descendants, live ones and those already reaped (cutime, cstime):
    e.g. an agent, its zygote, the supervisors and their steps."""
    stats = proc_stats()
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])
            todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def start_postgres(bench: "Bench") -> tuple[Any, list[str]]:
    """A durable (fsync on, PostgreSQL's defaults) throwaway server, stopped by ``bench.close()``;
    returns it and the broker flags that put the broker's store there."""
    from zerorun.testing.postgres import PostgresServer

    server = PostgresServer(durable=True)
    bench.cleanups.append(server.close)
    server.start()
    return server, ["--store", server.dsn(), "--store-password-file", str(server.password_file)]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------------------------
# the harness


class BenchTimeout(Exception):
    pass


class Simulator:
    """A ``agent.fleetsim`` subprocess; ``wait_welcomed`` reads its status line."""

    def __init__(self, proc: subprocess.Popen[str], n: int, log_path: Path):
        self.proc = proc
        self.n = n
        self.log_path = log_path
        self._line: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("fleetsim: all"):
                self._line = line.strip()
                self._ready.set()
        self._ready.set()

    def wait_welcomed(self, timeout: float) -> str:
        if not self._ready.wait(timeout) or self._line is None:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise BenchTimeout(f"simulator ({self.n} agents) not all welcomed within {timeout:g}s "
                               f"(exit {self.proc.poll()}):\n{tail}")
        return self._line

    def stop(self, timeout: float = 30) -> None:
        _stop_pid(self.proc, timeout)


class Bench:
    """A broker (LocalFleet, --auto-accept) plus simulated fleets, all stopped by ``close()``.

    ``max_seconds`` bounds the whole benchmark: past it a watchdog stops every process started here
    and exits the benchmark with status 124.
    """

    def __init__(self, name: str, *, heartbeat_interval: float = 5.0, max_seconds: float = 600,
                 log_level: str = "warning", keep: bool = False):
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"zerorun-bench-{name}-"))
        self.fleet = LocalFleet(self.root, auto_accept=True, heartbeat_interval=heartbeat_interval,
                                log_level=log_level)
        self.sims: list[Simulator] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.cleanups: list[Any] = []  # callables run by close(), last added first (a PostgreSQL server)
        self.keep = keep
        self._closed = False
        self._watchdog = threading.Timer(max_seconds, self._expired, args=(max_seconds,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expired(self, limit: float) -> None:
        print(f"bench {self.name}: time limit of {limit:g}s reached; stopping everything", file=sys.stderr,
              flush=True)
        self.close()
        os._exit(124)

    def start_broker(self, *extra: str) -> int:
        self.fleet.start_broker(*extra)
        assert self.fleet.broker is not None
        return self.fleet.broker.pid

    @property
    def broker_pid(self) -> int:
        assert self.fleet.broker is not None
        return self.fleet.broker.pid

    def start_sim(self, n: int, *, executor: str = "noop", prefix: str = "sim", tags: dict[str, str] | None = None,
                  broker: str | None = None,
                  spread: dict[str, Sequence[str]] | None = None, extra: Sequence[str] = (),
                  wait: float | None = 120) -> Simulator:
        args = [PYTHON, "-m", "agent.fleetsim", "--broker", broker or self.fleet.agent_endpoint,
                "--broker-key", str(self.fleet.broker_key), "-n", str(n), "--prefix", prefix,
                "--executor", executor, "--log-level", "info"]
        for k, v in (tags if tags is not None else {"role": "web"}).items():
            args += ["--tag", f"{k}={v}"]
        for k, values in (spread or {}).items():
            args += ["--tag-spread", f"{k}={','.join(values)}"]
        args += list(extra)
        log_path = self.root / f"fleetsim-{prefix}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ROOT),
                                env=self.fleet.env())
        log.close()
        sim = Simulator(proc, n, log_path)
        self.sims.append(sim)
        if wait:
            sim.wait_welcomed(wait)
            self.wait_online(n, prefix, timeout=wait)
        return sim

    def wait_online(self, n: int, prefix: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        client = self.fleet.client(timeout=60)
        while True:
            views = client.instances(include_offline=False)
            online = sum(1 for v in views if v.instance_id.startswith(prefix + "-") and v.ping_status == "Online")
            if online >= n:
                return
            if time.monotonic() > deadline:
                raise BenchTimeout(f"only {online}/{n} {prefix} instances Online after {timeout:g}s")
            time.sleep(0.2)

    def client(self, timeout: float = 60):
        from zerorun.client import Client, ClientConfig

        return Client(ClientConfig.load(self.fleet.client_config), timeout=timeout)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(args), **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        for proc in self.procs:
            _stop_pid(proc, 10)
        for sim in self.sims:
            sim.stop()
        try:
            self.fleet.close()
        except Exception as exc:  # a broker that will not stop is killed by LocalFleet
            print(f"bench {self.name}: closing the fleet: {exc}", file=sys.stderr)
        while self.cleanups:
            self.cleanups.pop()()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Bench":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stop_pid(proc: subprocess.Popen[Any], timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def report(name: str, rows: list[Sequence[Any]], headers: Sequence[str], figures: dict[str, Any],
           params: dict[str, Any]) -> Path:
    print(table(rows, headers))
    path = write_result(name, figures, params)
    print(f"\nresults: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


@contextlib.contextmanager
def byte_compiled(*packages: str) -> Iterator[None]:
    """The project's ``packages`` compiled into their ``__pycache__`` (git ignores them), as pip
    compiles an installed package, for the duration; the directories made here are removed
    afterwards, so the checkout is left as it was found. Where ``PYTHONDONTWRITEBYTECODE`` is set
    (this machine) a checkout has no byte code otherwise, and every process compiles what it
    imports. Installed dependencies and the standard library have their compiled modules already."""
    def dirs() -> set[Path]:
        return {p for package in packages for p in (ROOT / package).rglob("__pycache__")}

    before = dirs()
    try:
        for package in packages:
            compileall.compile_dir(ROOT / package, quiet=1)
        yield
    finally:
        for directory in dirs() - before:
            shutil.rmtree(directory, ignore_errors=True)


PROJECT_PACKAGES = ("zerorun", "zmq_broker", "agent")


@contextlib.contextmanager
def installed_project() -> Iterator[Path]:
    """A throwaway venv in which the project is laid out as its wheel installs it: its packages
    copied into the venv's ``site-packages`` and byte-compiled, its dependencies taken from this
    interpreter's ``site-packages`` (a ``.pth`` line). Yields the venv's directory; its
    ``bin/zerorun`` is the console script pip writes. A checkout's editable install differs from
    what an operator runs: its finder is imported at every interpreter start (13-16 ms here)."""
    import site
    import sysconfig

    with tempfile.TemporaryDirectory(prefix="zerorun-installed-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        for package in PROJECT_PACKAGES:
            shutil.copytree(ROOT / package, purelib / package, ignore=shutil.ignore_patterns("__pycache__"))
            compileall.compile_dir(purelib / package, quiet=1)
        (purelib / "zerorun-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        script = venv / "bin" / "zerorun"
        script.write_text(f"#!{venv}/bin/python\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
                          "from zerorun.cli import entry\nif __name__ == '__main__':\n"
                          "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                          "    sys.exit(entry())\n")
        script.chmod(0o755)
        yield venv
