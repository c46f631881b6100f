"""CLI features over a real fleet: follow and logs, canary, history filters, key management, and
what a new operator hits on the first day (pipes, flags, exit codes, limits, local documents,
completion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.cli_support import run_json
from zerorun import keys, protocol
from zmq_broker.model import CommandRecord
from zmq_broker.store.sqlite import SqliteStore


def test_send_follow_prints_lines_live_with_instance_prefixes(web_db_fleet):
    fleet = web_db_fleet
    proc = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), "send",
                             "RunShellScript", "-t", "tag:role=web", "--follow", "-p",
                             "commands=echo first; sleep 1.5; echo second; echo oops >&2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env())
    first_line = proc.stdout.readline()
    first_at = time.time()
    out, err = proc.communicate(timeout=60)
    done_at = time.time()
    assert proc.returncode == 0, err
    assert first_line.rstrip().endswith("| first")
    assert done_at - first_at > 1.0, "the first line must arrive before the command ends"
    lines = [first_line] + out.splitlines(keepends=True)
    for instance_id in ("web-1", "web-2"):
        assert any(line.startswith(instance_id) and line.rstrip().endswith("| second") for line in lines)
        assert f"{instance_id} | oops" in err
    assert "Success" in out and "invocation(s)" in out
    assert "\r" not in err  # no progress line into a pipe


def test_logs_of_a_finished_command_and_follow(web_db_fleet):
    fleet = web_db_fleet
    sent = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "--json", "-p",
                                "commands=echo one; echo two").stdout)
    logs = fleet.cli("logs", sent["command_id"])
    assert logs.returncode == 0 and logs.stdout == "db-1 | one\ndb-1 | two\n"
    follow = fleet.cli("logs", sent["command_id"], "--follow", "--instance", "db-1")
    assert follow.returncode == 0 and "db-1 | two" in follow.stdout
    as_json = json.loads(fleet.cli("logs", sent["command_id"], "--json").stdout)
    assert as_json["done"] and as_json["chunks"][0]["data"] == "one\ntwo\n"
    # named as `logs --follow --json` names it (that said instance_id, this only invocation_id)
    assert as_json["chunks"][0]["instance_id"] == as_json["chunks"][0]["invocation_id"] == "db-1"
    lines = [json.loads(line) for line in fleet.cli("logs", sent["command_id"], "-f", "--json").stdout.splitlines()]
    assert lines and lines[0]["instance_id"] == "db-1"


def test_canary_from_the_cli(fleet):
    fleet.start_agents({f"c-{n}": {"role": "canary"} for n in range(3)})
    proc = fleet.cli("send", "RunShellScript", "-t", "tag:role=canary", "--first", "1", "--max-errors", "100%",
                     "-p", "commands=exit 4", "--json")
    view = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert view["counts"] == {"Failed": 1, "Cancelled": 2} and view["first"] == 1


def test_commands_history_filters(web_db_fleet):
    fleet = web_db_fleet
    web = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true",
                               "--json").stdout)
    db = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=exit 1",
                              "--json").stdout)
    # command ids are UUIDv7s: they sort by time, so the store's indexes on them grow at one end
    assert {uuid.UUID(web["command_id"]).version, uuid.UUID(db["command_id"]).version} == {7}
    listed = json.loads(fleet.cli("commands", "--target", "role=web", "--json").stdout)
    assert [c["command_id"] for c in listed] == [web["command_id"]]
    failed = json.loads(fleet.cli("commands", "--status", "Failed", "--json").stdout)
    assert [c["command_id"] for c in failed] == [db["command_id"]]
    assert json.loads(fleet.cli("commands", "--since", "1h", "--json").stdout)
    assert json.loads(fleet.cli("commands", "--before", "1h", "--json").stdout) == []
    page = fleet.cli("commands", "--limit", "1")
    assert "more: --before" in page.stderr
    bad = fleet.cli("commands", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "cannot read time" in bad.stderr


def test_commands_pages_follow_their_hint_without_repeating_a_row(web_db_fleet):
    """The "(more: --before T)" hint rounded T to 6 decimals: when it rounded up (half the time),
    the next page began with the row the last one ended with. ``--json`` gives the hint too (on
    stderr: stdout stays the list), so a script can page."""
    import re

    fleet = web_db_fleet
    sent = [json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=true",
                                 "--no-wait", "--json").stdout)["command_id"] for _ in range(4)]
    seen, before = [], []
    while True:
        listed = fleet.cli("commands", "--limit", "1", *before, "--json")  # the hint on stderr, as without
        rows = json.loads(listed.stdout)
        hint = re.search(r"\(more: --before (\S+) --before-id (\S+)\)", listed.stderr)
        if hint:
            assert float(hint.group(1)) == rows[-1]["requested_at"], (hint.group(1), rows[-1]["requested_at"])
            assert hint.group(2) == rows[-1]["command_id"]
            before = ["--before", hint.group(1), "--before-id", hint.group(2)]
        seen += [r["command_id"] for r in rows]
        if not hint:
            break
        assert len(seen) <= len(sent), seen
    assert seen == sent[::-1]


def test_commands_pages_do_not_skip_commands_requested_at_the_same_time(fleet):
    """The hint was "(more: --before T)" and the next page `requested_at < T`: the commands
    requested at exactly T (brokers of a cluster, a coarse clock) that did not fit on the page
    were never listed. Five such commands are written into the broker's database before it starts."""
    import re

    fleet.stop_broker()
    store = SqliteStore(fleet.broker_dir / "broker.db")
    at = time.time() - 600
    history = [("new-2", at + 2), ("new-1", at + 1), *((f"same-{n}", at) for n in range(5)), ("old-0", at - 1)]
    for command_id, requested_at in history:
        store.put_command(CommandRecord(command_id, protocol.SUCCESS, protocol.SUCCESS, "RunShellScript", "1", "0" * 64,
                                        {}, ["tag:role=web"], "admin", requested_at, requested_at + 60, 60, 1, 0, [],
                                        completed_at=requested_at + 1))
    store.close()
    fleet.start_broker()
    expected = ["new-2", "new-1", "same-4", "same-3", "same-2", "same-1", "same-0", "old-0"]
    for filters in ([], ["--target", "role=web"], ["--document", "RunShellScript"], ["--status", "Success"]):
        seen, more = [], []
        while len(seen) <= len(expected):
            page = fleet.cli("commands", "--limit", "3", *filters, *more, check=True)
            seen += [line.split()[0] for line in page.stdout.splitlines()[1:] if line.strip()]
            hint = re.search(r"\(more: (--before \S+ --before-id \S+)\)", page.stderr)
            if not hint:
                break
            more = hint.group(1).split()
        assert seen == expected, (filters, seen)
    refused = fleet.cli("commands", "--before-id", "same-3")
    assert refused.returncode == 2 and "--before-id goes with --before" in refused.stderr
    # a mistyped id, or the id with another page's time, repeated rows or left some out without a word
    for before, before_id in ((repr(at), "same-33"), (repr(at + 1), "same-3")):
        refused = fleet.cli("commands", "--limit", "3", "--before", before, "--before-id", before_id)
        assert refused.returncode == 2 and f"no command '{before_id}' was requested at" in refused.stderr, refused


