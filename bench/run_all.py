"""Runs every benchmark (each in its own process, each bounded in time) and prints one table of
the figures against their targets: issue 25's where it sets one (round trip, throughput per
broker-CPU-second, the CLI, agent memory), issue 8's elsewhere. ``--quick`` uses fewer runs;
``--skip``/``--only`` choose benchmarks. Each benchmark also writes its own JSON to
bench/results/."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, RESULTS, ROOT, machine, table, write_result  # noqa: E402

BENCHES = {
    "round_trip": (["--runs", "200"], ["--runs", "50"], 400),
    "fanout": (["--sizes", "100,1000,5000", "--runs", "5"], ["--sizes", "100,1000", "--runs", "3"], 1200),
    "throughput": (["--seconds", "10"], ["--seconds", "5"], 600),
    "idle": (["-n", "5000", "--window", "30"], ["-n", "5000", "--window", "15"], 600),
    "cli_round_trip": (["--runs", "20"], ["--runs", "8"], 300),
    "agent_rss": ([], [], 120),
    "ansible": (["--runs", "3"], ["--runs", "1"], 900),
}


def latest(name: str, since: float) -> dict | None:
    files = sorted((p for p in RESULTS.glob(f"{name}-*.json") if p.stat().st_mtime >= since),
                   key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def yn(ok: bool) -> str:
    return "yes" if ok else "NO"


def rows_for(name: str, doc: dict) -> list[list]:
    f = doc["figures"]
    if name == "round_trip":
        s = f["round_trip_ms"]
        return [["round trip p50 (1 real agent, client library)", f"{s['p50']:.2f} ms (p99 {s['p99']:.1f})",
                 "<= 2 ms", yn(s["p50"] <= 2)]]
    if name == "fanout":
        out = []
        for r in f["fanout"]:
            t = r["target_seconds"]
            out.append([f"fan-out {r['n']} {r['executor']}", f"{r['seconds']['p50']:.2f} s",
                        f"<= {t:g} s" if t else "-", yn(r["seconds"]["p50"] <= t) if t else "-"])
        return out
    if name == "throughput":
        rows = []
        for r in f["throughput"]:
            goal = 3_000 if r["shape"].startswith("1 ") else 20_000
            rows.append([f"throughput, {r['shape']}", f"{r['invocations_per_broker_cpu_s']:,.0f}/broker-CPU-s "
                         f"({r['invocations_per_broker_cpu_s_without_result_reads']:,.0f} before the result reads; "
                         f"{r['invocations_per_s']:,.0f} inv/s)", f">= {goal:,}/broker-CPU-s",
                         yn(r["invocations_per_broker_cpu_s"] >= goal)])
        return rows
    if name == "idle":
        return [[f"idle {f['agents']} agents: broker RSS", f"{f['broker_rss_mb_max']:.0f} MB", "<= 300 MB",
                 yn(f["broker_rss_mb_max"] <= 300)],
                [f"idle {f['agents']} agents: broker CPU", f"{f['broker_cpu_pct']:.1f} %", "<= 5 %",
                 yn(f["broker_cpu_pct"] <= 5)]]
    if name == "cli_round_trip":
        s = f["send_wall_s"]
        rows = [[f"zerorun send echo hi to {f['instances']} (whole CLI process, as installed)", f"{s['p50']:.3f} s",
                 "<= 0.1 s", yn(s["p50"] <= 0.1)]]
        if "send_wall_checkout_s" in f:
            rows.append(["the same from this checkout's venv (editable install)",
                         f"{f['send_wall_checkout_s']['p50']:.3f} s", "-", "-"])
        return rows
    if name == "agent_rss":
        return [["idle real agent RSS", f"{f['idle_rss_mb']:.1f} MB", "< 25 MB", yn(f["idle_rss_mb"] < 25)]]
    if name == "ansible":
        r = f["ratios"]
        cases = f["cases"]
        return [[label, f"{c['seconds']['p50']:.2f} s", "-", "-"] for label, c in cases.items()] + [
            ["per-host / targets", f"{r['perhost_over_targets']:.2f}x", "<= 1.5x", yn(r["perhost_over_targets"] <= 1.5)],
            ["command module / per-host", f"{r['command_over_perhost']:.1f}x", ">= 5x",
             yn(r["command_over_perhost"] >= 5)]]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--skip", default="", help="comma-separated benchmark names")
    a = p.parse_args(argv)
    names = [n for n in BENCHES if (not a.only or n in a.only.split(",")) and n not in a.skip.split(",")]
    rows, status = [], {}
    for name in names:
        full, quick, limit = BENCHES[name]
        args = [PYTHON, "-m", f"bench.{name}", *(quick if a.quick else full), "--max-seconds", str(limit)]
        print(f"== {name}: {' '.join(args[2:])}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(args, cwd=str(ROOT), timeout=limit + 60)
            status[name] = proc.returncode
        except subprocess.TimeoutExpired:
            status[name] = "timeout"
        doc = latest(name, t0 - 1)
        if doc is None:
            rows.append([name, f"no result (exit {status[name]})", "-", "-"])
            continue
        rows.extend(rows_for(name, doc))
    print()
    print(f"machine: {machine()}")
    print(table(rows, ["figure", "measured", "target", "met"]))
    write_result("run_all", {"rows": rows, "exit_status": status}, {"quick": a.quick, "benchmarks": names})
    return 0 if all(v == 0 for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
