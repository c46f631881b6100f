"""ansible-core's own ``become`` integration target, run through the zerorun.fleet.agent connection
plugin against a real broker and agent (issue 23: "Ansible's become integration target should then
pass through the plugin as it does over ssh").

The target is vendored unchanged under ``ansible_core_targets/become`` (see the NOTICE there) and
run as ansible-test runs it: a playbook applying the role ``become`` to one host, ``gather_facts:
no``, ``output_dir`` given, here with ``ansible_connection=zerorun.fleet.agent``, with pipelining on
(this plugin's default) and off (the default over ssh). Two connection users, the two cases the
target's ``vars/main.yml`` knows:

- root (the agent runs as root, the target's usual case in ansible-core's CI): sudo and su to the
  test user, without a password.
- an unprivileged user (an agent of its own runs as that user): sudo and su to the test user *with*
  the test user's password, so both prompts are answered through the plugin's terminal (sudo's on
  stdin with ``-S``, su's on the terminal). The connection user's sudo rule either has ``targetpw``
  (sudo asks for the target user's password, as on openSUSE, which is the password the target
  passes) or ``NOPASSWD`` (a password is given but never asked for).
  Becoming an unprivileged user from an unprivileged user needs ``setfacl`` (the acl package) for
  Ansible's temporary files, as over ssh; without it this case is skipped.

The target's dependency ``setup_test_user`` is replaced by a stand-in role (the same facts and the
same "become the test user" check) for a user the test makes: the original creates the user with
the ``user`` module and ``password_hash``, which needs passlib on the controller
(``setup_passlib_controller``) and root as the connection user, and is not about become.
The target ``become_su`` (one ad hoc command) runs through the root agent. Of the target
``become_unprivileged``, the Linux part runs (``common_remote_group/test.yml``, vendored with its
``tmpdir`` action plugin): unpriv1 becomes unpriv2 with sudo and a password, Ansible's temporary
files shared through a common group because setfacl fails. Its setup and cleanup playbooks (ssh
keys for unpriv1, sudoers edits, ``chmod a-x`` on the machine's setfacl) are replaced by fixtures:
the agent of unpriv1 finds a failing setfacl first on its PATH instead, so nothing outside the
test changes. Left out: its macOS part (chmod_acl_macos) and the FreeBSD skip in ``become``'s vars
(Linux only here).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402

TARGETS = Path(__file__).resolve().parent / "ansible_core_targets"
INTERPRETER = "/usr/bin/python3"  # modules run as the test user too: an interpreter every user may run

# As ansible-test writes it for a role target with gather_facts/no.
PLAYBOOK = """
- hosts: {host}
  gather_facts: false
  roles:
    - role: become
"""

# Stands in for setup_test_user where the connection user may not create users: the same facts,
# for a user the test made, and the same check that becoming it works.
STAND_IN_SETUP_TEST_USER = """
- name: gather distribution facts
  gather_facts:
    gather_subset: distribution
  when: ansible_distribution is not defined

- name: set variables (the test user made by the test)
  no_log: yes
  set_fact:
    test_user_name: "{{ zerorun_test_user.name }}"
    test_user_plaintext_password: "{{ zerorun_test_user.password }}"
    test_user: "{{ zerorun_test_user.registered }}"

- name: run whoami as the test user
  shell: whoami
  vars:
    ansible_become: yes
    ansible_become_user: "{{ test_user_name }}"
    ansible_become_password: "{{ test_user_plaintext_password }}"
  register: whoami

- name: verify becoming the test user worked
  assert:
    that:
      - whoami.stdout == test_user_name
