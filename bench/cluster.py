"""Several brokers on one PostgreSQL store (issue 20): what a cluster costs and carries.

- **Fan-out**: one command by tag to N simulated (noop) agents spread evenly over the brokers,
  sent to one broker, from send until the broker answers the wait (every result committed); p50
  over runs, and each broker's RSS with the fleet connected. Default: 1,000 agents on 2 brokers,
  then 10,000 on 3 (``--fanouts 1000x2,10000x3``).
- **Throughput**: clients send 100-instance commands back to back, round-robin over the brokers,
  to agents spread over all of them (so most invocations cross brokers); invocations per
  broker-CPU-second summed over the cluster, beside one broker on SQLite and one on PostgreSQL
  measured in the same run. Goal: the cluster's figure within 30 % of one broker on SQLite.
- **Cross-broker hop**: round trip of ``true`` on one real agent, sent to the broker holding its
  session and to another broker; the difference is what a hop through the store adds.

This machine has 2 cores: the figures are costs (CPU per invocation), not speed-ups.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, Simulator, cluster_cpu_seconds, cpu_seconds, ms, report, rss_mb, summary  # noqa: E402
from zerorun.client import Client, ClientConfig  # noqa: E402
from zerorun.testing import LocalFleet  # noqa: E402


class ClusterBench:
    """N brokers (LocalFleets sharing the first one's keys) on one durable PostgreSQL server."""

    def __init__(self, bench: Bench, brokers: int, server, dsn: str):
        self.bench = bench
        self.fleets = [bench.fleet] + [LocalFleet(bench.root / f"broker-{i}", auto_accept=True,
                                                  heartbeat_interval=5.0, log_level="warning")
                                       for i in range(1, brokers)]
        self.args = ["--store", dsn, "--store-password-file", str(server.password_file)]
        for i, fleet in enumerate(self.fleets):
            if i:
                fleet.broker_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.fleets[0].broker_dir / "keys", fleet.broker_dir / "keys")
                bench.cleanups.append(fleet.close)
            fleet.start_broker(*self.args)
        self.sims: list[Simulator] = []

    @property
    def pids(self) -> list[int]:
        return [f.broker.pid for f in self.fleets]

    def endpoints(self, first: int) -> list[str]:
        eps = [f.runtime()["agent_endpoint"] for f in self.fleets]
        return eps[first:] + eps[:first]

    def start_sims(self, n: int, prefix: str, executor: str = "noop",
                   spread: dict[str, list[str]] | None = None) -> None:
        per = n // len(self.fleets)
        for i in range(len(self.fleets)):
            more = [a for e in self.endpoints(i)[1:] for a in ("--broker", e)]
            sim = self.bench.start_sim(per, prefix=f"{prefix}{i}", tags={"role": prefix}, executor=executor,
                                       extra=more, wait=None, broker=self.endpoints(i)[0], spread=spread)
            self.sims.append(sim)
        for sim in self.sims[-len(self.fleets):]:
            sim.wait_welcomed(300)

    def client(self, i: int, timeout: float = 120) -> Client:
        return Client(ClientConfig.load(self.fleets[i].client_config), timeout=timeout)

    def wait_online(self, n: int, prefix: str, timeout: float = 300) -> None:
        client = self.client(0)
        deadline = time.monotonic() + timeout
        while sum(1 for v in client.instances(include_offline=False)
                  if v.instance_id.startswith(prefix) and v.ping_status == "Online") < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all {n} {prefix} agents Online")
            time.sleep(0.5)
        client.close()


def fanout(n: int, brokers: int, runs: int) -> dict:
    from bench.common import start_postgres

    with Bench(f"cluster-fanout-{n}x{brokers}", max_seconds=900) as bench:
        server, _ = start_postgres(bench)
        dsn = server.create_database("bench")
        cluster = ClusterBench(bench, brokers, server, dsn)
        cluster.start_sims(n, "f")
        cluster.wait_online(n - n % brokers, "f")
        client = cluster.client(0)
        times = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            view = client.send("RunShellScript", {"commands": ["true"]}, ["tag:role=f"], max_concurrency="100%",
                               wait=300)
            times.append(time.perf_counter() - t0)
            assert view.status == "Success", view.counts
        client.close()
        rss = [rss_mb(pid) for pid in cluster.pids]
    s = summary(times[1:])
    return {"agents": n, "brokers": brokers, "seconds": s, "broker_rss_mb": rss}


