"""Store: what one group commit costs on each backend, per invocation, at the batch sizes the
broker's loop produces (1 invocation per iteration when lightly loaded, hundreds under fan-out).

Each batch is what a loop iteration queues while results arrive: ``n`` finished invocations (a
step result with a line of output) and their command's record, then one ``flush()``. Measured:
flush wall time, the broker process's CPU (this process: encoding, the driver, SQLite itself) and,
for PostgreSQL, the server's CPU (every process of the throwaway cluster), each per invocation.
Also for PostgreSQL: how long a NOTIFY sent with a one-row flush takes to wake a listener on another
connection polling its descriptor (flush start to ``drain()`` returning it): the floor of a
cross-broker wake-up.

SQLite runs as the broker runs it (WAL, synchronous=NORMAL: durable across a process crash, no
fsync per commit); PostgreSQL with its defaults (fsync on, synchronous_commit on: every commit
waits for its WAL flush), on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cluster_cpu_seconds, report, summary  # noqa: E402
from zerorun import protocol  # noqa: E402
from zmq_broker.model import CommandRecord  # noqa: E402

BATCHES = (1, 10, 100, 1000)


def _records(n: int) -> tuple[CommandRecord, list[protocol.InvocationView]]:
    now = time.time()
    command_id = uuid.uuid4().hex
    rec = CommandRecord(command_id=command_id, status=protocol.IN_PROGRESS, status_details="",
                        document_name="RunShellScript", document_version="1", document_sha256="0" * 64,
                        parameters={"commands": ["true"]}, targets=["tag:group=g001"], requested_by="admin",
                        requested_at=now, expires_at=now + 3600, timeout_seconds=3600, max_concurrency=100,
                        max_errors=100, steps=[], invocation_ids=[uuid.uuid4().hex for _ in range(n)])
    step = protocol.StepResult(name="runShellScript", status=protocol.SUCCESS, exit_code=0, stdout="ok\n",
                               stdout_size=3)
    invocations = [protocol.InvocationView(
        invocation_id=iid, command_id=command_id, instance_id=f"tp-{k:05d}", status=protocol.SUCCESS,
        exit_code=0, stdout="ok\n", stdout_size=3, requested_at=now, delivered_at=now, started_at=now,
        ended_at=now, steps=[step]) for k, iid in enumerate(rec.invocation_ids)]
    return rec, invocations


def measure(store, n: int, seconds: float, server_cpu) -> dict:
    flushes, flush_wall = 0, 0.0
    batches = [_records(n) for _ in range(max(3, min(200, int(20_000 / n))))]
    cpu0, srv0, t0 = time.process_time(), server_cpu(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rec, invocations = batches[flushes % len(batches)]
        store.put_command(rec)
        for inv in invocations:
            store.put_invocation(inv)
        started = time.perf_counter()
        store.flush()
        flush_wall += time.perf_counter() - started
        flushes += 1
    cpu, srv = time.process_time() - cpu0, server_cpu() - srv0
    invocations = flushes * n
    return {"batch": n, "flushes": flushes, "flush_ms": 1000 * flush_wall / flushes,
            "flush_us_per_invocation": 1e6 * flush_wall / invocations,
            "broker_cpu_us_per_invocation": 1e6 * cpu / invocations,
            "server_cpu_us_per_invocation": 1e6 * srv / invocations if srv == srv else float("nan")}


def notify_latency(store, listener_store, rounds: int = 300) -> dict:
    """Flush (one command row and a NOTIFY) to the listener's drain() returning it, in ms."""
    import select

    listener = listener_store.coordination()
    listener.listen("zerorun_bench")
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    latencies = []
    for k in range(rounds):
        rec, _ = _records(1)
        store.put_command(rec)
        store.notify("zerorun_bench", str(k))
        started = time.perf_counter()
        store.flush()
        got: list = []
        while not got:
            poller.poll(5000)
            got = listener.drain()
        latencies.append(1000 * (time.perf_counter() - started))
    return summary(latencies)


