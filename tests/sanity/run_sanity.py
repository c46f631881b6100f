#!/usr/bin/env python3
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run ``ansible-test sanity`` on the zerorun.fleet collection, offline-friendly.

ansible-test refuses the checkout's collection/ link (it resolves the real path and finds no
``ansible_collections`` parent), and the repository root also holds the Python project. So the
collection's files (git-tracked plus untracked non-ignored, minus galaxy.yml's build_ignore,
plus the collection's own tests) are copied into ``$TMP/ansible_collections/zerorun/fleet`` and
the sanity tests run there.

Offline shims, installed only when needed (a machine with internet access behaves as usual):

- ansible-test bootstraps pip in each sanity venv from a downloaded ``get-pip.py``; when
  ``~/.ansible/test/cache/get_pip_<X_Y>.py`` is missing and cannot be downloaded, a stand-in is
  written that uses ``ensurepip`` and then pip itself;
- that stand-in also writes a ``sitecustomize.py`` into the venv which drops ``PIP_CONFIG_FILE``
  when it is ``os.devnull``, so pip keeps the machine's index and CA settings.

Usage: tests/sanity/run_sanity.py [--test NAME ...] [--keep] [-- extra ansible-test args]
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE, NAME = "zerorun", "fleet"
DEFAULT_TESTS = ("validate-modules", "pep8", "yamllint", "compile", "import", "action-plugin-docs")
COLLECTION_TESTS = ("tests/sanity/", "tests/unit/plugins/", "tests/unit/conftest.py", "tests/integration/test_ansible_")
GET_PIP_URL = "https://ci-files.testing.ansible.com/ansible-test/get-pip-%s.py"

GET_PIP_STANDIN = '''"""Offline stand-in for get-pip.py, written by tests/sanity/run_sanity.py."""
import ensurepip
import os
import site
import subprocess
import sys

SITECUSTOMIZE = """import os
if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
    del os.environ["PIP_CONFIG_FILE"]  # keep the machine's pip index and CA bundle
"""

for directory in site.getsitepackages():
    if directory.startswith(sys.prefix) and os.path.isdir(directory):
        with open(os.path.join(directory, "sitecustomize.py"), "w") as handle:
            handle.write(SITECUSTOMIZE)
        break
if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
    del os.environ["PIP_CONFIG_FILE"]
ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install"] + args))
'''


def git_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    return sorted({p for p in out.decode().split("\0") if p})


def ignored(path: str, patterns: list[str]) -> bool:
    """galaxy.yml build_ignore semantics (ansible-galaxy matches each pattern against the whole
    relative path of every directory and file it walks): a pattern matches the path or one of
    its parent directories, never a bare name deeper down (``agent`` is the top-level package,
    not ``roles/agent``)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


def collection_files() -> list[str]:
    patterns = yaml.safe_load((ROOT / "galaxy.yml").read_text()).get("build_ignore") or []
    chosen = []
    for path in git_files():
        if not (ROOT / path).is_file() or (ROOT / path).is_symlink():
            continue
        if path.startswith(COLLECTION_TESTS) or not ignored(path, patterns):
            chosen.append(path)
    return chosen


def copy_collection(dest: Path) -> int:
    files = collection_files()
    for path in files:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, target)
    return len(files)


def ansible_test_command() -> list[str]:
    beside = Path(sys.executable).parent / "ansible-test"
    if beside.exists():
        return [sys.executable, str(beside)]
    found = shutil.which("ansible-test")
    if not found:
        sys.exit("ansible-test not found: install ansible-core in this Python")
    return [found]


def pip_bootstrap_version() -> str:
    try:
        import ansible_test
    except ImportError:
        return "24.2"
    source = Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
    match = re.search(r"pip='([0-9.]+)'", source.read_text())
    return match.group(1) if match else "24.2"


def ensure_get_pip() -> None:
    """Leaves ansible-test's own download alone when it can work; writes the stand-in otherwise."""
    version = pip_bootstrap_version()
    cache = Path("~/.ansible/test/cache/get_pip_%s.py" % version.replace(".", "_")).expanduser()
    if cache.exists():
        return
    try:
        with urllib.request.urlopen(GET_PIP_URL % version, timeout=10) as response:
            response.read(1)
        return  # reachable: ansible-test downloads it itself
    except Exception as exc:  # noqa: BLE001 - any failure means offline here
        print("get-pip.py unreachable (%s): using the ensurepip stand-in %s" % (exc, cache))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(GET_PIP_STANDIN)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="append", help="sanity test to run (repeatable; default: %s)"
                        % ", ".join(DEFAULT_TESTS))
    parser.add_argument("--python", default="%d.%d" % sys.version_info[:2])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("extra", nargs="*", help="more ansible-test arguments (after --)")
    options = parser.parse_args()

    started = time.monotonic()
    ensure_get_pip()
    work = Path(tempfile.mkdtemp(prefix="zerorun-sanity-"))
    dest = work / "ansible_collections" / NAMESPACE / NAME
    try:
        count = copy_collection(dest)
        print("copied %d files to %s" % (count, dest))
        command = ansible_test_command() + ["sanity", "--python", options.python, "--requirements", "--color", "no"]
        for test in options.test or DEFAULT_TESTS:
            command += ["--test", test]
        command += options.extra
        print("+", " ".join(command))
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(work))
        env.pop("ANSIBLE_CONFIG", None)
        rc = subprocess.call(command, cwd=dest, env=env)
    finally:
        if options.keep:
            print("kept", dest)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("sanity %s in %.0fs" % ("passed" if rc == 0 else "FAILED (rc=%d)" % rc, time.monotonic() - started))
    return rc


if __name__ == "__main__":
    sys.exit(main())
