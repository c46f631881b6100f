"""run_command's share of issue 22, from a real ansible-playbook run against a real broker and
agents: run_as, notify, and the note that says where the output was cut and how to get the rest."""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402
from webhook_support import Receiver  # noqa: E402


@pytest.fixture
def receiver():
    made = Receiver()
    yield made
    made.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs the agent to run as root")
def test_run_command_runs_as_a_user_notifies_and_says_where_output_was_cut(fleet_factory, receiver, tmp_path):
    fleet = fleet_factory("ansible-op")
    fleet.start_broker("--webhook", f"ops={receiver.url('/ops')}", "--max-output-bytes", "1000")
    fleet.start_agents({"web-1": {"role": "web"}})
    run = ansible_support.AnsibleRun(fleet, tmp_path, "plugin: zerorun.fleet.instances\n")
    proc = run.playbook(f"""
        - hosts: localhost
          gather_facts: false
          vars:
            ansible_python_interpreter: {sys.executable}
          tasks:
            - name: as nobody
              zerorun.fleet.run_command:
                commands: id -un
                targets: tag:role=web
                run_as: nobody
                notify: [ops]
            - name: long output
              zerorun.fleet.run_command:
                commands: seq 1 2000
                targets: tag:role=web
    """)
    assert proc.returncode == 0, proc.stdout
    result = run.by_host("as nobody")["localhost"]["result"]
    assert result["invocations"][0]["stdout"] == "nobody"
    assert result["invocations"][0]["output_note"] == ""
    body = json.loads(receiver.wait_for(1)[0][2])
    assert body["command_id"] == result["command_id"] and body["status"] == "Success"

    result = run.by_host("long output")["localhost"]["result"]
    inv = result["invocations"][0]
    whole = "".join(f"{i}\n" for i in range(1, 2001)).encode()
    assert inv["stdout_truncated"] is True and inv["stdout_size"] == len(whole)
    command_id = result["command_id"]
    assert inv["output_note"] == (
        f"stdout truncated after 1000 of {len(whole)} bytes; the whole output: zerorun show {command_id} "
        f"--instance web-1 --output full (or zerorun logs {command_id} -i web-1)")
    assert "output truncated on 1: web-1: stdout truncated after 1000" in result["msg"]
    full = fleet.cli("show", command_id, "--instance", "web-1", "--output", "full")
    assert full.returncode == 0 and full.stdout.encode() == whole
    assert pwd.getpwnam("nobody")  # (the user the first task ran as)
