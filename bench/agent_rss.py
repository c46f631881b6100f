"""One REAL idle agent's RSS (python -m agent, connected and heartbeating), before and after it ran
a command. Target (issue 8): < 30 MB."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, cpu_seconds, report, rss_mb  # noqa: E402

TARGET_MB = 30.0


def run(settle: float, max_seconds: float) -> dict:
    with Bench("agent_rss", max_seconds=max_seconds) as bench:
        bench.start_broker()
        proc = bench.fleet.start_agent("rss-1", {"role": "rss"})
        bench.fleet.wait_online(["rss-1"])
        time.sleep(settle)
        idle = rss_mb(proc.pid)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(settle)
        idle_cpu_pct = 100 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        client = bench.client()
        view = client.send("RunShellScript", {"commands": ["echo hi"]}, instance_ids=["rss-1"])
        client.wait(view.command_id, timeout=30)
        client.close()
        time.sleep(1)
        after = rss_mb(proc.pid)
        threads = len(list(Path(f"/proc/{proc.pid}/task").iterdir()))
    figures = {"idle_rss_mb": idle, "rss_after_command_mb": after, "idle_cpu_pct": idle_cpu_pct,
               "threads": threads, "target_mb": TARGET_MB, "met": max(idle, after) < TARGET_MB}
    rows = [["idle agent RSS (MB)", idle, TARGET_MB, "yes" if idle < TARGET_MB else "NO"],
            ["RSS after one command (MB)", after, TARGET_MB, "yes" if after < TARGET_MB else "NO"],
            ["idle CPU (% of a core, heartbeat 5 s)", idle_cpu_pct, "-", "-"]]
    report("agent_rss", rows, ["measure", "measured", "target", "met"], figures, {"settle_s": settle})
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=120)
    a = p.parse_args(argv)
    run(a.settle, a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
