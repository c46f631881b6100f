"""Ansible: ``ansible-playbook`` with one ``zerorun.fleet.run_command`` task on 100 simulated
instances (real executor: ``true`` really runs), in targets mode (one task on localhost, one
command by tag) and per-host mode (hosts: the 100 instances; the action plugin coalesces the
batch into one broker command), versus ``ansible`` with the ``command`` module over
``ansible_connection=local`` for the same 100 host names (the best case Ansible itself can do).
Same forks for all (default 20). Wall time of the whole ansible process, p50 over runs.
A reference case measures Ansible's own per-host floor: a ``debug`` task on the same 100 hosts
(a worker per host, no module, no connection, nothing of Zerorun).

Targets (issue 8): per-host within 1.5x of targets mode; at least 5x faster than ``command``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, ROOT, Bench, report, summary  # noqa: E402


def tool(name: str) -> str:
    path = Path(PYTHON).parent / name
    return str(path) if path.exists() else name


def run(n: int, runs: int, forks: int, max_seconds: float) -> dict:
    with Bench("ansible", max_seconds=max_seconds) as bench:
        bench.start_broker()
        bench.start_sim(n, executor="real", prefix="ans", tags={"role": "ans"})
        root = bench.root
        hosts = [f"ans-{i:05d}" for i in range(n)]
        inv = root / "inventory.ini"
        inv.write_text("[fleet]\n" + "\n".join(hosts) + "\n\n[fleet:vars]\nansible_connection=local\n"
                       f"ansible_python_interpreter={PYTHON}\n\n[local]\nlocalhost ansible_connection=local "
                       f"ansible_python_interpreter={PYTHON}\n")
        (root / "targets.yml").write_text(
            "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
            "    - zerorun.fleet.run_command:\n        commands: \"true\"\n        targets: tag:role=ans\n"
            "        max_concurrency: \"100%\"\n")
        (root / "floor.yml").write_text(
            "- hosts: fleet\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug:\n        msg: hi\n")
        (root / "perhost.yml").write_text(
            "- hosts: fleet\n  gather_facts: false\n  tasks:\n"
            "    - zerorun.fleet.run_command:\n        commands: \"true\"\n        max_concurrency: \"100%\"\n")
        env = bench.fleet.env()
        env.update({"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORKS": str(forks),
                    "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
                    "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"})
        cases = {
            "run_command targets mode (1 task, localhost)": [tool("ansible-playbook"), "-i", str(inv),
                                                             str(root / "targets.yml")],
            "run_command per-host mode (100 hosts)": [tool("ansible-playbook"), "-i", str(inv),
                                                      str(root / "perhost.yml")],
            "ansible -m command over local (100 hosts)": [tool("ansible"), "fleet", "-i", str(inv), "-m",
                                                          "command", "-a", "true"],
            # Ansible's own per-host floor: a task that runs in each host's worker and does nothing
            "reference: debug task on the 100 hosts (no module, no connection)": [
                tool("ansible-playbook"), "-i", str(inv), str(root / "floor.yml")],
        }
        results = {}
        for label, args in cases.items():
            times, bad = [], 0
            for i in range(runs):
                t0 = time.perf_counter()
                proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
                times.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    bad += 1
                    print(f"  {label}: exit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}",
                          file=sys.stderr)
            results[label] = {"seconds": summary(times), "failed_runs": bad}
            print(f"  {label}: p50 {results[label]['seconds']['p50']:.2f}s", file=sys.stderr, flush=True)
    labels = list(cases)
    t_targets = results[labels[0]]["seconds"]["p50"]
    t_perhost = results[labels[1]]["seconds"]["p50"]
    t_command = results[labels[2]]["seconds"]["p50"]
    t_floor = results[labels[3]]["seconds"]["p50"]
    ratios = {"perhost_over_targets": t_perhost / t_targets, "command_over_perhost": t_command / t_perhost,
              "command_over_targets": t_command / t_targets, "floor_over_targets": t_floor / t_targets,
              "perhost_over_floor": t_perhost / t_floor}
    figures = {"cases": results, "ratios": ratios, "forks": forks, "instances": n,
               "targets": {"perhost_over_targets_max": 1.5, "command_over_perhost_min": 5.0},
               "met": ratios["perhost_over_targets"] <= 1.5 and ratios["command_over_perhost"] >= 5.0}
    rows = [[label, r["seconds"]["p50"], r["seconds"]["max"], r["failed_runs"]] for label, r in results.items()]
    rows.append(["ratio per-host / targets (target <= 1.5)", ratios["perhost_over_targets"], "-",
                 "yes" if ratios["perhost_over_targets"] <= 1.5 else "NO"])
    rows.append(["ratio command / per-host (target >= 5)", ratios["command_over_perhost"], "-",
                 "yes" if ratios["command_over_perhost"] >= 5 else "NO"])
    rows.append(["ratio debug floor / targets (Ansible alone)", ratios["floor_over_targets"], "-", "-"])
    rows.append(["ratio per-host / debug floor", ratios["perhost_over_floor"], "-", "-"])
    report("ansible", rows, [f"case (forks={forks})", "p50 s", "max s", "failed / met"], figures,
           {"instances": n, "runs": runs, "forks": forks, "executor": "real (fleetsim)"})
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--forks", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=900)
    a = p.parse_args(argv)
    run(a.n, a.runs, a.forks, a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
