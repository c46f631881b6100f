"""The CLI as part of the round trip: the whole ``zerorun send RunShellScript -p commands='echo hi'``
process, to 30 simulated instances (real executor), wall time p50 over runs. Also the CLI's
start-up alone (``zerorun --help``-free: ``python -c 'import zerorun.cli'``) and ``-X importtime``'s
heaviest imports, because start-up is most of this figure. Two CLIs, alternated against one fleet:
the project laid out as its wheel installs it (``bench.common.installed_project``: what an operator
runs) and this checkout's venv (an editable install, whose finder every interpreter start imports);
both byte-compiled, as pip installs a package (the byte code made is removed afterwards).

Target (issue 25): <= 0.1 s as installed (issue 8's was 0.3 s; SaltStack 3008: 2.8 s; Ansible over
SSH with pipelining: 5.3 s).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, ROOT, Bench, byte_compiled, installed_project, report, summary  # noqa: E402

TARGET_S = 0.1


def zerorun_cli() -> list[str]:
    script = Path(PYTHON).parent / "zerorun"
    if script.exists():
        return [str(script)]
    found = shutil.which("zerorun")
    return [found] if found else [PYTHON, "-m", "zerorun.cli"]


def import_profile(python: str, cwd: str, top: int = 8) -> list[list]:
    proc = subprocess.run([python, "-X", "importtime", "-c", "import zerorun.cli"], capture_output=True, text=True,
                          cwd=cwd)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        rows.append([name.strip(), int(cum_us), int(self_us)])
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def _timed(args: list[str], env: dict, cwd: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, cwd=cwd)
    return time.perf_counter() - t0, proc


def run(n: int, runs: int, max_seconds: float) -> dict:
    # Two CLIs, alternated run by run against one fleet: the project as its wheel installs it (what
    # an operator runs), and this checkout's venv (an editable install: its finder is imported at
    # every start). Both byte-compiled, as pip compiles an installed package; a checkout may have
    # no byte code at all (where PYTHONDONTWRITEBYTECODE is set), and every run would compile.
    with byte_compiled("zerorun"), installed_project() as venv, \
            Bench("cli_round_trip", max_seconds=max_seconds) as bench:
        bench.start_broker()
        bench.start_sim(n, executor="real", prefix="cli", tags={"role": "cli"})
        env = bench.fleet.env()
        send = ["-c", str(bench.fleet.client_config), "send", "RunShellScript", "-p", "commands=echo hi",
                "-t", "tag:role=cli"]
        pythons = {"installed": (str(venv / "bin" / "python"), [str(venv / "bin" / "zerorun")], str(venv)),
                   "checkout": (PYTHON, zerorun_cli(), str(ROOT))}
        times: dict[str, list[float]] = {k: [] for k in pythons}
        startup: dict[str, list[float]] = {k: [] for k in pythons}
        bare: dict[str, list[float]] = {k: [] for k in pythons}
        bad = 0
        for i in range(runs + 1):
            for kind, (_, cli, _) in pythons.items():
                dt, proc = _timed([*cli, *send], env)
                if proc.returncode != 0 or proc.stdout.count("  hi") != n:
                    bad += 1
                    print(f"  {kind} run {i}: exit {proc.returncode}\n{proc.stdout[-500:]}\n{proc.stderr[-500:]}",
                          file=sys.stderr)
                if i > 0:
                    times[kind].append(dt)
        for i in range(max(3, runs // 2)):
            for kind, (python, _, cwd) in pythons.items():
                startup[kind].append(_timed([python, "-c", "import zerorun.cli"], env, cwd)[0])
                if i < 5:
                    bare[kind].append(_timed([python, "-c", "pass"], env, cwd)[0])
        imports = import_profile(*pythons["installed"][::2])
    s = {k: summary(v) for k, v in times.items()}
    st = {k: summary(v) for k, v in startup.items()}
    b = {k: summary(v) for k, v in bare.items()}
    figures = {"instances": n, "cli": pythons["installed"][1], "send_wall_s": s["installed"],
               "send_wall_checkout_s": s["checkout"], "import_zerorun_cli_s": st["installed"],
               "import_zerorun_cli_checkout_s": st["checkout"], "python_bare_s": b["installed"],
               "python_bare_checkout_s": b["checkout"], "heaviest_imports_us": imports, "failed_runs": bad,
               "target_s": TARGET_S, "met": s["installed"]["p50"] <= TARGET_S}
    rows = []
    for kind, label in (("installed", "as installed"), ("checkout", "this checkout's venv")):
        met = s[kind]["p50"] <= TARGET_S
        rows += [[f"zerorun send (echo hi, {n} instances, whole process), {label}", s[kind]["p50"],
                  s[kind]["p90"], TARGET_S, "yes" if met else "NO"],
                 [f"python -c 'import zerorun.cli', {label}", st[kind]["p50"], st[kind]["p90"], "-", "-"],
                 [f"python -c pass, {label}", b[kind]["p50"], b[kind]["p90"], "-", "-"]]
    report("cli_round_trip", rows, ["measure (s)", "p50", "p90", "target", "met"], figures,
           {"instances": n, "runs": runs, "executor": "real (fleetsim)"})
    print("\nheaviest imports of zerorun.cli as installed (cumulative µs, self µs):")
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
