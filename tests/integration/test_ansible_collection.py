"""The zerorun.fleet collection end to end: real ansible-inventory, ansible-playbook, ansible
ad-hoc and ansible-runner processes against a real broker and real agents on 127.0.0.1.

One LocalFleet (web-1, web-2 tagged role=web, db-1 tagged role=db) is shared by the module's
tests; each test counts the commands the broker recorded before and after its Ansible run.
Results are read from a small recording callback (JSON lines), not scraped from the screen;
only what run_command shows while it waits (live output, progress) is read from the playbook's
stdout, line by line as it comes.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from zerorun.testing import LocalFleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402
from ansible_support import REPO, tool  # noqa: E402

WEB = {"web-1", "web-2"}
ALL = {"web-1", "web-2", "db-1"}


@pytest.fixture(scope="module")
def afleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("ansible-fleet"))
    try:
        fleet.start_broker()
        fleet.start_agents({"web-1": {"role": "web", "env": "prod"}, "web-2": {"role": "web", "env": "dev"},
                            "db-1": {"role": "db", "env": "prod"}})
        yield fleet
    except BaseException:
        print(fleet.broker_log()[-4000:])
        raise
    finally:
        fleet.close()


class AnsibleRun(ansible_support.AnsibleRun):
    """The collection's plugins and playbooks; the inventory plugin without set_connection."""

    TIMEOUT = 120.0

    def __init__(self, fleet: LocalFleet, workdir: Path):
        super().__init__(fleet, workdir, "plugin: zerorun.fleet.instances\n")

    def commands(self) -> list:
        return self.fleet.client().commands(limit=1000)


@pytest.fixture
def ansible(afleet, tmp_path):
    return AnsibleRun(afleet, tmp_path)


def unwrap(value):
    """ansible-core 2.19 marks untrusted strings in ``--list`` output as {"__ansible_unsafe": ...}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


# -- inventory -------------------------------------------------------------------------------------

def test_inventory_graph_shows_tag_and_ping_groups_and_hostvars(ansible):
    graph = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--graph")
    assert graph.returncode == 0, graph.stderr
    for group in ("@tag_role_web:", "@tag_role_db:", "@tag_env_prod:", "@tag_env_dev:", "@zerorun_online:"):
        assert group in graph.stdout
    listed = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--list")
    data = unwrap(json.loads(listed.stdout))
    assert set(data["tag_role_web"]["hosts"]) == WEB
    assert set(data["zerorun_online"]["hosts"]) == ALL
    hostvars = data["_meta"]["hostvars"]["web-2"]
    assert hostvars["zerorun_instance_id"] == "web-2"
    assert hostvars["zerorun_tags"] == {"role": "web", "env": "dev"}
    assert hostvars["zerorun_ping_status"] == "Online"
    assert hostvars["zerorun_platform"] and hostvars["zerorun_agent_version"] and hostvars["zerorun_last_seen"]
    assert "tags" not in hostvars


def test_inventory_gives_tags_that_share_a_group_name_groups_of_their_own(fleet, tmp_path):
    """Tags `a b=c` and `a_b=c` both made the group tag_a_b_c: a play on it ran on the hosts of
    both tags, and nothing said so."""
    fleet.start_agents({"s-1": {"a b": "c", "role": "web-1"}, "u-1": {"a_b": "c"}, "u-2": {"a_b": "c"}})
    ansible = AnsibleRun(fleet, tmp_path)
    listed = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--list",
                         "-e", f"ansible_python_interpreter={sys.executable}")
    assert listed.returncode == 0, listed.stderr
    groups = {name: set(group.get("hosts", ())) for name, group in unwrap(json.loads(listed.stdout)).items()
              if name.startswith("tag_")}
    spaced = "tag_a_b_c_" + hashlib.sha256(b"a b\0c").hexdigest()[:8]
    underscored = "tag_a_b_c_" + hashlib.sha256(b"a_b\0c").hexdigest()[:8]
    assert groups == {spaced: {"s-1"}, underscored: {"u-1", "u-2"}, "tag_role_web_1": {"s-1"}}
    warning = " ".join(listed.stderr.split())  # as Ansible wraps it
    assert (f"the tags 'a b=c' and 'a_b=c' all give the group name tag_a_b_c; so that their hosts are not merged, "
            f"no host is put in tag_a_b_c and each tag has its own group: {spaced} (tag 'a b=c'), "
            f"{underscored} (tag 'a_b=c')") in warning, listed.stderr


def test_hostnames_never_gives_two_instances_one_inventory_host(fleet, tmp_path):
    """Agents report this machine's host name; an agent's default instance id is its host name. With
    hostnames: hostname, an instance listed before the one whose id is that host name took the name,
    the other fell back to its id, the same name: one inventory host, the first instance gone."""
    machine = socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", machine) or machine <= "0-app":
        pytest.skip(f"host name {machine!r} cannot be an instance id sorted after 0-app")
    fleet.start_agents({"0-app": {"role": "app"}, machine: {"role": "app"}})
    ansible = ansible_support.AnsibleRun(fleet, tmp_path, "plugin: zerorun.fleet.instances\nhostnames: hostname\n")
    listed = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--list")
    assert listed.returncode == 0, listed.stderr
    hostvars = unwrap(json.loads(listed.stdout))["_meta"]["hostvars"]
    assert {name: v["zerorun_instance_id"] for name, v in hostvars.items()} == {"0-app": "0-app", machine: machine}


def test_an_empty_tag_value_is_a_target_of_the_inventory_and_of_run_command(fleet, tmp_path):
    """`tags set ID owner=` stored an empty value that no target could name: `tag:owner=` was refused
    by the inventory plugin and run_command before they reached the broker ("empty tag value")."""
    fleet.start_agents({"e-1": {"owner": ""}, "e-2": {"owner": "ops"}, "e-3": {}})
    fleet.cli("tags", "set", "e-3", "owner=", check=True)
    ansible = AnsibleRun(fleet, tmp_path)
    ansible.inventory.write_text("plugin: zerorun.fleet.instances\ntargets: 'tag:owner='\n")
    listed = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--list",
                         "-e", f"ansible_python_interpreter={sys.executable}")
    assert listed.returncode == 0, listed.stderr
    data = unwrap(json.loads(listed.stdout))
    assert set(data["_meta"]["hostvars"]) == {"e-1", "e-3"}
    assert set(data["tag_owner_"]["hosts"]) == {"e-1", "e-3"}
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: empty owner
              zerorun.fleet.run_command:
                commands: echo "$ZERORUN_INSTANCE_ID"
                targets: "tag:owner="
    """, "-e", f"ansible_python_interpreter={sys.executable}")
    assert proc.returncode == 0, proc.stdout
    result = ansible.by_host("empty owner")["localhost"]["result"]
    assert {inv["instance_id"]: inv["stdout"] for inv in result["invocations"]} == {"e-1": "e-1", "e-3": "e-3"}


