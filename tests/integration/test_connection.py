"""Conformance suite for the zerorun.fleet.agent connection plugin, in the style of
community.general's connection tests: real ``ansible`` / ``ansible-playbook`` processes run
ordinary modules (raw, command, copy, fetch, template, setup, ping) on real agents through a real
broker. The "remote" side is this machine (the agents run here), so every host works under its
own directory and the results are checked on disk as well as from Ansible's own results, read
from a small recording callback (JSON lines).

One LocalFleet per module: web-1, web-2 (role=web) and db-1 (role=db).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zerorun import keys
from zerorun.client import Client, ClientConfig, RequestFailed
from zerorun.testing import LocalFleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402

HOSTS = ("web-1", "web-2", "db-1")
CONNECTION = "zerorun.fleet.agent"

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cfleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("connection-fleet"))
    try:
        fleet.start_broker()
        fleet.start_agents({"web-1": {"role": "web"}, "web-2": {"role": "web"}, "db-1": {"role": "db"}})
        yield fleet
    except BaseException:
        print(fleet.broker_log()[-4000:])
        raise
    finally:
        fleet.close()


class AnsibleRun(ansible_support.AnsibleRun):
    """Hosts from the inventory plugin with set_connection: every task goes through the agents."""

    def __init__(self, fleet: LocalFleet, workdir: Path):
        super().__init__(fleet, workdir, "plugin: zerorun.fleet.instances\nset_connection: true\n",
                         ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_HOST_KEY_CHECKING="0",
                         ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
        self.remote = workdir / "remote"  # the instances' side of the test (the agents run here)
        self.remote.mkdir()


@pytest.fixture
def ansible(cfleet, tmp_path):
    return AnsibleRun(cfleet, tmp_path)


def ok_on_all(ansible: AnsibleRun, task: str, hosts=HOSTS) -> dict[str, dict]:
    results = ansible.by_host(task)
    assert set(results) == set(hosts), results
    for host, rec in results.items():
        assert rec["outcome"] == "ok", (host, rec)
    return {h: r["result"] for h, r in results.items()}


# -- commands -------------------------------------------------------------------------------------

def test_raw_keeps_stdout_stderr_and_rc_apart(ansible):
    proc = ansible.playbook("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: raw
              raw: printf 'out %s\\n' "$(hostname)"; echo err >&2; exit 3
              register: r
              failed_when: r.rc != 3
    """)
    assert proc.returncode == 0, proc.stdout
    for result in ok_on_all(ansible, "raw").values():
        assert result["rc"] == 3
        assert result["stdout"].startswith("out ")
        assert result["stderr"].strip() == "err"  # separate streams: no PTY merging, no markers