SHAPES = ("sqlite x1", "postgresql x1", "postgresql x3")


def throughput(seconds: float, agents: int, clients: int, shapes: tuple[str, ...] = SHAPES,
               per_command: int = 100, rounds: int = 1) -> dict:
    """The cluster's invocations per broker-CPU-second, beside one broker on each store: 100-instance
    commands (one group of agents each, every group spread over every broker) at 100 %
    concurrency, as ``throughput.py`` sends them, so that rate control's waves do not stand
    between a command and its agents. ``per_command`` 1: commands to one instance each, the
    instances in turn (a command per invocation: what a broker pays per command).

    ``rounds`` > 1 measures every shape that many times, in the given order and then reversed in
    turn (ABBA), so that a machine whose speed drifts over minutes weighs on every shape alike;
    each shape's figure is then its median round, and the cluster's share of one SQLite broker is
    taken round by round (the two measured next to each other) and its median reported."""
    runs: dict[str, list[dict]] = {}
    for r in range(max(1, rounds)):
        order = [s for s in SHAPES if s in shapes]
        for label in (order if r % 2 == 0 else order[::-1]):
            runs.setdefault(label, []).append(_throughput_phase(label, seconds, agents, clients, per_command))
    out: dict = {}
    for label, phases in runs.items():
        ranked = sorted(phases, key=lambda f: f["inv_per_broker_cpu_s"])
        out[label] = dict(ranked[(len(ranked) - 1) // 2], rounds=[f["inv_per_broker_cpu_s"] for f in phases])
    if rounds > 1 and "sqlite x1" in runs and "postgresql x3" in runs:
        shares = [c["inv_per_broker_cpu_s"] / s["inv_per_broker_cpu_s"]
                  for s, c in zip(runs["sqlite x1"], runs["postgresql x3"]) if s["inv_per_broker_cpu_s"]]
        out["share"] = {"per_round": shares, "median": statistics.median(shares) if shares else 0.0}
    return out


def _throughput_phase(label: str, seconds: float, agents: int, clients: int, per_command: int) -> dict:
    """One shape (``sqlite x1``, ``postgresql x1`` or ``postgresql x3``) measured once, on a fleet of its own."""
    from bench.common import start_postgres

    brokers, store = {"sqlite x1": (1, "sqlite"), "postgresql x1": (1, "postgresql"),
                      "postgresql x3": (3, "postgresql")}[label]
    groups = [f"g{k:03d}" for k in range(max(1, agents // 100))]
    with Bench(f"cluster-throughput-{label.replace(' ', '')}", max_seconds=600) as bench:
        if store == "sqlite":
            bench.start_broker()
            bench.start_sim(agents, prefix="t0", tags={"role": "t"}, spread={"group": groups})
            pids, pg_pid, cluster = [bench.broker_pid], 0, None
            clients_of = [lambda: bench.client(60)]
        else:
            server, _ = start_postgres(bench)
            dsn = server.create_database("bench")
            cluster = ClusterBench(bench, brokers, server, dsn)
            cluster.start_sims(agents, "t", spread={"group": groups})
            cluster.wait_online(agents - agents % brokers, "t")
            pids, pg_pid = cluster.pids, server.pid
            clients_of = [lambda i=i: cluster.client(i, 60) for i in range(brokers)]
        sent, errors = [], []
        deadline = [0.0]
        go = threading.Event()
        instances: list[str] = []
        if per_command == 1:
            lister = clients_of[0]()
            instances = sorted(v.instance_id for v in lister.instances() if v.instance_id.startswith("t"))
            lister.close()

        def worker(k: int) -> None:
            client = clients_of[k % len(clients_of)]()
            go.wait()
            i = k
            try:
                while time.monotonic() < deadline[0]:
                    if instances:
                        view = client.send("RunShellScript", {"commands": ["true"]},
                                           instance_ids=[instances[i % len(instances)]], wait=120)
                    else:
                        view = client.send("RunShellScript", {"commands": ["true"]},
                                           [f"tag:group={groups[i % len(groups)]}"], max_concurrency="100%",
                                           max_errors="100%", wait=120)
                    i += clients
                    sent.append(len(view.invocations))
            except Exception as exc:  # noqa: BLE001 - reported in the figures
                errors.append(str(exc))
            finally:
                client.close()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        pg0 = cluster_cpu_seconds(pg_pid) if pg_pid else 0.0
        t0 = time.monotonic()
        deadline[0] = t0 + seconds
        go.set()
        for t in threads:
            t.join(seconds + 180)
        wall = time.monotonic() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        pg = (cluster_cpu_seconds(pg_pid) - pg0) if pg_pid else 0.0
        total = sum(sent)
        return {"invocations": total, "wall_s": wall, "inv_per_s": total / wall,
                "broker_cpu_s": cpu, "inv_per_broker_cpu_s": total / cpu if cpu else 0.0,
                "postgres_cpu_s": pg, "errors": errors[:3]}


def hop(runs: int) -> dict:
    """One real agent on broker 0; ``true`` sent through broker 0 and through broker 1."""
    from bench.common import start_postgres

    with Bench("cluster-hop", max_seconds=600, heartbeat_interval=1.0) as bench:
        server, _ = start_postgres(bench)
        dsn = server.create_database("bench")
        cluster = ClusterBench(bench, 2, server, dsn)
        more = [a for e in cluster.endpoints(0)[1:] for a in ("--broker", e)]
        cluster.fleets[0].start_agent("hop-1", {"role": "hop"}, *more)
        cluster.wait_online(1, "hop-")
        figures = {}
        for label, i in (("same broker", 0), ("other broker", 1)):
            client = cluster.client(i, 30)
            times = []
            for k in range(runs + 10):
                t0 = time.perf_counter()
                client.send("RunShellScript", {"commands": ["true"]}, instance_ids=["hop-1"], wait=30)
                if k >= 10:
                    times.append(time.perf_counter() - t0)
            client.close()
            figures[label] = summary([ms(t) for t in times])
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fanouts", default="1000x2,10000x3", help="NxBROKERS,...")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--agents", type=int, default=600, help="throughput: simulated agents in all")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--hop-runs", type=int, default=100)
    p.add_argument("--only", default="fanout,throughput,hop")
    p.add_argument("--per-command", type=int, choices=(1, 100), default=100,
                   help="throughput: instances per command (1: a command per invocation)")
    p.add_argument("--rounds", type=int, default=1,
                   help="throughput: measure each shape this many times, in turn and reversed (ABBA); report "
                        "medians and the cluster's share of one SQLite broker round by round")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help="throughput: which of " + ", ".join(SHAPES) + " (an A/B of a cluster change needs only the last)")
    a = p.parse_args(argv)
    figures: dict = {}
    rows = []
    if "fanout" in a.only:
        for spec in a.fanouts.split(","):
            n, brokers = (int(x) for x in spec.split("x"))
            f = fanout(n, brokers, a.runs)
            figures[f"fanout {spec}"] = f
            rows.append([f"fan-out {n} noop over {brokers} brokers (s)", f["seconds"]["p50"], f["seconds"]["max"],
                         "RSS MB " + ", ".join(f"{x:.0f}" for x in f["broker_rss_mb"])])
    if "throughput" in a.only:
        t = throughput(a.seconds, a.agents, a.clients, tuple(x.strip() for x in a.shapes.split(",")),
                       a.per_command, a.rounds)
        figures["throughput"] = t
        for label, f in t.items():
            if label == "share":
                rows.append(["postgresql x3 as a share of sqlite x1, round by round (median)", f["median"],
                             " ".join(f"{x:.0%}" for x in f["per_round"]), "goal >= 70 % (issue 20)"])
                continue
            notes = f"postgres CPU {f['postgres_cpu_s']:.1f}s"
            if len(f["rounds"]) > 1:
                notes += " rounds " + " ".join(f"{x:,.0f}" for x in f["rounds"])
            rows.append([f"throughput {label}, {a.per_command}-instance commands (inv/broker-CPU-s)",
                         f["inv_per_broker_cpu_s"], f["inv_per_s"], notes])
    if "hop" in a.only:
        h = hop(a.hop_runs)
        figures["hop"] = h
        for label, s in h.items():
            rows.append([f"round trip, {label} (ms)", s["p50"], s["p99"], ""])
    report("cluster", rows, ["measure", "value (p50)", "max / rate / p99", "notes"], figures, vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
