"""`make dist` builds the wheel and the collection tarball; the tarball installs as an operator
installs it and works from a directory outside the checkout: ansible-doc, the inventory plugin,
run_command and the agent connection against a real fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VENV = Path(sys.prefix)


def run(*args, env=None, cwd=ROOT, timeout=600):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc


def make_dist(dist: Path) -> tuple[Path, Path]:
    """`make dist` with this interpreter's environment (-o: never reinstall that environment)."""
    if not (BIN / "ansible-galaxy").exists():
        pytest.skip("ansible-core is not installed in this environment")
    run("make", "-o", VENV / ".installed-stamp", "dist", f"DIST={dist}", f"VENV={VENV}")
    wheels = list(dist.glob("zerorun-*.whl"))
    tarballs = list(dist.glob("zerorun-fleet-*.tar.gz"))
    assert len(wheels) == 1 and len(tarballs) == 1, list(dist.iterdir())
    assert not (ROOT / "build").exists()  # no stale build tree left for the next wheel
    return wheels[0], tarballs[0]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return make_dist(tmp_path_factory.mktemp("dist"))


def test_make_dist_builds_the_wheel_and_the_collection(dist):
    wheel, tarball = dist
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for wanted in ("zerorun/cli.py", "zerorun/client.py", "zerorun/onboarding.py", "zerorun/documents/builtin/RunShellScript.yml",
                   "zmq_broker/server.py", "agent/daemon.py"):
        assert wanted in names, wanted
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        scripts = zf.read(entry_points).decode()
    for script in ("zerorun =", "zerorun-broker =", "zerorun-agent ="):
        assert script in scripts
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    for wanted in ("plugins/inventory/instances.py", "plugins/action/run_command.py",
                   "plugins/modules/run_command.py", "plugins/connection/agent.py", "roles/agent/tasks/main.yml",
                   "roles/broker/tasks/main.yml", "playbooks/demo.yml", "meta/runtime.yml",
                   "meta/execution-environment.yml", "meta/awx_credential_type.yml", "requirements.txt", "README.md",
                   "plugins/plugin_utils/task_internals.py", "plugins/doc_fragments/attributes.py"):
        assert wanted in names, wanted
    for unwanted in ("zmq_broker/server.py", "agent/daemon.py", "tests/unit/conftest.py", "collection", "dist"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), unwanted
    info = manifest["collection_info"]
    assert not any("example.invalid" in str(info.get(k) or "") for k in ("repository", "documentation",
                                                                          "homepage", "issues"))


INVENTORY = "plugin: zerorun.fleet.instances\nset_connection: true\n"
PLAY = """
- hosts: all
  gather_facts: false
  tasks:
    - name: run_command per host
      zerorun.fleet.run_command:
        commands: echo "installed {{ inventory_hostname }}"
      register: r
    - name: check
      ansible.builtin.assert:
        that: r.stdout == "installed " ~ inventory_hostname
    - name: ping through the agent connection
      ansible.builtin.ping:
"""


@pytest.mark.parametrize("how", ["collections_path", "default_path"])
def test_the_installed_tarball_works_outside_the_checkout(dist, web_db_fleet, tmp_path, how):
    """(a) `ansible-galaxy collection install -p DIR` and ANSIBLE_COLLECTIONS_PATH=DIR; (b) a plain
    `ansible-galaxy collection install` into the user's default path. No ansible.cfg of the
    checkout anywhere: the working directory is outside it and ANSIBLE_CONFIG is unset."""
    _, tarball = dist
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "ZERORUN_"))}
    env.update(HOME=str(home), ZERORUN_CONFIG=str(web_db_fleet.client_config),
               ZERORUN_CONTROL_PATH_DIR=str(web_db_fleet.control_dir),
               ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_NOCOLOR="1")
    if how == "collections_path":
        target = tmp_path / "collections"
        run(BIN / "ansible-galaxy", "collection", "install", tarball, "-p", target, env=env, cwd=work)
        env["ANSIBLE_COLLECTIONS_PATH"] = str(target)
        expected_root = target
    else:
        run(BIN / "ansible-galaxy", "collection", "install", tarball, env=env, cwd=work)
        expected_root = home / ".ansible" / "collections"
    listed = run(BIN / "ansible-galaxy", "collection", "list", "zerorun.fleet", "--format", "json", env=env, cwd=work)
    paths = list(json.loads(listed.stdout))
    assert [Path(p).resolve() for p in paths] == [(expected_root / "ansible_collections").resolve()], paths

    doc = run(BIN / "ansible-doc", "zerorun.fleet.run_command", env=env, cwd=work)
    assert "targets" in doc.stdout and "max_concurrency" in doc.stdout
    for kind, name in (("inventory", "zerorun.fleet.instances"), ("connection", "zerorun.fleet.agent")):
        out = run(BIN / "ansible-doc", "-t", kind, name, env=env, cwd=work)
        assert name in out.stdout

    (work / "fleet.zerorun.yml").write_text(INVENTORY)
    (work / "site.yml").write_text(textwrap.dedent(PLAY))
    proc = run(BIN / "ansible-playbook", "-i", "fleet.zerorun.yml", "site.yml", env=env, cwd=work, timeout=300)
    assert "failed=0" in proc.stdout and "unreachable=0" in proc.stdout
    for host in ("web-1", "web-2", "db-1"):
        assert f"{host}" in proc.stdout and "ok=3" in proc.stdout