def test_an_empty_tag_value_that_can_be_set_can_be_targeted(fleet):
    """`tags set ID owner=` (and an agent's `--tag owner=`) stored an empty value, but the target
    `tag:owner=` was refused ("empty tag value"): nothing could reach those instances by it."""
    fleet.start_agents({"e-1": {"owner": ""}, "e-2": {"owner": "ops"}, "e-3": {"role": "db"}})
    fleet.cli("tags", "set", "e-3", "owner=", check=True)
    listed = json.loads(fleet.cli("instances", "-t", "tag:owner=", "--json", check=True).stdout)
    assert sorted(i["instance_id"] for i in listed) == ["e-1", "e-3"]
    assert {i["instance_id"]: i["tags"]["owner"] for i in listed} == {"e-1": "", "e-3": ""}
    sent = fleet.cli("send", "RunShellScript", "-t", "tag:owner=", "-p", "commands=true", "--json")
    assert sent.returncode == 0, sent.stderr
    view = json.loads(sent.stdout)
    assert view["targets"] == ["tag:owner="] and view["counts"] == {"Success": 2}
    assert sorted(i["instance_id"] for i in view["invocations"]) == ["e-1", "e-3"]
    for term in ("tag:owner=", "owner="):  # the history's index finds it by the whole target or its part
        found = json.loads(fleet.cli("commands", "--target", term, "--json", check=True).stdout)
        assert [c["command_id"] for c in found] == [view["command_id"]], term
    typo = fleet.cli("send", "RunShellScript", "-t", "tag:owner=ops,", "-p", "commands=true")
    assert typo.returncode == 2 and "tag:owner= alone targets the empty value" in typo.stderr, typo.stderr


def test_logs_follow_that_gives_up_says_so(web_db_fleet):
    """`logs ID --follow --wait-timeout S` of a command still running after S exited 1 without
    a word: nothing said whether the output was whole or how to go on."""
    fleet = web_db_fleet
    command_id = fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=echo one; sleep 30",
                           "--no-wait").stdout.strip()
    proc = fleet.cli("logs", command_id, "--follow", "--wait-timeout", "2")
    assert proc.returncode == 1 and "db-1 | one" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"zerorun: command {command_id} still running after 2s; follow on with: "
                                   f"zerorun logs {command_id} --follow"), proc.stderr
    fleet.cli("cancel", command_id, check=True)


def test_keys_add_and_revoke_from_the_cli(fleet, tmp_path):
    keys.create_keypair(tmp_path, "ops")
    added = fleet.cli("keys", "add", "client", "ops", str(tmp_path / "ops.key"))
    assert added.returncode == 0 and "client key SHA256:" in added.stdout and "accepted" in added.stdout
    listed = json.loads(fleet.cli("keys", "--json").stdout)
    assert any(k["kind"] == "client" and k["name"] == "ops" and k["state"] == "accepted" for k in listed)
    revoked = fleet.cli("keys", "revoke", "ops")
    assert revoked.returncode == 0 and "rejected" in revoked.stdout
    bad = fleet.cli("keys", "add", "robot", "x", "y")
    assert bad.returncode == 2 and "usage: zerorun keys add" in bad.stderr


def test_keys_with_more_names_than_they_act_on_are_refused(web_db_fleet):
    """`keys reject web-2 db-1` rejected web-2 alone and exited 0: db-1, named to be cut off,
    stayed accepted without a word."""
    fleet = web_db_fleet
    for args in (["reject", "web-2", "db-1"], ["accept", "web-2", "db-1"], ["revoke", "web-2", "db-1"],
                 ["delete", "web-2", "db-1"], ["list", "web-2"]):
        proc = fleet.cli("keys", *args)
        assert proc.returncode == 2 and " NAME" in proc.stderr and "Traceback" not in proc.stderr, (args, proc)
    states = {k["name"]: k["state"] for k in json.loads(fleet.cli("keys", "--json").stdout)}
    assert states["web-2"] == states["db-1"] == "accepted"


