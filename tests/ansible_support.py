"""What the Ansible integration tests share: a result-recording callback and the environment
that runs Ansible from the checkout against a LocalFleet."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from zerorun.testing import LocalFleet

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

RECORDER = '''
import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    """Writes every task result as one JSON line to $ZERORUN_TEST_RECORD."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "zerorun_record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, outcome):
        task = getattr(result, "task", None) or result._task
        host = getattr(result, "host", None) or result._host
        data = getattr(result, "result", None)
        if data is None:
            data = result._result
        line = {"host": host.get_name(), "task": task.get_name(), "outcome": outcome, "result": data}
        with open(os.environ["ZERORUN_TEST_RECORD"], "a") as handle:
            handle.write(json.dumps(line, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")
'''


def tool(name: str) -> str:
    """An Ansible CLI from this interpreter's environment (skips the test when missing)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed")
    return found


def ansible_env(fleet: LocalFleet, workdir: Path, **extra: str) -> tuple[dict[str, str], Path]:
    """Environment for Ansible CLIs run from the checkout (ansible.cfg -> collection/ link), with
    the recording callback installed; returns (env, the JSON-lines record file). The connection
    plugin's multiplexers live in the fleet's own control directory (stopped by fleet.close())."""
    callbacks = workdir / "callbacks"
    callbacks.mkdir(exist_ok=True)
    (callbacks / "zerorun_record.py").write_text(RECORDER)
    record = workdir / "record.jsonl"
    env = dict(os.environ, ZERORUN_CONFIG=str(fleet.client_config),
               ZERORUN_CONTROL_PATH_DIR=str(fleet.control_dir),
               ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_CALLBACK_PLUGINS=str(callbacks), ANSIBLE_CALLBACKS_ENABLED="zerorun_record",
               ANSIBLE_DEPRECATION_WARNINGS="0", ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0", ZERORUN_TEST_RECORD=str(record))
    env.update(extra)
    return env, record


class AnsibleRun:
    """Runs Ansible CLIs from the checkout against a fleet, with the recording callback, and
    reads each task's results back per host. ``inventory`` holds ``inventory_text``."""

    TIMEOUT = 180.0

    def __init__(self, fleet: LocalFleet, workdir: Path, inventory_text: str, **env: str):
        self.fleet = fleet
        self.workdir = workdir
        self.env, self.record = ansible_env(fleet, workdir, **env)
        self.inventory = workdir / "fleet.zerorun.yml"
        self.inventory.write_text(inventory_text)

    def run(self, name: str, *args: str, env: dict | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        if self.record.exists():
            self.record.unlink()
        proc = subprocess.run([tool(name), *args], cwd=REPO, env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=timeout or self.TIMEOUT)
        print(f"$ {name} {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
        return proc

    def adhoc(self, pattern: str, module: str, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run("ansible", pattern, "-i", str(self.inventory), "-m", module, *args, **kw)

    def playbook(self, text: str, *args: str, inventory: Path | None = None, name: str = "play.yml",
                 **kw) -> subprocess.CompletedProcess[str]:
        path = self.workdir / name
        path.write_text(textwrap.dedent(text))
        return self.run("ansible-playbook", "-i", str(inventory or self.inventory), str(path), *args, **kw)

    def records(self, task: str | None = None) -> list[dict]:
        if not self.record.exists():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]
        return [r for r in lines if task is None or r["task"] == task]

    def by_host(self, task: str) -> dict[str, dict]:
        return {r["host"]: r for r in self.records(task)}


def login_groups(user: pwd.struct_passwd) -> list[int]:
    """The user's groups, as a login (or a service manager) gives them: not this process's."""
    return os.getgrouplist(user.pw_name, user.pw_gid)


def python_for(user: pwd.struct_passwd, env: dict[str, str]) -> str | None:
    """An interpreter the user may run that imports the agent (this one's, or the system's with
    this environment's packages: the same Python minor version)."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import zmq, msgspec, yaml, agent.daemon"], env=env, cwd="/",
                                   user=user.pw_uid, group=user.pw_gid, extra_groups=login_groups(user), capture_output=True,
                                   timeout=60)
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return candidate
    return None


class UserAgent:
    """An agent of ``fleet`` running as ``user`` (not as the test's own user), as instance
    ``instance_id``; ``python`` is the interpreter it runs with; ``path_prefix`` (``DIR:``) goes
    before the agent's PATH. Skips the test when no Python that user may run imports this
    checkout's agent."""

    def __init__(self, fleet: LocalFleet, user: pwd.struct_passwd, instance_id: str, path_prefix: str = ""):
        self.user = user
        self.instance_id = instance_id
        self.state = Path(tempfile.mkdtemp(prefix="zr-user-agent-"))
        os.chmod(self.state, 0o755)
        shutil.copy(fleet.broker_key, self.state / "broker.key")
        (self.state / "agent").mkdir()
        for path in (self.state, self.state / "agent", self.state / "broker.key"):
            os.chown(path, user.pw_uid, user.pw_gid)
        env = {"PATH": path_prefix + "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name,
               "LOGNAME": user.pw_name, "LANG": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])}
        python = python_for(user, env)
        if python is None:
            shutil.rmtree(self.state, ignore_errors=True)
            pytest.skip(f"no Python that user {user.pw_name} may run imports this checkout's agent (this one "
                        f"lives under {os.path.realpath(sys.executable)})")
        self.python = python
        with open(fleet.root / f"agent-{instance_id}.log", "ab") as log:
            self.proc = subprocess.Popen([python, "-m", "agent", "--broker", fleet.agent_endpoint, "--broker-key",
                                          str(self.state / "broker.key"), "--instance-id", instance_id,
                                          "--state-dir", str(self.state / "agent"), "--heartbeat-interval", "0.5"],
                                         env=env, cwd="/", user=user.pw_uid, group=user.pw_gid,
                                         extra_groups=login_groups(user),
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            fleet.wait_online([instance_id])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)
