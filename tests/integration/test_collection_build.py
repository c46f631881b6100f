"""The collection builds into a tarball that installs and documents itself, as a user gets it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args, env=None, cwd=ROOT):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_build_install_and_ansible_doc(tmp_path):
    run(BIN / "ansible-galaxy", "collection", "build", "--output-path", tmp_path, "--force")
    tarballs = list(tmp_path.glob("zerorun-fleet-*.tar.gz"))
    assert len(tarballs) == 1
    with tarfile.open(tarballs[0]) as tar:
        names = set(tar.getnames())
    for wanted in ("plugins/inventory/instances.py", "plugins/action/run_command.py",
                   "plugins/modules/run_command.py", "plugins/connection/agent.py", "roles/agent/tasks/main.yml",
                   "roles/broker/tasks/main.yml", "playbooks/demo.yml", "meta/runtime.yml",
                   "meta/execution-environment.yml", "requirements.txt", "README.md"):
        assert wanted in names, wanted
    for unwanted in ("zmq_broker/server.py", "agent/daemon.py", "tests/unit/conftest.py", "collection"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), unwanted
    target = tmp_path / "collections"
    run(BIN / "ansible-galaxy", "collection", "install", tarballs[0], "-p", target)
    config = tmp_path / "ansible.cfg"  # not the checkout's: only the installed copy may be found
    config.write_text(f"[defaults]\ncollections_path = {target}\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(config))
    doc = run(BIN / "ansible-doc", "zerorun.fleet.run_command", env=env, cwd=tmp_path)
    assert "targets" in doc.stdout and "max_concurrency" in doc.stdout
    for kind, name in (("inventory", "zerorun.fleet.instances"), ("connection", "zerorun.fleet.agent")):
        out = run(BIN / "ansible-doc", "-t", kind, name, env=env, cwd=tmp_path)
        assert name in out.stdout
