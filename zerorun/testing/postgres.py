"""A throwaway PostgreSQL server for tests and benchmarks.

``initdb`` and ``pg_ctl`` from the system's server package (``/usr/lib/postgresql/*/bin``, or
``$ZERORUN_PG_BINDIR``) build and start a cluster in a temporary directory, listening on a free
port on 127.0.0.1 only. ``initdb`` refuses to run as root, so as root the binaries run as the
unprivileged ``postgres`` user (``runuser -u postgres --``) in a directory handed to that user.
A login role and a database it owns are created; the role's password is in a 0600 file (what
``zerorun-broker --store-password-file`` reads). Administration goes through the cluster's own
Unix socket in that private directory (trust), the role's connections through TCP with SCRAM.

``start()`` raises ``PostgresUnavailable`` with the exact reason when no server can be started
here, so that a test can skip saying why. The postmaster is stopped by its pid (``stop()``,
``close()``); ``start()`` again brings the same cluster back on the same port.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

RUN_AS = "postgres"
BINDIR_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started on this machine; the message says why."""


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl: $ZERORUN_PG_BINDIR, the newest Debian-style
    versioned directory, or wherever initdb is on PATH."""
    explicit = os.environ.get("ZERORUN_PG_BINDIR")
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = sorted((Path(p) for p in glob.glob(BINDIR_GLOB)), key=lambda p: _version_key(p.parent.name),
                            reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    where = f"$ZERORUN_PG_BINDIR ({explicit})" if explicit else f"{BINDIR_GLOB} or PATH"
    raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) in {where}; "
                              "install the server package (Debian: apt-get install postgresql)")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster: ``start()``, ``dsn()``, ``password_file``, ``create_database()``, ``stop()``,
    ``close()``. As a context manager it starts and closes itself."""

    def __init__(self, *, user: str = "zerorun", database: str = "zerorun", durable: bool = False,
                 base_dir: str | None = None):
        self.user = user
        self.database = database
        # Tests never survive a power cut, so fsync is off by default (a crash of the server
        # process still loses nothing committed: the WAL reaches the kernel at every commit).
        # Benchmarks pass durable=True to measure what a real deployment pays.
        self.durable = durable
        self.base_dir = base_dir
        self.root: Path | None = None
        self.port = 0
        self.pid = 0
        self.password = ""
        self.bindir: Path | None = None
        self._run_as: pwd.struct_passwd | None = None

    # -- paths --------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self.root is None:
            raise RuntimeError("the server was never started")
        return self.root / name

    @property
    def data_dir(self) -> Path:
        return self._path("data")

    @property
    def socket_dir(self) -> Path:
        return self._path("socket")

    @property
    def password_file(self) -> Path:
        return self._path("password")

    @property
    def log_file(self) -> Path:
        return self._path("postgres.log")

    def dsn(self, database: str | None = None) -> str:
        """The role's DSN, without its password (that is in ``password_file``)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> "PostgresServer":
        """Creates the cluster on first call (then the role and database), or starts it again."""
        if self.root is None:
            self._create()
            try:
                self._start_postmaster()
                self._create_role_and_database()
            except BaseException:
                self.close()
                raise
        elif not self.running():
            self._start_postmaster()
        return self

    def running(self) -> bool:
        return self.pid > 0 and _alive(self.pid)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stops the postmaster by its pid: ``fast`` (SIGINT: sessions end, a clean shutdown) or
        ``immediate`` (SIGQUIT: no shutdown checkpoint, recovery at the next start, as after a
        crash). The cluster stays and ``start()`` brings it back."""
        if not self.running():
            self.pid = 0
            return
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "smart": signal.SIGTERM}[mode]
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline += 10
            time.sleep(0.05)
        self.pid = 0

    def close(self) -> None:
        """Stops the server and removes its directory."""
        if self.root is None:
            return
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- databases ----------------------------------------------------------------------------

    def admin(self, database: str = "postgres") -> Any:
        """A superuser connection through the cluster's private Unix socket (autocommit)."""
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                               dbname=database, autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> str:
        """A new, empty database owned by the role; returns its DSN."""
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                       sql.Identifier(self.user)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- helpers ------------------------------------------------------------------------------

    def _create(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise PostgresUnavailable("psycopg is not installed (pip install 'zerorun[postgresql]')") from None
        self.bindir = find_bindir()
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(RUN_AS)
            except KeyError:
                raise PostgresUnavailable(f"running as root and there is no {RUN_AS!r} user to run initdb "
                                          "as (initdb refuses root)") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable(f"running as root and there is no runuser to switch to {RUN_AS!r} "
                                          "(initdb refuses root)")
        # Not under pytest's tmp_path: its parents are 0700 root, which postgres cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="zerorun-pg-", dir=self.base_dir))
        self.socket_dir.mkdir()
        if self._run_as is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
            check = self._run([f"test -x {self.root} && test -w {self.root}"], shell=True, timeout=30)
            if check.returncode != 0:
                raise PostgresUnavailable(f"user {RUN_AS!r} cannot enter {self.root} (a parent directory "
                                          "is closed to it); set TMPDIR to a directory it can reach")
        self.password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.password + "\n")
        init = self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                          "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                          "--no-sync", "--no-instructions"], timeout=120)
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed (exit {init.returncode}): {_tail(init.stdout)}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
            "logging_collector": "off",
        }
        if not self.durable:  # a server killed by a test leaves no segment in /dev/shm: they live in the cluster
            settings["dynamic_shared_memory_type"] = "mmap"
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# zerorun.testing.postgres\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_postmaster(self) -> None:
        assert self.bindir is not None
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
            proc = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                              "-o", f"-p {self.port}", "-w", "-t", "60", "start"], timeout=90)
            if proc.returncode == 0:
                self.pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
                return
            if "could not bind" not in self.log()[-2000:]:
                break
        raise PostgresUnavailable(f"pg_ctl start failed (exit {proc.returncode}): {_tail(proc.stdout)} "
                                  f"{_tail(self.log())}")

    def _create_role_and_database(self) -> None:
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(self.user), sql.Literal(self.password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(self.database), sql.Identifier(self.user)))

    def _run(self, args: list[str], *, timeout: float, shell: bool = False) -> subprocess.CompletedProcess[str]:
        if shell:
            args = ["sh", "-c", args[0]]
        if self._run_as is not None:
            args = ["runuser", "-u", self._run_as.pw_name, "--", *args]
        try:
            return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, cwd=str(self.root) if self.root else None)
        except OSError as exc:
            raise PostgresUnavailable(f"cannot run {args[0]}: {exc.strerror}") from None


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (the postmaster is not our child, so its
    exit is seen here, not by waitpid)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
