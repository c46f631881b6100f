"""The multiplexer's control directory (zerorun.mux): opened once, checked on its descriptor, and
every file in it reached through that descriptor. Real files, sockets and processes, one user;
the attacks by a second local user are in tests/integration/test_mux_security.py."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from zerorun import mux
from zerorun.testing.waits import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the multiplexer's guards are Linux's (/proc/self/fd, SO_PEERCRED)")


@pytest.fixture
def cdir(tmp_path):
    with mux.open_control_dir(tmp_path / "cp") as opened:
        yield opened


def secret_file(path: Path) -> bytes:
    content = b"must not be truncated, appended to or locked\n"
    path.write_bytes(content)
    return content


# -- the directory -------------------------------------------------------------------------------

def test_created_private_with_its_parents(tmp_path):
    with mux.open_control_dir(tmp_path / "a" / "b" / "cp") as opened:
        st = os.fstat(opened.fd)
        assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert (tmp_path / "a" / "b" / "cp").is_dir()


def test_a_directory_others_can_enter_is_refused(tmp_path):
    shared = tmp_path / "cp"
    shared.mkdir()
    shared.chmod(0o711)
    with pytest.raises(mux.MuxError, match=r"must be owned by uid \d+ and private \(mode 0700\), not uid \d+ with mode 0711"):
        mux.open_control_dir(shared)


def test_a_symlinked_directory_is_refused_even_to_a_private_one_of_ours(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(mux.MuxError, match="is a symbolic link: refused"):
        mux.open_control_dir(tmp_path / "link")
    assert list(real.iterdir()) == []


def test_a_file_in_place_of_the_directory_is_refused(tmp_path):
    (tmp_path / "cp").write_text("")
    with pytest.raises(mux.MuxError, match="Not a directory"):
        mux.open_control_dir(tmp_path / "cp")


def test_a_missing_directory_is_not_created_by_lookups(tmp_path):
    with pytest.raises(FileNotFoundError):
        mux.open_control_dir(tmp_path / "cp", create=False)
    assert mux.running_pid(tmp_path / "cp" / "zerorun-x") is None
    assert mux.stop_all(tmp_path / "cp") == []
    assert not (tmp_path / "cp").exists()


def test_the_descriptor_keeps_the_directory_it_checked(tmp_path, cdir):
    """Renaming the checked directory away and putting a link in its place redirects nothing."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "cp").rename(tmp_path / "moved")
    (tmp_path / "cp").symlink_to(elsewhere)
    os.close(cdir.open("x.users", os.O_RDWR, create=True))
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(cdir.endpoint("x.sock"))
        assert cdir.endpoint("x.sock") == f"ipc:///proc/self/fd/{cdir.fd}/x.sock"
        assert sorted(os.listdir(tmp_path / "moved")) == ["x.sock", "x.users"]
        assert list(elsewhere.iterdir()) == []
        assert cdir.has_socket("x.sock")
        router.close(0)
    finally:
        ctx.term()


# -- files in it ---------------------------------------------------------------------------------

def test_a_new_file_is_created_exclusively_and_private(tmp_path, cdir):
    fd = cdir.open("n.lock", os.O_RDWR, create=True)
    os.close(fd)
    st = (tmp_path / "cp" / "n.lock").stat()
    assert st.st_mode & 0o777 == 0o600
    os.close(cdir.open("n.lock", os.O_RDWR, create=True))  # and reopened when it is there


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlinked_file_is_refused_and_its_target_untouched(tmp_path, cdir, dangling):
    target = tmp_path / "target"
    content = None if dangling else secret_file(target)
    (tmp_path / "cp" / "n.lock").symlink_to(target)
    for create in (True, False):
        with pytest.raises(mux.MuxError, match="n.lock is a symbolic link: refused"):
            cdir.open("n.lock", os.O_RDWR, create=create)
    if dangling:
        assert not target.exists()  # not created through the link either
    else:
        assert target.read_bytes() == content


def test_a_hard_linked_file_is_refused(tmp_path, cdir):
    target = tmp_path / "target"
    content = secret_file(target)
    os.link(target, tmp_path / "cp" / "n.lock")
    with pytest.raises(mux.MuxError, match="n.lock has 2 hard links: refused"):
        cdir.open("n.lock", os.O_RDWR, create=True)
    assert target.read_bytes() == content