def test_usage_errors_are_exit_2_without_traceback(web_db_fleet):
    fleet = web_db_fleet
    bad = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "no-equals-sign")
    assert bad.returncode == 2 and "must look like NAME=VALUE" in bad.stderr and "Traceback" not in bad.stderr


def test_document_file_is_recorded_under_its_name_and_hash_is_exact(web_db_fleet, tmp_path):
    import hashlib

    doc = tmp_path / "crlf-doc.yml"
    doc.write_bytes(b"schemaVersion: '2.2'\r\ndescription: crlf\r\nmainSteps:\r\n  - action: aws:runShellScript\r\n"
                    b"    name: s\r\n    inputs:\r\n      runCommand: [echo crlf]\r\n")
    digest = hashlib.sha256(doc.read_bytes()).hexdigest()
    proc = web_db_fleet.cli("send", "--document-file", str(doc), "--document-hash", digest, "-t", "tag:role=db",
                            "--json")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["document_name"] == "crlf-doc" and view["document_sha256"] == digest


# -- a new operator's first day (issue 24) ---------------------------------------------------------

def _cli_process(fleet, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), *args],
                            env=fleet.env(), **kw)


def test_a_pipe_closed_early_ends_quietly_as_coreutils_do(web_db_fleet):
    """`zerorun commands | head -1`: no BrokenPipeError traceback; killed by SIGPIPE (141 in the shell)."""
    import signal

    fleet = web_db_fleet
    for _ in range(3):
        fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true", check=True)
    for args in (["commands"], ["keys", "list", "--json"], ["instances", "--json"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line is written
        proc = _cli_process(fleet, *args, stdout=write, stderr=subprocess.PIPE)
        os.close(write)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGPIPE, (args, proc.returncode, err)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    shell = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{sys.executable} -m zerorun.cli -c {fleet.client_config} commands | head -1"],
                           capture_output=True, text=True, env=fleet.env(), timeout=60)
    assert shell.stdout.startswith("COMMAND") and shell.stderr == ""
    assert shell.returncode in (0, 141)  # 0 when everything fitted into the pipe before head left


@pytest.mark.parametrize("extra", [[], ["--follow"], ["--json"]])
def test_ctrl_c_while_send_waits_names_the_command_that_goes_on(web_db_fleet, extra):
    """Ctrl-C stops the waiting, not the command; it used to end with nothing at all, so the
    operator had no id to wait on or cancel."""
    import signal

    fleet = web_db_fleet
    proc = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), "send",
                             "RunShellScript", "-t", "tag:role=web", "-p", "commands=sleep 30", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env())
    deadline = time.monotonic() + 30
    while not json.loads(fleet.cli("commands", "--json").stdout):
        assert time.monotonic() < deadline, "the command was never sent"
        time.sleep(0.2)
    time.sleep(3.0)  # past the send's own short wait (1 s) and its answer: waiting now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    (command,) = json.loads(fleet.cli("commands", "--json").stdout)
    cid = command["command_id"]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"zerorun: interrupted; command {cid} goes on: zerorun wait {cid}"
                                    f" (or zerorun cancel {cid})")
    assert command["status"] in ("Pending", "InProgress")
    assert fleet.cli("cancel", cid).returncode == 0


def test_a_broker_gone_while_send_waits_names_the_command_it_took(web_db_fleet):
    """The error said only that the broker did not answer: the command it had already taken ran
    on, and the operator had no id to follow it up with once the broker was back."""
    import re

    fleet = web_db_fleet
    proc = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), "--request-timeout",
                             "2", "send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=sleep 20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env())
    deadline = time.monotonic() + 30
    while not json.loads(fleet.cli("commands", "--json").stdout):
        assert time.monotonic() < deadline, "the command was never sent"
        time.sleep(0.2)
    time.sleep(3.0)  # past the send's own short wait, answered with the command: waiting now
    fleet.stop_broker()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "Traceback" not in err, err
    found = re.search(r"; command ([0-9a-f]{32}) was sent: zerorun wait \1 once the broker answers$", err.strip())
    assert err.startswith("zerorun: BrokerUnavailable: no answer from the broker") and found, err
    fleet.start_broker()
    assert fleet.cli("show", found.group(1), "--json").returncode in (0, 1)  # it knows the command


def test_wait_and_follow_go_on_across_a_broker_restart(web_db_fleet):
    """A broker restarted while `wait` and `logs --follow` waited (an upgrade) lost their pending
    request: both failed "no answer from the broker ... (is it running?)" 25 s later, though the
    broker was back within seconds and the command ended Success."""
    fleet = web_db_fleet
    command_id = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "--no-wait", "-p",
                           "commands=sleep 6; echo done").stdout.strip()
    base = [sys.executable, "-m", "zerorun.cli", "-c", str(fleet.client_config), "--request-timeout", "5"]
    waiting = {name: subprocess.Popen(base + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=fleet.env())
               for name, args in (("wait", ["wait", command_id]), ("logs", ["logs", command_id, "--follow"]))}
    time.sleep(2.0)  # both are waiting on the broker now
    fleet.stop_broker()
    time.sleep(1.0)
    fleet.start_broker()
    for name, proc in waiting.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Traceback" not in err, f"{name}: {err}"
        assert "web-1" in out and "done" in out, f"{name}: {out}"


