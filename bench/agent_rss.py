"""One REAL idle agent's RSS (python -m agent, connected and heartbeating), before and after it ran
a command. Target (issue 8): < 30 MB; issue 25: < 25 MB.

Two agents of the same fleet are measured side by side: one that compiles the project's modules
from source at start, as a checkout does where ``PYTHONDONTWRITEBYTECODE`` is set (compiling
leaves about 0.4 MB behind), and one started after they were byte-compiled into their
``__pycache__``, as pip leaves an installed package (the directories made for it are removed
at the end)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Bench, byte_compiled, cpu_seconds, report, rss_mb  # noqa: E402

TARGET_MB = 30.0
GOAL_MB = 25.0


def run(settle: float, max_seconds: float) -> dict:
    with contextlib.ExitStack() as compiled:
        with Bench("agent_rss", max_seconds=max_seconds) as bench:
            bench.start_broker()
            source = bench.fleet.start_agent("rss-source", {"role": "rss"})
            bench.fleet.wait_online(["rss-source"])  # it has imported what it needs: compiled now, for the next
            compiled.enter_context(byte_compiled("agent", "zerorun"))
            installed = bench.fleet.start_agent("rss-1", {"role": "rss"})
            bench.fleet.wait_online(["rss-1"])
            time.sleep(settle)
            idle, idle_source = rss_mb(installed.pid), rss_mb(source.pid)
            c0, t0 = cpu_seconds(installed.pid), time.monotonic()
            time.sleep(settle)
            idle_cpu_pct = 100 * (cpu_seconds(installed.pid) - c0) / (time.monotonic() - t0)
            client = bench.client()
            for instance_id in ("rss-1", "rss-source"):
                view = client.send("RunShellScript", {"commands": ["echo hi"]}, instance_ids=[instance_id])
                client.wait(view.command_id, timeout=30)
            client.close()
            time.sleep(1)
            after, after_source = rss_mb(installed.pid), rss_mb(source.pid)
            threads = len(list(Path(f"/proc/{installed.pid}/task").iterdir()))
    figures = {"idle_rss_mb": idle, "rss_after_command_mb": after, "idle_cpu_pct": idle_cpu_pct,
               "idle_rss_from_source_mb": idle_source, "rss_after_command_from_source_mb": after_source,
               "threads": threads, "target_mb": TARGET_MB, "goal_mb": GOAL_MB,
               "met": max(idle, after) < TARGET_MB, "goal_met": max(idle, after) < GOAL_MB}

    def row(name: str, value: float) -> list:
        return [name, value, TARGET_MB, GOAL_MB, "yes" if value < GOAL_MB else "NO"]

    rows = [row("idle agent RSS (MB), byte-compiled as installed", idle),
            row("RSS after one command (MB), byte-compiled as installed", after),
            row("idle agent RSS (MB), compiled from source at start", idle_source),
            row("RSS after one command (MB), compiled from source at start", after_source),
            ["idle CPU (% of a core, heartbeat 5 s)", idle_cpu_pct, "-", "-", "-"]]
    report("agent_rss", rows, ["measure", "measured", "target", "goal (issue 25)", "goal met"], figures,
           {"settle_s": settle})
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