# -- run_command: targets mode ---------------------------------------------------------------------

def test_targets_mode_returns_every_invocation_in_one_command(ansible):
    before = len(ansible.commands())
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          module_defaults:
            group/zerorun.fleet.fleet:
              broker_timeout: 20
          tasks:
            - name: by tag
              zerorun.fleet.run_command:
                commands: echo "hi from $ZERORUN_INSTANCE_ID"
                targets: tag:role=web
                comment: targets mode
    """)
    assert proc.returncode == 0, proc.stdout
    result = ansible.by_host("by tag")["localhost"]["result"]
    assert result.get("failed", False) is False and result["changed"] is True and result["status"] == "Success"
    outputs = {inv["instance_id"]: inv["stdout"] for inv in result["invocations"]}
    assert outputs == {"web-1": "hi from web-1", "web-2": "hi from web-2"}
    assert result["counts"] == {"Success": 2}
    assert result["document"]["name"] == "RunShellScript" and len(result["document"]["sha256"]) == 64
    assert len(ansible.commands()) == before + 1


def test_demo_playbook(ansible):
    proc = ansible.run("ansible-playbook", "zerorun.fleet.demo")
    assert proc.returncode == 0, proc.stdout
    for instance_id in WEB:
        assert "hello from " in proc.stdout and f"as {instance_id}" in proc.stdout
    assert "db-1" not in proc.stdout
    assert "load average" in proc.stdout


def test_report_playbook_writes_a_report_on_the_controller(ansible, tmp_path):
    report = tmp_path / "report.md"
    proc = ansible.run("ansible-playbook", "zerorun.fleet.report", "-e", f"zerorun_report_file={report}")
    assert proc.returncode == 0, proc.stdout
    text = report.read_text()
    for instance_id in ALL:
        assert f"## {instance_id} (Success, rc=0)" in text
    assert "kernel: " in text


# -- run_command: per-host mode ----------------------------------------------------------------------

def test_per_host_mode_one_command_per_batch_and_failures_per_host(ansible):
    before = len(ansible.commands())
    proc = ansible.playbook("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: everyone
              zerorun.fleet.run_command:
                commands: echo "on $ZERORUN_INSTANCE_ID"
            - name: web-2 fails
              zerorun.fleet.run_command:
                commands:
                  - echo "trying on $ZERORUN_INSTANCE_ID"
                  - echo oops >&2
                  - test "$ZERORUN_INSTANCE_ID" != web-2
            - name: after
              ansible.builtin.debug:
                msg: still here
    """)
    assert proc.returncode == 2, proc.stdout  # some host failed
    everyone = ansible.by_host("everyone")
    assert set(everyone) == ALL
    for host, record in everyone.items():
        result = record["result"]
        assert record["outcome"] == "ok" and result.get("failed", False) is False
        # shaped like the command module's result
        assert result["rc"] == 0 and result["stdout"] == f"on {host}" and result["stdout_lines"] == [f"on {host}"]
        assert result["stderr"] == "" and result["stderr_lines"] == [] and result["start"] and result["end"]
        assert result["instance_id"] == host
    assert len({r["result"]["command_id"] for r in everyone.values()}) == 1  # ONE command for the batch
    failing = ansible.by_host("web-2 fails")
    assert failing["web-2"]["outcome"] == "failed"
    assert "instance web-2" in failing["web-2"]["result"]["msg"] and "exit code 1" in failing["web-2"]["result"]["msg"]
    assert failing["web-2"]["result"]["stderr_lines"] == ["oops"]
    assert failing["web-1"]["outcome"] == "ok" and failing["db-1"]["outcome"] == "ok"
    assert set(ansible.by_host("after")) == {"web-1", "db-1"}
    assert len(ansible.commands()) == before + 2
    assert "web-2                      : ok=1    changed=1    unreachable=0    failed=1" in proc.stdout


