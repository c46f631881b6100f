"""The multiplexer's control path against another local user (issue 17 section 4, issue 16 9.1).

Every attacker here is a real second user created for the module (``useradd``), running as its
own process (tests/integration/mux_attacker.py: started as root, it drops to that user's uid and
gid for good before it does anything). The victim is this test process (root) using the real
multiplexer in front of a real broker and agent. Without root, or without ``useradd``, the
module is skipped with the reason.

The attacks: (a) pre-create or symlink the control directory, or plant files in it; (b) race a
symlink flip or a directory exchange on the control path while the victim attaches and runs
``exec`` (a positive control shows the same race does reach a fake multiplexer through a check
that follows the path); (c) connect to the real multiplexer; (d) run a fake multiplexer for a
client to talk to; and a planted module in the working directory of the process that starts
the multiplexer.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import zmq

from zerorun import mux, protocol
from zerorun.client import ClientConfig
from zerorun.testing import LocalFleet

HELPER = Path(__file__).with_name("mux_attacker.py")
RACE_ROUNDS = int(os.environ.get("ZERORUN_MUX_RACE_ROUNDS", "300"))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the multiplexer's guards are Linux's (/proc/self/fd, SO_PEERCRED)")


class Part:
    """One attacker process; its JSON lines arrive on a queue."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_for(self, key: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        for record in self.seen:
            if key in record:
                return record
        while True:
            try:
                record = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the attacker did not report {key!r} within {timeout}s: {self.seen}") from None
            if record is None:
                raise AssertionError(f"the attacker exited ({self.proc.wait()}) without {key!r}: {self.seen}")
            self.seen.append(record)
            if key in record:
                return record

    def stop(self, key: str) -> dict:
        """SIGTERM, then its totals (the record holding ``key``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_for(key)

    def requests(self) -> list[dict]:
        return [r for r in self.seen if "request" in r]


class Attacker:
    """A second local user and the processes it runs (each stopped by pid at the end)."""

    def __init__(self, name: str):
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.parts: list[Part] = []

    def start(self, action: str, *args: str, pass_fds: tuple[int, ...] = ()) -> Part:
        proc = subprocess.Popen([sys.executable, str(HELPER), str(self.uid), str(self.gid), action, *map(str, args)],
                                stdout=subprocess.PIPE, text=True, pass_fds=pass_fds, cwd="/")
        part = Part(proc)
        self.parts.append(part)
        return part

    def run(self, action: str, *args: str) -> dict:
        """Runs one action to its end; everything it reported, in one dict."""
        part = self.start(action, *args)
        part.wait_for("done" if action in ("symlink", "mkdir", "write") else "events")
        part.proc.wait(10)
        return {k: v for record in part.seen for k, v in record.items()}

    def stop_all(self) -> None:
        for part in self.parts:
            if part.proc.poll() is None:
                part.proc.send_signal(signal.SIGTERM)
        for part in self.parts:
            try:
                part.proc.wait(10)
            except subprocess.TimeoutExpired:
                part.proc.kill()
                part.proc.wait()
            part.reader.join(5)
            part.proc.stdout.close()
        self.parts.clear()


@pytest.fixture(scope="module")
def attacker():
    if os.geteuid() != 0:
        pytest.skip("the attacker tests create a second local user (useradd), which needs root: "
                    "run them as root in a throwaway VM or container")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if not useradd or not userdel:
        pytest.skip("useradd/userdel not installed: cannot create the second local user")
    name = f"zrmux{secrets.token_hex(3)}"
    made = subprocess.run([useradd, "--no-create-home", "--user-group", "--shell", "/bin/false", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a local user here: {made.stderr.strip()}")
    user = Attacker(name)
    try:
        yield user
    finally:
        user.stop_all()
        removed = subprocess.run([userdel, name], capture_output=True, text=True)
        if removed.returncode != 0:
            warnings.warn(f"the test user {name} could not be removed: {removed.stderr.strip()}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("mux-security-fleet"))
    try:
        fleet.start_broker()
        fleet.start_agents({"web-1": {"role": "web"}})
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def config(fleet) -> ClientConfig:
    return ClientConfig.load(fleet.client_config)


@pytest.fixture
def base(attacker):
    """A directory both users can reach (pytest's tmp_path is under a root-only directory), with
    ``attacker-owned``: a directory of the attacker's, and every multiplexer stopped at the end."""
    root = Path(tempfile.mkdtemp(prefix="zr-mux-sec-"))
    root.chmod(0o755)
    owned = root / "attacker-owned"
    owned.mkdir(mode=0o755)
    os.chown(owned, attacker.uid, attacker.gid)
    try:
        yield root
    finally:
        attacker.stop_all()
        for directory in [root, *root.rglob("*")]:
            if directory.is_dir() and not directory.is_symlink() and directory.stat().st_uid == 0:
                try:
                    mux.stop_all(directory)
                except mux.MuxError:
                    pass
        shutil.rmtree(root, ignore_errors=True)


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def root_only_file(path: Path) -> tuple[Path, bytes]:
    content = b"root only: must never be truncated, appended to or locked by the multiplexer\n"
    path.write_bytes(content)
    path.chmod(0o600)
    return path, content


def exec_through(config: ClientConfig, directory: Path, nonce: str) -> bytes:
    client = mux.attach(config, directory, persist=10, timeout=10, start_timeout=10)
    try:
        return client.exec("web-1", f"echo {nonce}").stdout
    finally:
        client.close()


# -- (a) the control directory or its files, prepared by the attacker ----------------------------

@pytest.mark.parametrize("how", ["pre-created 0777", "pre-created private to the attacker",
                                 "symlink to the victim's private directory",
                                 "symlink to the attacker's directory"])
def test_a_control_directory_the_attacker_made_or_linked_is_refused(attacker, base, config, how):
    owned = base / "attacker-owned"
    victim_dir = private_dir(base / "victim-cp")
    control = owned / "cp"
    fake = None
    if how.startswith("pre-created"):
        attacker.run("mkdir", control, "0777" if "0777" in how else "0700")
        fake = attacker.start("fake-mux", control, mux.control_name(config)) if "0777" in how else None
        expected = f"must be owned by uid 0 and private (mode 0700), not uid {attacker.uid}"
    else:
        evil = owned / "evil"
        attacker.run("mkdir", evil, "0755")
        fake = attacker.start("fake-mux", evil, mux.control_name(config))
        attacker.run("symlink", victim_dir if "victim" in how else evil, control)
        expected = "is a symbolic link: refused"
    if fake is not None:
        fake.wait_for("ready")

    with pytest.raises(mux.MuxError) as refused:
        mux.attach(config, control, persist=5, timeout=5, start_timeout=5)
    assert expected in str(refused.value)
    assert list(victim_dir.iterdir()) == []  # nothing created through a link either
    if control.is_dir() and not control.is_symlink():
        assert all(p.stat().st_uid == attacker.uid for p in control.iterdir())  # the victim wrote nothing there
    if fake is not None:
        assert fake.stop("requests")["requests"] == 0


@pytest.mark.parametrize("planted", [".users symlink", ".lock symlink", ".log symlink",
                                     "fake multiplexer (.lock held, .sock)", ".sock alone"])
def test_files_planted_in_the_control_directory_are_refused_never_followed(attacker, base, config, planted):
    """The victim's directory was left open (0777) for a while; the attacker planted something;
    the victim made it private again. Nothing planted is followed, used or trusted."""
    target, content = root_only_file(base / "root-only")
    control = base / "victim-cp"
    control.mkdir()
    control.chmod(0o777)
    name = mux.control_name(config)
    fake = None
    if planted.endswith("symlink"):
        suffix = planted.split()[0]
        attacker.run("symlink", target, control / f"{name}{suffix}")
        expected = f"{name}{suffix} is a symbolic link: refused"
    else:
        fake = attacker.start("fake-mux", control, name)
        fake.wait_for("ready")
        if planted == ".sock alone":
            (control / f"{name}.lock").unlink()  # no lock: the victim would start its own
        expected = f"belongs to uid {attacker.uid}, not to uid 0: refused"
    control.chmod(0o700)
    stamp = target.stat()

    with pytest.raises(mux.MuxError) as refused:
        mux.attach(config, control, persist=5, timeout=5, start_timeout=5)
    assert expected in str(refused.value)
    assert target.read_bytes() == content and target.stat().st_mtime_ns == stamp.st_mtime_ns
    if fake is not None:
        assert fake.stop("requests")["requests"] == 0


# -- (b) a race on the control path ------------------------------------------------------------

def _naive_reaches_fake(control: Path, name: str, budget: float = 30.0) -> int:
    """The check the issue broke, as a positive control: stat() the directory (following links),
    then connect by path. Returns the try on which the fake multiplexer answered (0: never)."""
    ctx = zmq.Context()
    deadline = time.monotonic() + budget
    try:
        for attempt in itertools.count(1):
            if time.monotonic() > deadline:
                return 0
            try:
                st = os.stat(control)
            except OSError:
                continue
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                continue
            dealer = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.connect(f"ipc://{control}/{name}.sock")
            dealer.send_multipart(protocol.frames(protocol.Ping(rid=attempt)))
            if dealer.poll(200):
                reply = protocol.reply_decoder.decode(dealer.recv_multipart()[-1])
                if isinstance(reply.data, dict) and reply.data.get("forged"):
                    dealer.close(0)
                    return attempt
            dealer.close(0)
    finally:
        ctx.term()


@pytest.mark.parametrize("mode", ["symlink", "parent symlink", "exchange"])
def test_a_race_on_the_control_path_sends_nothing_to_a_fake_multiplexer(attacker, base, config, fleet, mode):
    """Issue 17: flipping a symlink between the checks sent 4,474 of 8,403 exec requests to the
    attacker's fake multiplexer. ``symlink``: the control path flips between symlinks to the
    victim's private directory and to the attacker's. ``parent symlink``: the same one level up
    (the control directory itself is a real directory either way). ``exchange``: the victim's own
    directory sits in a parent the attacker owns, which keeps swapping it with its own
    (renameat2 RENAME_EXCHANGE)."""
    owned = base / "attacker-owned"
    name = mux.control_name(config)
    if mode == "parent symlink":
        attacker.run("mkdir", owned / "evil-parent", "0755")
        evil = owned / "evil-parent" / "cp"
        victim_parent = base / "victim-parent"
        victim_parent.mkdir(mode=0o755)
        victim_dir = private_dir(victim_parent / "cp")
        control = owned / "link" / "cp"
    else:
        evil = owned / "evil"
        control = owned / "cp"
    attacker.run("mkdir", evil, "0755")
    fake = attacker.start("fake-mux", evil, name)
    fake.wait_for("ready")
    if mode == "symlink":
        victim_dir = private_dir(base / "victim-cp")
        flipper = attacker.start("flip-symlink", control, victim_dir, evil)
    elif mode == "parent symlink":
        flipper = attacker.start("flip-symlink", owned / "link", victim_parent, owned / "evil-parent")
    else:
        victim_dir = private_dir(control)  # as the victim's own mkdir in that parent would make it
        flipper = attacker.start("flip-exchange", control, evil)
    time.sleep(0.2)  # let it spin (it runs until stopped)
    assert flipper.proc.poll() is None, flipper.seen

    control_hit = _naive_reaches_fake(control, name)
    assert control_hit, ("the positive control never reached the fake: the race rig is not racing "
                         f"(flipper: {flipper.proc.poll()} {flipper.seen}, fake: {fake.proc.poll()} {fake.seen})")

    genuine = refused = forged = 0
    reasons: set[str] = set()
    for round_ in range(RACE_ROUNDS):
        nonce = f"n{round_}-{secrets.token_hex(4)}"
        try:
            out = exec_through(config, control, nonce)
        except mux.MuxError as exc:
            refused += 1
            reasons.add(str(exc).split(":")[-1].strip()[:60])
            continue
        if out == f"{nonce}\n".encode():
            genuine += 1
        else:
            forged += 1
    flips = flipper.stop("flips")["flips"]
    fake.stop("requests")
    received = sum(1 for r in fake.requests() if r["request"] == "Exec")  # the control sent Pings
    print(f"mode={mode} rounds={RACE_ROUNDS} flips={flips} genuine={genuine} refused={refused} forged={forged} "
          f"fake_received={received} positive_control_hit_on_try={control_hit} reasons={sorted(reasons)}")
    assert received == 0 and forged == 0
    assert genuine + refused == RACE_ROUNDS
    if mode == "symlink":
        assert genuine == 0  # the control path is a symlink every time: always refused
    else:  # the victim's directory (whatever its name now) still serves the victim
        mine = victim_dir if mode == "parent symlink" else next(d for d in (control, evil) if d.stat().st_uid == 0)
        assert exec_through(config, mine, "still mine") == b"still mine\n"


# -- (c) another user on the real multiplexer's socket --------------------------------------------

def test_another_user_cannot_use_the_real_multiplexer(attacker, base, config):
    control = private_dir(base / "victim-cp")
    assert exec_through(config, control, "first") == b"first\n"
    name = mux.control_name(config)
    sock = control / f"{name}.sock"
    pid = mux.running_pid(control / name)
    assert pid

    tried = attacker.run("connect", sock, "1")
    assert tried["raw_connect"] == "PermissionError" and not tried["replied"]  # cannot even reach it

    # The victim opens the way by mistake (directory searchable, socket 0777): the socket admits
    # only the victim's uid, at accept, before any ZeroMQ handshake.
    control.chmod(0o711)
    sock.chmod(0o777)
    tried = attacker.run("connect", sock, "2")
    assert tried["raw_connect"] == "connected"  # the kernel let it in; the multiplexer then closed it
    assert not tried["replied"]
    assert "CONNECTED" in tried["events"] and "DISCONNECTED" in tried["events"]
    assert "HANDSHAKE_SUCCEEDED" not in tried["events"]
    control.chmod(0o700)
    assert mux.running_pid(control / name) == pid  # still serving, the victim too:
    assert exec_through(config, control, "after") == b"after\n"


def test_requests_from_another_uid_are_dropped_even_without_the_accept_filter(attacker, base, config):
    """The second guard, for a libzmq without ZMQ_IPC_FILTER_UID: each request's peer uid (from
    the ``Peer-Address`` libzmq reads with SO_PEERCRED) must be the multiplexer's."""
    control = private_dir(base / "victim-cp")
    with mux.open_control_dir(control, create=False) as cdir:
        control.chmod(0o711)  # so that the attacker can reach the socket at all
        multiplexer = mux.Multiplexer(config, cdir, "t", persist=5)
        assert multiplexer.filtered is False
        ctx = zmq.Context()
        front, back, broker = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
        try:
            for s in (front, back, broker):
                s.linger = 0
            front.bind(cdir.endpoint("t.sock"))  # no accept filter
            (control / "t.sock").chmod(0o777)
            broker.bind("inproc://broker-stand-in")
            back.connect("inproc://broker-stand-in")

            tried = attacker.start("connect", control / "t.sock", "3")
            assert front.poll(5000), "the attacker's request did not arrive"
            multiplexer._forward_requests(front, back, time.monotonic())
            assert multiplexer.refused == 1
            assert not broker.poll(200)  # nothing went on to the broker

            mine = ctx.socket(zmq.DEALER)
            mine.linger = 0
            mine.connect(cdir.endpoint("t.sock"))
            mine.send_multipart(protocol.frames(protocol.Ping(rid=7)))
            assert front.poll(5000)
            multiplexer._forward_requests(front, back, time.monotonic())
            assert broker.poll(2000)  # ours went on
            assert mux._rid(broker.recv_multipart()[-1]) == 7
            assert multiplexer.refused == 1
            mine.close(0)
            assert tried.wait_for("events")["replied"] is False
        finally:
            for s in (front, back, broker):
                s.close(0)
            ctx.term()


# -- (d) a fake multiplexer ---------------------------------------------------------------------

def test_a_client_refuses_a_multiplexer_run_by_another_user(attacker, base, config):
    """The socket file is the victim's and the lock is held, but the process that listens on the
    socket is the attacker's (a socket inherited by another user's process): the client reads
    SO_PEERCRED on its connection and sends nothing."""
    control = private_dir(base / "victim-cp")
    name = mux.control_name(config)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        listener.bind(str(control / f"{name}.sock"))
    finally:
        os.umask(old_umask)
    lock = os.open(control / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fake = attacker.start("fake-mux", base / "attacker-owned", name, "--fd", listener.fileno(),
                              pass_fds=(listener.fileno(),))
        fake_pid = fake.wait_for("ready")["pid"]
        os.pwrite(lock, f"{fake_pid}\n".encode(), 0)
        listener.close()
        assert stat.S_ISSOCK((control / f"{name}.sock").stat().st_mode)
        assert (control / f"{name}.sock").stat().st_uid == 0  # the file is ours; the listener is not

        with pytest.raises(mux.MuxError) as refused:
            mux.attach(config, control, persist=5, timeout=5, start_timeout=5)
        assert f"(pid {fake_pid}) runs as uid {attacker.uid}, not uid 0: refused, nothing sent" in str(refused.value)
        assert fake.stop("requests")["requests"] == 0
    finally:
        os.close(lock)


# -- the multiplexer's start ---------------------------------------------------------------------

def test_the_multiplexer_never_imports_from_the_starting_process_working_directory(attacker, base, fleet):
    """``python -m`` puts the working directory first on sys.path; Ansible may run from a
    directory another user can write. The multiplexer starts in "/" instead."""
    workdir = base / "attacker-owned"
    marker = base / "pwned"
    attacker.run("write", workdir / "zmq.py",
                 f"import os\nopen({str(marker)!r}, 'w').write(str(os.geteuid()))\nraise SystemExit(9)\n")
    # positive control: in that directory, `python -m zerorun.mux` would run the planted module
    subprocess.run([sys.executable, "-m", "zerorun.mux", "--help"], cwd=workdir, capture_output=True)
    assert marker.read_text() == "0"
    marker.unlink()

    control = private_dir(base / "victim-cp")
    victim = base / "victim-scripts"
    private_dir(victim)
    script = victim / "victim.py"  # a script run by path, as ansible-playbook is: sys.path[0] is its directory
    script.write_text(textwrap.dedent(f"""
        import sys
        from zerorun import mux
        from zerorun.client import ClientConfig
        client = mux.attach(ClientConfig.load({str(fleet.client_config)!r}), {str(control)!r}, persist=5)
        sys.stdout.buffer.write(client.exec("web-1", "echo through").stdout)
        client.close()
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=workdir, capture_output=True, timeout=60)
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in control.glob("*.log")}
    assert done.returncode == 0, (done.stderr, logs)
    assert done.stdout == b"through\n"
    assert not marker.exists()

