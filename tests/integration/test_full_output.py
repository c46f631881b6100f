"""Whole outputs (issue 22): the view keeps its cap, the output store keeps everything (up to the
broker's limit), read from the agent in paced chunks after the result, and the CLI prints it byte for
byte; real broker, real agents, real CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess

from zerorun.testing import wait_until

from tests.cli_support import run_json

SIX_MB = 6 * 1000 * 1000
# 6 MB of varied bytes (not one repeated block: a misplaced chunk would show), and some stderr
BIG = """import hashlib, sys
out = sys.stdout.buffer
for i in range(%d):
    out.write(hashlib.sha256(str(i).encode()).hexdigest().encode() + b"\\n")
out.flush()
sys.stderr.write("done\\n")
""" % (SIX_MB // 65)


def _big_script(tmp_path) -> str:
    path = tmp_path / "big.py"
    path.write_text(BIG)
    return f"python3 {path}"


def _expected() -> bytes:
    return b"".join(hashlib.sha256(str(i).encode()).hexdigest().encode() + b"\n" for i in range(SIX_MB // 65))


def _full(fleet, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([fleet.python, "-m", "zerorun.cli", "-c", str(fleet.client_config), *args],
                          capture_output=True, timeout=120, env=fleet.env())


def test_a_6mb_output_is_kept_whole_and_printed_byte_for_byte(fleet, tmp_path):
    fleet.start_agents({"big-1": {"role": "big"}})
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=big", "-p",
                               f"commands={_big_script(tmp_path)}")
    assert code == 0, err
    inv = view["invocations"][0]
    expected = _expected()
    assert len(expected) > 5_000_000 and inv["stdout_size"] == len(expected)
    assert len(inv["stdout"]) < len(expected)  # the view keeps its cap
    cid = view["command_id"]

    shown = _full(fleet, "show", cid, "--instance", "big-1", "--output", "full")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == expected
    assert shown.stderr == b"done\n"
    logs = _full(fleet, "logs", cid, "-i", "big-1")
    assert logs.returncode == 0 and logs.stdout == expected and logs.stderr == b"done\n"

    # the plain view says it was cut and how to get the rest
    plain = fleet.cli("show", cid)
    assert f"zerorun show {cid} --instance big-1 --output full" in plain.stdout

    # kept beside the database, readable by the broker's user only
    stored = fleet.broker_dir / "outputs" / cid / f"{inv['invocation_id']}.stdout"
    assert stored.stat().st_size == len(expected) and stored.stat().st_mode & 0o777 == 0o600
    assert (fleet.broker_dir / "outputs" / cid).stat().st_mode & 0o777 == 0o700


def test_small_output_and_bytes_that_are_not_utf8_come_back_exactly(fleet):
    fleet.start_agents({"box-1": {"role": "box"}})
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=box", "-p",
                               "commands=printf 'caf\\351 \\000 ok\\n'; echo small")
    assert code == 0, err
    shown = _full(fleet, "show", view["command_id"], "-i", "box-1", "--output", "full")
    assert shown.returncode == 0 and shown.stdout == b"caf\xe9 \x00 ok\nsmall\n"
    assert (fleet.broker_dir / "outputs" / view["command_id"]).exists()  # read from the agent: not UTF-8
    # an output the view holds whole needs no copy
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=box", "-p", "commands=echo hello")
    assert _full(fleet, "show", view["command_id"], "-i", "box-1", "--output", "full").stdout == b"hello\n"
    assert not (fleet.broker_dir / "outputs" / view["command_id"]).exists()


def test_the_broker_limit_cuts_the_whole_output_and_says_so(fleet_factory, tmp_path):
    fleet = fleet_factory("limited")
    fleet.start_broker("--max-full-output-bytes", "1000000", "--max-output-bytes", "100000")
    fleet.start_agent("box-1", {"role": "box"}, "--max-output-bytes", "100000")
    fleet.wait_online(["box-1"])
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=box", "-p",
                               f"commands={_big_script(tmp_path)}")
    assert code == 0, err
    shown = _full(fleet, "show", view["command_id"], "-i", "box-1", "--output", "full")
    assert shown.stdout == _expected()[:1000000]
    assert b"incomplete (1000000 of" in shown.stderr and b"broker's limit of 1000000 bytes" in shown.stderr
    refused = fleet.cli("show", view["command_id"], "--output", "full")
    assert refused.returncode == 2 and "exactly one --instance" in refused.stderr
    assert os.path.exists(fleet.broker_dir / "outputs" / view["command_id"])


def test_an_agent_cannot_make_the_broker_keep_more_than_its_limit(fleet_factory, tmp_path):
    """What a result says follows (``stdout_follows``, ``stderr_follows``) is the agent's word: a
    negative stdout once made room for more than the limit in stderr (limit - stdout), and the
    broker pulled whatever a compromised agent sent, up to its disk."""
    import time

    import zmq

    from zerorun import keys, protocol
    from tests import raw_agent_support as raw_agent

    limit = 1_000_000
    fleet = fleet_factory("hostile")
    fleet.start_broker("--max-full-output-bytes", str(limit))
    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    asked = 0
    try:
        raw_agent.hello(sock)
        view = fleet.client().send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        (deliver,) = [m for m in raw_agent.receive(sock, 5, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = deliver.invocations[0].invocation_id
        sock.send_multipart(protocol.frames(protocol.Results([protocol.InvocationResult(
            iid, "Success", exit_code=0, stdout_follows=-(1 << 40), stderr_follows=1 << 40)])))
        deadline = time.time() + 5
        while time.time() < deadline and asked <= 4 * limit:  # answer every read in full, as long as it asks
            for read in raw_agent.receive(sock, 0.3):
                if isinstance(read, protocol.OutputRead):
                    asked += read.length
                    sock.send_multipart(protocol.frames(protocol.OutputData(
                        read.invocation_id, read.stream, read.offset, b"e" * read.length)))
    finally:
        sock.close(0)
        ctx.term()
    assert asked <= limit, asked
    stored = sum(p.stat().st_size for p in (fleet.broker_dir / "outputs").rglob("*") if p.is_file())
    assert stored <= limit, stored
    inv = fleet.client().get_command(view.command_id).invocations[0]
    assert inv.status == "Success"


def test_reads_lost_with_an_agents_connection_are_asked_again_when_it_is_back(fleet_factory, tmp_path):
    """Chunks of a whole output the broker asked an agent for, lost with its connection, were
    asked again only after READ_TIMEOUT (30 s): an agent that reconnected twice in a read (a
    loaded machine) had a client's `show --output full` give up on it. Its HELLO asks again."""
    import time

    import zmq

    from zerorun import keys, protocol
    from tests import raw_agent_support as raw_agent

    fleet = fleet_factory("reconnects")
    fleet.start_broker()
    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    size = 300_000
    try:
        raw_agent.hello(sock)
        view = fleet.client().send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        (deliver,) = [m for m in raw_agent.receive(sock, 5, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        iid = deliver.invocations[0].invocation_id
        sock.send_multipart(protocol.frames(protocol.Results([protocol.InvocationResult(
            iid, "Success", exit_code=0, stdout_follows=size)])))
        lost = [m for m in raw_agent.receive(sock, 5, until=protocol.OutputRead) if isinstance(m, protocol.OutputRead)]
        assert lost, "no read asked"
        sock.close(0)  # gone with the reads it was asked, unanswered
        sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
        sock.send_multipart(protocol.frames(protocol.Hello(instance_id="raw-1", unacked=[iid])))
        got = b""
        deadline = time.monotonic() + 10  # a third of READ_TIMEOUT
        while len(got) < size and time.monotonic() < deadline:
            for read in raw_agent.receive(sock, 0.3):
                if isinstance(read, protocol.OutputRead) and read.offset == len(got):
                    got += b"o" * read.length
                    sock.send_multipart(protocol.frames(protocol.OutputData(
                        read.invocation_id, read.stream, read.offset, b"o" * read.length)))
        assert len(got) == size, len(got)
        client = fleet.client()
        wait_until(lambda: client.output_slice(view.command_id, "raw-1", length=1).complete,
                   "the broker to hold all of it")  # before the socket goes, with what it has not sent
    finally:
        sock.close(0)
        ctx.term()
    shown = _full(fleet, "show", view.command_id, "-i", "raw-1", "--output", "full")
    assert shown.returncode == 0 and shown.stdout == b"o" * size, shown.stderr[-500:]


BINARY_STEP = ("  - action: aws:runShellScript\n    name: {name}\n    inputs:\n      runCommand:\n"
               "        - head -c 4300000 /dev/zero | tr '\\0' '\\377'\n"
               "        - head -c 4300000 /dev/zero | tr '\\0' '\\376' >&2\n")


def test_a_result_of_several_big_binary_steps_fits_in_one_message(fleet_factory, tmp_path):
    """Each step's text was capped, and is carried twice (in its step and in the invocation's): two
    steps of 4.3 MB that are not UTF-8 (each byte a 3-byte U+FFFD) made a Results message over the
    64 MiB limit; the broker dropped the connection, the agent sent it again after every Welcome,
    for ever, and nothing else it ran was heard of. A stream is now capped for the whole result;
    the rest is read from the agent's kept files, byte for byte."""
    # heartbeats of 2 s, not 0.5: in CI (two workers on two cores) the agent heard nothing for
    # three 0.5 s intervals while tens of MB of this output went through, and reconnected, which
    # this test is not about (reads lost that way: test_reads_lost_with_an_agents_connection_...)
    fleet = fleet_factory(heartbeat_interval=2.0)
    fleet.start_broker()
    path = tmp_path / "binary.yml"
    path.write_text("schemaVersion: '2.2'\ndescription: two binary steps\nmainSteps:\n"
                    + BINARY_STEP.format(name="one") + BINARY_STEP.format(name="two"))
    fleet.start_agents({"bin-1": {"role": "bin"}})
    code, view, err = run_json(fleet, "send", "--document-file", str(path), "-t", "tag:role=bin",
                               "--wait-timeout", "60")
    assert code == 0, err
    (inv,) = view["invocations"]
    assert inv["status"] == "Success" and inv["stdout_size"] == inv["stderr_size"] == 8_600_000, inv["status"]
    shown = _full(fleet, "show", view["command_id"], "-i", "bin-1", "--output", "full")
    assert shown.returncode == 0, shown.stderr[-500:]
    assert shown.stdout == b"\xff" * 8_600_000 and shown.stderr == b"\xfe" * 8_600_000
    assert "disconnected" not in fleet.agent_log("bin-1")
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=bin", "-p", "commands=echo next")
    assert code == 0 and view["invocations"][0]["stdout"] == "next\n", err
