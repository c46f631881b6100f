"""Throughput: invocations per second the broker sustains with noop agents, CURVE and durable
state on (the broker always runs both; SQLite WAL group commit), and where its time goes.

Several client connections (threads, one Client each) send commands back to back for a fixed
time; the rate is invocations / (last completion - first send), completion times taken from the
broker's own ``completed_at``. Two shapes: commands to 1 instance each, and commands to 100
instances each (by tag). The broker is profiled with py-spy during the run. The broker's CPU time
is read from /proc, so ``inv per broker-CPU-second`` is its capacity independent of what else
runs on the machine (the simulator and the clients share the same 2 cores). That CPU includes
the benchmark reading every command's result back afterwards (one ``wait`` request per command:
as many requests again in 1-instance phases), as it always has; ``same, before the result
reads`` is the broker's CPU for running the commands alone (read after the clients stopped
sending and a pause of ``SETTLE_S``).

``--stores sqlite,postgresql`` runs the same phases once per store backend (PostgreSQL: a throwaway
durable server on 127.0.0.1, fsync on) and adds the server's CPU (every process of its cluster)
and, with ``--metrics``, the broker's group-commit time per invocation (its
``zerorun_store_write_seconds`` histogram).

Target (issue 8): >= 10,000 invocations/s with CURVE and durable state.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, cluster_cpu_seconds, cpu_seconds, report, start_postgres  # noqa: E402
from bench.profiling import Profiler  # noqa: E402

TARGET = 10_000
SETTLE_S = 1.0  # after the last send: what is in flight finishes before the CPU is read


def store_write_seconds(bench: Bench) -> float:
    """The broker's total group-commit time so far (nan without --metrics)."""
    address = bench.fleet.runtime().get("metrics")
    if not address:
        return float("nan")
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    found = re.search(r"^zerorun_store_write_seconds_sum (\S+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def phase(bench: Bench, shape: str, agents: int, clients: int, seconds: float, profile: bool,
          server_cpu=lambda: float("nan")) -> dict:
    groups = agents // 100
    sent: list[list[str]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Event()
    deadline = [0.0]

    def worker(k: int) -> None:
        client = bench.client(timeout=60)
        i = k
        start.wait()
        try:
            while time.monotonic() < deadline[0]:
                if shape == "1":
                    view = client.send("RunShellScript", {"commands": ["true"]},
                                       instance_ids=[f"tp-{i % agents:05d}"])
                else:
                    view = client.send("RunShellScript", {"commands": ["true"]},
                                       targets=[f"tag:group=g{i % groups:03d}"], max_concurrency="100%",
                                       max_errors="100%")
                sent[k].append(view.command_id)
                i += clients
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    out = bench.root / f"broker-profile-{shape}.txt"
    b0, s0, w0 = cpu_seconds(bench.broker_pid), server_cpu(), store_write_seconds(bench)
    with Profiler(bench.broker_pid, out) if profile else _Null() as prof:
        t0 = time.time()
        deadline[0] = time.monotonic() + seconds
        start.set()
        for t in threads:
            t.join()
        # The broker's CPU for running the commands alone, before this benchmark reads their
        # results back: one wait per command below is a request of its own (a store read and a
        # reply) and cost about a third of the broker's CPU in 1-instance phases. What was still
        # in flight (a few commands) finishes within the pause; an idle broker uses next to none.
        time.sleep(SETTLE_S)
        execution_cpu = cpu_seconds(bench.broker_pid) - b0
        # wait for completion of everything sent
        client = bench.client(timeout=120)
        ids = [c for s in sent for c in s]
        last, invocations, incomplete = 0.0, 0, 0
        for cid in ids:
            view = client.wait(cid, timeout=120, include_output=False)
            if view.status not in ("Success",):
                incomplete += 1
            invocations += sum(view.counts.values())
            last = max(last, view.completed_at)
        client.close()
    broker_cpu = cpu_seconds(bench.broker_pid) - b0
    store_cpu = server_cpu() - s0
    store_write = store_write_seconds(bench) - w0
    elapsed = last - t0
    res = {"shape": f"{shape} instance(s)/command", "clients": clients, "commands": len(ids),
           "invocations": invocations, "elapsed_s": round(elapsed, 3),
           "invocations_per_s": invocations / elapsed if elapsed > 0 else 0.0,
           "commands_per_s": len(ids) / elapsed if elapsed > 0 else 0.0,
           "broker_cpu_s": round(broker_cpu, 2),
           "invocations_per_broker_cpu_s": invocations / broker_cpu if broker_cpu > 0 else 0.0,
           "broker_cpu_s_without_result_reads": round(execution_cpu, 2),
           "invocations_per_broker_cpu_s_without_result_reads":
               invocations / execution_cpu if execution_cpu > 0 else 0.0,
           "broker_cpu_ms_per_command": 1000 * broker_cpu / max(1, len(ids)),
           "store_server_cpu_s": round(store_cpu, 2),
           "invocations_per_broker_and_store_cpu_s": invocations / (broker_cpu + store_cpu)
           if store_cpu == store_cpu and broker_cpu + store_cpu > 0 else float("nan"),
           "store_write_us_per_invocation": 1e6 * store_write / max(1, invocations),
           "not_success": incomplete, "errors": errors[:5]}
    if profile:
        res["profile"] = prof.summary()
    return res


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run(agents: int, clients: int, seconds: float, profile: bool, max_seconds: float,
        stores: tuple[str, ...] = ("sqlite",), metrics: bool = False) -> dict:
    results = []
    for store in stores:
        with Bench("throughput", max_seconds=max_seconds) as bench:
            flags, server_cpu = ([], lambda: float("nan"))
            if store == "postgresql":
                server, flags = start_postgres(bench)
                server_cpu = lambda: cluster_cpu_seconds(server.pid)  # noqa: E731
            if metrics:
                flags += ["--metrics-bind", "127.0.0.1:0"]
            bench.start_broker(*flags)
            groups = [f"g{i:03d}" for i in range(max(1, agents // 100))]
            bench.start_sim(agents, prefix="tp", tags={"role": "tp"}, spread={"group": groups})
            for shape in ("1", "100"):
                r = phase(bench, shape, agents, clients, seconds, profile, server_cpu)
                r["store"] = store
                results.append(r)
                print(f"  {store}, {r['shape']}: {r['invocations_per_s']:.0f} inv/s", file=sys.stderr, flush=True)
    rows = [[r["store"], r["shape"], r["clients"], r["commands"], r["invocations"], r["invocations_per_s"],
             r["commands_per_s"], r["broker_cpu_s"], r["invocations_per_broker_cpu_s"],
             r["invocations_per_broker_cpu_s_without_result_reads"], r["store_server_cpu_s"],
             r["invocations_per_broker_and_store_cpu_s"], r["store_write_us_per_invocation"], TARGET,
             "yes" if r["invocations_per_s"] >= TARGET else "NO"] for r in results]
    figures = {"throughput": results, "target_invocations_per_s": TARGET}
    report("throughput", rows, ["store", "shape", "clients", "commands", "invocations", "inv/s", "cmd/s",
                                "broker CPU s", "inv/broker-CPU-s", "same, before the result reads",
                                "store server CPU s",
                                "inv/(broker+server)-CPU-s", "commit us/inv", "target", "met"], figures,
           {"agents": agents, "clients": clients, "seconds": seconds, "curve": True, "stores": list(stores),
            "metrics": metrics, "persistence": {"sqlite": "WAL, synchronous=NORMAL",
                                                "postgresql": "127.0.0.1, fsync on"}})
    for r in results:
        prof = r.get("profile")
        if prof and "top_self" in prof:
            print(f"\nbroker profile, {r['shape']} ({prof['busy_seconds']} s holding the GIL):")
            for f, pct in prof["top_self"][:10]:
                print(f"  {pct:5.1f}% self  {f}")
            for f, pct in prof["top_inclusive"][:12]:
                print(f"  {pct:5.1f}% incl  {f}")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--stores", default="sqlite", help="comma-separated: sqlite, postgresql")
    p.add_argument("--metrics", action="store_true",
                   help="broker metrics on, to read its group-commit time per invocation")
    a = p.parse_args(argv)
    stores = tuple(s.strip() for s in a.stores.split(",") if s.strip())
    if not set(stores) <= {"sqlite", "postgresql"}:
        p.error("--stores: sqlite and/or postgresql")
    run(a.agents, a.clients, a.seconds, not a.no_profile, a.max_seconds, stores, a.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