@pytest.mark.parametrize("pipelining", ["true", "false"])
def test_command_with_stdin(ansible, pipelining):
    proc = ansible.playbook("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: cat
              command: cat
              args:
                stdin: "héllo {{ inventory_hostname }}\\nsecond line"
    """, "-e", f"ansible_pipelining={pipelining}")
    assert proc.returncode == 0, proc.stdout
    for host, result in ok_on_all(ansible, "cat").items():
        assert result["stdout"] == f"héllo {host}\nsecond line"
        assert result["rc"] == 0


def test_ping_and_setup_through_the_inventory_plugin(ansible):
    proc = ansible.adhoc("all", "ping")
    assert proc.returncode == 0, proc.stdout
    assert {h: r["ping"] for h, r in ok_on_all(ansible, "ping").items()} == dict.fromkeys(HOSTS, "pong")
    proc = ansible.adhoc("all", "setup", "-a", "gather_subset=min")
    assert proc.returncode == 0, proc.stdout
    for result in ok_on_all(ansible, "setup").values():
        facts = result["ansible_facts"]
        assert facts["ansible_system"] == "Linux"
        assert facts["ansible_python"]["executable"] == sys.executable


# -- files ----------------------------------------------------------------------------------------

def test_copy_and_fetch_text_binary_unicode_and_modes(ansible, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "text.txt").write_text("plain text\nwith two lines\n")
    (src / "binary.bin").write_bytes(bytes(range(256)) * 64 + b"\x00\xff" * 1000)
    (src / "ünïcødé ✓ name.txt").write_text("unicode named file ✓\n")
    script = src / "tool.sh"
    script.write_text("#!/bin/sh\necho tool ran\n")
    script.chmod(0o755)
    files = ["text.txt", "binary.bin", "ünïcødé ✓ name.txt"]
    proc = ansible.playbook(f"""
        - hosts: all
          gather_facts: false
          vars:
            dir: "{ansible.remote}/{{{{ inventory_hostname }}}}"
            files: {json.dumps(files)}
          tasks:
            - name: dir
              file: {{path: "{{{{ dir }}}}", state: directory}}
            - name: copy
              copy: {{src: "{src}/{{{{ item }}}}", dest: "{{{{ dir }}}}/{{{{ item }}}}", mode: "0640"}}
              loop: "{{{{ files }}}}"
            - name: copy preserve
              copy: {{src: "{script}", dest: "{{{{ dir }}}}/tool.sh", mode: preserve}}
            - name: run tool
              command: "{{{{ dir }}}}/tool.sh"
            - name: fetch
              fetch: {{src: "{{{{ dir }}}}/{{{{ item }}}}", dest: "{tmp_path}/back/{{{{ inventory_hostname }}}}/", flat: true}}
              loop: "{{{{ files }}}}"
            - name: copy again
              copy: {{src: "{src}/{{{{ item }}}}", dest: "{{{{ dir }}}}/{{{{ item }}}}", mode: "0640"}}
              loop: "{{{{ files }}}}"
    """)
    assert proc.returncode == 0, proc.stdout
    for host, result in ok_on_all(ansible, "run tool").items():
        assert result["stdout"] == "tool ran"
    for host in HOSTS:
        for name in files:
            remote = ansible.remote / host / name
            assert remote.read_bytes() == (src / name).read_bytes()
            assert stat.S_IMODE(remote.stat().st_mode) == 0o640
            assert (tmp_path / "back" / host / name).read_bytes() == (src / name).read_bytes()
        assert stat.S_IMODE((ansible.remote / host / "tool.sh").stat().st_mode) == 0o755
    again = ok_on_all(ansible, "copy again")
    assert all(not r["changed"] for r in again.values())  # checksums match: nothing rewritten
    leftovers = [p for p in ansible.remote.rglob("*") if ".zerorun-" in p.name]
    assert leftovers == []


def test_fifty_megabyte_file_both_ways(ansible, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(50):
            handle.write(os.urandom(1 << 20))
    digest = sha256(big)
    started = time.monotonic()
    proc = ansible.playbook(f"""
        - hosts: web-1
          gather_facts: false
          tasks:
            - name: put
              copy: {{src: "{big}", dest: "{ansible.remote}/big.bin"}}
            - name: get
              fetch: {{src: "{ansible.remote}/big.bin", dest: "{tmp_path}/big-back.bin", flat: true}}
    """)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout
    assert sha256(ansible.remote / "big.bin") == digest
    assert sha256(tmp_path / "big-back.bin") == digest
    assert ok_on_all(ansible, "put", ["web-1"])["web-1"]["checksum"]  # sha1 computed by copy
    print(f"50 MiB up and down through the broker in {elapsed:.1f}s")


def test_client_transfers_stream_and_verify(cfleet, tmp_path):
    """The client calls under the plugin: mode kept on replace, checksum enforced, no temp left."""
    client = cfleet.client()
    local = tmp_path / "f.txt"
    local.write_text("v1\n")
    target = tmp_path / "remote.txt"
    target.write_text("old\n")
    target.chmod(0o600)
    info = client.put_file("db-1", local, str(target), chunk_size=2)
    assert target.read_text() == "v1\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert info["sha256"] == sha256(local)
    fresh = tmp_path / "fresh.txt"
    client.put_file("db-1", local, str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    # a commit whose digest does not match leaves the target alone
    from zerorun import protocol

    client._file_op("db-1", "t-bad", "open-put", path=str(target))
    client._file_op("db-1", "t-bad", "write", data=b"evil")
    with pytest.raises(RequestFailed) as exc:
        client._file_op("db-1", "t-bad", "commit", sha256="0" * 64)
    assert exc.value.code == "FileError" and "checksum mismatch" in str(exc.value)
    assert target.read_text() == "v1\n"
    assert not [p for p in tmp_path.iterdir() if ".zerorun-" in p.name]
    with pytest.raises(RequestFailed) as exc:  # not found is a code from the agent, not a message
        client.fetch_file("db-1", str(tmp_path / "missing"), tmp_path / "x")
    assert exc.value.code == "FileNotFound"
    with pytest.raises(RequestFailed) as exc:
        client.fetch_file("db-1", str(tmp_path), tmp_path / "x")  # a directory: another failure
    assert exc.value.code in ("FileError", "IsADirectory") and exc.value.code != "FileNotFound"
    assert protocol.ExecReply(rc=0) == client.exec("db-1", "true")


def test_fetch_of_a_missing_file_is_file_not_found(ansible, tmp_path):
    """ansible's fetch tells "not found" (AnsibleFileNotFound, from the agent's FileNotFound code)
    from other failures: fail_on_missing=false skips it instead of failing the host."""
    proc = ansible.playbook(f"""
        - hosts: all
          gather_facts: false
          tasks:
            - name: fetch missing
              fetch: {{src: "{ansible.remote}/does-not-exist", dest: "{tmp_path}/back/", fail_on_missing: false}}
    """, inventory=_static_inventory(ansible, ["web-1"]))
    assert proc.returncode == 0, proc.stdout
    result = ansible.by_host("fetch missing")["web-1"]["result"]
    assert "not found" in result["msg"].lower() or "does not exist" in result["msg"].lower(), result


TRANSFER_ACTION = """
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    \"\"\"put_file / fetch_file of the task's connection, as the copy and fetch actions call them.\"\"\"

    def run(self, tmp=None, task_vars=None):
        args = self._task.args
        getattr(self._connection, args["op"] + "_file")(args["src"], args["dest"])
        return {"changed": True}
