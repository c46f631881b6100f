"""``make demo``: a broker and four agents on this machine, keys accepted, a command by tag,
then the same through an Ansible playbook; every process is stopped at the end."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .testing import LocalFleet

ROOT = Path(__file__).resolve().parent.parent
AGENTS = {"web-1": {"role": "web"}, "web-2": {"role": "web"}, "db-1": {"role": "db"}, "db-2": {"role": "db"}}


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def zerorun(fleet: LocalFleet, *args: str) -> int:
    print("$ zerorun " + " ".join(a if " " not in a else repr(a) for a in args), flush=True)
    proc = fleet.cli(*args)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="zerorun-demo-"))
    fleet = LocalFleet(workdir, auto_accept=False, heartbeat_interval=1.0)
    status = 0
    try:
        say(f"starting a broker (state in {workdir}/broker): CURVE keys are generated on first start")
        fleet.start_broker()
        print(f"agents connect to {fleet.agent_endpoint}; client config: {fleet.client_config}")
        say("starting four agents: web-1, web-2 (role=web) and db-1, db-2 (role=db)")
        for instance_id, tags in AGENTS.items():
            fleet.start_agent(instance_id, tags)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = {k.name for k in fleet.client().keys() if k.state == "pending"}
            if pending >= set(AGENTS):
                break
            time.sleep(0.2)
        say("new agent keys wait for an operator's decision")
        zerorun(fleet, "keys", "list")
        for instance_id in AGENTS:
            zerorun(fleet, "keys", "accept", instance_id)
        fleet.wait_online(AGENTS)
        say("the fleet, with tags and ping status")
        zerorun(fleet, "instances")
        say("run a command on every instance tagged role=web")
        status = zerorun(fleet, "send", "RunShellScript", "-t", "tag:role=web", "-p",
                         "commands=echo \"hello from $(hostname) as $ZERORUN_INSTANCE_ID\"; uptime")
        playbook = ROOT / "playbooks" / "demo.yml"
        ansible_playbook = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent))
        if playbook.exists() and ansible_playbook:
            say("the same from Ansible: ansible-playbook playbooks/demo.yml")
            env = fleet.env()
            env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
            env.setdefault("ANSIBLE_FORCE_COLOR", "1" if sys.stdout.isatty() else "0")
            env["ANSIBLE_LOCALHOST_WARNING"] = "False"
            env["ANSIBLE_INVENTORY_UNPARSED_WARNING"] = "False"
            print(f"$ ansible-playbook {playbook.relative_to(ROOT)}", flush=True)
            status = subprocess.run([ansible_playbook, str(playbook)], cwd=ROOT, env=env).returncode or status
        elif not ansible_playbook:
            say("ansible-playbook is not installed in this environment: skipping the playbook part")
    finally:
        say("stopping every process the demo started")
        fleet.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print("done." if status == 0 else f"finished with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
