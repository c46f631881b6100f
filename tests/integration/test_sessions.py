"""Sessions through the broker (issue 23), with real processes: a shell driven through a real
pseudo-terminal, port forwarding to an HTTP server on the agent's side, SSH through
``zerorun proxy`` to a private sshd, and what happens when the agent or the broker dies under a
session. The instances are this machine (the agents run here), so "on the instance" is 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from zerorun import keys

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the terminal in these tests")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402

POLICY = """
roles:
  webshell:
    allow: [read, session, forward]
    targets: ["tag:role=web"]
    forward: ["{port}"]
clients:
  web-ops: webshell
"""


def _audit(fleet) -> list[dict]:
    return [json.loads(line) for line in (fleet.broker_dir / "audit.jsonl").read_text().splitlines()]


def _wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, "timed out waiting"
            return value
        time.sleep(0.05)


def _cli(fleet, *args: str, config: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "zerorun.cli", "-c", str(config or fleet.client_config), *args]


def _spawn(fleet, *args: str, config: Path | None = None, rows: int = 24, cols: int = 80) -> "pexpect.spawn":
    child = pexpect.spawn(_cli(fleet, *args, config=config)[0], _cli(fleet, *args, config=config)[1:],
                          env=fleet.env(), timeout=20, dimensions=(rows, cols), encoding="utf-8",
                          codec_errors="replace")
    child.logfile_read = _Tail()
    return child


class _Tail:
    """What the terminal showed, for failure messages."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> None:
        self.text = (self.text + data)[-4000:]

    def flush(self) -> None:
        pass


def _client_config(fleet, name: str, directory: Path) -> Path:
    """A registered client key and its client.yaml (its role comes from the policy)."""
    keys.create_keypair(directory, name)
    public, _ = keys.load_secret(directory / f"{name}.key_secret")
    fleet.client().add_key("client", name, public.decode())
    runtime = fleet.runtime()
    path = directory / "client.yaml"
    # values quoted (JSON strings are YAML): a z85 key may start with a character YAML reserves
    settings = {"endpoint": runtime["client_endpoint"], "broker_public_key": runtime["broker_public_key"],
                "client_key_file": str(directory / f"{name}.key_secret")}
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return path


@pytest.fixture
def web_fleet(fleet_factory, tmp_path):
    fleet = fleet_factory("sessions")
    fleet.start_broker("--session-transcripts", str(tmp_path / "transcripts"))
    fleet.start_agents({"web-1": {"role": "web"}, "db-1": {"role": "db"}})
    return fleet


# -- the shell ----------------------------------------------------------------------------------


def test_a_shell_in_a_real_terminal_resizes_and_returns_the_exit_status(web_fleet, tmp_path):
    fleet = web_fleet
    child = _spawn(fleet, "session", "web-1")
    child.sendline("tty; echo MARK-$((6*7))")
    child.expect(r"MARK-42")
    assert re.search(r"/dev/pts/\d+", child.before), child.logfile_read.text
    child.setwinsize(40, 132)  # the client sees SIGWINCH and tells the instance's pty
    child.sendline("stty size")
    child.expect(r"40 132")
    child.sendline("sleep 30")
    time.sleep(0.5)
    child.sendcontrol("c")  # Ctrl-C goes to the remote foreground job, as in ssh
    child.sendline("echo after-$((1+1))")
    child.expect("after-2")
    child.sendline("exit 7")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7, child.logfile_read.text

    lines = _audit(fleet)
    opened = [r for r in lines if r.get("event") == "session.open"]
    closed = [r for r in lines if r.get("event") == "session.close"]
    assert opened and opened[-1]["instance"] == "web-1" and opened[-1]["kind"] == "shell"
    assert "admin" in opened[-1]["client"]
    assert closed[-1]["exit_code"] == 7 and closed[-1]["bytes_in"] > 20 and closed[-1]["bytes_out"] > 20
    assert closed[-1]["duration_seconds"] > 0.5

    casts = list((tmp_path / "transcripts").glob("*-web-1-*.cast"))
    assert len(casts) == 1
    header, *events = [json.loads(line) for line in casts[0].read_text().splitlines()]
    assert header["version"] == 2 and header["width"] == 80 and header["height"] == 24
    assert any(e[1] == "o" and "MARK-42" in e[2] for e in events)
    assert ["r", "132x40"] in [e[1:] for e in events]
    assert all(e[0] >= 0 for e in events)
    assert oct(casts[0].stat().st_mode & 0o777) == "0o600"


def test_one_command_with_a_terminal_and_its_status(web_fleet):
    fleet = web_fleet
    child = _spawn(fleet, "session", "web-1", "--", "tty;", "exit", "3")
    child.expect(pexpect.EOF)
    child.close()
    assert re.search(r"/dev/pts/\d+", child.logfile_read.text)
    assert child.exitstatus == 3


