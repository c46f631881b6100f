"""``commands`` filters over a large history, per store backend, through the store itself (no
broker): what the broker's ``ListCommands`` costs on SQLite and PostgreSQL with N commands
(default 100,000: 1-instance commands spread over 100 instances, one in a hundred of another
document). p50 and max of 20 queries per filter. ``bench/soak.py`` measures the same on SQLite
through a real broker and the whole CLI.

    python -m bench.history --commands 100000 --stores sqlite,postgresql
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report  # noqa: E402
from zmq_broker.model import CommandRecord  # noqa: E402

QUERIES = {"none (newest 50)": {}, "status=Success": {"status": "Success"},
           "document=GetInstanceInfo (1 %)": {"document": "GetInstanceInfo"},
           "target=instance:soak-00042 (1 %)": {"target": "instance:soak-00042"},
           "target=instance:nosuch (none)": {"target": "instance:nosuch"}}


def fill(store, n: int) -> None:
    new = {"new": True} if "new" in inspect.signature(store.put_command).parameters else {}  # older revisions
    start = time.time() - n
    for i in range(n):
        document = "GetInstanceInfo" if i % 100 == 99 else "RunShellScript"
        store.put_command(CommandRecord(uuid.uuid4().hex, "Success", "Success", document, "1", "0" * 64,
                                        {"commands": ["true"]}, [f"instance:soak-{i % 100:05d}"], "admin",
                                        start + i, start + i + 60, 60, 1, 0, []), **new)
        if i % 5000 == 4999:
            store.flush()
    store.flush()


def measure(store) -> dict:
    out = {}
    for name, query in QUERIES.items():
        times, found = [], 0
        for _ in range(20):
            t = time.perf_counter()
            found = len(store.list_commands(limit=50, **query))
            times.append(time.perf_counter() - t)
        out[name] = {"found": found, "p50_ms": round(statistics.median(times) * 1000, 2),
                     "max_ms": round(max(times) * 1000, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", type=int, default=100_000)
    p.add_argument("--stores", default="sqlite,postgresql")
    a = p.parse_args(argv)
    figures: dict = {}
    for backend in [s.strip() for s in a.stores.split(",") if s.strip()]:
        if backend == "sqlite":
            from zmq_broker.store.sqlite import SqliteStore

            root = Path(tempfile.mkdtemp(prefix="zerorun-bench-history-"))
            try:
                store = SqliteStore(root / "broker.db")
                fill(store, a.commands)
                figures[backend] = measure(store)
                store.close()
            finally:
                shutil.rmtree(root, ignore_errors=True)
        else:
            from zerorun.testing.postgres import PostgresServer
            from zmq_broker.store.postgresql import PostgresStore

            with PostgresServer(durable=True) as server:
                store = PostgresStore(server.dsn(), server.password)
                fill(store, a.commands)
                with server.admin("zerorun") as conn:
                    conn.execute("ANALYZE")  # as autovacuum would have by then
                figures[backend] = measure(store)
                store.close()
    rows = [[backend, name, q["found"], q["p50_ms"], q["max_ms"]]
            for backend, queries in figures.items() for name, q in queries.items()]
    report("history", rows, ["store", "filter", "found", "p50 ms", "max ms"], figures, {"commands": a.commands})
    return 0


if __name__ == "__main__":
    sys.exit(main())