def test_per_host_mode_registers_the_whole_invocation(ansible):
    """RETURN promised per-host results the host's whole invocation under ``invocation``, a key
    Ansible deletes from every registered result: register never had it (undefined)."""
    proc = ansible.playbook("""
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: per host
              zerorun.fleet.run_command:
                commands: echo "on $ZERORUN_INSTANCE_ID"
              register: ran
            - name: registered
              ansible.builtin.set_fact:
                seen: "{{ ran.zerorun_invocation.instance_id }} {{ ran.zerorun_invocation.stdout }}"
    """)
    assert proc.returncode == 0, proc.stdout
    assert {h: r["result"]["ansible_facts"]["seen"] for h, r in ansible.by_host("registered").items()} == \
        {"web-1": "web-1 on web-1", "web-2": "web-2 on web-2"}


def test_per_host_mode_with_fewer_forks_than_hosts_still_sends_one_command(ansible):
    before = len(ansible.commands())
    proc = ansible.playbook("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: one fork
              zerorun.fleet.run_command:
                commands: hostname
    """, "--forks", "1")
    assert proc.returncode == 0, proc.stdout
    assert set(ansible.by_host("one fork")) == ALL
    assert len(ansible.commands()) == before + 1


def test_unknown_instance_fails_only_its_host(ansible, tmp_path):
    inventory = tmp_path / "ghost.zerorun.yml"
    inventory.write_text(textwrap.dedent("""\
        plugin: zerorun.fleet.instances
        targets: ['tag:role=web']
        compose:
          zerorun_instance_id: "'ghost-1' if zerorun_instance_id == 'web-2' else zerorun_instance_id"
    """))
    proc = ansible.playbook("""
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: ghost
              zerorun.fleet.run_command:
                commands: "true"
    """, inventory=inventory)
    assert proc.returncode == 2
    results = ansible.by_host("ghost")
    assert results["web-1"]["outcome"] == "ok"
    assert results["web-2"]["outcome"] == "failed"
    assert "instance ghost-1" in results["web-2"]["result"]["msg"]
    assert "Undeliverable" in results["web-2"]["result"]["msg"]


def test_rolling_restart_playbook_goes_batch_by_batch(ansible):
    before = {command.command_id for command in ansible.commands()}
    proc = ansible.run("ansible-playbook", "-i", str(ansible.inventory), "zerorun.fleet.rolling_restart")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("PLAY [Rolling restart of tag_role_web]") == 2  # serial: 50% of 2 hosts
    new = [command for command in ansible.commands() if command.command_id not in before]
    assert len(new) == 4  # two tasks x two batches, one command each
    assert all(command.target_count == 1 for command in new)
    assert "would restart web on" in proc.stdout


# -- check mode, wait: false ---------------------------------------------------------------------------

def test_check_mode_sends_nothing_and_diff_shows_the_script(ansible):
    before = len(ansible.commands())
    proc = ansible.playbook("""
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: per host
              zerorun.fleet.run_command:
                commands: echo "checked $ZERORUN_INSTANCE_ID"
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: by tag
              zerorun.fleet.run_command:
                commands: echo "by tag"
                targets: tag:role=db
    """, "--check", "--diff")
    assert proc.returncode == 0, proc.stdout
    assert len(ansible.commands()) == before  # the broker recorded no command
    assert '+echo "checked $ZERORUN_INSTANCE_ID"' in proc.stdout
    assert '+echo "by tag"' in proc.stdout
    per_host = ansible.by_host("per host")
    assert per_host["web-1"]["result"]["would_run_on"] == ["web-1"]
    assert per_host["web-1"]["result"]["command_id"] is None
    assert ansible.by_host("by tag")["localhost"]["result"]["would_run_on"] == ["db-1"]


def test_check_mode_fails_on_an_instance_id_the_broker_does_not_know(ansible):
    """The dry run left an unknown instance id out: --check passed where the run fails the task
    (Undeliverable), and the CLI's send --dry-run said "on 0 instance(s)" with exit 0."""
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: by id
              zerorun.fleet.run_command:
                commands: "true"
                instance_ids: [web-1, nosuch]
    """, "--check")
    assert proc.returncode == 2, proc.stdout
    result = ansible.by_host("by id")["localhost"]
    assert result["outcome"] == "failed" and result["result"]["would_run_on"] == ["web-1"]
    assert "unknown to the broker, would end Undeliverable: nosuch" in result["result"]["msg"]


def test_check_mode_keeps_the_result_keys_so_the_loop_pattern_works(ansible):
    """The common pattern, a loop over the invocations of a registered run, runs in --check too
    (empty: nothing ran) instead of failing on a missing key; so does reading stdout per host."""
    play = """
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: by tag
              zerorun.fleet.run_command:
                commands: echo looped
                targets: tag:role=web
              register: sent
            - name: each invocation
              ansible.builtin.debug:
                msg: "{{ item.instance_id }}: {{ item.stdout }} ({{ sent.counts }})"
              loop: "{{ sent.invocations }}"
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: per host
              zerorun.fleet.run_command:
                commands: echo per-host
              register: mine
            - name: stdout lines
              ansible.builtin.debug:
                msg: "{{ mine.stdout_lines | length }} {{ mine.rc }}"
    """
    before = len(ansible.commands())
    checked = ansible.playbook(play, "--check")
    assert checked.returncode == 0, checked.stdout
    assert len(ansible.commands()) == before
    looped = ansible.by_host("each invocation")["localhost"]
    assert looped["outcome"] == "skipped" and looped["result"]["results"] == []  # nothing ran: no items
    assert {h: r["result"]["msg"] for h, r in ansible.by_host("stdout lines").items()} == {
        "web-1": "0 -1", "web-2": "0 -1"}
    real = ansible.playbook(play)
    assert real.returncode == 0, real.stdout
    items = ansible.by_host("each invocation")["localhost"]["result"]["results"]
    assert sorted(r["msg"].split(" (")[0] for r in items) == ["web-1: looped", "web-2: looped"]


def test_a_local_document_from_ansible_is_named_after_its_file(ansible):
    """run_command document_file: recorded under the file's own name with version $LOCAL, not as
    the stored RunShellScript (the module's default document) it would otherwise pass for."""
    files = ansible.workdir / "files"
    files.mkdir()
    (files / "patch-db.yml").write_text("schemaVersion: '2.2'\nmainSteps:\n  - action: aws:runShellScript\n"
                                        "    name: s\n    inputs:\n      runCommand: [echo patched]\n")
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: from a file
              zerorun.fleet.run_command:
                document_file: patch-db.yml
                targets: tag:role=db
            - name: inline
              zerorun.fleet.run_command:
                document_content: |
                  schemaVersion: '2.2'
                  mainSteps:
                    - action: aws:runShellScript
                      name: s
                      inputs:
                        runCommand: [echo inline]
                targets: tag:role=db
    """)
    assert proc.returncode == 0, proc.stdout
    from_file = ansible.by_host("from a file")["localhost"]["result"]
    assert from_file["document"]["name"] == "patch-db" and from_file["document"]["version"] == "$LOCAL"
    assert from_file["invocations"][0]["stdout"] == "patched"
    inline = ansible.by_host("inline")["localhost"]["result"]
    assert inline["document"]["name"] == "local-document" and inline["document"]["version"] == "$LOCAL"


def test_a_document_file_that_cannot_be_used_fails_with_one_line_naming_it(ansible):
    """run_command's document_file and document's src: a file that is a directory, cannot be
    read, is not UTF-8, or is not YAML or JSON fails the task with one line that names the file
    and says what is wrong (as the CLI says it), not Python's exception text; nothing is sent.
    A file is read exactly as the CLI reads it (CRLF kept: its hash is the file's)."""
    files = ansible.workdir / "files"
    files.mkdir()
    (files / "a-directory").mkdir()
    (files / "latin1.yml").write_bytes("schemaVersion: '2.2'\ndescription: caf\xe9\n".encode("latin-1"))
    (files / "broken.yml").write_text("schemaVersion: '2.2'\nmainSteps: [\n  - action: x\n")
    (files / "a-list.yml").write_text("- schemaVersion: '2.2'\n")
    (files / "crlf.yml").write_bytes(DOCUMENT.replace("\n", "\r\n").encode())
    unreadable = files / "unreadable.yml"
    unreadable.write_text(DOCUMENT)
    unreadable.chmod(0)
    cases = {  # file -> what the message says after naming it
        "a-directory": ("cannot read {option} a-directory ({found}): Is a directory"),
        "/proc/self/mem": ("cannot read {option} /proc/self/mem: Input/output error"),  # unreadable, even by root
        "latin1.yml": ("{option} latin1.yml ({found}) is not UTF-8 text (byte 37)"),
        "broken.yml": ("{option} broken.yml ({found}) is neither valid JSON nor valid YAML at line 3: "
                       "did not find expected node content"),
        "a-list.yml": ("{option} a-list.yml ({found}) is not a document: a document is a mapping with schemaVersion"),
    }
    if os.geteuid() != 0:  # root reads it all the same
        cases["unreadable.yml"] = "cannot read {option} unreadable.yml ({found}): Permission denied"
    tasks = ""
    for n, path in enumerate(cases):
        tasks += f"""
            - name: run {n}
              zerorun.fleet.run_command:
                document_file: {path}
                targets: tag:role=db
              ignore_errors: true
            - name: store {n}
              zerorun.fleet.document:
                name: ItUnusable{n}
                src: {path}
              ignore_errors: true
        """
    before = len(ansible.commands())
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: crlf
              zerorun.fleet.document:
                name: ItCrlf
                src: crlf.yml
        """ + textwrap.indent(textwrap.dedent(tasks), " " * 12),
                            "-e", f"ansible_python_interpreter={sys.executable}")
    assert proc.returncode == 0, proc.stdout
    for n, (path, message) in enumerate(cases.items()):
        found = files / path
        run = ansible.by_host(f"run {n}")["localhost"]
        assert run["outcome"] == "failed"
        assert run["result"]["msg"] == message.format(option="document_file", found=found), run["result"]
        store = ansible.by_host(f"store {n}")["localhost"]
        assert store["outcome"] == "failed"
        if path in ("broken.yml", "a-list.yml"):  # the document module validates it whole, naming its src
            assert store["result"]["msg"].startswith(f"document ItUnusable{n} from src {path} ({found}) is not "
                                                     "valid: "), store["result"]
        else:
            assert store["result"]["msg"] == message.format(option="src", found=found), store["result"]
    assert len(ansible.commands()) == before
    crlf = ansible.by_host("crlf")["localhost"]["result"]
    assert crlf["sha256"] == hashlib.sha256((files / "crlf.yml").read_bytes()).hexdigest()
    names = {d.name for d in ansible.fleet.client().documents()}
    assert "ItCrlf" in names and not any(name.startswith("ItUnusable") for name in names)


def test_wait_false_then_command_info_until_done(ansible):
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: send
              zerorun.fleet.run_command:
                commands: sleep 1; echo done
                targets: tag:role=db
                wait: false
              register: sent
            - name: poll
              zerorun.fleet.command_info:
                command_id: "{{ sent.command_id }}"
              register: info
              until: info.done
              retries: 30
              delay: 1
    """)
    assert proc.returncode == 0, proc.stdout
    sent = ansible.by_host("send")["localhost"]["result"]
    assert sent["status"] in ("Pending", "InProgress") and sent["command_id"]
    info = ansible.by_host("poll")["localhost"]["result"]
    assert info["done"] is True and info["status"] == "Success"
    assert info["command_id"] == sent["command_id"]
    assert [inv["stdout"] for inv in info["invocations"]] == ["done"]


def test_command_info_without_output_reports_nothing_truncated(ansible):
    """include_output=false said of every invocation that its output was cut ("stdout truncated
    after 0 of 6 bytes", stdout_truncated true) and put that in the task's msg."""
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: send
              zerorun.fleet.run_command:
                commands: echo hello; echo oops >&2
                targets: tag:role=db
              register: sent
            - name: brief
              zerorun.fleet.command_info:
                command_id: "{{ sent.command_id }}"
                include_output: false
              register: info
    """)
    assert proc.returncode == 0, proc.stdout
    info = ansible.by_host("brief")["localhost"]["result"]
    [inv] = info["invocations"]
    assert (inv["stdout"], inv["stderr"], inv["stdout_size"], inv["stderr_size"]) == ("", "", 6, 5)
    assert (inv["stdout_truncated"], inv["stderr_truncated"], inv["output_note"]) == (False, False, "")
    assert info["msg"] == "command %s Success on 1 instance(s)" % info["command_id"]


def test_command_info_refuses_a_negative_wait_timeout_as_run_command_does(ansible):
    """wait=true with wait_timeout=-5 was taken as 0: one look and the task returned the command
    still running, as if it had waited."""
    command_id = ansible.fleet.client().send("RunShellScript", targets=["tag:role=db"],
                                             parameters={"commands": ["true"]}).command_id
    proc = ansible.adhoc("localhost", "zerorun.fleet.command_info", "-a",
                         f"command_id={command_id} wait=true wait_timeout=-5")
    assert proc.returncode != 0
    assert '"msg": "wait_timeout must be 0 or more seconds (unset: no limit), got -5"' in proc.stdout


# -- run_command while it waits: live output, progress; async ---------------------------------------

class LivePlaybook:
    """ansible-playbook started in the background, its stdout and stderr read line by line as they
    come (``lines``: in order of arrival; ``stderr``: the lines that came on stderr).
    PYTHONUNBUFFERED: Python block-buffers a pipe (a terminal gets each line at once)."""

    def __init__(self, ansible: AnsibleRun, text: str, *args: str):
        path = ansible.workdir / "live.yml"
        path.write_text(textwrap.dedent(text))
        if ansible.record.exists():
            ansible.record.unlink()
        self.proc = subprocess.Popen(
            [tool("ansible-playbook"), "-i", str(ansible.inventory), str(path),
             "-e", f"ansible_python_interpreter={sys.executable}", *args],
            cwd=REPO, env=dict(ansible.env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._open = 2
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put((stream is self.proc.stderr, line.rstrip("\n")))
        self._queue.put(None)

    def _next(self, timeout: float) -> str | None:
        """The next line from either stream; None when both ended."""
        while self._open:
            item = self._queue.get(timeout=timeout)
            if item is None:
                self._open -= 1
                continue
            on_stderr, line = item
            self.lines.append(line)
            if on_stderr:
                self.stderr.append(line)
            return line
        return None

    def wait_for_line(self, predicate, timeout: float = 60.0) -> str:
        """The first line (seen or to come) for which predicate holds; fails at the process's end."""
        for line in self.lines:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no such line within %ss; so far:\n%s" % (timeout, "\n".join(self.lines)))
            if line is None:
                raise AssertionError("ansible-playbook ended without such a line:\n" + "\n".join(self.lines))
            if predicate(line):
                return line

    def finish(self, timeout: float = 120.0) -> tuple[int, list[str]]:
        returncode = self.proc.wait(timeout)
        while self._next(10) is not None:
            pass
        print("\n".join(self.lines))
        return returncode, self.lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


WAIT_FOR_MARKER = 'for i in $(seq 600); do [ -e {marker} ] && break; sleep 0.1; done; [ -e {marker} ] || exit 3'


def test_with_v_output_lines_arrive_before_the_task_ends(ansible, tmp_path):
    """Each step's line is seen in the playbook's stdout while the step still waits for a marker
    that the test creates only then; the batch's leader alone prints, once per line, before the
    hosts' results, and -v does not dump the shown output again. Nothing of a no_log task."""
    marker = tmp_path / "go-on"
    run = LivePlaybook(ansible, f"""
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: live
              zerorun.fleet.run_command:
                commands:
                  - echo "first from $ZERORUN_INSTANCE_ID"
                  - echo "warning from $ZERORUN_INSTANCE_ID" >&2
                  - {WAIT_FOR_MARKER.format(marker=marker)}
                  - echo "after the marker on $ZERORUN_INSTANCE_ID"
            - name: hidden
              zerorun.fleet.run_command:
                commands: echo "not for the screen"
              no_log: true
    """, "-v")
    try:
        for instance_id in sorted(WEB):
            run.wait_for_line(lambda line, i=instance_id: line == f"{i} | first from {i}")
        assert not any(line.startswith("changed: [") for line in run.lines)  # the task goes on
        marker.touch()
        returncode, lines = run.finish()
    finally:
        run.stop()
    assert returncode == 0
    for instance_id in WEB:
        for line in (f"{instance_id} | first from {instance_id}", f"{instance_id} ! warning from {instance_id}",
                     f"{instance_id} | after the marker on {instance_id}", f"{instance_id} -- Success"):
            assert lines.count(line) == 1, line  # shown once: by the leader only
            assert line not in run.stderr  # -v messages: stdout
        result = ansible.by_host("live")[instance_id]["result"]
        assert result["stdout_lines"] == [f"first from {instance_id}", f"after the marker on {instance_id}"]
    assert not any("not for the screen" in line for line in lines)  # no_log: no live output either
    results_at = [n for n, line in enumerate(lines) if line.startswith("changed: [")][:2]  # the task "live"
    assert sorted(lines[n] for n in results_at) == ["changed: [web-1]", "changed: [web-2]"]  # no dump
    assert not any("after the marker" in line for line in lines if not line.startswith(("web-1 |", "web-2 |")))
    last_output = max(n for n, line in enumerate(lines) if " -- Success" in line or " | " in line)
    assert last_output < min(results_at)


def test_progress_lines_without_v_on_a_slow_command_none_on_a_quick_one(ansible, tmp_path):
    """The rule: nothing for a command that ends within progress_interval seconds; then a line at
    most every interval; a last line with the final counts. On stderr; without -v no output
    lines. In per-host mode the batch's leader alone prints (one last line per command)."""
    markers = {name: tmp_path / name for name in ("targets", "per-host")}
    run = LivePlaybook(ansible, f"""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: quick
              zerorun.fleet.run_command:
                commands: echo quick
                targets: tag:role=web
            - name: slow
              zerorun.fleet.run_command:
                commands:
                  - echo "slow output"
                  - {WAIT_FOR_MARKER.format(marker=markers["targets"])}
                targets: tag:role=db
                progress_interval: 1
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: slow per host
              zerorun.fleet.run_command:
                commands: {WAIT_FOR_MARKER.format(marker=markers["per-host"])}
                progress_interval: 1
    """)
    try:
        first = run.wait_for_line(lambda line: line.startswith("zerorun: command "))
        markers["targets"].touch()
        run.wait_for_line(lambda line: line.startswith("zerorun: command ") and "/2 done" in line)
        markers["per-host"].touch()
        returncode, lines = run.finish()
    finally:
        run.stop()
    assert returncode == 0
    slow = ansible.by_host("slow")["localhost"]["result"]
    quick = ansible.by_host("quick")["localhost"]["result"]
    (per_host,) = {r["result"]["command_id"] for r in ansible.by_host("slow per host").values()}
    progress = [line for line in lines if line.startswith("zerorun: command ")]
    assert progress == [line for line in run.stderr if line.startswith("zerorun: command ")]  # on stderr
    by_command: dict[str, list[str]] = {}
    for line in progress:
        by_command.setdefault(line.split()[2].rstrip(":"), []).append(line)
    assert quick["status"] == "Success" and quick["command_id"] not in by_command  # quick: no progress line
    assert set(by_command) == {slow["command_id"], per_host}
    assert by_command[slow["command_id"]][0] == first
    assert first.startswith(f"zerorun: command {slow['command_id']}: 0/1 done, 1 running, 0 failed, 0 pending (")
    assert ": 1/1 done, 0 running, 0 failed, 0 pending (" in by_command[slow["command_id"]][-1]
    finals = [line for line in by_command[per_host] if ": 2/2 done, 0 running" in line]
    assert finals == by_command[per_host][-1:], progress  # one printer for the batch, one last line
    assert not any(re.match(r"\S+ +[|!] ", line) for line in lines)  # no -v: no output lines
    assert slow["invocations"][0]["stdout"] == "slow output"


def test_async_is_refused_and_points_at_wait_false(ansible):
    before = len(ansible.commands())
    proc = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: async
              zerorun.fleet.run_command:
                commands: echo never
                targets: tag:role=db
              async: 60
              poll: 0
    """, "-e", f"ansible_python_interpreter={sys.executable}")
    assert proc.returncode == 2, proc.stdout
    result = ansible.by_host("async")["localhost"]
    assert result["outcome"] == "failed"
    assert "zerorun.fleet.run_command does not support async" in result["result"]["msg"]
    assert "wait: false" in result["result"]["msg"] and "zerorun.fleet.command_info" in result["result"]["msg"]
    assert len(ansible.commands()) == before  # nothing sent


# -- document module -----------------------------------------------------------------------------------

DOCUMENT = """\
schemaVersion: "2.2"
description: Greets
parameters:
  who:
    type: String
    default: world
mainSteps:
  - action: aws:runShellScript
    name: greet
    inputs:
      runCommand:
        - echo "hello {{ who }}"
"""


def test_document_module_is_idempotent_and_honours_check_mode(ansible):
    files = ansible.workdir / "files"
    files.mkdir()
    (files / "greet.yml").write_text(DOCUMENT)
    playbook = """
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: store
              zerorun.fleet.document:
                name: ItGreet
                src: greet.yml
            - name: changed content in check mode
              zerorun.fleet.document:
                name: ItGreet
                content: "{{ lookup('file', 'files/greet.yml') | replace('hello', 'bye') }}"
              check_mode: true
              diff: true
            - name: inline
              zerorun.fleet.document:
                name: ItInline
                set_default: true
                content: !unsafe |
                  schemaVersion: "2.2"
                  parameters: {who: {type: String}}
                  mainSteps:
                    - action: aws:runShellScript
                      name: hi
                      inputs: {runCommand: ["echo hi {{ who }}"]}
            - name: run it
              zerorun.fleet.run_command:
                document: ItGreet
                parameters:
                  who: ansible
                targets: tag:role=db
    """
    first = ansible.playbook(playbook)
    assert first.returncode == 0, first.stdout
    assert ansible.by_host("store")["localhost"]["result"]["changed"] is True
    assert ansible.by_host("inline")["localhost"]["result"]["changed"] is True
    checked = ansible.by_host("changed content in check mode")["localhost"]["result"]
    assert checked["changed"] is True and checked["created"] is True
    assert '-        - echo "hello {{ who }}"' in first.stdout and '+        - echo "bye {{ who }}"' in first.stdout
    ran = ansible.by_host("run it")["localhost"]["result"]
    assert [inv["stdout"] for inv in ran["invocations"]] == ["hello ansible"]
    versions = ansible.fleet.client().document_versions("ItGreet")
    assert [v.version for v in versions] == [1]  # check mode stored nothing

    second = ansible.playbook(playbook)
    assert second.returncode == 0, second.stdout
    assert ansible.by_host("store")["localhost"]["result"]["changed"] is False
    assert ansible.by_host("inline")["localhost"]["result"]["changed"] is False
    assert "localhost                  : ok=4    changed=2" in second.stdout  # check-mode task + run_command
    assert len(ansible.fleet.client().document_versions("ItGreet")) == 1

    removed = ansible.playbook("""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: remove
              zerorun.fleet.document:
                name: ItGreet
                state: absent
            - name: remove again
              zerorun.fleet.document:
                name: ItGreet
                state: absent
            - name: remove inline
              zerorun.fleet.document:
                name: ItInline
                state: absent
    """)
    assert removed.returncode == 0, removed.stdout
    assert ansible.by_host("remove")["localhost"]["result"]["changed"] is True
    assert ansible.by_host("remove again")["localhost"]["result"]["changed"] is False


# -- ad-hoc, pytest-ansible, ansible-runner ------------------------------------------------------------

def test_adhoc_short_form_prints_each_hosts_output(ansible):
    before = len(ansible.commands())
    proc = ansible.run("ansible", "-i", str(ansible.inventory), "tag_role_web", "-m", "zerorun.fleet.run_command",
                       "-a", "commands=uptime")
    assert proc.returncode == 0, proc.stdout
    for instance_id in WEB:
        assert f"{instance_id} | CHANGED" in proc.stdout
    assert proc.stdout.count("load average") >= 2
    assert len(ansible.commands()) == before + 1


@pytest.mark.parametrize("value", ["nan", "-1", "1e300"])
def test_a_broker_timeout_out_of_range_is_named_and_nothing_is_sent(ansible, value):
    """broker_timeout nan or 1e300 failed as "Task failed: cannot convert float NaN to integer"
    (ZeroMQ's poll); -1 blamed a broker that was there ("no answer ... within -1s")."""
    before = len(ansible.commands())
    proc = ansible.playbook(f"""
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: timeout
              zerorun.fleet.run_command:
                commands: echo never
                targets: tag:role=web
                broker_timeout: {value}
    """, "-e", f"ansible_python_interpreter={sys.executable}")
    assert proc.returncode == 2, proc.stdout
    result = ansible.by_host("timeout")["localhost"]
    assert result["outcome"] == "failed"
    assert result["result"]["msg"].startswith("broker_timeout must be a number of seconds from more than 0 to"
                                              " 2592000 (30 days), not ")
    assert len(ansible.commands()) == before  # nothing sent


def test_pytest_ansible_adhoc_fixture(ansible, ansible_adhoc, monkeypatch):
    """pytest-ansible's ansible_adhoc runs the module in-process over the plugin's inventory."""
    monkeypatch.setenv("ZERORUN_CONFIG", str(ansible.fleet.client_config))
    hosts = ansible_adhoc(inventory=str(ansible.inventory), host_pattern="tag_role_web")
    results = getattr(hosts["tag_role_web"], "zerorun.fleet.run_command")(
        commands='echo "adhoc on $ZERORUN_INSTANCE_ID"')
    assert set(results.keys()) == WEB
    for host in WEB:
        assert not results[host].get("failed")
        assert results[host]["stdout"] == f"adhoc on {host}"
    assert len({results[h]["command_id"] for h in WEB}) == 1


def test_ansible_runner_with_the_inventory_plugin(ansible, tmp_path):
    """What AWX does: ansible-runner runs the job with the inventory plugin as inventory source."""
    import ansible_runner

    private = tmp_path / "runner"
    (private / "project").mkdir(parents=True)
    (private / "project" / "site.yml").write_text(textwrap.dedent("""\
        - hosts: tag_role_web
          gather_facts: false
          tasks:
            - name: via runner
              zerorun.fleet.run_command:
                commands: echo "runner on $ZERORUN_INSTANCE_ID"
    """))
    runner = ansible_runner.run(
        private_data_dir=str(private), playbook="site.yml", inventory=str(ansible.inventory),
        quiet=True, timeout=120,
        envvars={"ZERORUN_CONFIG": str(ansible.fleet.client_config),
                 "PATH": os.pathsep.join([str(Path(tool("ansible-playbook")).parent), os.environ.get("PATH", "")]),
                 "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collection"),
                 "ANSIBLE_DEPRECATION_WARNINGS": "0"})
    print(runner.stdout.read())
    assert runner.status == "successful" and runner.rc == 0
    oks = {e["event_data"]["host"]: e["event_data"]["res"] for e in runner.events
           if e["event"] == "runner_on_ok" and e["event_data"].get("task") == "via runner"}
    assert set(oks) == WEB
    for host, res in oks.items():
        assert res["stdout"] == f"runner on {host}" and res["rc"] == 0
