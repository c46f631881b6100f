"""The agent's sessions without a broker: SessionStart / SessionData in, messages out."""

from __future__ import annotations

import queue
import socket
import threading
import time

from agent.sessions import WINDOW, AgentSessions
from zerorun import protocol


class Collector:
    def __init__(self) -> None:
        self.messages: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, message) -> None:
        self.messages.put(message)

    def until(self, predicate, timeout: float = 10.0) -> list:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(message)
            if predicate(message):
                return seen
        raise AssertionError(f"timed out; saw {seen}")


def _ended(message) -> bool:
    return isinstance(message, protocol.SessionData) and message.close


def test_a_command_in_a_pty_sends_its_output_and_status():
    out = Collector()
    sessions = AgentSessions(out)
    try:
        sessions.handle(protocol.SessionStart(session_id="s1", kind="shell", command="tty; stty size; exit 5",
                                              cols=100, rows=30, window=WINDOW))
        seen = out.until(_ended)
        assert isinstance(seen[0], protocol.SessionStarted) and seen[0].ok and seen[0].window == WINDOW
        text = b"".join(m.data for m in seen if isinstance(m, protocol.SessionData))
        assert b"/dev/pts/" in text and b"30 100" in text
        assert seen[-1].exit_code == 5
        seqs = [m.seq for m in seen if isinstance(m, protocol.SessionData) and (m.data or m.eof)]
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        sessions.shutdown()


def test_a_shell_without_a_terminal_reads_its_input_to_the_end_on_pipes():
    """SessionStart.pty False, as sshd without a pty: stdin, stdout and stderr are pipes, the
    client's eof is the end of stdin, stdout and stderr come apart."""
    out = Collector()
    sessions = AgentSessions(out)
    try:
        sessions.handle(protocol.SessionStart(session_id="p1", kind="shell", pty=False, window=WINDOW,
                                              command="wc -l; tty >/dev/null || echo no-tty >&2; exit 4"))
        sessions.handle(protocol.SessionData("p1", seq=1, data=b"a\nb\nc\n"))
        sessions.handle(protocol.SessionData("p1", seq=2, eof=True))
        seen = out.until(_ended)
        assert isinstance(seen[0], protocol.SessionStarted) and seen[0].ok and seen[0].pty is False
        data = [m for m in seen if isinstance(m, protocol.SessionData)]
        assert b"".join(m.data for m in data if m.stream == "") == b"3\n"
        assert b"no-tty" in b"".join(m.data for m in data if m.stream == "stderr")
        assert {m.stream for m in data if m.eof} == {"", "stderr"}
        assert seen[-1].exit_code == 4 and seen[-1].ack == 6
    finally:
        sessions.shutdown()


def test_output_stops_at_the_clients_window_and_resumes_on_acknowledgement():
    out = Collector()
    sessions = AgentSessions(out)
    window = 16 * 1024
    try:
        sessions.handle(protocol.SessionStart(session_id="s2", kind="exec", command="head -c 100000 /dev/zero",
                                              window=window))
        out.until(lambda m: isinstance(m, protocol.SessionStarted))
        time.sleep(0.5)
        got = []
        while not out.messages.empty():
            got.append(out.messages.get())
        sent = sum(len(m.data) for m in got if isinstance(m, protocol.SessionData))
        assert sent == window  # exactly the window, then it waits
        total = sent
        while True:  # acknowledge what came: the rest flows, then the end
            sessions.handle(protocol.SessionData("s2", ack=total))
            message = out.messages.get(timeout=10)
            if isinstance(message, protocol.SessionData):
                total += len(message.data)
                if message.close:
                    break
        assert total == 100000
        assert message.exit_code == 0
    finally:
        sessions.shutdown()


def test_an_exec_keeps_stdout_stderr_and_the_terminal_apart_and_reads_stdin():
    out = Collector()
    sessions = AgentSessions(out)
    try:
        sessions.handle(protocol.SessionStart(
            session_id="s3", kind="exec", window=WINDOW,
            command="printf 'say: ' > /dev/tty; read word < /dev/tty; echo \"out $word\"; cat >&2"))
        out.until(lambda m: isinstance(m, protocol.SessionData) and m.stream == "tty" and b"say:" in m.data)
        sessions.handle(protocol.SessionData("s3", seq=1, stream="tty", data=b"hello\n"))
        sessions.handle(protocol.SessionData("s3", seq=2, stream="", data=b"to stderr"))
        sessions.handle(protocol.SessionData("s3", seq=3, stream="", eof=True))
        seen = out.until(_ended)
        by = {"": b"", "stderr": b""}
        for m in seen:
            if isinstance(m, protocol.SessionData) and m.stream in by:
                by[m.stream] += m.data
        assert by[""] == b"out hello\n" and by["stderr"] == b"to stderr"
        assert seen[-1].exit_code == 0
    finally:
        sessions.shutdown()


def test_a_tcp_session_half_closes_and_ends_when_both_sides_are_done():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def echo_upper() -> None:
        conn, _ = server.accept()
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        conn.sendall(data.upper())
        conn.close()

    thread = threading.Thread(target=echo_upper, daemon=True)
    thread.start()
    out = Collector()
    sessions = AgentSessions(out)
    try:
        sessions.handle(protocol.SessionStart(session_id="s4", kind="tcp", port=port, window=WINDOW))
        started = out.until(lambda m: isinstance(m, protocol.SessionStarted))
        assert started[-1].ok
        sessions.handle(protocol.SessionData("s4", seq=1, data=b"abc"))
        sessions.handle(protocol.SessionData("s4", seq=2, eof=True))
        seen = out.until(_ended)
        assert b"".join(m.data for m in seen if isinstance(m, protocol.SessionData)) == b"ABC"
        assert any(m.eof for m in seen if isinstance(m, protocol.SessionData))
        assert seen[-1].error == ""
    finally:
        sessions.shutdown()
        server.close()


def test_refusals_are_answered():
    out = Collector()
    sessions = AgentSessions(out)
    try:
        sessions.handle(protocol.SessionStart(session_id="s5", kind="shell", run_as="someone-else-entirely"))
        refused = out.until(lambda m: isinstance(m, protocol.SessionStarted))[-1]
        assert not refused.ok and "run-as" in refused.error
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        sessions.handle(protocol.SessionStart(session_id="s6", kind="tcp", port=closed_port))
        refused = out.until(lambda m: isinstance(m, protocol.SessionStarted))[-1]
        assert not refused.ok and "cannot connect" in refused.error
    finally:
        sessions.shutdown()