"""


def _need_root_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the become target creates users (and here a sudo rule): needs root")
    for tool in ("useradd", "userdel", "chpasswd", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} (.ci/run installs sudo when apt-get can; useradd and groupadd are the passwd package)")
    if not os.access(INTERPRETER, os.X_OK):
        pytest.skip(f"no {INTERPRETER}: modules run as the target's test user need an interpreter every user may run")


def _make_user(prefix: str, password: str | None = None) -> pwd.struct_passwd:
    name = prefix + secrets.token_hex(4)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    if password is not None:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True)
    return pwd.getpwnam(name)


def _remove_user(name: str) -> None:
    subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)


def _run_target(fleet, workdir: Path, host: str, inventory_line: str, roles_path: list[Path],
                extra_vars: dict | None = None):
    run = ansible_support.AnsibleRun(fleet, workdir, "", ANSIBLE_PYTHON_INTERPRETER=INTERPRETER,
                                     ANSIBLE_ROLES_PATH=os.pathsep.join(map(str, roles_path)))
    inventory = workdir / "hosts.ini"
    inventory.write_text(f"{host} ansible_connection=zerorun.fleet.agent ansible_python_interpreter={INTERPRETER} "
                         f"{inventory_line}\n")
    output_dir = workdir / "output_dir"
    output_dir.mkdir()
    variables = dict(extra_vars or {}, output_dir=str(output_dir))
    vars_file = workdir / "vars.json"
    vars_file.write_text(json.dumps(variables))
    os.chmod(vars_file, 0o600)
    proc = run.playbook(PLAYBOOK.format(host=host), "-e", f"@{vars_file}", "-v", inventory=inventory)
    return run, proc


def _assert_passed(run, proc, host: str, methods: tuple[str, ...], password: str) -> None:
    records = run.records()
    bad = [r for r in records if r["outcome"] in ("failed", "unreachable")]
    assert proc.returncode == 0 and not bad, proc.stdout[-8000:] + proc.stderr[-3000:]
    verified = [r for r in records if "verify results from previous tasks (" in r["task"]]
    ran = sorted(r["task"].split("(", 1)[1].split(" ", 1)[0] for r in verified)
    assert ran == sorted(methods), [r["task"] for r in records]  # every become method ran, none skipped
    for record in verified:
        assert record["host"] == host and record["outcome"] == "ok", record
        assert record["task"].endswith(f" {password})"), record["task"]


@pytest.fixture
def target_test_user():
    """The target's test user, with a password (setup_test_user's part), removed afterwards."""
    _need_root_tools()
    password = "zr-" + secrets.token_hex(8)
    user = _make_user("zrt", password)
    try:
        yield user, password
    finally:
        _remove_user(user.pw_name)


def _stand_in_roles(workdir: Path, user: pwd.struct_passwd, password: str) -> tuple[list[Path], dict]:
    """The roles path (the stand-in setup_test_user first) and the variables it reads."""
    tasks = workdir / "roles" / "setup_test_user" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(STAND_IN_SETUP_TEST_USER)
    registered = {"name": user.pw_name, "uid": user.pw_uid, "group": user.pw_gid}  # as the user module returns
    return [workdir / "roles", TARGETS], {"zerorun_test_user": {"name": user.pw_name, "password": password,
                                                                "registered": registered}}


@pytest.mark.parametrize("pipelining", ["true", "false"])
def test_become_target_as_root(fleet, target_test_user, tmp_path, pipelining):
    """The agent runs as root (this test's user), the target's usual case in ansible-core's CI."""
    if os.geteuid() != 0:
        pytest.skip("the root case needs the agent to run as root")
    _need_root_tools("sudo", "su")  # the target becomes its test user with both
    fleet.start_agent("become-root")
    fleet.wait_online(["become-root"])
    roles, variables = _stand_in_roles(tmp_path, *target_test_user)
    run, proc = _run_target(fleet, tmp_path, "become-root", f"zerorun_pipelining={pipelining}", roles, variables)
    _assert_passed(run, proc, "become-root", ("sudo", "su"), "without password")


SUDO_RULES = {
    # sudo asks for the target user's password (as on openSUSE): the test user's, which the target passes
    "sudo-asks": "Defaults:{user} targetpw\n{user} ALL=(ALL:ALL) ALL\n",
    # sudo asks nothing although a password is given: the plugin must see success without a prompt
    "sudo-nopasswd": "{user} ALL=(ALL:ALL) NOPASSWD: ALL\n",
}


@pytest.fixture(params=sorted(SUDO_RULES))
def unprivileged_agent(request, fleet, target_test_user):
    """An agent running as an unprivileged user with a sudo rule from SUDO_RULES."""
    _need_root_tools("sudo", "su")
    if shutil.which("setfacl") is None:
        pytest.skip("no setfacl (the acl package): Ansible needs it to hand its temporary files to an unprivileged "
                    "become user, over ssh as here")
    rule = None
    connection_user = _make_user("zrc")
    try:
        rule = Path(f"/etc/sudoers.d/{connection_user.pw_name}")
        rule.write_text(SUDO_RULES[request.param].format(user=connection_user.pw_name))
        os.chmod(rule, 0o440)
        agent = ansible_support.UserAgent(fleet, connection_user, "become-user")
        try:
            yield agent
        finally:
            agent.stop()
    finally:
        if rule is not None:
            rule.unlink(missing_ok=True)
        _remove_user(connection_user.pw_name)


@pytest.mark.parametrize("pipelining", ["true", "false"])
def test_become_target_with_passwords_from_an_unprivileged_user(fleet, target_test_user, unprivileged_agent, tmp_path,
                                                                pipelining):
    agent = unprivileged_agent
    roles, variables = _stand_in_roles(tmp_path, *target_test_user)
    run, proc = _run_target(fleet, tmp_path, agent.instance_id,
                            f"zerorun_pipelining={pipelining} ansible_remote_tmp=/tmp/.ansible-{agent.user.pw_name}",
                            roles, variables)
    _assert_passed(run, proc, agent.instance_id, ("sudo", "su"), "with password")


SU_WRONG_PASSWORD = """
- hosts: {host}
  gather_facts: false
  tasks:
    - name: su with a wrong password
      command: whoami
      become: true
      become_method: su
      become_user: {user}
      ignore_errors: true
      vars:
        ansible_become_password: not-the-password
    - name: after it
      command: echo still-reachable
"""


@pytest.mark.parametrize("unprivileged_agent", ["sudo-asks"], indirect=True)
def test_a_wrong_su_password_fails_the_task_not_the_host(fleet, target_test_user, unprivileged_agent, tmp_path):
    """Beyond the target (its failures are sudo's, in test_become_password.py): su's refusal."""
    agent = unprivileged_agent
    run = ansible_support.AnsibleRun(fleet, tmp_path, "", ANSIBLE_PYTHON_INTERPRETER=INTERPRETER)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"{agent.instance_id} ansible_connection=zerorun.fleet.agent "
                         f"ansible_python_interpreter={INTERPRETER} ansible_remote_tmp=/tmp/.ansible-{agent.user.pw_name}\n")
    proc = run.playbook(SU_WRONG_PASSWORD.format(host=agent.instance_id, user=target_test_user[0].pw_name), inventory=inventory)
    failed = run.by_host("su with a wrong password")[agent.instance_id]
    assert failed["outcome"] == "failed", failed  # never "unreachable"
    assert "Incorrect su password" in failed["result"]["msg"], failed
    assert run.by_host("after it")[agent.instance_id]["outcome"] == "ok", proc.stdout


