"""Fan-out: one command by tag to N simulated instances; time from send until every result is
stored (the broker answers the client's long-poll wait only once the command is terminal and
committed). p50 over runs. max_concurrency "100%".

``--gc``: the broker runs with its metrics on, and each size's row adds the garbage collector's
full collections from the moment its agents started connecting, and the longest full collection
since the broker started (``zerorun_gc_pause_seconds``; each holds the broker's loop). Off by
default: the metrics' once-a-second snapshot costs the broker a little CPU of its own.

Targets (issue 8, 2 cores): 1,000 instances noop <= 0.5 s; real ``true`` <= 3 s.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, cpu_seconds, report, rss_mb, summary  # noqa: E402

TARGETS = {("noop", 1000): 0.5, ("real", 1000): 3.0, ("noop", 10000): 2.0}
PER_SIMULATOR = 5000  # agents per simulator process (each needs two descriptors per agent)


def full_collections(bench: Bench) -> tuple[float, float]:
    """(full collections so far, longest full collection in ms) from the broker's metrics, read
    after its next once-a-second snapshot; (nan, nan) without metrics."""
    address = bench.fleet.runtime().get("metrics")
    if not address:
        return float("nan"), float("nan")
    time.sleep(1.1)
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    count = re.search(r'^zerorun_gc_pause_seconds_count\{generation="2"\} (\S+)$', text, re.M)
    longest = re.search(r'^zerorun_gc_pause_longest_seconds\{generation="2"\} (\S+)$', text, re.M)
    return (float(count.group(1)) if count else float("nan"),
            1000 * float(longest.group(1)) if longest else float("nan"))


def fan_out(bench: Bench, n: int, executor: str, runs: int, warmup: int = 1) -> dict:
    gc_before, _ = full_collections(bench)
    prefix = f"{executor}{n}"
    count = -(-n // PER_SIMULATOR)
    sims = [bench.start_sim(n // count + (k < n % count), executor=executor, prefix=f"{prefix}s{k}",
                            tags={"fleet": prefix}, wait=None) for k in range(count)]
    for sim in sims:
        sim.wait_welcomed(max(60, n / 50))
    for k, sim in enumerate(sims):
        bench.wait_online(sim.n, f"{prefix}s{k}", timeout=max(60, n / 50))
    client = bench.client(timeout=120)
    times, broker_cpu, sim_cpu, bad = [], [], [], 0

    def sims_cpu() -> float:
        return sum(cpu_seconds(sim.pid) for sim in sims)

    for i in range(warmup + runs):
        b0, s0 = cpu_seconds(bench.broker_pid), sims_cpu()
        t0 = time.perf_counter()
        view = client.send("RunShellScript", {"commands": ["true"]}, targets=[f"tag:fleet={prefix}"],
                           max_concurrency="100%", max_errors="100%")
        view = client.wait(view.command_id, timeout=300, include_output=False)
        dt = time.perf_counter() - t0
        ok = view.counts.get("Success", 0)
        if ok != n:
            bad += 1
            print(f"  {prefix}: run {i}: {view.status} {view.counts}", file=sys.stderr)
        if i >= warmup:
            times.append(dt)
            broker_cpu.append(cpu_seconds(bench.broker_pid) - b0)
            sim_cpu.append(sims_cpu() - s0)
        time.sleep(0.3)
    client.close()
    rss = rss_mb(bench.broker_pid)
    gc_after, gc_longest_ms = full_collections(bench)
    for sim in sims:
        sim.stop()
    s = summary(times)
    return {"n": n, "executor": executor, "seconds": s, "simulators": count, "broker_rss_mb": rss,
            "broker_cpu_seconds_p50": summary(broker_cpu)["p50"],
            "sim_cpu_seconds_p50": summary(sim_cpu)["p50"], "incomplete_runs": bad,
            "full_collections": gc_after - gc_before, "longest_full_collection_ms": gc_longest_ms,
            "target_seconds": TARGETS.get((executor, n))}


def run(sizes: list[int], executors: list[str], runs: int, real_max: int, max_seconds: float,
        gc: bool = False) -> dict:
    results = []
    with Bench("fanout", max_seconds=max_seconds) as bench:
        bench.start_broker(*(["--metrics-bind", "127.0.0.1:0"] if gc else []))
        for executor in executors:
            for n in sizes:
                if executor == "real" and n > real_max:
                    continue
                r = fan_out(bench, n, executor, runs if n < 5000 else max(1, runs // 2))
                results.append(r)
                print(f"  {executor} n={n}: p50 {r['seconds']['p50']:.3f}s", file=sys.stderr, flush=True)
    rows = []
    for r in results:
        t = r["target_seconds"]
        rows.append([r["executor"], r["n"], r["seconds"]["p50"], r["seconds"]["max"], r["broker_cpu_seconds_p50"],
                     r["sim_cpu_seconds_p50"], round(r["broker_rss_mb"]), r["full_collections"],
                     r["longest_full_collection_ms"], t if t else "-",
                     "-" if not t else ("yes" if r["seconds"]["p50"] <= t else "NO")])
    figures = {"fanout": results}
    report("fanout", rows, ["executor", "N", "p50 s", "max s", "broker CPU s", "sims CPU s", "broker RSS MB",
                            "full GCs", "longest full GC ms", "target s", "met"],
           figures, {"runs": runs, "sizes": sizes, "executors": executors, "max_concurrency": "100%", "gc": gc})
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="100,1000,5000", help="comma-separated N")
    p.add_argument("--executors", default="noop,real")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--real-max", type=int, default=1000, help="largest N for the real executor (5000: --real-max 5000)")
    p.add_argument("--max-seconds", type=float, default=900)
    p.add_argument("--gc", action="store_true", help="read the broker's garbage-collector pauses from its metrics")
    a = p.parse_args(argv)
    run([int(x) for x in a.sizes.split(",")], a.executors.split(","), a.runs, a.real_max, a.max_seconds, a.gc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
