"""Soak: a broker that stays flat for weeks (issue 25).

- **Memory**: clients send 100-instance commands back to back to noop agents until
  ``--invocations`` (default 1,000,000) have been sent; the broker's RSS is read at every tenth of
  the way and once everything has finished. Flat means no growth per finished command: the figure
  is the growth from the 20 % mark (warmed up) to the end, per 100,000 invocations.
- **History**: ``--history`` (default 100,000) 1-instance commands, spread over the agents, one in
  a hundred of another document; then ``commands`` with filters (none, status, document, a target
  one command in a hundred has, a target none has) through the client library (the broker's
  answer) and through the whole ``zerorun commands`` process: p50 and p99.
- **Pruning**: the broker restarted with a retention that makes the whole history old; a client
  pings it every 20 ms while the broker prunes, and keeps sending 1-instance commands at
  ``--prune-send-rate``: ping latency p50/p99/max (the loop's stall), how long the history takes
  to go, and whether pruning outpaces what is being added.

Phases: ``--only memory,history,prune`` (prune needs history: it runs it first when asked alone).
``--store postgresql`` runs them on a throwaway durable PostgreSQL server instead of SQLite.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli_round_trip import zerorun_cli  # noqa: E402
from bench.common import Bench, cpu_seconds, ms, report, rss_mb, start_postgres, summary  # noqa: E402

AGENTS = 100


def send_until(bench: Bench, clients: int, commands: int, make, progress=None) -> list[str]:
    """Sends ``commands`` commands from ``clients`` threads (``make(client, i)`` sends number i);
    ``progress(sent_so_far)`` is called by the first thread at most every 1 % of the way."""
    sent: list[list[str]] = [[] for _ in range(clients)]
    errors: list[str] = []
    counter = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        client = bench.client(timeout=120)
        try:
            while True:
                with lock:
                    i = counter[0]
                    if i >= commands:
                        return
                    counter[0] += 1
                sent[k].append(make(client, i).command_id)
                if progress is not None and k == 0:
                    progress(counter[0])
        except Exception as exc:  # a bench reports, it does not hide
            errors.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"sending failed: {errors[:3]}")
    return [c for s in sent for c in s]


def wait_all(bench: Bench, ids: list[str]) -> int:
    """Waits for every command; returns how many did not end in Success."""
    client = bench.client(timeout=300)
    try:
        return sum(client.wait(cid, timeout=300, include_output=False).status != "Success" for cid in ids)
    finally:
        client.close()


def memory_phase(bench: Bench, invocations: int, clients: int) -> dict:
    commands = invocations // AGENTS
    marks: list[tuple[int, float]] = [(0, rss_mb(bench.broker_pid))]
    step = max(1, commands // 10)

    def progress(done: int) -> None:
        if done >= (len(marks)) * step and len(marks) <= 10:
            marks.append((done * AGENTS, rss_mb(bench.broker_pid)))

    cpu0, t0 = cpu_seconds(bench.broker_pid), time.monotonic()
    ids = send_until(bench, clients, commands, lambda c, i: c.send(
        "RunShellScript", {"commands": ["true"]}, targets=["tag:role=soak"], max_concurrency="100%",
        max_errors="100%"), progress)
    failed = wait_all(bench, ids)
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(bench.broker_pid) - cpu0
    time.sleep(5.0)  # a quiet moment: what the broker keeps once nothing is in flight
    final = rss_mb(bench.broker_pid)
    warm = next((rss for n, rss in marks if n >= invocations * 0.2), marks[-1][1])
    return {"invocations": commands * AGENTS, "commands": commands, "elapsed_s": round(elapsed, 1),
            "invocations_per_broker_cpu_s": round(commands * AGENTS / cpu) if cpu else 0,
            "rss_mb_marks": [(n, round(r, 1)) for n, r in marks], "rss_mb_final": round(final, 1),
            "growth_mb_per_100k_after_warmup": round((final - warm) / (invocations * 0.8 / 100_000), 2),
            "not_success": failed}


def history_phase(bench: Bench, history: int, clients: int) -> dict:
    t0 = time.monotonic()
    ids = send_until(bench, clients, history, lambda c, i: c.send(
        "GetInstanceInfo" if i % 100 == 99 else "RunShellScript",
        {} if i % 100 == 99 else {"commands": ["true"]}, instance_ids=[f"soak-{i % AGENTS:05d}"]))
    failed = wait_all(bench, ids[-10 * clients:])  # in order, near enough: the last ones end last
    seeded = time.monotonic() - t0
    queries = {
        "none (newest 50)": {},
        "status=Success": {"status": "Success"},
        "document=GetInstanceInfo (1 %)": {"document": "GetInstanceInfo"},
        "target=instance:soak-00042 (1 %)": {"target": "instance:soak-00042"},
        "target=instance:nosuch (none)": {"target": "instance:nosuch"},
    }
    client = bench.client(timeout=60)
    rows = {}
    try:
        for name, q in queries.items():
            times, found = [], 0
            for _ in range(20):
                t = time.perf_counter()
                found = len(client.commands(limit=50, **q))
                times.append(time.perf_counter() - t)
            rows[name] = {"found": found, "client_ms": {k: ms(v) for k, v in summary(times).items() if k != "n"}}
    finally:
        client.close()
    cli = [*zerorun_cli(), "-c", str(bench.fleet.client_config), "commands", "--target", "instance:soak-00042"]
    times = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run(cli, capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - t)
    return {"history": history, "seed_s": round(seeded, 1), "not_success_of_the_last": failed, "queries": rows,
            "cli_commands_target_ms": {k: ms(v) for k, v in summary(times).items() if k != "n"}}


def count_commands(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT count(*) FROM commands").fetchone()[0]


def prune_phase(bench: Bench, send_rate: float, seconds: float, postgres: Any = None,
                store_flags: Sequence[str] = ()) -> dict:
    db = bench.fleet.broker_dir / "broker.db"

    def count() -> int:
        if postgres is None:
            return count_commands(db)
        with postgres.admin(postgres.database) as conn:
            return conn.execute("SELECT count(*) FROM commands").fetchone()[0]

    before = count()
    bench.fleet.stop_broker()
    # every command in the history is older than a retention of 1 s
    bench.start_broker(*store_flags, "--retention-days", str(1 / 86400))
    bench.wait_online(AGENTS, "soak", timeout=120)
    stop = threading.Event()
    pings: list[float] = []
    sent = [0]

    def pinger() -> None:
        client = bench.client(timeout=60)
        try:
            while not stop.is_set():
                t = time.perf_counter()
                client.ping()
                pings.append(time.perf_counter() - t)
                stop.wait(0.02)
        finally:
            client.close()

    def sender() -> None:
        client = bench.client(timeout=60)
        try:
            while not stop.is_set():
                client.send("RunShellScript", {"commands": ["true"]}, instance_ids=[f"soak-{sent[0] % AGENTS:05d}"])
                sent[0] += 1
                stop.wait(1.0 / send_rate)
        finally:
            client.close()

    threads = [threading.Thread(target=pinger), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    t0, left, gone_at = time.monotonic(), before, None
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        left = count()
        if left <= sent[0] and gone_at is None:  # the old history is gone
            gone_at = time.monotonic() - t0
            break
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {"history_before": before, "left": left, "sent_meanwhile": sent[0],
            "history_gone_after_s": round(gone_at, 1) if gone_at is not None else None,
            "pruned_per_s": round((before + sent[0] - left) / elapsed, 1),
            "ping_ms": {k: ms(v) for k, v in summary(pings).items() if k != "n"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--invocations", type=int, default=1_000_000)
    p.add_argument("--history", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--prune-send-rate", type=float, default=50.0, help="1-instance commands/s sent while pruning")
    p.add_argument("--prune-seconds", type=float, default=300.0, help="give up waiting for the pruning after this")
    p.add_argument("--only", default="memory,history,prune")
    p.add_argument("--max-seconds", type=float, default=3600)
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                   help="the broker's store (postgresql: a throwaway durable server on 127.0.0.1)")
    a = p.parse_args(argv)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    figures: dict = {}
    rows = []
    with Bench("soak", max_seconds=a.max_seconds) as bench:
        postgres, store_flags = start_postgres(bench) if a.store == "postgresql" else (None, [])
        bench.start_broker(*store_flags)
        bench.start_sim(AGENTS, prefix="soak", tags={"role": "soak"})
        if "memory" in only:
            m = figures["memory"] = memory_phase(bench, a.invocations, a.clients)
            rows.append(["memory", f"{m['invocations']:,} invocations in {m['elapsed_s']} s",
                         f"RSS {m['rss_mb_marks'][0][1]} -> {m['rss_mb_final']} MB; "
                         f"{m['growth_mb_per_100k_after_warmup']} MB per 100k after warm-up"])
            print(f"  memory: {m}", file=sys.stderr, flush=True)
        if only & {"history", "prune"}:
            h = figures["history"] = history_phase(bench, a.history, a.clients)
            for name, q in h["queries"].items():
                rows.append(["history", f"commands {name}: {q['found']} found",
                             f"p50 {q['client_ms']['p50']:.1f} ms, p99 {q['client_ms']['p99']:.1f} ms"])
            c = h["cli_commands_target_ms"]
            rows.append(["history", "zerorun commands --target (whole process)",
                         f"p50 {c['p50']:.0f} ms, p99 {c['p99']:.0f} ms"])
            print(f"  history: {h}", file=sys.stderr, flush=True)
        if "prune" in only:
            r = figures["prune"] = prune_phase(bench, a.prune_send_rate, a.prune_seconds, postgres, store_flags)
            rows.append(["prune", f"{r['history_before']:,} old commands, {r['sent_meanwhile']} sent meanwhile",
                         f"gone after {r['history_gone_after_s']} s ({r['pruned_per_s']}/s); ping p50 "
                         f"{r['ping_ms']['p50']:.1f} ms, p99 {r['ping_ms']['p99']:.1f} ms, "
                         f"max {r['ping_ms']['max']:.0f} ms"])
    report("soak", rows, ["phase", "what", "figure"], figures,
           {"invocations": a.invocations, "history": a.history, "clients": a.clients, "agents": AGENTS,
            "prune_send_rate": a.prune_send_rate, "store": a.store})
    return 0


if __name__ == "__main__":
    sys.exit(main())