def test_a_fifo_is_refused_without_blocking(tmp_path, cdir):
    os.mkfifo(tmp_path / "cp" / "n.lock")
    started = time.monotonic()
    with pytest.raises(mux.MuxError, match="is not a regular file"):
        cdir.open("n.lock", os.O_RDONLY)
    assert time.monotonic() - started < 5


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_a_file_of_another_uid_is_refused(tmp_path, cdir):
    planted = tmp_path / "cp" / "n.users"
    planted.write_text("")
    os.chown(planted, 65534, 65534)
    with pytest.raises(mux.MuxError, match="n.users belongs to uid 65534, not to uid 0: refused"):
        cdir.open("n.users", os.O_RDWR, create=True)


def test_sockets_must_be_our_sockets(tmp_path, cdir):
    assert cdir.has_socket("n.sock") is False
    (tmp_path / "cp" / "n.sock").write_text("")
    with pytest.raises(mux.MuxError, match="n.sock is not a socket"):
        cdir.has_socket("n.sock")
    (tmp_path / "cp" / "n.sock").unlink()
    (tmp_path / "cp" / "n.sock").symlink_to(tmp_path / "elsewhere.sock")
    with pytest.raises(mux.MuxError, match="n.sock is not a socket"):
        cdir.has_socket("n.sock")
    (tmp_path / "cp" / "n.sock").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "cp" / "n.sock"))
        assert cdir.has_socket("n.sock") is True


def test_peer_credentials_and_peer_uid_of_a_frame(cdir):
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        for s in (router, dealer):
            s.linger = 0
        router.bind(cdir.endpoint("p.sock"))
        dealer.connect(cdir.endpoint("p.sock"))
        dealer.send(b"x")
        assert router.poll(5000)
        frame = router.recv_multipart(copy=False)[-1]
        assert mux._peer_uid(frame) == os.geteuid()
        pid, uid, _ = mux.peer_credentials(frame.get(zmq.SRCFD))
        assert (pid, uid) == (os.getpid(), os.geteuid())
        pair_a, pair_b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        pair_a.bind("inproc://no-peer-address")
        pair_b.connect("inproc://no-peer-address")
        pair_b.send(b"y")
        assert mux._peer_uid(pair_a.recv(copy=False)) is None  # no credentials: not "ours"
        for s in (router, dealer, pair_a, pair_b):
            s.close(0)
    finally:
        ctx.term()


# -- the lock ------------------------------------------------------------------------------------

