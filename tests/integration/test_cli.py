"""CLI features over a real fleet: follow and logs, canary, history filters, key management."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from zerorun import keys


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
