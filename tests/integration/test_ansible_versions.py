"""Batch coalescing under every supported ansible-core (pyproject allows >= 2.15): the adapter over
ansible-core's private task attributes (plugins/plugin_utils/task_internals.py) is exercised by
its unit tests and by a real ansible-playbook run, in a virtualenv per ansible-core release.

Each virtualenv holds only ansible-core (and what it requires); a .pth file adds this checkout
and the test environment's site-packages (zerorun's own dependencies) behind it, so the
ansible-core under test is the one imported. The virtualenvs are kept in ~/.cache (one per
release and checkout) because installing ansible-core takes most of the time; a release that
cannot be installed here is skipped with pip's reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zerorun.testing import LocalFleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RELEASES = ("2.15", "2.17", "2.19")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zerorun-tests"


def _venv_for(release: str) -> Path:
    checkout = hashlib.sha256(str(REPO).encode()).hexdigest()[:10]
    venv = CACHE / f"ansible-core-{release}-{checkout}"
    ready = venv / ".ready"
    if not ready.exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
        if made.returncode != 0:
            pytest.skip(f"cannot create a virtualenv for ansible-core {release}: {made.stderr.strip()[-300:]}")
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", f"ansible-core~={release}.0"],
                             capture_output=True, text=True, timeout=900)
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"ansible-core {release} cannot be installed here: {pip.stderr.strip()[-300:]}")
        ready.write_text(release)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this checkout (zerorun) and the test environment's packages (pyzmq, msgspec, pytest), after
    # the venv's own site-packages: its ansible-core wins over the test environment's
    Path(purelib, "zerorun-under-test.pth").write_text(f"{REPO}\n" + "".join(f"{p}\n" for p in site.getsitepackages()))
    return venv


@pytest.fixture(scope="module", params=RELEASES)
def core(request):
    venv = _venv_for(request.param)
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import ansible; print(ansible.__version__)"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(request.param + "."), version.stdout + version.stderr
    return venv / "bin"


@pytest.fixture(scope="module")
def vfleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("versions-fleet"))
    try:
        fleet.start_broker()
        fleet.start_agents({"web-1": {"role": "web"}, "web-2": {"role": "web"}, "db-1": {"role": "db"}})
        yield fleet
    finally:
        fleet.close()


def test_adapter_unit_tests_under_each_release(core):
    proc = subprocess.run([str(core / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:pytest-ansible",
                           "tests/unit/plugins/plugin_utils/test_task_internals.py",
                           "tests/unit/plugins/plugin_utils/test_coalesce.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


PLAY = """
- hosts: all
  gather_facts: false
  tasks:
    - name: preassigned
      zerorun.fleet.run_command:
        commands: echo pre
    - name: gathered
      zerorun.fleet.run_command:
        commands: echo gathered
      when: inventory_hostname is defined
    - name: included
      ansible.builtin.include_tasks: included.yml
"""

INCLUDED = """
- name: inside
  zerorun.fleet.run_command:
    commands: echo included
"""


def test_coalescing_under_each_release(core, vfleet, tmp_path):
    """One broker command per batch for each task, and the reason the adapter found for not
    pre-assigning (a ``when``, a dynamic include) named in the -vvv output."""
    (tmp_path / "play.yml").write_text(textwrap.dedent(PLAY))
    (tmp_path / "included.yml").write_text(textwrap.dedent(INCLUDED))
    env, record = ansible_support.ansible_env(vfleet, tmp_path, ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    (tmp_path / "fleet.zerorun.yml").write_text("plugin: zerorun.fleet.instances\n")
    before = len(vfleet.client().commands(limit=1000))
    proc = subprocess.run([str(core / "ansible-playbook"), "-i", "fleet.zerorun.yml", "play.yml", "-f", "5", "-vvv"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in record.read_text().splitlines()]
    by_task: dict[str, dict[str, str]] = {}
    for rec in results:
        if rec["task"] in ("preassigned", "gathered", "inside"):
            assert rec["outcome"] == "ok", rec
            by_task.setdefault(rec["task"], {})[rec["host"]] = rec["result"]["stdout"]
    hosts = {"web-1", "web-2", "db-1"}
    assert by_task["preassigned"] == dict.fromkeys(hosts, "pre")
    assert by_task["gathered"] == dict.fromkeys(hosts, "gathered")
    assert by_task["inside"] == dict.fromkeys(hosts, "included")
    assert len(vfleet.client().commands(limit=1000)) - before == 3  # one command per task for the batch
    assert "not pre-assigned: when" in proc.stdout
    assert "not pre-assigned: dynamic include" in proc.stdout