"""


def test_local_file_errors_are_one_clear_line(ansible, tmp_path):
    """A local file that cannot be read (put) or written (fetch) fails the task with one line
    naming the file and what is wrong ("cannot read X: Is a directory"), the errors ansible's own
    connection plugins raise (AnsibleFileNotFound when missing, else AnsibleError), never
    Python's text of the error; the host stays reachable and nothing is left behind."""
    (tmp_path / "action_plugins").mkdir()
    (tmp_path / "action_plugins" / "zerorun_transfer.py").write_text(TRANSFER_ACTION)
    remote_file = ansible.remote / "there.txt"
    remote_file.write_text("there\n")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    in_the_way = tmp_path / "back" / "web-1" / str(remote_file).lstrip("/")
    in_the_way.mkdir(parents=True)  # fetch (not flat) would write its file there: a directory
    cases = {  # task: (op, src, dest, message)
        "put missing": ("put", tmp_path / "missing", ansible.remote / "m",
                        f"file or module does not exist: {tmp_path / 'missing'}"),
        "put directory": ("put", a_dir, ansible.remote / "d",
                          f"zerorun.fleet.agent: cannot read {a_dir}: Is a directory"),
        "put unreadable": ("put", "/proc/self/mem", ansible.remote / "u",  # unreadable, even by root
                           "zerorun.fleet.agent: cannot read /proc/self/mem: Input/output error"),
        "fetch into a missing directory": ("fetch", remote_file, tmp_path / "nowhere" / "f",
                                           f"zerorun.fleet.agent: cannot write {tmp_path / 'nowhere' / 'f'}: "
                                           f"directory {tmp_path / 'nowhere'} does not exist"),
        "fetch onto a directory": ("fetch", remote_file, a_dir,
                                   f"zerorun.fleet.agent: cannot write {a_dir}: Is a directory"),
        "fetch without permission": ("fetch", remote_file, "/sys/kernel/zerorun-fetched",  # even root
                                     "zerorun.fleet.agent: cannot write /sys/kernel/zerorun-fetched: "
                                     "Permission denied"),
    }
    tasks = "".join(f"""
            - name: {task}
              zerorun_transfer: {{op: {op}, src: "{src}", dest: "{dest}"}}
              ignore_errors: true
    """ for task, (op, src, dest, _) in cases.items())
    proc = ansible.playbook(f"""
        - hosts: all
          gather_facts: false
          tasks:
    {tasks}
            - name: fetch module onto a directory
              fetch: {{src: "{remote_file}", dest: "{tmp_path}/back"}}
              ignore_errors: true
            - name: still reachable
              raw: echo still here
    """, inventory=_static_inventory(ansible, ["web-1"]))
    assert proc.returncode == 0, proc.stdout
    cases["fetch module onto a directory"] = (
        None, None, None, f"zerorun.fleet.agent: cannot write {in_the_way}: Is a directory")
    for task, (_, _, _, message) in cases.items():
        rec = ansible.by_host(task)["web-1"]
        assert rec["outcome"] == "failed", (task, rec)
        first, *more = rec["result"]["msg"].removeprefix("Task failed: ").splitlines()
        assert first == message, (task, rec["result"])
        assert bool(more) == (task == "put missing"), rec["result"]  # what ansible adds to AnsibleFileNotFound
        assert "Errno" not in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert ansible.by_host("still reachable")["web-1"]["outcome"] == "ok"
    assert sorted(p.name for p in ansible.remote.iterdir()) == ["there.txt"]  # no upload started or left
    assert list(tmp_path.rglob("*.zerorun.tmp")) == []
    assert list(a_dir.iterdir()) == [] and list(in_the_way.iterdir()) == []