def _session_without_a_terminal(fleet, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """``zerorun session`` with stdin a pipe (or /dev/null) and no terminal anywhere, as in a
    script; a bounded wait, so that a session that never ends fails the test instead of hanging it."""
    try:
        return subprocess.run(_cli(fleet, "session", *args), input=stdin, capture_output=True, timeout=45,
                              env=fleet.env(), stdin=subprocess.DEVNULL if stdin is None else None,
                              start_new_session=True)  # no controlling terminal either
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"zerorun session {' '.join(args)} did not end; stdout {exc.stdout!r}, "
                             f"stderr {exc.stderr!r}") from None


def test_a_shell_with_stdin_at_its_end_ends_at_once(web_fleet):
    """``zerorun session ID </dev/null``, as ``ssh host </dev/null``: no terminal is asked for, the
    login shell reads the end of its input and exits 0, and so does zerorun."""
    started = time.monotonic()
    proc = _session_without_a_terminal(web_fleet, "web-1")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    assert b"Connection to" not in proc.stderr


def test_a_shell_reads_piped_input_and_exits_with_the_shells_status(web_fleet):
    """``printf ... | zerorun session ID``: the remote shell runs what it reads, on pipes (no
    terminal: its stdout and stderr come back apart), and zerorun exits with its status."""
    fleet = web_fleet
    script = b"echo hello-$((1+1))\ntty || echo no-tty\necho to-stderr >&2\nexit 3\necho not-reached\n"
    proc = _session_without_a_terminal(fleet, "web-1", stdin=script)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == b"hello-2"  # no echo of the input, no prompt, no \r
    assert b"no-tty" in proc.stdout and b"not-reached" not in proc.stdout
    assert b"to-stderr" in proc.stderr and b"to-stderr" not in proc.stdout
    # a command (-- CMD) reads stdin the same way, through the user's shell
    proc = _session_without_a_terminal(fleet, "web-1", "--", "wc -l; exit 4", stdin=b"a\nb\nc\n")
    assert proc.returncode == 4 and proc.stdout.strip() == b"3", proc.stdout + proc.stderr
    closed = [r for r in _audit(fleet) if r.get("event") == "session.close"]
    assert [r["exit_code"] for r in closed[-2:]] == [3, 4]