def test_become_su_target_su_gets_a_terminal(fleet, target_test_user, tmp_path):
    """ansible-core's ``become_su`` target (runme.sh): ``ansible -a whoami --become-method=su --become``
    must not answer "su: requires a terminal to execute". There it is ``localhost`` (connection
    local) becoming root; here the root agent, and su to the test user (become to the agent's own
    user is skipped, as over ssh when logged in as that user)."""
    if os.geteuid() != 0:
        pytest.skip("the agent must run as root for su without a password")
    fleet.start_agent("become-root")
    fleet.wait_online(["become-root"])
    run = ansible_support.AnsibleRun(fleet, tmp_path, "", ANSIBLE_PYTHON_INTERPRETER=INTERPRETER,
                                     ANSIBLE_LOAD_CALLBACK_PLUGINS="1")  # the recorder, for ad hoc commands too
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"become-root ansible_connection=zerorun.fleet.agent ansible_python_interpreter={INTERPRETER}\n")
    proc = run.run("ansible", "become-root", "-i", str(inventory), "-a", "whoami", "--become-method=su", "--become",
                   "--become-user", target_test_user[0].pw_name)
    assert "su: requires a terminal to execute" not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run.by_host("command")["become-root"]["result"]["stdout"] == target_test_user[0].pw_name


UNPRIVILEGED_NAMES = ("unpriv1", "unpriv2", "commongroup")  # fixed by the target's assertions
FAKE_SETFACL = """#!/bin/sh
echo "setfacl: $*: Operation not supported" >&2
exit 1
"""


