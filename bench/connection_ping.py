"""Connection plugin: time per ``ping`` task across N instances over ``zerorun.fleet.agent``
(through the broker to real agents) versus ``ansible_connection=local`` for the same host names.

Real agents (one process each, ``python -m agent``) on 127.0.0.1, not the fleet simulator (it
has no interactive exec). Each case runs ``ansible-playbook`` twice per round: one play with 1
``ping`` task and one with ``1 + EXTRA`` ping tasks over all N hosts; the time per task is the
difference divided by EXTRA (the marginal cost of one more task on every host, with Ansible's
own start-up and inventory parsing taken out). Same forks for every case.

Issue 9's target: the agent connection within 2x of local (like for like: same pipelining).

Usage: python bench/connection_ping.py [-n 50] [--runs 3] [--forks 10] [--extra 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zerorun.testing import LocalFleet  # noqa: E402

PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"


def tool(name: str) -> str:
    path = Path(PYTHON).parent / name
    return str(path) if path.exists() else name


def playbook(path: Path, tasks: int) -> Path:
    lines = ["- hosts: fleet", "  gather_facts: false", "  tasks:"]
    lines += [f"    - name: ping {i}\n      ansible.builtin.ping:" for i in range(tasks)]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or "unreachable=1" in proc.stdout or "failed=1" in proc.stdout:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def run(n: int, runs: int, forks: int, extra: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="zerorun-bench-conn-"))
    fleet = LocalFleet(root, heartbeat_interval=5.0, log_level="warning")
    try:
        fleet.start_broker()
        hosts = [f"conn-{i:03d}" for i in range(n)]
        t0 = time.perf_counter()
        for host in hosts:
            fleet.start_agent(host, {"role": "bench"})
        fleet.wait_online(hosts, timeout=120)
        print(f"{n} real agents online in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        one = playbook(root / "one.yml", 1)
        many = playbook(root / "many.yml", 1 + extra)
        inventories = {}
        for label, conn, pipelining in (("zerorun.fleet.agent, pipelining on", "zerorun.fleet.agent", True),
                                        ("zerorun.fleet.agent, pipelining off", "zerorun.fleet.agent", False),
                                        ("local, pipelining on", "local", True),
                                        ("local, pipelining off", "local", False)):
            # The same inventory source for every case: the zerorun.fleet.instances plugin, with
            # the connection set by compose (what set_connection: true does for the agent).
            inv = root / f"case{len(inventories)}.zerorun.yml"
            inv.write_text(
                "plugin: zerorun.fleet.instances\ntargets: tag:role=bench\ngroups:\n  fleet: true\n"
                f"compose:\n  ansible_connection: \"'{conn}'\"\n  ansible_pipelining: {str(pipelining).lower()}\n"
                f"  ansible_python_interpreter: \"'{PYTHON}'\"\n")
            inventories[label] = inv
        env = fleet.env()
        env.update({"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORKS": str(forks),
                    "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
                    "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
                    "ANSIBLE_DEPRECATION_WARNINGS": "False"})
        results: dict[str, dict] = {}
        for label, inv in inventories.items():
            ones, manys, per_task = [], [], []
            for _ in range(runs):
                a = timed([tool("ansible-playbook"), "-i", str(inv), str(one)], env)
                b = timed([tool("ansible-playbook"), "-i", str(inv), str(many)], env)
                ones.append(a)
                manys.append(b)
                per_task.append((b - a) / extra)
            results[label] = {"play_1_task_s": ones, f"play_{1 + extra}_tasks_s": manys,
                              "per_task_s": per_task, "per_task_p50_s": statistics.median(per_task),
                              "play_1_task_p50_s": statistics.median(ones)}
            print(f"  {label}: {statistics.median(per_task):.3f}s per task over {n} hosts "
                  f"(1-task play {statistics.median(ones):.2f}s)", file=sys.stderr, flush=True)
    finally:
        fleet.close()
    ratios = {
        "pipelining on": results["zerorun.fleet.agent, pipelining on"]["per_task_p50_s"]
        / results["local, pipelining on"]["per_task_p50_s"],
        "pipelining off": results["zerorun.fleet.agent, pipelining off"]["per_task_p50_s"]
        / results["local, pipelining off"]["per_task_p50_s"],
        "agent default (on) vs local default (off)": results["zerorun.fleet.agent, pipelining on"]["per_task_p50_s"]
        / results["local, pipelining off"]["per_task_p50_s"],
    }
    figures = {"instances": n, "agents": "real (python -m agent), one per instance", "forks": forks,
               "inventory": "zerorun.fleet.instances plugin for every case", "loadavg_at_end": os.getloadavg(),
               "runs": runs, "extra_tasks": extra, "cases": results, "ratios_agent_over_local": ratios,
               "target_max_ratio": 2.0, "met": all(r <= 2.0 for r in ratios.values())}
    print()
    print(f"ping, {n} instances, forks={forks}, p50 of {runs} runs")
    print(f"{'case':40} {'per task s':>11} {'per host-task ms':>17} {'1-task play s':>14}")
    for label, r in results.items():
        print(f"{label:40} {r['per_task_p50_s']:11.3f} {1000 * r['per_task_p50_s'] / n:17.1f} "
              f"{r['play_1_task_p50_s']:14.2f}")
    for label, ratio in ratios.items():
        print(f"ratio agent/local, {label:31} {ratio:6.2f}  (target <= 2: {'yes' if ratio <= 2 else 'NO'})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"connection_ping-{stamp}.json"
    out.write_text(json.dumps({
        "benchmark": "connection_ping", "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "figures": figures}, indent=2) + "\n")
    print(f"wrote {out}")
    return figures


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop every agent we started
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=50, help="instances (one real agent each)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--forks", type=int, default=10)
    p.add_argument("--extra", type=int, default=5, help="extra ping tasks in the long play")
    a = p.parse_args(argv)
    run(a.n, a.runs, a.forks, a.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