@pytest.mark.parametrize("pty", [[], ["-t"]])
def test_output_piped_to_head_ends_the_remote_command_too(web_fleet, pty):
    """``zerorun session ID -- CMD | head -1``, as ``ssh host CMD | head -1``: zerorun dies of
    SIGPIPE without a word (141 in the shell), and the remote command ends with it (it used to run
    on until the broker missed the client's polls, 20 seconds and more)."""
    marker = f"zerorun-reader-gone-{os.getpid()}-{len(pty)}"
    command = " ".join(_cli(web_fleet, "session", "web-1", *pty, "--", f"'exec yes {marker}'"))
    shell = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} </dev/null | head -1"],
                           capture_output=True, text=True, env=web_fleet.env(), timeout=60)
    assert shell.stdout.strip() == marker, shell
    assert shell.returncode == 141 and shell.stderr == "", shell

    def remote_pids() -> list[int]:
        found = subprocess.run(["pgrep", "-f", f"yes {marker}"], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    try:
        _wait_for(lambda: not remote_pids(), timeout=5)
    finally:
        for pid in remote_pids():  # this test's own, by id
            os.kill(pid, signal.SIGKILL)


def test_a_terminal_is_forced_with_t_and_refused_with_capital_t(web_fleet):
    """As ssh's -tt and -T: ``-t`` asks for a terminal although stdin is not one, ``-T`` runs
    without one although it is."""
    fleet = web_fleet
    proc = _session_without_a_terminal(fleet, "web-1", "-t", "--", "tty")
    assert proc.returncode == 0 and re.search(rb"/dev/pts/\d+", proc.stdout), proc.stdout + proc.stderr
    child = _spawn(fleet, "session", "-T", "web-1")
    child.sendline("tty || echo no-$((2+3))-tty")
    child.expect("no-5-tty")
    child.sendline("exit 6")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 6, child.logfile_read.text


def test_the_terminal_is_restored_and_the_exit_is_255_when_the_agent_dies(web_fleet):
    fleet = web_fleet
    child = _shell_under_stty(fleet)
    child.sendline("echo READY-$((2*3))")
    child.expect("READY-6")
    fleet.stop_agent("web-1", signal.SIGKILL)
    child.expect(r"RC=(\d+)", timeout=30)
    assert child.match.group(1) == "255"
    child.expect(pexpect.EOF)
    text = child.logfile_read.text
    assert "disconnected" in text
    _assert_cooked(text)


def test_the_terminal_is_restored_and_the_exit_is_255_when_the_broker_dies(web_fleet):
    fleet = web_fleet
    child = _shell_under_stty(fleet)
    child.sendline("echo READY-$((2*3))")
    child.expect("READY-6")
    fleet.kill_broker()
    child.expect(r"RC=(\d+)", timeout=30)
    assert child.match.group(1) == "255"
    child.expect(pexpect.EOF)
    text = child.logfile_read.text
    assert "SessionLost" in text and "broker" in text
    _assert_cooked(text)


def _shell_under_stty(fleet) -> "pexpect.spawn":
    """zerorun session inside a local shell that prints its status and the terminal's modes after."""
    command = " ".join(_cli(fleet, "session", "web-1"))
    script = f"{command}; echo RC=$?; stty -a"
    child = pexpect.spawn("/bin/sh", ["-c", script], env=fleet.env(), timeout=20, dimensions=(24, 80),
                          encoding="utf-8", codec_errors="replace")
    child.logfile_read = _Tail()
    return child


def _assert_cooked(text: str) -> None:
    """The local terminal is back in cooked mode: canonical input, echo and signals on."""
    modes = text.rsplit("RC=", 1)[1]
    for mode in ("icanon", "echo", "isig", "opost"):
        assert re.search(rf"(?<![-\w]){mode}\b", modes), (mode, modes)


def test_a_session_outside_the_roles_scope_is_refused_and_audited(web_fleet, tmp_path):
    fleet = web_fleet
    (fleet.broker_dir / "policy.yaml").write_text(POLICY.format(port=1))
    fleet.stop_broker()
    fleet.start_broker("--session-transcripts", str(tmp_path / "transcripts"))
    fleet.wait_online(["web-1", "db-1"])
    config = _client_config(fleet, "web-ops", tmp_path / "web-ops")
    refused = subprocess.run(_cli(fleet, "session", "db-1", "--", "true", config=config), capture_output=True,
                             text=True, env=fleet.env(), timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 255
    assert "AccessDenied" in refused.stderr and "db-1" in refused.stderr and "outside its scope" in refused.stderr
    allowed = subprocess.run(_cli(fleet, "session", "web-1", "--", "echo", "in-scope", config=config),
                             capture_output=True, text=True, env=fleet.env(), timeout=60, stdin=subprocess.DEVNULL)
    assert allowed.returncode == 0, allowed.stderr
    assert "in-scope" in allowed.stdout
    denied = [r for r in _audit(fleet) if r.get("event") == "access.denied" and "OpenSession" in r.get("op", "")]
    assert denied and "db-1" in denied[-1]["reason"]


# -- port forwarding ----------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def http_server(tmp_path):
    """An HTTP server on the agent's side (127.0.0.1: the instance), serving a 50 MB file."""
    www = tmp_path / "www"
    www.mkdir()
    big = www / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(50):
            handle.write(os.urandom(1024 * 1024))
    (www / "hello.txt").write_text("hello through the tunnel\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], big
    server.shutdown()
    server.server_close()


def _start_forward(fleet, spec: str, config: Path | None = None) -> tuple[subprocess.Popen, int]:
    # SIGINT handled as a terminal's Ctrl-C has it: a shell's background job (a CI run started with
    # ``&``) passes it on ignored, and Python then keeps it ignored
    proc = subprocess.Popen(_cli(fleet, "forward", "web-1", spec, config=config), env=fleet.env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stderr.readline()
    found = re.search(r"Forwarding 127\.0\.0\.1:(\d+) ->", line)
    if found is None:
        proc.kill()
        raise AssertionError(f"no forwarding line: {line!r} {proc.stderr.read()}")
    return proc, int(found.group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_port_forwarding_carries_concurrent_requests_and_a_large_download(web_fleet, http_server):
    fleet = web_fleet
    port, big = http_server
    proc, local = _start_forward(fleet, f"0:{port}")
    try:
        def fetch(_: int) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=30) as response:
                return response.read()

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(fetch, range(20)))
        assert answers == [b"hello through the tunnel\n"] * 20

        digest = hashlib.sha256()
        size = 0
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/big.bin", timeout=120) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        assert size == big.stat().st_size
        assert digest.hexdigest() == _sha256(big)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    closed = [r for r in _audit(fleet) if r.get("event") == "session.close" and r.get("kind") == "tcp"]
    assert len(closed) >= 21
    assert max(r["bytes_out"] for r in closed) >= 50 * 1024 * 1024


def test_a_slow_reader_holds_the_transfer_back_instead_of_filling_memory(web_fleet, http_server):
    """The client reads nothing for a while: the broker's buffer and the agent's reads stop at
    the windows (512 KiB each way), and the download then completes whole."""
    fleet = web_fleet
    port, big = http_server
    proc, local = _start_forward(fleet, f"0:{port}")
    try:
        sock = socket.create_connection(("127.0.0.1", local))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /big.bin HTTP/1.0\r\nHost: x\r\n\r\n")
        time.sleep(2.0)  # a reader that does not read: the window stops the flow
        broker_rss = _rss(fleet.broker.pid)
        assert broker_rss < 200 * 1024 * 1024, broker_rss  # far below the 50 MB file
        digest, size, header = hashlib.sha256(), 0, b""
        while b"\r\n\r\n" not in header:
            header += sock.recv(1)
        while True:
            block = sock.recv(1 << 20)
            if not block:
                break
            digest.update(block)
            size += len(block)
        sock.close()
        assert size == big.stat().st_size and digest.hexdigest() == _sha256(big)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_forward_outside_the_allow_list_is_refused(web_fleet, http_server, tmp_path):
    fleet = web_fleet
    port, _ = http_server
    (fleet.broker_dir / "policy.yaml").write_text(POLICY.format(port=port))
    fleet.stop_broker()
    fleet.start_broker()
    fleet.wait_online(["web-1", "db-1"])
    config = _client_config(fleet, "web-ops", tmp_path / "web-ops")
    refused = subprocess.run(_cli(fleet, "forward", "web-1", f"0:{port + 1 if port < 65535 else port - 1}",
                                  config=config), capture_output=True, text=True, env=fleet.env(), timeout=60)
    assert refused.returncode == 2
    assert "AccessDenied" in refused.stderr and "may not forward" in refused.stderr
    remote = subprocess.run(_cli(fleet, "forward", "web-1", f"0:10.0.0.1:{port}", config=config),
                            capture_output=True, text=True, env=fleet.env(), timeout=60)
    assert remote.returncode == 2 and "may not forward to 10.0.0.1" in remote.stderr
    proc, local = _start_forward(fleet, f"0:{port}", config=config)  # the allowed one works
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=30) as response:
            assert response.read() == b"hello through the tunnel\n"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


# -- SSH over the broker ------------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path):
    """A private sshd on 127.0.0.1 (root logs in with a key made here), stopped after the test."""
    binary = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if binary is None:
        pytest.skip("no OpenSSH server (sshd): install openssh-server (.ci/run does when apt-get can)")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("no OpenSSH client (ssh, ssh-keygen)")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (privilege separation)")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    work = tmp_path / "sshd"
    work.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "user_key")], check=True)
    shutil.copy(work / "user_key.pub", work / "authorized_keys")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (work / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host_key'}\nPidFile none\n"
        f"AuthorizedKeysFile {work / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "LogLevel VERBOSE\n")
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(work / "sshd_config")], stderr=open(work / "log", "wb"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(work / 'log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port, work
    proc.terminate()
    proc.wait(timeout=10)


def test_ssh_and_ansibles_ssh_connection_through_zerorun_proxy(web_fleet, sshd, tmp_path):
    fleet = web_fleet
    port, work = sshd
    proxy = " ".join(_cli(fleet, "proxy", "%h", "%p"))
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host web-1\n  User root\n  Port {port}\n  IdentityFile {work / 'user_key'}\n"
                          f"  ProxyCommand {proxy}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                          "  LogLevel ERROR\n")
    result = subprocess.run(["ssh", "-F", str(ssh_config), "web-1", "echo", "via-broker-$((20+3))"],
                            capture_output=True, text=True, env=fleet.env(), timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + (work / "log").read_text()[-2000:]
    assert result.stdout.strip() == "via-broker-23"
    closed = _wait_for(lambda: [r for r in _audit(fleet) if r.get("event") == "session.close" and r["kind"] == "tcp"])
    assert closed[-1]["bytes_in"] > 0 and closed[-1]["bytes_out"] > 0 and closed[-1]["error"] == ""

    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        f"web-1 ansible_connection=ssh ansible_user=root ansible_port={port} "
        f"ansible_ssh_private_key_file={work / 'user_key'} ansible_python_interpreter={sys.executable} "
        f"ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        f"-o ProxyCommand=\"{proxy}\"'\n")
    (tmp_path / "ansible").mkdir()
    ansible = ansible_support.AnsibleRun(fleet, tmp_path / "ansible", "", ANSIBLE_HOST_KEY_CHECKING="0",
                                         ANSIBLE_SSH_CONTROL_PATH_DIR=str(tmp_path / "cp"))
    run = ansible.run("ansible", "web-1", "-i", str(inventory), "-m", "ansible.builtin.command",
                      "-a", "echo ansible-over-zerorun")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ansible-over-zerorun" in run.stdout
