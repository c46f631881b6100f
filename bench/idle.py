"""Idle scale: broker RSS and CPU with N (default 5,000) connected, heartbeating simulated agents.

After every agent is Online and the connect storm has settled, the broker's /proc/<pid>/stat
(utime+stime) and VmRSS are sampled over a window (default 30 s). Heartbeat interval: the broker's
default of 5 s. Also reported: the time to get all N agents welcomed (CURVE handshakes + HELLOs)
and the simulator's own CPU and RSS.

Targets (issue 8): broker RSS <= 300 MB and CPU <= 5% of a core with 5,000 idle agents.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, cpu_seconds, report, rss_mb  # noqa: E402
from bench.profiling import Profiler  # noqa: E402

TARGET_RSS_MB = 300.0
TARGET_CPU_PCT = 5.0


def run(n: int, window: float, settle: float, heartbeat: float, profile: bool, max_seconds: float) -> dict:
    with Bench("idle", heartbeat_interval=heartbeat, max_seconds=max_seconds) as bench:
        bench.start_broker()
        rss_empty = rss_mb(bench.broker_pid)
        t0 = time.monotonic()
        sim = bench.start_sim(n, prefix="idle", tags={"role": "idle"}, wait=max(120, n / 20))
        welcomed_s = time.monotonic() - t0
        time.sleep(settle)
        pid = bench.broker_pid
        b0, s0, w0 = cpu_seconds(pid), cpu_seconds(sim.pid), time.monotonic()
        rss_samples = []
        with Profiler(pid, bench.root / "idle-profile.txt", rate=100) if profile else contextlib.nullcontext() as prof:
            while time.monotonic() - w0 < window:
                rss_samples.append(rss_mb(pid))
                time.sleep(1.0)
        wall = time.monotonic() - w0
        broker_pct = 100 * (cpu_seconds(pid) - b0) / wall
        sim_pct = 100 * (cpu_seconds(sim.pid) - s0) / wall
        online = sum(1 for v in bench.fleet.client().instances(include_offline=False)
                     if v.ping_status == "Online")
        figures = {"agents": n, "online_at_end": online, "heartbeat_interval_s": heartbeat,
                   "welcome_all_s": round(welcomed_s, 2), "window_s": round(wall, 1),
                   "broker_rss_mb_max": max(rss_samples), "broker_rss_mb_empty": rss_empty,
                   "broker_cpu_pct": broker_pct, "sim_cpu_pct": sim_pct, "sim_rss_mb": rss_mb(sim.pid),
                   "target_rss_mb": TARGET_RSS_MB, "target_cpu_pct": TARGET_CPU_PCT,
                   "met": max(rss_samples) <= TARGET_RSS_MB and broker_pct <= TARGET_CPU_PCT}
        if profile:
            figures["profile"] = prof.summary()
    rows = [["broker RSS (MB)", figures["broker_rss_mb_max"], TARGET_RSS_MB,
             "yes" if figures["broker_rss_mb_max"] <= TARGET_RSS_MB else "NO"],
            ["broker CPU (% of a core)", broker_pct, TARGET_CPU_PCT, "yes" if broker_pct <= TARGET_CPU_PCT else "NO"],
            ["time to welcome all (s)", figures["welcome_all_s"], "-", "-"],
            ["online at end", online, n, "yes" if online == n else "NO"],
            ["simulator CPU (%)", sim_pct, "-", "-"], ["simulator RSS (MB)", figures["sim_rss_mb"], "-", "-"]]
    report("idle", rows, [f"{n} idle agents, heartbeat {heartbeat:g}s", "measured", "target", "met"], figures,
           {"agents": n, "window_s": window, "heartbeat_interval_s": heartbeat})
    if profile and "top_self" in figures.get("profile", {}):
        print("\nbroker profile while idle:")
        for f, pct in figures["profile"]["top_inclusive"][:10]:
            print(f"  {pct:5.1f}% incl  {f}")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=5000)
    p.add_argument("--window", type=float, default=30)
    p.add_argument("--settle", type=float, default=10)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--profile", action="store_true", help="py-spy the broker during the window")
    p.add_argument("--max-seconds", type=float, default=600)
    a = p.parse_args(argv)
    run(a.n, a.window, a.settle, a.heartbeat_interval, a.profile, a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
