"""Round trip: one ``true`` on one REAL agent via the client library; p50/p99 over many runs.

Measures send (and wait, in one request) -> broker -> agent (journal, fork/exec of /bin/sh) -> result stored -> the waiting
client answered. Target (issue 8): p50 <= 5 ms on 2 cores; issue 25: p50 under 2 ms.

The hop-by-hop breakdown comes from the timestamps the parts record (one machine, one clock):
the client's send to the command's ``requested_at`` (the broker rendered and created it), to the
invocation's ``delivered_at`` (the broker committed it and sent it; the agent journalled it and
its acknowledgement reached the broker), to the step's ``started_at`` (the agent's supervisor
started ``/bin/sh``), to its ``ended_at``, to the command's ``completed_at`` (the result reached
the broker and was applied), to the client holding the answer (commit and reply).

Also the CPU each side spends per round trip (from /proc over the measured runs): the broker, the
agent with its zygote, supervisors and their steps, and this client. What the wall time has
beyond their sum is waiting: threads woken on idle CPUs, ZeroMQ's I/O threads in between.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, cpu_seconds, ms, report, summary, tree_cpu_seconds  # noqa: E402

TARGET_P50_MS = 5.0
HOPS = ["client -> broker: rendered, created", "-> committed, delivered, journalled, acked",
        "ack -> step started by the supervisor", "step: /bin/sh true", "step ended -> result applied by the broker",
        "-> client: commit and answer"]


def run(runs: int = 200, warmup: int = 10, max_seconds: float = 300) -> dict:
    with Bench("round_trip", max_seconds=max_seconds) as bench:
        broker_pid = bench.start_broker()
        agent_pid = bench.fleet.start_agent("rt-1", {"role": "rt"}).pid
        bench.fleet.wait_online(["rt-1"])
        client = bench.client()
        times = []
        cpu: dict[str, float] = {}
        hops: dict[str, list[float]] = {name: [] for name in HOPS}
        statuses = set()
        for i in range(warmup + runs):
            if i == warmup:
                cpu = {"broker": cpu_seconds(broker_pid), "agent": tree_cpu_seconds(agent_pid),
                       "client": time.process_time()}
            wall, t0 = time.time(), time.perf_counter()
            view = client.send("RunShellScript", {"commands": ["true"]}, instance_ids=["rt-1"], wait=30)
            dt = time.perf_counter() - t0
            statuses.add(view.status)
            if i >= warmup:
                times.append(dt)
                inv = view.invocations[0]
                if inv.steps:
                    marks = [wall, view.requested_at, inv.delivered_at, inv.steps[0].started_at,
                             inv.steps[0].ended_at, view.completed_at, wall + dt]
                    for name, a, b in zip(HOPS, marks, marks[1:]):
                        hops[name].append(b - a)
        time.sleep(0.2)  # what the last round trip left to do (acks, the run directory's removal)
        cpu = {"broker": cpu_seconds(broker_pid) - cpu["broker"], "agent": tree_cpu_seconds(agent_pid) - cpu["agent"],
               "client": time.process_time() - cpu["client"]}
        client.close()
    s = summary([ms(t) for t in times])
    figures = {"round_trip_ms": s, "statuses": sorted(statuses), "target_p50_ms": TARGET_P50_MS,
               "met": s["p50"] <= TARGET_P50_MS}
    rows = [["round trip (ms)", s["p50"], s["p90"], s["p99"], s["max"], TARGET_P50_MS,
             "yes" if figures["met"] else "NO"]]
    figures["hops_ms"] = {}
    for name, values in hops.items():
        if values:
            h = summary([ms(v) for v in values])
            figures["hops_ms"][name] = h
            rows.append([f"  {name}", h["p50"], h["p90"], h["p99"], h["max"], "", ""])
    figures["cpu_ms_per_round_trip"] = {k: round(1000 * v / max(1, runs), 3) for k, v in cpu.items()}
    figures["wall_ms_per_round_trip"] = round(1000 * sum(times) / max(1, runs), 3)
    for name, value in figures["cpu_ms_per_round_trip"].items():
        rows.append([f"CPU per round trip (ms): {name}", value, "", "", "", "", ""])
    rows.append(["wall per round trip (ms, mean)", figures["wall_ms_per_round_trip"], "", "", "", "", ""])
    report("round_trip", rows, ["measure", "p50", "p90", "p99", "max", "target p50", "met"], figures,
           {"runs": runs, "warmup": warmup, "agent": "real (python -m agent)", "statuses": sorted(statuses)})
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=300)
    a = p.parse_args(argv)
    run(a.runs, max_seconds=a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
