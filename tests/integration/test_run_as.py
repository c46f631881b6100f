"""Run as another user (issue 22), with a real broker, real agents and the real CLI: the step gets
the user's ids, groups, a login environment and a directory it can enter; an unknown user fails the
invocation before anything runs; the policy decides who may run as whom, and the audit log says."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess

import pytest

from tests.cli_support import run_json
from zerorun import protocol
from zerorun.client import Client, RequestFailed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs the agent to run as root")

POLICY = """
roles:
  deployers:
    allow: [read, run, session]
    documents: ["*"]
    targets: ["*"]
    run_as: [nobody, "app-*"]
  plain:
    allow: [read, run, session]
    documents: ["*"]
    targets: ["*"]
clients:
  deploy-bot: deployers
  plain-bot: plain
"""

JINJA_DOCUMENT = """
schemaVersion: "2.2"
templating: jinja
description: steps as different users
parameters:
  user: {type: String, default: nobody}
mainSteps:
  - name: as-parameter
    action: aws:runShellScript
    runAs: "{{ user }}"
    inputs: {runCommand: ["echo step1=$(id -un)"]}
  - name: as-agent
    action: aws:runShellScript
    inputs: {runCommand: ["echo step2=$(id -un)"]}
"""


@pytest.fixture
def one_agent(fleet_factory):
    fleet = fleet_factory("runas")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(POLICY)
    fleet.start_broker()
    fleet.start_agents({"box-1": {"role": "box"}})
    return fleet


def _client(fleet, name, tmp_path) -> Client:
    return fleet.add_client(name, tmp_path / "clients")


def test_run_as_nobody_gets_the_users_identity_environment_and_directory(one_agent):
    nobody = pwd.getpwnam("nobody")
    script = "id -un; id -u; id -g; echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME; echo PATH=$PATH; pwd; " \
             "echo SECRET=${ZERORUN_AGENT_ONLY:-unset}; ls -ld $0 | cut -c1-10; stat -c %U $0"
    code, view, err = run_json(one_agent, "send", "RunShellScript", "-t", "tag:role=box", "-p",
                               f"commands={script}", "--run-as", "nobody")
    assert code == 0, err
    inv = view["invocations"][0]
    lines = inv["stdout"].splitlines()
    assert lines[0] == "nobody"
    assert lines[1:3] == [str(nobody.pw_uid), str(nobody.pw_gid)]
    assert lines[3] == f"HOME={nobody.pw_dir} USER=nobody LOGNAME=nobody"
    assert lines[4] == "PATH=/usr/local/bin:/usr/bin:/bin"
    home_enterable = os.path.isdir(nobody.pw_dir) and os.access(nobody.pw_dir, os.X_OK)
    assert lines[5] in ((nobody.pw_dir, "/") if home_enterable else ("/",))
    assert lines[7:9] == ["-r-x------", "nobody"]  # the script is the user's, readable by it alone
    assert view["run_as"] == "nobody"
    audit = [json.loads(line) for line in (one_agent.broker_dir / "audit.jsonl").read_text().splitlines()]
    sent = [a for a in audit if a.get("event") == "command.send" and a.get("command_id") == view["command_id"]]
    assert sent and sent[0]["run_as"] == ["nobody"]

    # the plain text output says who, and --script which user each step runs as
    shown = one_agent.cli("show", view["command_id"], "--script")
    assert "run as nobody" in shown.stdout and "(runShellScript) as nobody" in shown.stdout


def test_unknown_user_fails_the_invocation_before_anything_runs(one_agent, tmp_path):
    marker = tmp_path / "ran"
    proc = one_agent.cli("send", "RunShellScript", "-t", "tag:role=box", "-p", f"commands=touch {marker}",
                         "--run-as", "no-such-user-zr")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "run-as user 'no-such-user-zr' does not exist on this instance" in proc.stdout
    assert not marker.exists()
    # a name that is no user name at all is refused by the broker before anything is sent
    proc = one_agent.cli("send", "RunShellScript", "-t", "tag:role=box", "-p", "commands=true",
                         "--run-as", "bad name;rm")
    assert proc.returncode == 2 and "InvalidRunAs" in proc.stderr


def test_the_policy_decides_who_may_run_as_whom(one_agent, tmp_path):
    deploy = _client(one_agent, "deploy-bot", tmp_path)
    plain = _client(one_agent, "plain-bot", tmp_path)
    try:
        view = deploy.send("RunShellScript", {"commands": ["id -un"]}, ["tag:role=box"], run_as="nobody", wait=20)
        assert view.invocations[0].stdout.strip() == "nobody"
        with pytest.raises(RequestFailed) as exc:  # its list does not name root (no run-as)
            deploy.send("RunShellScript", {"commands": ["id -un"]}, ["tag:role=box"], wait=20)
        assert exc.value.code == "AccessDenied" and "may not run as root" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:  # a role without run_as: root only
            plain.send("RunShellScript", {"commands": ["id -un"]}, ["tag:role=box"], run_as="nobody")
        assert exc.value.code == "AccessDenied"
        assert "may not run as nobody (its role's run_as allows: root)" in str(exc.value)
        view = plain.send("RunShellScript", {"commands": ["id -un"]}, ["tag:role=box"], wait=20)
        assert view.invocations[0].stdout.strip() == pwd.getpwuid(os.geteuid()).pw_name
        # a step's own runAs is checked the same way, after rendering (here from a parameter)
        with pytest.raises(RequestFailed) as exc:
            plain.send("", {}, ["tag:role=box"], document_content=JINJA_DOCUMENT)
        assert exc.value.code == "AccessDenied" and "may not run as nobody" in str(exc.value)
    finally:
        deploy.close()
        plain.close()
    audit = [json.loads(line) for line in (one_agent.broker_dir / "audit.jsonl").read_text().splitlines()]
    assert any(a.get("event") == "access.denied" and a.get("run_as") == ["nobody"] for a in audit)


def test_a_jinja_documents_steps_run_as_their_own_users(one_agent, tmp_path):
    path = tmp_path / "users.yml"
    path.write_text(JINJA_DOCUMENT)
    code, view, err = run_json(one_agent, "send", "--document-file", str(path), "-t", "tag:role=box",
                               "--run-as", "daemon")
    assert code == 0, err
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert view["invocations"][0]["stdout"].splitlines() == ["step1=nobody", "step2=daemon"]
    assert [s.get("run_as") for s in view["steps"]] == ["nobody", "daemon"]
    code, view, err = run_json(one_agent, "send", "--document-file", str(path), "-t", "tag:role=box")
    assert view["invocations"][0]["stdout"].splitlines() == ["step1=nobody", f"step2={me}"]


@pytest.fixture
def shell_user():
    """A user with a login shell (nobody's is nologin), removed afterwards."""
    if shutil.which("useradd") is None:
        pytest.skip("no useradd to create a user with a login shell")
    name = "zrs" + secrets.token_hex(4)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def test_a_session_runs_as_the_user_the_role_allows(one_agent, tmp_path, shell_user):
    """``zerorun session --run-as``: the shell gets the user's identity, its login environment and
    a terminal it owns; a user whose shell is nologin gets nologin, as with ssh; the policy's
    run_as decides, as for steps."""
    user = shell_user
    proc = one_agent.cli("session", "box-1", "--run-as", user.pw_name, "-t", "--",  # -t: a terminal, as ssh -tt
                         "id -un; id -u; echo HOME=$HOME USER=$USER; stat -c %U $(tty)", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.replace("\r", "").splitlines()
    assert lines[:3] == [user.pw_name, str(user.pw_uid), f"HOME={user.pw_dir} USER={user.pw_name}"], lines
    assert lines[3] == user.pw_name  # the terminal is the session user's, as sshd makes it
    nologin = pwd.getpwnam("nobody").pw_shell
    if nologin.endswith("nologin"):
        proc = one_agent.cli("session", "box-1", "--run-as", "nobody", "--", "id -un", timeout=60)
        assert proc.returncode != 0 and "nobody" not in proc.stdout  # nologin ran, not the command
    proc = one_agent.cli("session", "box-1", "--run-as", "no-such-user-zr", "--", "true", timeout=60)
    assert proc.returncode == 255 and "run-as user 'no-such-user-zr' does not exist" in proc.stderr

    deploy = _client(one_agent, "deploy-bot", tmp_path)
    plain = _client(one_agent, "plain-bot", tmp_path)
    try:
        def shell(run_as: str) -> protocol.OpenSession:
            return protocol.OpenSession(instance_id="box-1", kind="shell", run_as=run_as, dry_run=True)

        assert deploy.request(shell("nobody"))["ok"]
        with pytest.raises(RequestFailed) as exc:  # its list does not name root (the agent's user)
            deploy.request(shell(""))
        assert exc.value.code == "AccessDenied" and "may not run as root" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:  # a role without run_as: root only
            plain.request(shell("nobody"))
        assert exc.value.code == "AccessDenied" and "may not run as nobody" in str(exc.value)
        assert plain.request(shell(""))["ok"]
    finally:
        deploy.close()
        plain.close()