def test_logs_follow_with_no_broker_fails_within_the_request_timeout(fleet, tmp_path):
    """`logs ID --follow` began with a 10 s long-poll: with no broker it said so after 10 s plus
    --request-timeout, where every other command takes --request-timeout."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gone = tmp_path / "gone.yaml"
    gone.write_text(fleet.client_config.read_text().replace(fleet.runtime()["client_endpoint"],
                                                             f"tcp://127.0.0.1:{port}"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "-c", str(gone), "--request-timeout", "1", "logs",
                           "0" * 32, "--follow"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "BrokerUnavailable" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 6, time.monotonic() - started


def test_version_and_output_flags_before_or_after_the_subcommand(web_db_fleet):
    from zerorun import __version__

    version = web_db_fleet.cli("--version")
    assert version.returncode == 0 and version.stdout.startswith(f"zerorun {__version__}")
    after = subprocess.run([sys.executable, "-m", "zerorun.cli", "keys", "--json", "-c",
                            str(web_db_fleet.client_config)], capture_output=True, text=True, timeout=60)
    before = subprocess.run([sys.executable, "-m", "zerorun.cli", "--json", "-c", str(web_db_fleet.client_config),
                             "keys"], capture_output=True, text=True, timeout=60)
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    nested = subprocess.run([sys.executable, "-m", "zerorun.cli", "documents", "list", "--json",
                             "--request-timeout", "5", "--config", str(web_db_fleet.client_config)],
                            capture_output=True, text=True, timeout=60)
    assert nested.returncode == 0 and any(d["name"] == "RunShellScript" for d in json.loads(nested.stdout))


def test_show_has_the_exit_code_contract_of_send_and_wait(web_db_fleet):
    fleet = web_db_fleet
    good = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=true",
                                "--json").stdout)
    bad = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=exit 3",
                               "--json").stdout)
    running = fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=sleep 30", "--no-wait")
    running_id = running.stdout.strip()
    assert fleet.cli("show", good["command_id"]).returncode == 0
    assert fleet.cli("show", bad["command_id"]).returncode == 1
    assert fleet.cli("show", bad["command_id"], "--json").returncode == 1
    assert fleet.cli("show", running_id).returncode == 1  # not finished
    assert fleet.cli("show", "0" * 32).returncode == 2  # no such command
    fleet.cli("cancel", running_id, check=True)


def test_wait_on_a_finished_command_shows_what_show_shows(web_db_fleet):
    fleet = web_db_fleet
    sent = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=echo out-$(hostname)x",
                     "--no-wait").stdout.strip()
    fleet.cli("wait", sent, check=True)  # now it has finished
    shown, waited = fleet.cli("show", sent), fleet.cli("wait", sent)
    assert waited.returncode == shown.returncode == 0
    assert waited.stdout == shown.stdout and "out-" in waited.stdout
    shown_json = json.loads(fleet.cli("show", sent, "--json").stdout)
    waited_json = json.loads(fleet.cli("wait", sent, "--json").stdout)
    assert waited_json == shown_json and all(i["stdout"].startswith("out-") for i in waited_json["invocations"])


@pytest.mark.parametrize("args, says", [
    (["--execution-timeout", "0"], "execution timeout must be from 1 to 172800"),
    (["--execution-timeout", "-5"], "execution timeout must be from 1 to 172800"),
    (["--execution-timeout", "999999"], "execution timeout must be from 1 to 172800"),
    (["--timeout", "0"], "delivery timeout must be from 1 to 2592000"),
    (["--max-concurrency", "0"], "max_concurrency must be a whole number >= 1 or a percentage from 1% to 100%"),
    (["--max-concurrency", "0%"], "max_concurrency must be"),
    (["--max-concurrency", "150%"], "max_concurrency must be"),
    (["--max-errors", "-1"], "max_errors must be a whole number >= 0 or a percentage from 0% to 100%"),
    (["--first", "-2"], "first (the canary count) must be 0"),
])
def test_limits_out_of_range_are_refused_naming_the_range(web_db_fleet, args, says):
    fleet = web_db_fleet
    before = len(json.loads(fleet.cli("commands", "--json").stdout))
    proc = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true", *args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(json.loads(fleet.cli("commands", "--json").stdout)) == before  # nothing was sent
    ok = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true", "--execution-timeout",
                   "172800", "--max-concurrency", "100%", "--max-errors", "0")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("args, says", [
    (["send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true", "--first", str(10**20)],
     f"first={10**20}: out of range"),
    (["tokens", "create", "--uses", str(10**20)], f"uses={10**20}: out of range"),
])
def test_a_number_past_64_bits_is_one_line_not_an_encoder_traceback(fleet, args, says):
    """msgpack carries 64-bit integers: ``--first 10**20`` was an OverflowError traceback from the
    encoder (in the Ansible modules "Task failed: can't serialize ints")."""
    proc = fleet.cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"zerorun: BadRequest: {says} for a request (64 bits)\n"
    assert json.loads(fleet.cli("commands", "--json").stdout) == []  # nothing was sent
    assert json.loads(fleet.cli("tokens", "list", "--json").stdout) == []


def test_a_request_larger_than_a_message_may_be_is_refused_not_a_silent_broker(fleet, tmp_path):
    """A 65 MB --document-file went out whole; the broker's socket drops a message past its
    limit with the connection, and the CLI reported "no answer from the broker ... (is it
    running?)"."""
    from zerorun import protocol

    big = tmp_path / "big.yml"
    big.write_text("a" * (protocol.MAX_MESSAGE_BYTES + 1024))
    proc = fleet.cli("send", "--document-file", str(big), "-t", "tag:role=web")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("zerorun: BadRequest: the request is ") and proc.stderr.endswith(
        f" bytes, more than the {protocol.MAX_MESSAGE_BYTES} a message may have\n"), proc.stderr
    assert fleet.cli("ping").returncode == 0


