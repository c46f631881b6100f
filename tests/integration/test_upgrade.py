"""Upgrading the fleet through the fleet (issue 19): the built-in UpdateAgent document installs
a new agent wheel, restarts each agent onto it (its running step, the upgrade itself, is kept by
its supervisor and reported by the new agent), and succeeds once the new version is welcomed; a
broken wheel leaves the old agent running and the invocation Failed.

The wheels are the project's own code, zipped by the test with two version strings (a pure-Python
wheel: packages plus a dist-info); each agent runs from its own virtualenv (no pip in it: the
upgrade needs none), which finds the dependencies in the test's virtualenv through a .pth file.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import zipfile
from pathlib import Path

from zerorun.testing import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared CLI helpers
from cli_support import run_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "zerorun", "zmq_broker")


def make_wheel(out: Path, version: str, patch: dict[str, str] | None = None) -> Path:
    """zerorun-VERSION-py3-none-any.whl from this tree; ``patch`` replaces files (path: text)."""
    info = f"zerorun-{version}.dist-info"
    files: dict[str, bytes] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yml") and "__pycache__" not in path.parts:
                files[str(path.relative_to(ROOT))] = path.read_bytes()
    init = files["zerorun/__init__.py"].decode()
    files["zerorun/__init__.py"] = init.replace('__version__ = "0.1.0"', f'__version__ = "{version}"').encode()
    for name, text in (patch or {}).items():
        files[name] = text.encode()
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: zerorun\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    rows = [[name, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(),
             str(len(data))] for name, data in files.items()]
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows([*rows, [f"{info}/RECORD", "", ""]])
    files[f"{info}/RECORD"] = record.getvalue().encode()
    wheel = out / f"zerorun-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def make_venv(where: Path, wheel: Path) -> Path:
    """A virtualenv with ``wheel`` unpacked in it; the other dependencies come from ours."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return python


def agent_status(fleet, instance_id: str) -> dict:
    try:
        return json.loads((fleet.agent_dir(instance_id) / "agent.json").read_text())
    except (OSError, ValueError):
        return {}


def versions(fleet) -> dict[str, str]:
    return {v.instance_id: v.agent_version for v in fleet.client().instances()}


def start_agents_from(fleet, tmp_path: Path, ids: list[str], wheel: Path) -> None:
    dev_python = fleet.python
    try:
        for instance_id in ids:
            fleet.python = str(make_venv(tmp_path / f"venv-{instance_id}", wheel))
            fleet.agent_cwd[instance_id] = tmp_path  # not this tree: python -m would import it from here
            fleet.start_agent(instance_id, {"role": "upgrade"})
    finally:
        fleet.python = dev_python
    fleet.wait_online(ids)


def serve(directory: Path):
    """A local HTTP server for ``directory`` (127.0.0.1, a free port); shut down by the caller."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_update_agent_upgrades_five_agents_first_one_then_the_rest(fleet, tmp_path):
    old = make_wheel(tmp_path, "0.9.1")
    (tmp_path / "www").mkdir()
    new = make_wheel(tmp_path / "www", "0.9.2")
    ids = [f"up-{n}" for n in range(5)]
    start_agents_from(fleet, tmp_path, ids, old)
    assert set(versions(fleet).values()) == {"0.9.1"}
    pids = {i: fleet.agents[i].pid for i in ids}
    sha = hashlib.sha256(new.read_bytes()).hexdigest()
    server = serve(tmp_path / "www")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{new.name}"
        rc, view, err = run_json(fleet, "send", "UpdateAgent", "-p", f"source={url}", "-p", f"sha256={sha}",
                                 "-t", "tag:role=upgrade", "--first", "1", "--max-concurrency", "2",
                                 "--timeout", "120")
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0, (err, view)
    assert {i["instance_id"]: i["status"] for i in view["invocations"]} == {i: "Success" for i in ids}, view
    for inv in view["invocations"]:
        assert "upgraded the agent from 0.9.1 to 0.9.2" in inv["stdout"]
    wait_until(lambda: set(versions(fleet).values()) == {"0.9.2"}, "every agent to say HELLO as 0.9.2")
    assert {i: fleet.agents[i].pid for i in ids} == pids and all(fleet.agents[i].poll() is None for i in ids)
    assert all(agent_status(fleet, i)["version"] == "0.9.2" for i in ids)
    # the upgraded agents run commands
    rc, later, _ = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo fine", "-t", "tag:role=upgrade")
    assert rc == 0 and {i["stdout"] for i in later["invocations"]} == {"fine\n"}


def test_a_broken_wheel_leaves_the_old_agent_running_and_the_invocation_failed(fleet, tmp_path):
    old = make_wheel(tmp_path, "0.9.1")
    start_agents_from(fleet, tmp_path, ["up-0"], old)
    pid = fleet.agents["up-0"].pid
    damaged = tmp_path / "zerorun-0.9.3-py3-none-any.whl"
    damaged.write_bytes(make_wheel(tmp_path / ".." / tmp_path.name, "0.9.3").read_bytes()[:4000])
    rc, view, _ = run_json(fleet, "send", "UpdateAgent", "-p", f"source={damaged}", "-i", "up-0", "--timeout", "60")
    inv = view["invocations"][0]
    assert inv["status"] == "Failed" and "upgrade failed" in inv["stderr"], inv
    assert fleet.agents["up-0"].pid == pid and fleet.agents["up-0"].poll() is None
    assert versions(fleet)["up-0"] == "0.9.1"
    # a wrong sha256 is refused before anything is installed
    wrong = "0" * 64
    rc, view, _ = run_json(fleet, "send", "UpdateAgent", "-p", f"source={old}", "-p", f"sha256={wrong}",
                           "-i", "up-0", "--timeout", "60")
    assert view["invocations"][0]["status"] == "Failed" and "not the 000" in view["invocations"][0]["stderr"]


def test_an_agent_that_cannot_start_is_rolled_back(fleet, tmp_path):
    old = make_wheel(tmp_path, "0.9.1")
    start_agents_from(fleet, tmp_path, ["up-0"], old)
    broken = make_wheel(tmp_path, "0.9.4", patch={"agent/__main__.py": "raise SystemExit('broken on purpose')\n"})
    rc, view, _ = run_json(fleet, "send", "UpdateAgent", "-p", f"source={broken}", "-p", "waitSeconds=20",
                           "-i", "up-0", "--timeout", "90")
    try:
        inv = view["invocations"][0]
        assert inv["status"] == "Failed", inv
        assert "rolling back to 0.9.1" in inv["stderr"] and "rolled back to 0.9.1" in inv["stderr"]
        wait_until(lambda: versions(fleet)["up-0"] == "0.9.1" and agent_status(fleet, "up-0").get("version") == "0.9.1",
                   "the old agent to be back")
    finally:  # the agent started again by the roll-back is not the fleet's process: stopped by pid
        status = agent_status(fleet, "up-0")
        if status.get("pid") and status["pid"] != fleet.agents["up-0"].pid:
            try:
                os.kill(status["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