def compare_statements(seconds: float) -> dict:
    from zerorun.testing.postgres import PostgresServer
    from zmq_broker.store import postgresql as pg
    from zmq_broker.store.postgresql import PostgresStore

    def rows(n: int) -> tuple[list[tuple], list[tuple]]:
        rec, invocations = _records(n)
        return ([(rec.command_id, rec.status, rec.document_name, rec.requested_at, pg._enc.encode(rec))],
                [(i.invocation_id, i.command_id, i.instance_id, i.status, pg._enc.encode(i)) for i in invocations])

    def plain(table: str) -> str:
        key, columns = pg._TABLES[table]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c, _ in columns if c != key)
        return (f"INSERT INTO {table} VALUES ({', '.join(['%s'] * len(columns))}) "
                f"ON CONFLICT ({key}) DO UPDATE SET {updates}")

    def executemany(conn, commands, invocations, pipeline=False):
        with (conn.pipeline() if pipeline else _nothing()), conn.transaction():
            cur = conn.cursor()
            cur.executemany(plain("commands"), commands)
            cur.executemany(plain("invocations"), invocations)

    def unnest(conn, commands, invocations):
        with conn.transaction():
            conn.execute(pg._UPSERTS["commands"], [list(c) for c in zip(*commands)])
            conn.execute(pg._UPSERTS["invocations"], [list(c) for c in zip(*invocations)])

    def one_statement(conn, commands, invocations):
        head = f"WITH c AS ({pg._UPSERTS['commands']}), i AS ({pg._UPSERTS['invocations']}) SELECT 1"
        conn.execute(head, [list(c) for c in zip(*commands)] + [list(c) for c in zip(*invocations)])

    ways = {"executemany, transaction": executemany,
            "executemany, pipeline mode": lambda *a: executemany(*a, pipeline=True),
            "unnest per table, transaction": unnest, "one writable-CTE statement (the store's)": one_statement}
    results = []
    with PostgresServer(durable=True) as server:
        PostgresStore(server.dsn(), server.password).close()  # the real schema
        import psycopg

        with psycopg.connect(server.dsn(), password=server.password, autocommit=True) as conn:
            for n in (1, 100, 1000):
                batches = [rows(n) for _ in range(20)]
                for name, way in ways.items():
                    way(conn, *batches[0])
                    flushes, cpu0, srv0, t0 = 0, time.process_time(), cluster_cpu_seconds(server.pid), time.perf_counter()
                    while time.perf_counter() - t0 < seconds:
                        way(conn, *batches[flushes % len(batches)])
                        flushes += 1
                    wall = time.perf_counter() - t0
                    results.append({"invocations": n, "way": name, "flush_ms": 1000 * wall / flushes,
                                    "client_cpu_us_per_flush": 1e6 * (time.process_time() - cpu0) / flushes,
                                    "server_cpu_us_per_flush": 1e6 * (cluster_cpu_seconds(server.pid) - srv0) / flushes})
    report("store-statements", [[r["invocations"], r["way"], r["flush_ms"], r["client_cpu_us_per_flush"],
                                 r["server_cpu_us_per_flush"]] for r in results],
           ["invocations + 1 command", "statement", "flush ms", "client CPU us/flush", "server CPU us/flush"],
           {"statements": results}, {"seconds": seconds})
    return {"statements": results}