@pytest.mark.parametrize("args, says", [
    (["send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=echo caf\udce9"],
     "parameters.commands: 'echo caf\\udce9' is not UTF-8 text"),
    (["send", "RunShellScript", "-t", "tag:role=caf\udce9", "-p", "commands=true"],
     "targets.values: 'caf\\udce9' is not UTF-8 text"),
    (["show", "caf\udce9"], "command_id: 'caf\\udce9' is not UTF-8 text"),
])
def test_an_argument_that_is_not_utf8_is_one_line_not_an_encoder_traceback(fleet, args, says):
    """A Latin-1 terminal's "café" reaches Python as surrogates, which the encoder refused with a
    UnicodeEncodeError traceback."""
    proc = fleet.cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"zerorun: BadRequest: {says}\n"
    assert json.loads(fleet.cli("commands", "--json").stdout) == []  # nothing was sent


def test_an_unknown_instance_is_one_rule_whatever_the_spelling(web_db_fleet):
    """Instances named explicitly (-i ID or a lone -t instance:ID) each get an invocation; one the
    broker does not know ends Undeliverable (exit 1). Tags that match nothing are an error (exit 2)."""
    fleet = web_db_fleet
    for spelling in (["-i", "nosuch"], ["-t", "instance:nosuch"]):
        proc = fleet.cli("send", "RunShellScript", "-p", "commands=true", *spelling, "--json")
        view = json.loads(proc.stdout)
        assert proc.returncode == 1, (spelling, proc.stderr)
        assert [(i["instance_id"], i["status"], i["status_details"]) for i in view["invocations"]] == \
            [("nosuch", "Undeliverable", "unknown instance")]
        assert view["targets"] == ["instance:nosuch"]
    mixed = json.loads(fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "instance:db-1,nosuch",
                                 "--json").stdout)
    assert {i["instance_id"]: i["status"] for i in mixed["invocations"]} == {"db-1": "Success",
                                                                           "nosuch": "Undeliverable"}
    nothing = fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "tag:role=nosuch")
    assert nothing.returncode == 2 and "NoInstancesInTag" in nothing.stderr


def test_a_dry_run_names_the_instances_the_broker_does_not_know(web_db_fleet):
    """`send -i nosuch --dry-run` said "would run ... on 0 instance(s):" and exited 0, and with
    `-i web-1` beside it left nosuch out: the real send gives nosuch an Undeliverable invocation
    and exits 1."""
    fleet = web_db_fleet
    proc = fleet.cli("send", "RunShellScript", "-p", "commands=true", "-i", "nosuch", "-i", "web-1", "--dry-run")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "on 1 instance(s): web-1" in proc.stdout
    assert "nosuch" in proc.stderr and "Undeliverable" in proc.stderr, proc.stderr
    rc, view, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=true", "-t", "instance:nosuch",
                           "--dry-run")
    assert rc == 1 and [(i["instance_id"], i["status"], i["status_details"]) for i in view["invocations"]] == \
        [("nosuch", "Undeliverable", "unknown instance")]
    assert fleet.cli("send", "RunShellScript", "-p", "commands=true", "-i", "web-1", "--dry-run").returncode == 0


def test_notify_invocations_without_a_webhook_is_refused_before_sending(web_db_fleet):
    """`--notify-invocations` without `--notify` was dropped without a word: the operator waited
    for notifications that nothing would send."""
    fleet = web_db_fleet
    proc = fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "tag:role=db", "--notify-invocations")
    assert proc.returncode == 2 and "--notify-invocations needs --notify" in proc.stderr, proc.stdout + proc.stderr
    assert json.loads(fleet.cli("commands", "--json").stdout) == []


def test_cancel_of_an_instance_the_command_does_not_run_on_is_refused(web_db_fleet):
    fleet = web_db_fleet
    command_id = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=sleep 30",
                           "--no-wait").stdout.strip()
    bad = fleet.cli("cancel", command_id, "--instance", "nosuch")
    assert bad.returncode == 2 and "no invocation on nosuch" in bad.stderr and "web-1" in bad.stderr
    assert json.loads(fleet.cli("show", command_id, "--json").stdout)["status"] in ("Pending", "InProgress")
    good = fleet.cli("cancel", command_id, "--instance", "web-1")
    assert good.returncode == 0, good.stderr
    fleet.cli("cancel", command_id, check=True)