# -- settings from the inventory, ansible.cfg or the environment ----------------------------------

def test_the_inventory_config_file_reaches_the_connection(cfleet, tmp_path):
    """Only the inventory file names the client config (no ZERORUN_* in the environment): the
    inventory plugin passes it on as ansible_zerorun_config, so the connection finds the broker."""
    ansible = AnsibleRun(cfleet, tmp_path)
    ansible.inventory.write_text(f"plugin: zerorun.fleet.instances\nset_connection: true\nconfig_file: {cfleet.client_config}\n")
    env = {k: v for k, v in ansible.env.items() if not k.startswith("ZERORUN_") or k in ("ZERORUN_TEST_RECORD", "ZERORUN_CONTROL_PATH_DIR")}
    ansible.env = env
    proc = ansible.adhoc("web-1", "ping")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ansible.by_host("ping")["web-1"]["result"]["ping"] == "pong"


def test_an_inventory_from_the_environment_leaves_the_job_its_own_settings(cfleet, tmp_path):
    """AWX runs an inventory update and each job apart, each with a client config file of its own
    injected (ZERORUN_CONFIG, deleted afterwards), and stores the inventory's hosts and variables.
    The inventory plugin made the update's ZERORUN_CONFIG the host variable ansible_zerorun_config,
    which beats the job's environment: every task of every job was unreachable, "not found"."""
    ansible = AnsibleRun(cfleet, tmp_path)
    update_config = tmp_path / "inventory-update" / "config"
    update_config.parent.mkdir()
    shutil.copy(cfleet.client_config, update_config)
    listed = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--list", "--yaml",
                         env={"ZERORUN_CONFIG": str(update_config)})
    assert listed.returncode == 0, listed.stderr
    stored = tmp_path / "stored.yml"  # what AWX keeps of the inventory update
    stored.write_text(listed.stdout)
    shutil.rmtree(update_config.parent)  # AWX removes the update's private files
    job_config = tmp_path / "job" / "config"
    job_config.parent.mkdir()
    shutil.copy(cfleet.client_config, job_config)
    proc = ansible.run("ansible", "web-1", "-i", str(stored), "-m", "ping", env={"ZERORUN_CONFIG": str(job_config)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ansible.by_host("ping")["web-1"]["result"]["ping"] == "pong"
    assert "ansible_zerorun_config" not in listed.stdout


def test_the_connection_takes_its_settings_from_ansible_cfg(cfleet, tmp_path):
    ansible = AnsibleRun(cfleet, tmp_path)
    config = tmp_path / "ansible.cfg"
    config.write_text((ansible_support.REPO / "ansible.cfg").read_text().replace(
        "collections_path = ./collection", f"collections_path = {ansible_support.REPO / 'collection'}")
        + f"\n[zerorun_connection]\nconfig_file = {cfleet.client_config}\n")
    ansible.env = {k: v for k, v in ansible.env.items() if k != "ZERORUN_CONFIG"}
    ansible.env["ANSIBLE_CONFIG"] = str(config)
    proc = ansible.run("ansible", "all", "-i", str(_static_inventory(ansible, ["web-1"])), "-m", "ping")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ansible.by_host("ping")["web-1"]["result"]["ping"] == "pong"


def test_missing_settings_are_named_the_way_ansible_takes_them(cfleet, tmp_path):
    ansible = AnsibleRun(cfleet, tmp_path)
    ansible.env = {k: v for k, v in ansible.env.items() if k != "ZERORUN_CONFIG"}
    ansible.env["HOME"] = str(tmp_path)  # no ~/.config/zerorun/client.yaml either
    proc = ansible.run("ansible", "all", "-i", str(_static_inventory(ansible, ["web-1"])), "-m", "ping")
    assert proc.returncode != 0
    rec = ansible.by_host("ping")["web-1"]
    assert rec["outcome"] == "unreachable"
    msg = rec["result"]["msg"]
    assert "ansible_zerorun_config" in msg and "[zerorun_connection]" in msg and "ZERORUN_CONFIG" in msg
    assert "-c FILE" not in msg  # a CLI flag means nothing to an Ansible user


def test_the_python_interpreter_from_the_inventory_compose(cfleet, tmp_path):
    """What the docs advise for interpreter discovery: ansible_python_interpreter from compose."""
    ansible = AnsibleRun(cfleet, tmp_path)
    ansible.env = {k: v for k, v in ansible.env.items() if k != "ANSIBLE_PYTHON_INTERPRETER"}
    ansible.inventory.write_text("plugin: zerorun.fleet.instances\nset_connection: true\n"
                                 f"compose:\n  ansible_python_interpreter: \"'{sys.executable}'\"\n")
    proc = ansible.adhoc("db-1", "setup", "-a", "gather_subset=min")
    assert proc.returncode == 0, proc.stdout
    facts = ansible.by_host("setup")["db-1"]["result"]["ansible_facts"]
    assert facts["ansible_python"]["executable"] == sys.executable


# -- become ---------------------------------------------------------------------------------------

def test_become_to_the_agents_own_user_needs_no_sudo(ansible, tmp_path):
    """The agent runs as root here and there is no sudo on this machine: become to root is the
    user the connection reports (the agent's), so Ansible does not wrap commands in sudo."""
    if os.geteuid() != 0:
        pytest.skip("the agents must run as root for become_user=root to be their own user")
    (ansible.remote / "data.txt").write_text("fetched with become\n")
    proc = ansible.playbook(f"""
        - hosts: all
          gather_facts: false
          become: true
          tasks:
            - name: whoami
              command: id -un
            - name: fetch as root
              fetch: {{src: "{ansible.remote}/data.txt", dest: "{tmp_path}/back/", flat: true}}
    """, inventory=_static_inventory(ansible, ["web-1", "db-1"]))
    assert proc.returncode == 0, proc.stdout
    assert {h: r["stdout"] for h, r in ok_on_all(ansible, "whoami", ["web-1", "db-1"]).items()} == \
        {"web-1": "root", "db-1": "root"}
    assert (tmp_path / "back" / "data.txt").read_text() == "fetched with become\n"
    # told instead of asked: the same, without the round trip
    proc = ansible.playbook("""
        - hosts: all
          gather_facts: false
          become: true
          tasks:
            - name: whoami
              command: id -un
    """, "-e", "ansible_zerorun_agent_user=root", inventory=_static_inventory(ansible, ["web-1"]))
    assert proc.returncode == 0, proc.stdout
    assert ok_on_all(ansible, "whoami", ["web-1"])["web-1"]["stdout"] == "root"


def test_become_through_the_su_become_plugin(ansible):
    if shutil.which("su") is None:
        pytest.skip("no su on this machine")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    if os.geteuid() != 0:
        pytest.skip("su without a password needs the agent to run as root")
    # sudo is not installed here; su as root needs no password. nobody's shell is nologin,
    # hence -s /bin/sh; nobody cannot enter the test venv, hence the system Python.
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3 for the unprivileged user")
    proc = ansible.playbook(f"""
        - hosts: web
          gather_facts: false
          vars:
            ansible_python_interpreter: {python}
          tasks:
            - name: as nobody
              command: id -un
              become: true
              become_method: su
              become_user: nobody
              become_flags: -s /bin/sh
            - name: raw as nobody
              raw: id -un
              become: true
              become_method: su
              become_user: nobody
              become_flags: -s /bin/sh
            - name: as myself
              command: id -un
    """, inventory=_static_inventory(ansible, ["web-1", "web-2"], group="web"))
    assert proc.returncode == 0, proc.stdout
    hosts = ["web-1", "web-2"]
    assert {h: r["stdout"] for h, r in ok_on_all(ansible, "as nobody", hosts).items()} == dict.fromkeys(hosts, "nobody")
    assert {h: r["stdout"].strip() for h, r in ok_on_all(ansible, "raw as nobody", hosts).items()} == dict.fromkeys(hosts, "nobody")
    assert {h: r["stdout"] for h, r in ok_on_all(ansible, "as myself", hosts).items()} == dict.fromkeys(hosts, "root")


def test_a_become_that_fails_fails_the_task_not_the_host(ansible):
    """A password prompt is answered through a session with a terminal now (test_become_password.py);
    what still goes wrong on the instance (here: sudo to a user that does not exist, or no sudo
    at all) is the task's failure, which ignore_errors and rescue can handle, never UNREACHABLE."""
    proc = ansible.playbook("""
        - hosts: web-1
          gather_facts: false
          tasks:
            - name: sudo with password
              command: id -un
              become: true
              become_method: sudo
              become_user: no-such-user-zr
              vars:
                ansible_become_password: secret
    """, inventory=_static_inventory(ansible, ["web-1"]))
    assert proc.returncode != 0
    rec = ansible.by_host("sudo with password")["web-1"]
    assert rec["outcome"] == "failed", rec


def _static_inventory(ansible: AnsibleRun, hosts: list[str], group: str = "targets") -> Path:
    path = ansible.workdir / "static.ini"
    lines = [f"[{group}]"] + [f"{h} ansible_connection={CONNECTION}" for h in hosts]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- a playbook that converges ---------------------------------------------------------------------

def test_template_playbook_converges_and_restarts_nothing_the_second_time(ansible, tmp_path):
    (tmp_path / "app.conf.j2").write_text("# managed\nname = {{ inventory_hostname }}\nrole = {{ zerorun_tags.role }}\n")
    play = f"""
        - hosts: all
          gather_facts: false
          tasks:
            - name: config dir
              file: {{path: "{ansible.remote}/{{{{ inventory_hostname }}}}", state: directory, mode: "0755"}}
            - name: template
              template: {{src: "{tmp_path}/app.conf.j2", dest: "{ansible.remote}/{{{{ inventory_hostname }}}}/app.conf", mode: "0644"}}
              notify: restart app
          handlers:
            - name: restart app
              shell: echo restarted >> "{ansible.remote}/{{{{ inventory_hostname }}}}/restarts"
    """
    first = ansible.playbook(play)
    assert first.returncode == 0, first.stdout
    assert all(r["changed"] for r in ok_on_all(ansible, "template").values())
    assert len(ansible.records("restart app")) == 3
    second = ansible.playbook(play)
    assert second.returncode == 0, second.stdout
    assert not any(r["changed"] for r in ok_on_all(ansible, "template").values())
    assert ansible.records("restart app") == []
    assert "changed=0" in second.stdout and "changed=1" not in second.stdout
    for host in HOSTS:
        conf = (ansible.remote / host / "app.conf").read_text()
        assert f"name = {host}\n" in conf
        assert (ansible.remote / host / "restarts").read_text() == "restarted\n"


# -- failures -------------------------------------------------------------------------------------

def test_stopped_agent_and_dead_broker_are_reported_clearly(cfleet, ansible):
    cfleet.start_agent("gone-1", {"role": "gone"})
    cfleet.wait_online(["gone-1"])
    cfleet.stop_agent("gone-1")
    cfleet.wait_status("gone-1", "ConnectionLost")
    inventory = _static_inventory(ansible, ["gone-1", "web-1"])
    proc = ansible.run("ansible", "all", "-i", str(inventory), "-m", "ping")
    assert proc.returncode != 0
    results = ansible.by_host("ping")
    assert results["web-1"]["outcome"] == "ok"
    assert results["gone-1"]["outcome"] == "unreachable"
    assert "the agent of instance 'gone-1' is not connected" in results["gone-1"]["result"]["msg"]

    started = time.monotonic()
    proc = ansible.run("ansible", "all", "-i", str(inventory), "-m", "ping",
                       env={"ZERORUN_ENDPOINT": "tcp://127.0.0.1:9", "ZERORUN_BROKER_TIMEOUT": "2"})
    assert proc.returncode != 0 and time.monotonic() - started < 60
    for rec in ansible.by_host("ping").values():
        assert rec["outcome"] == "unreachable"
        assert "cannot use the Zerorun broker at tcp://127.0.0.1:9" in rec["result"]["msg"]
        assert "no answer from the broker" in rec["result"]["msg"]


@pytest.mark.parametrize("persistent", ["true", "false"])
def test_a_list_of_brokers_whose_first_is_dead_still_reaches_the_agents(cfleet, ansible, persistent):
    """A cluster's endpoints, the first broker down: the shared connection (the multiplexer) gave
    requests to the dead broker's queue as well as to the live one's, and each of them waited there
    until the task gave up ("no answer from the broker ... within 5s", the host unreachable)."""
    endpoints = "tcp://127.0.0.1:9,%s" % cfleet.runtime()["client_endpoint"]
    proc = ansible.run("ansible", "all", "-i", str(_static_inventory(ansible, ["web-1", "db-1"])), "-m", "ping",
                       env={"ZERORUN_ENDPOINT": endpoints, "ZERORUN_BROKER_TIMEOUT": "5",
                            "ZERORUN_PERSISTENT": persistent})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {h: r["result"]["ping"] for h, r in ansible.by_host("ping").items()} == {"web-1": "pong", "db-1": "pong"}


@pytest.mark.parametrize("option,value", [("exec_timeout", "-5"), ("exec_timeout", "nan"),
                                          ("persist_seconds", "-1")])
def test_a_negative_or_nan_number_of_seconds_is_refused(ansible, option, value):
    """A negative exec_timeout meant the agent's default hour, a NaN one or persist_seconds went
    on without a word."""
    proc = ansible.run("ansible", "all", "-i", str(_static_inventory(ansible, ["web-1"])), "-m", "ping",
                       env={"ZERORUN_" + option.upper(): value})
    assert proc.returncode != 0
    (rec,) = ansible.by_host("ping").values()
    assert "%s must be a number of seconds, 0 or more, got %s" % (option, value) in rec["result"]["msg"], rec
    assert "Traceback" not in proc.stdout + proc.stderr


def test_policy_can_forbid_exec_for_a_client(cfleet, ansible, tmp_path):
    policy = cfleet.broker_dir / "policy.yaml"
    policy.write_text(textwrap.dedent("""
        roles:
          runner:
            allow: [read, run]
            documents: ["*"]
            targets: ["*"]
          shell:
            allow: [read, exec]
            targets: ["instance:web-*"]
        clients:
          ci-runner: runner
          ci-shell: shell
    """))
    os.utime(policy, (time.time() + 5, time.time() + 5))
    runtime = cfleet.runtime()
    clients = {}
    for name in ("ci-runner", "ci-shell"):
        keys.create_keypair(tmp_path / "keys", name)
        public, _ = keys.load_secret(tmp_path / "keys" / f"{name}.key_secret")
        cfleet.client().add_key("client", name, public.decode())
        clients[name] = Client(ClientConfig.from_options(
            endpoint=runtime["client_endpoint"], broker_key=runtime["broker_public_key"],
            client_key_file=str(tmp_path / "keys" / f"{name}.key_secret")), timeout=5)
    try:
        deadline = time.monotonic() + 15
        while True:  # the broker re-reads its policy every 2 s
            try:
                clients["ci-shell"].exec("web-1", "true")
                break
            except RequestFailed:
                assert time.monotonic() < deadline, "policy was not reloaded"
                time.sleep(0.3)
        with pytest.raises(RequestFailed) as exc:
            clients["ci-runner"].exec("web-1", "true")
        assert exc.value.code == "AccessDenied" and "lacks permission 'exec'" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:
            clients["ci-shell"].put_file("db-1", __file__, str(tmp_path / "nope"))
        assert exc.value.code == "AccessDenied" and str(exc.value).endswith("outside its scope (instance:web-*): db-1")
    finally:
        for client in clients.values():
            client.close()

    inventory = _static_inventory(ansible, ["web-1", "db-1"])
    env = {"ZERORUN_CLIENT_KEY_FILE": str(tmp_path / "keys" / "ci-runner.key_secret")}
    proc = ansible.run("ansible", "all", "-i", str(inventory), "-m", "ping", env=env)
    assert proc.returncode != 0
    for rec in ansible.by_host("ping").values():
        assert rec["outcome"] == "unreachable"
        assert "lacks permission 'exec'" in rec["result"]["msg"]
    env = {"ZERORUN_CLIENT_KEY_FILE": str(tmp_path / "keys" / "ci-shell.key_secret")}
    proc = ansible.run("ansible", "all", "-i", str(inventory), "-m", "ping", env=env)
    results = ansible.by_host("ping")
    assert results["web-1"]["outcome"] == "ok"
    assert results["db-1"]["outcome"] == "unreachable"
    assert "outside its scope (instance:web-*): db-1" in results["db-1"]["result"]["msg"]
    audit = [json.loads(line) for line in (cfleet.broker_dir / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "access.denied" and e.get("permission") == "exec" for e in audit)
    assert any(e["event"] == "exec" and e["instance"] == "web-1" and "ci-shell" in e["client"] for e in audit)
    policy.unlink()


# -- one shared broker connection -------------------------------------------------------------------

def test_tasks_and_runs_share_one_broker_connection(cfleet, ansible):
    """persistent (the default): the first task starts one multiplexer; every later task, every
    fork and the next run go through it, so the broker sees one client connection in all."""
    from zerorun import mux

    mux.stop_all(cfleet.control_dir)
    inventory = _static_inventory(ansible, list(HOSTS))
    before = cfleet.client().ping()["client_connections"]
    proc = ansible.playbook("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: ping
              ping:
            - name: command
              command: echo shared
            - name: raw
              raw: echo raw
    """, inventory=inventory)
    assert proc.returncode == 0, proc.stdout
    for task in ("ping", "command", "raw"):
        ok_on_all(ansible, task)
    locks = [lock for lock in cfleet.control_dir.glob("zerorun-*.lock") if mux.running_pid(lock.with_suffix(""))]
    assert len(locks) == 1, locks  # (earlier tests' multiplexers for other keys were stopped above)
    pid = mux.running_pid(locks[0].with_suffix(""))
    assert pid, "the multiplexer outlives the run (persist_seconds)"
    assert (locks[0].with_suffix(".sock").stat().st_mode & 0o077) == 0  # the owner only
    assert (cfleet.control_dir.stat().st_mode & 0o777) == 0o700

    proc = ansible.run("ansible", "all", "-i", str(inventory), "-m", "ping")
    assert proc.returncode == 0, proc.stdout
    ok_on_all(ansible, "ping")
    assert mux.running_pid(locks[0].with_suffix("")) == pid
    # 9 tasks, then 3 more in a second run: one connection (the multiplexer's); the fleet's own
    # client was already connected before
    assert cfleet.client().ping()["client_connections"] - before == 1

    assert mux.stop_all(cfleet.control_dir) == [pid]
    assert mux.running_pid(locks[0].with_suffix("")) is None


def test_without_persistence_each_task_connects_and_no_multiplexer_starts(cfleet, ansible):
    from zerorun import mux

    mux.stop_all(cfleet.control_dir)
    inventory = _static_inventory(ansible, ["web-1"])
    before = cfleet.client().ping()["client_connections"]
    proc = ansible.run("ansible", "all", "-i", str(inventory), "-m", "ping", env={"ZERORUN_PERSISTENT": "false"})
    assert proc.returncode == 0, proc.stdout
    ok_on_all(ansible, "ping", hosts=["web-1"])
    assert not [p for p in cfleet.control_dir.glob("zerorun-*.lock") if mux.running_pid(p.with_suffix(""))]
    assert cfleet.client().ping()["client_connections"] - before == 1  # the task's own


def test_an_unsafe_control_directory_falls_back_to_a_direct_connection(cfleet, ansible, tmp_path):
    shared = tmp_path / "cp"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # others may enter: a socket there would lend them the client key
    proc = ansible.adhoc("web-1", "ping", env={"ZERORUN_CONTROL_PATH_DIR": str(shared)})
    assert proc.returncode == 0, proc.stdout
    ok_on_all(ansible, "ping", hosts=["web-1"])
    assert "cannot share the broker connection" in proc.stderr
    assert "must be owned by uid" in proc.stderr and "private (mode 0700)" in proc.stderr
    assert not list(shared.iterdir())