def compare_reads(seconds: float) -> dict:
    """A read as the store makes one (a cluster owner's read of the rows relayed to it, once per
    loop iteration that hears of some): psycopg's binary cursor against ``pg_prepared``'s
    ``query`` (libpq's prepared call, rows loaded by psycopg's loaders), client CPU per read."""
    import os

    import psycopg

    from zerorun.testing.postgres import PostgresServer
    from zmq_broker.store import pg_arrays
    from zmq_broker.store.pg_prepared import Prepared
    from zmq_broker.store.postgresql import PostgresStore

    sql = ("SELECT seq, command_id, kind, instance_id, body FROM relay WHERE command_id = ANY(%b::text[]) "
           "ORDER BY seq")
    params = (["c1", "c2"],)
    results = []
    with PostgresServer(durable=True) as server:
        PostgresStore(server.dsn(), server.password).close()  # the real schema
        pg_arrays.register()
        with psycopg.connect(server.dsn(), password=server.password, autocommit=True) as conn:
            cursor, prepared = conn.cursor(binary=True), Prepared(conn)
            ways = {"psycopg binary cursor": lambda: cursor.execute(sql, params).fetchall(),
                    "prepared (the store's)": lambda: prepared.query(sql, params)}
            for n in (0, 30):
                conn.execute("DELETE FROM relay")
                for i in range(n):
                    conn.execute("INSERT INTO relay (command_id, kind, instance_id, body) VALUES ('c1', 'result', %s, %s)",
                                 (f"i-{i:04d}", os.urandom(60)))
                for _ in range(3):  # alternated: the machine's drift weighs on both alike
                    for name, way in ways.items():
                        way()
                        reads, cpu0, t0 = 0, time.process_time(), time.perf_counter()
                        while time.perf_counter() - t0 < seconds / 3:
                            way()
                            reads += 1
                        results.append({"rows": n, "way": name, "reads": reads,
                                        "client_cpu_us_per_read": 1e6 * (time.process_time() - cpu0) / reads})
    report("store-reads", [[r["rows"], r["way"], r["reads"], r["client_cpu_us_per_read"]] for r in results],
           ["rows read", "way", "reads", "client CPU us/read"], {"reads": results}, {"seconds": seconds})
    return {"reads": results}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run(stores: list[str], seconds: float) -> dict:
    results = []
    for name in stores:
        with tempfile.TemporaryDirectory(prefix="zerorun-bench-store-") as tmp:
            if name == "sqlite":
                from zmq_broker.store.sqlite import SqliteStore

                store, server, server_cpu = SqliteStore(Path(tmp) / "broker.db"), None, lambda: float("nan")
            else:
                from zerorun.testing.postgres import PostgresServer
                from zmq_broker.store.postgresql import PostgresStore

                server = PostgresServer(durable=True).start()
                store = PostgresStore(server.dsn(), server.password)
                server_cpu = lambda: cluster_cpu_seconds(server.pid)  # noqa: E731
            try:
                for n in BATCHES:
                    r = measure(store, n, seconds, server_cpu)
                    r["store"] = name
                    results.append(r)
                    print(f"  {name} batch {n}: {r['flush_us_per_invocation']:.1f} us/invocation", file=sys.stderr)
                if server is not None:
                    other = PostgresStore(server.dsn(), server.password)
                    try:
                        latency = notify_latency(store, other)
                    finally:
                        other.close()
            finally:
                store.close()
                if server is not None:
                    server.close()
    rows = [[r["store"], r["batch"], r["flushes"], r["flush_ms"], r["flush_us_per_invocation"],
             r["broker_cpu_us_per_invocation"], r["server_cpu_us_per_invocation"]] for r in results]
    figures = {"store": results}
    if "postgresql" in stores:
        figures["notify_latency_ms"] = latency
    report("store", rows, ["store", "invocations/flush", "flushes", "flush ms", "flush us/inv",
                           "broker CPU us/inv", "server CPU us/inv"], figures,
           {"seconds_per_size": seconds, "sqlite": "WAL, synchronous=NORMAL",
            "postgresql": "127.0.0.1, fsync on, synchronous_commit on"})
    if "postgresql" in stores:
        print(f"NOTIFY with a one-row flush, flush start to the listener's drain(): p50 {latency['p50']:.2f} ms, "
              f"p99 {latency['p99']:.2f} ms ({latency['n']} rounds)")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stores", default="sqlite,postgresql")
    p.add_argument("--seconds", type=float, default=3.0, help="per store and batch size")
    p.add_argument("--compare-statements", action="store_true",
                   help="compare the ways of sending a batch to PostgreSQL instead")
    p.add_argument("--compare-reads", action="store_true",
                   help="compare psycopg's cursor with the store's prepared reads instead")
    a = p.parse_args(argv)
    if a.compare_reads:
        compare_reads(a.seconds)
        return 0
    if a.compare_statements:
        compare_statements(a.seconds)
        return 0
    run([s.strip() for s in a.stores.split(",") if s.strip()], a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