def test_show_and_logs_of_an_instance_the_command_does_not_run_on_are_refused(web_db_fleet):
    """`show ID -i web-l` (a typo) printed "0 invocation(s)" and exited 0 for a command that
    succeeded; `logs ID -i nosuch -i web-1` and `logs ID -f -i nosuch` left the typo out without
    a word. As cancel --instance: NotFound, exit 2, naming the instances it runs on."""
    fleet = web_db_fleet
    command_id = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=echo hi",
                                      "--json").stdout)["command_id"]
    for args in (["show", command_id, "-i", "nosuch"], ["show", command_id, "-i", "web-1", "-i", "nosuch"],
                 ["show", command_id, "-i", "nosuch", "--json"], ["logs", command_id, "-i", "nosuch", "-i", "web-1"],
                 ["logs", command_id, "-f", "-i", "nosuch"], ["logs", command_id, "-i", "nosuch", "--json"]):
        proc = fleet.cli(*args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "no invocation on nosuch" in proc.stderr and "web-1, web-2" in proc.stderr, (args, proc.stderr)
        assert proc.stdout == "", (args, proc.stdout)
    shown = fleet.cli("show", command_id, "-i", "web-1")
    assert shown.returncode == 0 and "--- web-1" in shown.stdout and "web-2" not in shown.stdout
    # the footer counted the whole command as if it were what was shown ("1 invocation(s): Success=2")
    assert shown.stdout.endswith("1 of 2 invocation(s) shown; the command's: Success=2\n"), shown.stdout
    logs = fleet.cli("logs", command_id, "-i", "web-2", "-i", "web-1")
    assert logs.returncode == 0 and logs.stdout == "web-1 | hi\nweb-2 | hi\n", logs.stdout


def test_a_local_document_is_shown_under_its_own_name_marked_local(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    doc = tmp_path / "patch-web.yml"
    doc.write_text("schemaVersion: '2.2'\ndescription: local\nmainSteps:\n  - action: aws:runShellScript\n"
                   "    name: s\n    inputs:\n      runCommand: [echo patched]\n")
    sent = fleet.cli("send", "--document-file", str(doc), "-t", "tag:role=db")
    assert sent.returncode == 0, sent.stderr
    assert "document patch-web (local file)" in sent.stdout and "$LOCAL" not in sent.stdout
    listed = fleet.cli("commands", "--limit", "1")
    assert "patch-web (local file)" in listed.stdout
    assert listed.stdout.splitlines()[0].split() == ["COMMAND", "STATUS", "DOCUMENT", "INSTANCES", "REQUESTED",
                                                     "TARGETS"]
    both = fleet.cli("send", "RunShellScript", "--document-file", str(doc), "-t", "tag:role=db")
    assert both.returncode == 2 and "not both" in both.stderr


def test_a_role_needs_local_to_send_a_local_document(web_db_fleet, tmp_path):
    """The broker's policy checks a local document file as the document '$LOCAL' (its refusal
    says so, and the CLI explains it); a role whose documents patterns include it may send one."""
    import time as _time

    fleet = web_db_fleet
    doc = tmp_path / "mine.yml"
    doc.write_text("schemaVersion: '2.2'\nmainSteps:\n  - action: aws:runShellScript\n    name: s\n"
                   "    inputs:\n      runCommand: [echo mine]\n")
    policy = fleet.broker_dir / "policy.yaml"
    out = tmp_path / "ops"
    created = fleet.cli("clients", "create", "ops", "--role", "operator", "--out", str(out), "--json")
    assert created.returncode == 0, created.stderr
    ops = [sys.executable, "-m", "zerorun.cli", "-c", str(out / "client.yaml")]

    def set_policy(documents):
        policy.write_text("roles:\n  operator:\n    allow: [read, run]\n    targets: ['*']\n"
                          f"    documents: {json.dumps(documents)}\nclients:\n  ops: operator\n")
        stamp = _time.time() + 5 + len(documents)
        os.utime(policy, (stamp, stamp))

    def send_local():
        return subprocess.run([*ops, "send", "--document-file", str(doc), "-t", "tag:role=db"],
                              capture_output=True, text=True, timeout=60, env=fleet.env())

    set_policy(["RunShellScript"])
    deadline = _time.monotonic() + 20
    while True:  # the broker notices a changed policy within a few seconds
        refused = send_local()
        if "may not send a local document file" in refused.stderr or _time.monotonic() > deadline:
            break
        _time.sleep(0.3)
    assert refused.returncode == 2, refused.stderr
    assert "may not send a local document file (its role's documents must match '$LOCAL')" in refused.stderr
    set_policy(["RunShellScript", "$LOCAL"])
    deadline = _time.monotonic() + 20
    while True:
        allowed = send_local()
        if allowed.returncode == 0 or _time.monotonic() > deadline:
            break
        _time.sleep(0.3)
    assert allowed.returncode == 0, allowed.stderr
    assert "mine (local file)" in allowed.stdout
    policy.unlink()


def test_documents_show_lists_defaults_and_allowed_values(fleet, tmp_path):
    doc = tmp_path / "d.yml"
    doc.write_text("schemaVersion: '2.2'\nparameters:\n"
                   "  level:\n    type: String\n    default: low\n    allowedValues: [low, high]\n"
                   "  name:\n    type: String\n    allowedPattern: '^[a-z]+$'\n"
                   "  token:\n    type: String\n    default: s3cret\n    secret: true\n"
                   "mainSteps:\n  - action: aws:runShellScript\n    name: s\n    inputs:\n"
                   "      runCommand: ['echo {{ level }} {{ name }}']\n")
    fleet.cli("documents", "create", "Levels", str(doc), check=True)
    shown = fleet.cli("documents", "show", "Levels")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()[2:]}
    assert "DEFAULT" in shown.stdout and "ALLOWED" in shown.stdout
    assert "low" in rows["level"] and "low|high" in rows["level"]
    assert "(required)" in rows["name"] and "pattern ^[a-z]+$" in rows["name"]
    assert "***" in rows["token"] and "s3cret" not in shown.stdout
    as_json = json.loads(fleet.cli("documents", "show", "Levels", "--json").stdout)
    assert as_json["parameters"]["level"]["default"] == "low"
    assert as_json["parameters"]["level"]["allowed_values"] == ["low", "high"]
    assert as_json["parameters"]["token"]["default"] == "***"
    builtin = fleet.cli("documents", "show", "RunShellScript")
    assert "3600" in builtin.stdout  # executionTimeout's default


def test_shell_completion_for_bash_with_names_from_the_broker(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    shim = tmp_path / "bin" / "zerorun"  # the completion calls `zerorun` from PATH
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m zerorun.cli \"$@\"\n")
    shim.chmod(0o755)
    script = fleet.cli("completion", "bash").stdout
    assert "complete -F _zerorun zerorun" in script
    probe = tmp_path / "probe.sh"
    probe.write_text(script + '\nt() { COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); _zerorun;'
                     ' echo "${COMPREPLY[*]}"; }\n'
                     't zerorun se\nt zerorun send --max-c\nt zerorun keys ac\nt zerorun send -i ""\n'
                     't zerorun send -t instance:w\nt zerorun documents show RunS\nt zerorun --json key\n'
                     't zerorun send -t f\nt zerorun instances --filter ""\n')
    env = dict(fleet.env(), PATH=f"{shim.parent}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "send session"  # both begin with "se"
    assert lines[1] == "--max-concurrency"
    assert lines[2] == "accept"
    assert set(lines[3].split()) == {"web-1", "web-2", "db-1"}
    assert set(lines[4].split()) == {"instance:web-1", "instance:web-2"}
    assert lines[5] == "RunShellScript"
    assert lines[6] == "keys"
    assert lines[7] == "fact:"  # targets on the facts agents report (fact:os.id=ubuntu) were never offered
    assert set(lines[8].split()) == {"tag:", "instance:", "fact:"}


def test_shell_completion_for_zsh(web_db_fleet, tmp_path):
    """zsh runs the bash function through bashcompinit, under `emulate sh` (0-based arrays), and
    filters the words itself (compadd)."""
    import shutil

    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (Debian: apt-get install zsh)")
    script = tmp_path / "zerorun.zsh"
    script.write_text(web_db_fleet.cli("completion", "zsh").stdout)
    probe = (f"source {script} || exit 1\n"
             "t() { emulate -L sh; COMP_WORDS=(\"$@\"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); _zerorun;"
             " echo \"${COMPREPLY[*]}\"; }\n"
             "t zerorun se\nt zerorun send --max-c\nt zerorun documents s\n")
    proc = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    commands, send_options, documents = proc.stdout.splitlines()
    assert "send" in commands.split() and "documents" in commands.split()
    assert "--max-concurrency" in send_options.split() and "--document-file" in send_options.split()
    assert "show" in documents.split() and "send" not in documents.split()


# -- a hostile or mistaken operator (the CLI review) ----------------------------------------------

BIG_OUTPUT = "commands=seq 1 100000"  # 588895 bytes: one slice of the whole output, more than a pipe holds


def _big_output_command(fleet) -> str:
    sent = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", BIG_OUTPUT, "--json").stdout)
    assert sent["status"] == "Success", sent
    return sent["command_id"]


@pytest.mark.parametrize("args", [["logs", "{cid}", "-i", "db-1"], ["show", "{cid}", "-i", "db-1", "--output", "full"]])
def test_a_whole_output_cut_short_by_a_full_disk_is_an_error_not_a_truncated_file(small_disk, web_db_fleet, args):
    """`zerorun logs ID -i X > FILE` on a disk that filled up: a buffered write cut short returns
    a short count and no error, and the CLI went on: FILE held the first 256 KiB, exit 0."""
    fleet = web_db_fleet
    cid = _big_output_command(fleet)
    room = os.statvfs(small_disk.path)
    (small_disk.path / "filler").write_bytes(b"\0" * (room.f_bavail * room.f_frsize - 200_000))  # room for 200 kB
    target = small_disk.path / "out.txt"
    with open(target, "wb") as sink:
        proc = _cli_process(fleet, *[a.format(cid=cid) for a in args], stdout=sink, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (proc.returncode, err, target.stat().st_size)
    assert err.decode() == "zerorun: error: No space left on device\n"


def test_a_whole_output_into_a_pipe_closed_mid_write_ends_as_coreutils_do(web_db_fleet):
    """`zerorun logs ID -i X | head -1`: the write cut short by the reader's going away returned
    a short count, and the CLI exited 0 as if everything had been written."""
    import signal

    fleet = web_db_fleet
    cid = _big_output_command(fleet)
    proc = _cli_process(fleet, "logs", cid, "-i", "db-1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"1\n"
    proc.stdout.close()  # while the CLI is blocked in writing the rest
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == -signal.SIGPIPE and err == b"", (proc.returncode, err)


@pytest.mark.parametrize("args", [["show", "{cid}"], ["show", "{cid}", "--json"], ["commands"], ["logs", "{cid}"]])
def test_output_that_cannot_be_written_is_one_line_and_exit_2(web_db_fleet, args):
    """`> /dev/full` (a full disk): a traceback and exit 1, the code that says a command did not
    succeed."""
    fleet = web_db_fleet
    cid = json.loads(fleet.cli("send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=echo hi",
                               "--json").stdout)["command_id"]
    with open("/dev/full", "wb") as full:
        proc = _cli_process(fleet, *[a.format(cid=cid) for a in args], stdout=full, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.decode() == "zerorun: error: No space left on device\n", (proc.returncode, err)


def test_a_send_goes_to_the_next_broker_when_the_first_was_never_reached(web_db_fleet, tmp_path):
    """A list of brokers whose first one takes TCP connections and never answers (a hung host, a
    port held by something else; a firewall that drops packets is the same): reads went on to the
    next broker, but `send` failed "no answer" (exit 3), though the first broker never had the
    command, nothing being sent before the handshake."""
    import socket

    fleet = web_db_fleet
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel's backlog; nothing is ever said
        endpoint = fleet.runtime()["client_endpoint"]
        both = tmp_path / "both.yaml"
        both.write_text(fleet.client_config.read_text().replace(
            endpoint, f"tcp://127.0.0.1:{silent.getsockname()[1]},{endpoint}"))
        proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "-c", str(both), "--request-timeout", "2", "send",
                               "RunShellScript", "-t", "tag:role=db", "-p", "commands=echo once", "--json"],
                              capture_output=True, text=True, timeout=120, env=fleet.env())
    finally:
        silent.close()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["invocations"][0]["stdout"] == "once\n"
    assert len(json.loads(fleet.cli("commands", "--json").stdout)) == 1


def test_ctrl_c_before_the_broker_answers_a_send_says_what_became_of_it(fleet, tmp_path):
    """Ctrl-C while the send itself waited for the broker's answer (the first second of every
    send: the broker answers a short command with its result) ended with nothing said: the
    command went on with no id shown. Said now; here nothing was sent, the broker never reached."""
    import signal
    import socket

    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        config = tmp_path / "silent.yaml"
        config.write_text(fleet.client_config.read_text().replace(fleet.runtime()["client_endpoint"], endpoint))
        proc = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(config), "--request-timeout", "60",
                                 "send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=true"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env())
        conn, _ = silent.accept()  # the CLI connected: its send waits for an answer from here on
        try:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            conn.close()
    finally:
        silent.close()
    assert proc.returncode == 130 and out == "", (proc.returncode, out, err)
    assert err == f"zerorun: interrupted; nothing was sent: the broker at {endpoint} was never reached\n"


class _MuteBroker:
    """A CURVE server with the broker's own keys that completes the handshake, takes requests
    and never answers them: a broker that took a send and went away before answering it."""

    def __init__(self, fleet):
        import zmq

        from zerorun import keys as keyfiles

        public, secret = keyfiles.load_secret(fleet.broker_dir / "keys" / "broker.key_secret")
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.curve_server = True
        self.socket.curve_publickey, self.socket.curve_secretkey = public, secret
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.config = fleet.root / "mute.yaml"
        self.config.write_text(fleet.client_config.read_text().replace(fleet.runtime()["client_endpoint"],
                                                                        self.endpoint))

    def received(self, timeout: float = 60) -> bool:
        return bool(self.socket.poll(timeout * 1000))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def test_a_send_the_broker_took_and_never_answered_says_the_command_may_go_on(fleet):
    """`send` whose broker went away after taking it (stopped mid-command) said "no answer from the
    broker ... (is it running?)" alone, exit 3: the command ran on with no word of it."""
    mute = _MuteBroker(fleet)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(mute.config), "--request-timeout", "1",
                                 "send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=true"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env())
        assert mute.received(), "the send never came"
        out, err = proc.communicate(timeout=60)
    finally:
        mute.close()
    assert proc.returncode == 3 and out == "", (proc.returncode, out, err)
    assert err == (f"zerorun: BrokerUnavailable: no answer from the broker at {mute.endpoint} within 2s (is it running,"
                   " and is this the client endpoint?); the command may have been sent and go on: zerorun commands"
                   " --limit 5 lists the latest once the broker answers\n")


def test_ctrl_c_before_a_connected_broker_answers_a_send_says_the_command_may_go_on(fleet):
    import signal

    mute = _MuteBroker(fleet)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "zerorun.cli", "-c", str(mute.config), "--request-timeout", "60",
                                 "send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=true"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env())
        assert mute.received(), "the send never came"
        time.sleep(0.5)  # into its wait for the answer (a signal just before a poll waits for the poll's end)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        mute.close()
    assert proc.returncode == 130 and out == "", (proc.returncode, out, err)
    assert err == ("zerorun: interrupted before the broker answered: the command may have been sent and go on;"
                   " zerorun commands --limit 5 lists the latest\n")


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_token_that_could_not_be_written_out_is_named_for_revoking(fleet, extra):
    """`zerorun tokens create > token` on a full disk: the broker made a live token, shown once and
    lost; the CLI said only "No space left on device"."""
    import re

    with open("/dev/full", "wb") as full:
        proc = _cli_process(fleet, "tokens", "create", "--tag", "role=web", *extra, stdout=full, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    first, second = err.decode().splitlines()
    found = re.fullmatch(r"zerorun: token (tok-[0-9a-f]+) was made but could not be written out; it enrols agents"
                         r" until [0-9: -]+: zerorun tokens revoke \1", first)
    assert proc.returncode == 2 and found and second == "zerorun: error: No space left on device", err
    listed = json.loads(fleet.cli("tokens", "list", "--json").stdout)
    assert [t["token_id"] for t in listed] == [found.group(1)]
