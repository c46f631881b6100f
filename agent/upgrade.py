"""Upgrading an agent through the fleet: the step of the built-in ``UpdateAgent`` document.

It runs as an ordinary step (``python -m agent.upgrade``, with the agent's own interpreter), so
it lives under a supervisor that outlives the agent it restarts; the new agent takes the step
back and reports its result. What it does, in order:

1. gets the wheel: ``source`` is a path on the instance or an ``http(s)://`` URL (a URL needs its
   ``sha256``; a path is checked against one when it is given), kept in ``<state dir>/upgrades``;
2. keeps the installed version as a wheel (repacked from its ``RECORD``), for the roll-back;
3. installs the new wheel in place of the old one (pure-Python wheels, no pip needed: the
   old distribution's files are removed, the wheel's extracted; a wheel that cannot be read
   changes nothing);
4. restarts the agent onto it (SIGUSR2: the agent re-executes itself, same pid, supervisors
   taken back) and waits until the new version has been welcomed by the broker (``agent.json``,
   written by the agent after each Welcome);
5. if it has not within ``waitSeconds``: reinstalls the old wheel, restarts the agent again (or
   starts it again with its recorded command line when it died and no systemd restarts it),
   and fails, saying why.

Parameters come as ``ZERORUN_PARAM_<name>`` (never through the shell); where the agent is, as
``ZERORUN_AGENT_PID``, ``ZERORUN_AGENT_STATE_DIR`` (set by the daemon for every step).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

DIST = "zerorun"
DOWNLOAD_TIMEOUT = 60.0


class UpgradeError(Exception):
    """The upgrade cannot go on; the message says why (the step's stderr)."""


def main() -> int:
    env = os.environ
    try:
        source = env.get("ZERORUN_PARAM_source", "").strip()
        sha256 = env.get("ZERORUN_PARAM_sha256", "").strip().lower()
        wait = float(env.get("ZERORUN_PARAM_waitSeconds", "") or 120)
        state_dir = Path(env["ZERORUN_AGENT_STATE_DIR"])
        agent_pid = int(env["ZERORUN_AGENT_PID"])
    except (KeyError, ValueError) as exc:
        print(f"UpdateAgent must run as a step of a Zerorun agent ({exc!r} is missing or wrong)", file=sys.stderr)
        return 1
    try:
        return upgrade(source, sha256, wait, state_dir, agent_pid)
    except UpgradeError as exc:
        print(f"upgrade failed: {exc}", file=sys.stderr)
        return 1


def upgrade(source: str, sha256: str, wait: float, state_dir: Path, agent_pid: int) -> int:
    if not source:
        raise UpgradeError("no source: give the wheel's URL (with its sha256) or its path on the instance")
    work = state_dir / "upgrades"
    work.mkdir(mode=0o700, exist_ok=True)
    wheel = fetch(source, sha256, work)
    new_version = wheel_version(wheel)
    old_version = metadata.version(DIST)
    if new_version == old_version:
        print(f"the agent is already at version {old_version}: nothing to do")
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    rollback = repack_installed(work)
    install(wheel, site)
    print(f"installed {wheel.name}; restarting the agent (pid {agent_pid}) onto {new_version}")
    sys.stdout.flush()
    started = time.time()
    restart(agent_pid, state_dir)
    welcomed = wait_welcomed(state_dir, new_version, started, wait, agent_pid)
    if welcomed:
        print(f"upgraded the agent from {old_version} to {new_version} (welcomed by the broker)")
        return 0
    print(f"the new agent ({new_version}) was not welcomed within {wait:g}s: rolling back to {old_version}",
          file=sys.stderr)
    install(rollback, site)
    started = time.time()
    restart(agent_pid, state_dir)
    back = wait_welcomed(state_dir, old_version, started, wait)
    print(f"rolled back to {old_version}" + ("" if back else " (the old agent has not said HELLO yet)"),
          file=sys.stderr)
    return 1


# -- the wheel -----------------------------------------------------------------------------------


def fetch(source: str, sha256: str, work: Path) -> Path:
    if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
        raise UpgradeError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if source.startswith(("http://", "https://")):
        if not sha256:
            raise UpgradeError("a wheel from a URL needs its sha256")
        name = source.rsplit("/", 1)[-1].split("?", 1)[0]
        if not name.endswith(".whl"):
            raise UpgradeError(f"the URL does not name a wheel (*.whl): {source}")
        target = work / name
        try:
            with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise UpgradeError(f"cannot download {source}: {exc}") from None
    else:
        target = Path(source)
        if not target.is_file() or target.suffix != ".whl":
            raise UpgradeError(f"no wheel (*.whl) at {source} on this instance")
    if sha256:
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != sha256:
            raise UpgradeError(f"{target.name} has sha256 {digest}, not the {sha256} given")
    return target


def wheel_version(wheel: Path) -> str:
    parts = wheel.name[:-len(".whl")].split("-")
    if len(parts) < 5 or parts[0].replace("_", "-").lower() != DIST:
        raise UpgradeError(f"{wheel.name} is not a wheel of {DIST}")
    return parts[1]


def install(wheel: Path, site: Path) -> None:
    """Replaces the installed distribution with ``wheel`` (pure Python): checked first, so a
    wheel that cannot be read changes nothing."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise UpgradeError(f"{wheel.name} is damaged (at {bad})")
            names = archive.namelist()
            for name in names:
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UpgradeError(f"{wheel.name} names a path outside the installation: {name}")
            info = [n for n in names if n.endswith(".dist-info/WHEEL")]
            if len(info) != 1 or b"Root-Is-Purelib: true" not in archive.read(info[0]):
                raise UpgradeError(f"{wheel.name} is not a pure-Python wheel")
            _remove_installed(site)
            for name in names:
                if name.endswith("/"):
                    continue
                target = site / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UpgradeError(f"cannot install {wheel.name}: {exc}") from None


def _remove_installed(site: Path) -> None:
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return
    info_dir = getattr(dist, "_path", None)
    for file in dist.files or ():
        path = Path(str(dist.locate_file(file))).resolve()
        if site.resolve() in path.parents:  # never the scripts in bin/: the new ones are the same
            try:
                path.unlink()
            except OSError:
                pass
    if isinstance(info_dir, Path) and info_dir.name.endswith(".dist-info") and site.resolve() in info_dir.resolve().parents:
        shutil.rmtree(info_dir, ignore_errors=True)  # what RECORD does not name (caches): gone too


def repack_installed(work: Path) -> Path:
    """The installed distribution as a wheel (from its RECORD), for the roll-back."""
    dist = metadata.distribution(DIST)
    version = dist.version
    target = work / f"{DIST}-{version}-py3-none-any.whl"
    site = Path(str(dist.locate_file(""))).resolve()
    records: list[list[str]] = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in dist.files or ():
            path = Path(str(dist.locate_file(file))).resolve()
            name = str(file)
            if site not in path.parents or name.endswith((".pyc", "/RECORD")) or not path.is_file():
                continue
            data = path.read_bytes()
            archive.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append([name, f"sha256={digest}", str(len(data))])
        record_name = f"{dist._path.name}/RECORD" if hasattr(dist, "_path") else f"{DIST}-{version}.dist-info/RECORD"  # type: ignore[attr-defined]
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([*records, [record_name, "", ""]])
        archive.writestr(record_name, out.getvalue())
    target.write_bytes(buffer.getvalue())
    return target


# -- the agent -------------------------------------------------------------------------------------


def read_status(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "agent.json").read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def restart(pid: int, state_dir: Path) -> None:
    """The agent re-executes itself (SIGUSR2); one that is gone is started again with its recorded
    command line, unless systemd restarts it (its unit has Restart=on-failure)."""
    if _alive(pid):
        os.kill(pid, signal.SIGUSR2)
        return
    if os.environ.get("INVOCATION_ID"):  # under systemd: the unit's restart starts it
        return
    status = read_status(state_dir)
    argv = status.get("argv") or []
    if not argv:
        raise UpgradeError("the agent is gone and its command line is unknown: start it again by hand")
    log = open(state_dir / "agent-restarted.log", "ab")
    subprocess.Popen([status.get("python") or sys.executable, *argv[1:]], stdin=subprocess.DEVNULL, stdout=log,
                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    log.close()


def wait_welcomed(state_dir: Path, version: str, since: float, wait: float, pid: int = 0) -> bool:
    """Until an agent of ``version`` has been welcomed after ``since``. An agent ``pid`` that
    died on its restart is not waited for (unless systemd restarts it)."""
    deadline = time.monotonic() + wait
    systemd = bool(os.environ.get("INVOCATION_ID"))
    while time.monotonic() < deadline:
        status = read_status(state_dir)
        if status.get("version") == version and status.get("welcomed_at", 0) > since:
            return True
        if pid and not systemd and not _alive(pid):
            return False
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    sys.exit(main())
