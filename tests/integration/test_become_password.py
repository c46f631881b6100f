"""Become with a password through the zerorun.fleet.agent connection plugin (issue 23).

A test user with a password-protected sudo rule, made here, runs an agent of its own; a playbook
with ``become: true``, ``become_method: sudo`` and ``ansible_become_password`` reaches root
through it, with pipelining and without (the prompt answered on stdin for ``sudo -S``, on the
terminal otherwise), and a wrong password fails the task, not the host.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "zr-" + secrets.token_hex(8)


def _python_for(user: pwd.struct_passwd, env: dict[str, str]) -> str | None:
    """An interpreter the user may run that imports the agent (this one's, or the system's with
    this environment's packages: the same Python minor version)."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import zmq, msgspec, yaml, agent.daemon"], env=env, cwd="/",
                                   user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True,
                                   timeout=60)
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.fixture
def sudo_user():
    """A user whose sudo rule asks for its password; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a test user and a sudo rule needs root")
    sudo = shutil.which("sudo")
    if sudo is None or shutil.which("useradd") is None:
        pytest.skip("no sudo (the sudo package; .ci/run installs it when apt-get can) or no useradd")
    name = "zrb" + secrets.token_hex(4)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    rule = Path(f"/etc/sudoers.d/{name}")
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n", text=True, check=True, capture_output=True)
        rule.write_text(f"{name} ALL=(ALL:ALL) ALL\n")
        os.chmod(rule, 0o440)
        yield pwd.getpwnam(name)
    finally:
        rule.unlink(missing_ok=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)


@pytest.fixture
def user_agent(fleet, sudo_user):
    """An agent running as the test user (instance become-1)."""
    user = sudo_user
    state = Path(tempfile.mkdtemp(prefix="zr-become-"))
    os.chmod(state, 0o755)
    shutil.copy(fleet.broker_key, state / "broker.key")
    (state / "agent").mkdir()
    for path in (state, state / "agent", state / "broker.key"):
        os.chown(path, user.pw_uid, user.pw_gid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])}
    python = _python_for(user, env)
    if python is None:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"no Python that user {user.pw_name} may run imports this checkout's agent (this one lives "
                    f"under {os.path.realpath(sys.executable)})")
    log = open(fleet.root / "agent-become-1.log", "ab")
    proc = subprocess.Popen([python, "-m", "agent", "--broker", fleet.agent_endpoint, "--broker-key",
                             str(state / "broker.key"), "--instance-id", "become-1", "--state-dir",
                             str(state / "agent"), "--heartbeat-interval", "0.5"],
                            env=env, cwd="/", user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        fleet.wait_online(["become-1"])
        yield user, python
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(state, ignore_errors=True)


PLAYBOOK = """
- hosts: become-1
  gather_facts: false
  tasks:
    - name: as the connection's user
      ansible.builtin.command: id -un
    - name: with sudo
      ansible.builtin.command: id -un
      become: true
      become_method: sudo
    - name: after it
      ansible.builtin.command: echo still-reachable
"""


@pytest.mark.parametrize("pipelining", ["true", "false"])
def test_sudo_with_a_password_through_the_connection_plugin(fleet, user_agent, tmp_path, pipelining):
    user, python = user_agent
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"become-1 ansible_connection=zerorun.fleet.agent ansible_python_interpreter={python} "
                         f"zerorun_pipelining={pipelining} ansible_remote_tmp=/tmp/.ansible-{user.pw_name}\n")
    run = ansible_support.AnsibleRun(fleet, tmp_path, "", ANSIBLE_PYTHON_INTERPRETER=python)
    good = run.playbook(PLAYBOOK, "-e", f"ansible_become_password={PASSWORD}", inventory=inventory)
    assert good.returncode == 0, good.stdout + good.stderr
    assert run.by_host("as the connection's user")["become-1"]["result"]["stdout"] == user.pw_name
    assert run.by_host("with sudo")["become-1"]["result"]["stdout"] == "root"

    bad = run.playbook(PLAYBOOK.replace("become_method: sudo", "become_method: sudo\n      ignore_errors: true"),
                       "-e", "ansible_become_password=not-the-password", inventory=inventory)
    failed = run.by_host("with sudo")["become-1"]
    assert failed["outcome"] == "failed", failed  # the task, not the host: never "unreachable"
    assert "Incorrect sudo password" in failed["result"]["msg"]
    assert run.by_host("after it")["become-1"]["outcome"] == "ok", bad.stdout