def test_a_starting_multiplexer_leaves_at_once_when_a_live_one_holds_the_lock(tmp_path, cdir):
    holder = cdir.open("n.lock", os.O_RDWR, create=True)
    other = cdir.open("n.lock", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        os.pwrite(holder, f"{os.getpid()}\n".encode(), 0)  # a live pid
        started = time.monotonic()
        assert mux._take_lock(other) is False
        assert time.monotonic() - started < 0.5
        os.ftruncate(holder, 0)  # no pid (starting, or a client's shared lock): it retries for a while
        started = time.monotonic()
        assert mux._take_lock(other) is False
        assert time.monotonic() - started >= 0.9
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert mux._take_lock(other) is True
    finally:
        os.close(holder)
        os.close(other)


# -- a client's connection ---------------------------------------------------------------------

def _unreachable_broker() -> mux.ClientConfig:
    public, secret = zmq.curve_keypair()
    return mux.ClientConfig("tcp://127.0.0.1:9", public, public, secret)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_attach_checks_and_closes_without_leaving_a_descriptor_behind(tmp_path):
    """A multiplexer needs no broker to accept clients: each attach connects once, checks who
    listens (ourselves), and close() gives everything back (a pending inproc placeholder leaked
    a socket per attach in an earlier version)."""
    config, control = _unreachable_broker(), tmp_path / "cp"
    try:
        for _ in range(5):  # the shared context's own descriptors come first
            mux.attach(config, control, persist=60).close()
        before = _open_descriptors()
        for _ in range(100):
            client = mux.attach(config, control, persist=60)
            assert client.control_path == control / mux.control_name(config)
            client.close()
        # not one per attach; libzmq's reaper closes sockets late, and other tests of this worker
        # may still be letting theirs go: wait for the count to settle instead of taking one look
        wait_until(lambda: _open_descriptors() - before < 10, "the attaches' descriptors to be given back",
                   timeout=5)
    finally:
        assert len(mux.stop_all(control)) == 1


def test_a_worker_with_its_stdin_closed_still_starts_a_multiplexer(tmp_path):
    """Its control directory then gets descriptor 0, which must not reach the multiplexer as
    the stdin that carries its config."""
    script = f"""
import os, sys, zmq
os.close(0)
from zerorun import mux
public, secret = zmq.curve_keypair()
client = mux.attach(mux.ClientConfig("tcp://127.0.0.1:9", public, public, secret), {str(tmp_path / "cp")!r})
print(client._cdir.fd, mux.running_pid(client.control_path) is not None)
client.close()
"""
    done = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["0", "True"]
    finally:
        mux.stop_all(tmp_path / "cp")


# -- the command line ----------------------------------------------------------------------------

def _mux(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zerorun.mux", *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_stop_on_an_unsafe_directory_says_so_without_a_traceback(tmp_path):
    (tmp_path / "cp").mkdir(mode=0o755)
    (tmp_path / "cp").chmod(0o755)
    done = _mux("stop", "--control-path-dir", str(tmp_path / "cp"))
    assert done.returncode == 1
    assert "zerorun mux: control directory" in done.stderr and "must be owned by uid" in done.stderr
    assert "Traceback" not in done.stderr


def test_stop_finds_the_multiplexers_in_the_directory_the_connection_uses(tmp_path, monkeypatch):
    """The connection plugin puts them in $ZERORUN_CONTROL_PATH_DIR when it is set; `python -m
    zerorun.mux stop` looked only in ~/.ansible/cp: "stopped 0 multiplexer(s)", all still running."""
    control = tmp_path / "cp"
    monkeypatch.setenv("ZERORUN_CONTROL_PATH_DIR", str(control))
    client = mux.attach(_unreachable_broker(), control, persist=60)
    client.close()
    try:
        done = subprocess.run([sys.executable, "-m", "zerorun.mux", "stop"], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, HOME=str(tmp_path)))
        assert done.returncode == 0 and done.stdout.startswith("stopped 1 multiplexer(s): "), done.stdout + done.stderr
    finally:
        mux.stop_all(control)


def test_serve_never_writes_through_a_lock_symlink(tmp_path):
    """Issue 17: a ``.lock`` symlink made the multiplexer truncate a file it could write."""
    target = tmp_path / "target"
    content = secret_file(target)
    control = tmp_path / "cp"
    control.mkdir(mode=0o700)
    (control / "zerorun-x.lock").symlink_to(target)
    public, secret = zmq.curve_keypair()
    config = {"endpoint": "tcp://127.0.0.1:9", "broker_public_key": public.decode(),
              "public_key": public.decode(), "secret_key": secret.decode()}
    done = _mux("serve", str(control / "zerorun-x"), "--persist", "1", stdin=json.dumps(config))
    assert done.returncode == 1
    assert "zerorun-x.lock is a symbolic link: refused" in done.stderr and "Traceback" not in done.stderr
    assert target.read_bytes() == content


def test_stop_all_returns_once_the_lock_is_free_not_once_the_pid_is_gone(tmp_path):
    """An exiting multiplexer clears the pid in its lock file a moment before it lets the lock go;
    ``stop_all`` waited only for the pid, so a lookup right after it could still find one running."""
    directory = tmp_path / "cp"
    with mux.open_control_dir(directory):
        pass
    lock = directory / "zerorun-test.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'%d\\n' % os.getpid())\n"
        "def stop(*_):\n"
        "    os.ftruncate(fd, 0)\n"
        "    time.sleep(0.5)\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        assert mux.running_pid(directory / "zerorun-test") == holder.pid
        assert mux.stop_all(directory) == [holder.pid]
        assert mux.running_pid(directory / "zerorun-test") is None
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
