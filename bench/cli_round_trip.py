"""The CLI as part of the round trip: the whole ``zerorun send RunShellScript -p commands='echo hi'``
process, to 30 simulated instances (real executor), wall time p50 over runs. Also the CLI's
start-up alone (``zerorun --help``-free: ``python -c 'import zerorun.cli'``) and ``-X importtime``'s
heaviest imports, because start-up is most of this figure. The project is byte-compiled first, as
pip installs it (``bench.common.byte_compiled``; the byte code made is removed afterwards).

Target (issue 8): <= 0.3 s (SaltStack 3008: 2.8 s; Ansible over SSH with pipelining: 5.3 s).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, Bench, byte_compiled, report, summary  # noqa: E402

TARGET_S = 0.3


def zerorun_cli() -> list[str]:
    script = Path(PYTHON).parent / "zerorun"
    if script.exists():
        return [str(script)]
    found = shutil.which("zerorun")
    return [found] if found else [PYTHON, "-m", "zerorun.cli"]


def import_profile(top: int = 8) -> list[list]:
    proc = subprocess.run([PYTHON, "-X", "importtime", "-c", "import zerorun.cli"], capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        rows.append([name.strip(), int(cum_us), int(self_us)])
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def run(n: int, runs: int, max_seconds: float) -> dict:
    cli = zerorun_cli()
    # as installed: pip byte-compiles a package; a checkout may have no byte code at all (where
    # PYTHONDONTWRITEBYTECODE is set), and then every run compiles what it imports (20 ms here)
    with byte_compiled("zerorun"), Bench("cli_round_trip", max_seconds=max_seconds) as bench:
        bench.start_broker()
        bench.start_sim(n, executor="real", prefix="cli", tags={"role": "cli"})
        env = bench.fleet.env()
        args = [*cli, "-c", str(bench.fleet.client_config), "send", "RunShellScript", "-p", "commands=echo hi",
                "-t", "tag:role=cli"]
        times, bad = [], 0
        for i in range(runs + 1):
            t0 = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
            dt = time.perf_counter() - t0
            if proc.returncode != 0 or proc.stdout.count("  hi") != n:
                bad += 1
                print(f"  run {i}: exit {proc.returncode}\n{proc.stdout[-500:]}\n{proc.stderr[-500:]}", file=sys.stderr)
            if i > 0:
                times.append(dt)
        startup = []
        for _ in range(max(3, runs // 2)):
            t0 = time.perf_counter()
            subprocess.run([PYTHON, "-c", "import zerorun.cli"], check=True, env=env)
            startup.append(time.perf_counter() - t0)
        bare = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([PYTHON, "-c", "pass"], check=True, env=env)
            bare.append(time.perf_counter() - t0)
        imports = import_profile()
    s, st, b = summary(times), summary(startup), summary(bare)
    figures = {"instances": n, "cli": cli, "send_wall_s": s, "import_zerorun_cli_s": st, "python_bare_s": b,
               "heaviest_imports_us": imports, "failed_runs": bad, "target_s": TARGET_S,
               "met": s["p50"] <= TARGET_S}
    rows = [[f"zerorun send (echo hi, {n} instances, whole process)", s["p50"], s["p90"], TARGET_S,
             "yes" if figures["met"] else "NO"],
            ["python -c 'import zerorun.cli'", st["p50"], st["p90"], "-", "-"],
            ["python -c pass", b["p50"], b["p90"], "-", "-"]]
    report("cli_round_trip", rows, ["measure (s)", "p50", "p90", "target", "met"], figures,
           {"instances": n, "runs": runs, "executor": "real (fleetsim)"})
    print("\nheaviest imports of zerorun.cli (cumulative µs, self µs):")
    for name, cum, own in imports:
        print(f"  {cum:>8}  {own:>8}  {name}")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=30)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=300)
    a = p.parse_args(argv)
    run(a.n, a.runs, a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