def _remove_kept_tmpdirs(name: str) -> None:
    """What ANSIBLE_KEEP_REMOTE_FILES left in the system temporary directories (Ansible's remote
    tmp for an unprivileged become user)."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for base in (Path("/var/tmp"), Path("/tmp")):
        for path in base.glob("ansible-tmp-*"):
            if path.is_dir() and path.stat().st_uid == uid:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def unpriv_users():
    """become_unprivileged's users and group (its setup_unpriv_users.yml and common_remote_group/
    setup.yml): unpriv1 with a password and a password-protected sudo rule, unpriv2, both in
    commongroup. The target then makes setfacl unusable machine-wide (chmod a-x); here only
    unpriv1's agent finds a setfacl that fails first on its PATH, as on a file system without ACLs."""
    _need_root_tools("sudo", "groupadd", "groupdel")
    for name in UNPRIVILEGED_NAMES:
        for lookup in ("passwd", "group"):
            if subprocess.run(["getent", lookup, name], capture_output=True).returncode == 0:
                pytest.skip(f"{lookup} entry {name} (a fixed name in become_unprivileged) already exists")
    password = "zr-" + secrets.token_hex(8)
    rule = Path("/etc/sudoers.d/unpriv1")
    try:
        subprocess.run(["groupadd", "commongroup"], check=True, capture_output=True)
        for name in ("unpriv1", "unpriv2"):
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", "--groups", "commongroup",
                            name], check=True, capture_output=True)
        subprocess.run(["chpasswd"], input=f"unpriv1:{password}\n", text=True, check=True, capture_output=True)
        rule.write_text("unpriv1 ALL=(ALL) ALL\n")
        os.chmod(rule, 0o440)
        user = pwd.getpwnam("unpriv1")
        fake = Path(user.pw_dir) / "fake-bin"  # where unpriv1 can reach it (pytest's tmp_path is root's alone)
        fake.mkdir(mode=0o755)
        (fake / "setfacl").write_text(FAKE_SETFACL)
        os.chmod(fake / "setfacl", 0o755)
        yield user, password, f"{fake}:"
    finally:
        rule.unlink(missing_ok=True)
        for name in ("unpriv1", "unpriv2"):
            _remove_kept_tmpdirs(name)
            _remove_user(name)
        subprocess.run(["groupdel", "commongroup"], capture_output=True)


def test_become_unprivileged_target_common_remote_group(fleet, unpriv_users, tmp_path):
    """ansible-core's ``become_unprivileged`` target, its Linux part (common_remote_group/test.yml,
    vendored): unpriv1 (the agent's user) becomes unpriv2 with sudo and a password, with
    ANSIBLE_KEEP_REMOTE_FILES and ANSIBLE_COMMON_REMOTE_GROUP, and Ansible's temporary files are
    shared through the common group because setfacl fails."""
    user, password, path_prefix = unpriv_users
    agent = ansible_support.UserAgent(fleet, user, "become-unpriv1", path_prefix=path_prefix)
    try:
        target = TARGETS / "become_unprivileged"
        run = ansible_support.AnsibleRun(fleet, tmp_path, "", ANSIBLE_PYTHON_INTERPRETER=INTERPRETER,
                                         ANSIBLE_KEEP_REMOTE_FILES="True", ANSIBLE_BECOME_PASS=password,
                                         ANSIBLE_COMMON_REMOTE_GROUP="commongroup",
                                         ANSIBLE_ACTION_PLUGINS=str(target / "action_plugins"))
        inventory = tmp_path / "hosts.ini"
        inventory.write_text(f"[ssh]\nbecome-unpriv1 ansible_connection=zerorun.fleet.agent "
                             f"ansible_python_interpreter={INTERPRETER}\n")
        proc = run.run("ansible-playbook", "-i", str(inventory), str(target / "common_remote_group" / "test.yml"), "-v")
        records = run.records()
        assert proc.returncode == 0 and not [r for r in records if r["outcome"] != "ok" and r["outcome"] != "skipped"], \
            proc.stdout[-8000:] + proc.stderr[-3000:]
        assert [r["outcome"] for r in run.records("assert")] == ["ok"], proc.stdout[-8000:]
    finally:
        agent.stop()
