"""Hostile load: what a legitimate client sees while an attacker works the broker.

Three attacks, each for a few seconds, with 100 simulated agents connected: back-to-back hostile
renderings (Jinja loops past the render deadline, and huge string products), a map bomb (a
many-megabyte msgpack request from a key with no role), and a request flood (pings as fast as one
connection sends them). Meanwhile a separate client pings once every 20 ms. Reported: that
client's ping p50/p99 (target: p99 under 50 ms during hostile renders), the broker's RSS before
and at its peak (target: growth under about twice the largest frame), and whether any agent went
ConnectionLost.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
import zmq  # noqa: E402

from bench.common import Bench, ms, report, rss_mb, summary  # noqa: E402
from zerorun import keys, protocol  # noqa: E402
from zerorun.client import Client, ClientConfig, RequestFailed, ZerorunError  # noqa: E402

TARGET_PING_P99_MS = 50.0
LOOPS = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}"


def _doc(line: str) -> str:
    return ("schemaVersion: '2.2'\ndescription: hostile\ntemplating: jinja\nmainSteps:\n"
            f"  - action: aws:runShellScript\n    name: run\n    inputs:\n      runCommand: ['{line}']\n")


class Pinger(threading.Thread):
    def __init__(self, bench: Bench):
        super().__init__(daemon=True)
        self.client = bench.client(timeout=10)
        self.times: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            self.client.ping()
            self.times.append(time.perf_counter() - t0)
            time.sleep(0.02)


class RssWatch(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.05)


def _raw_client(bench: Bench, name: str) -> tuple[zmq.Context, zmq.Socket]:
    directory = bench.root / "attackers"
    keys.create_keypair(directory, name)
    public, secret = keys.load_secret(directory / f"{name}.key_secret")
    bench.fleet.client().add_key("client", name, public.decode())  # a key without a role
    runtime = bench.fleet.runtime()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = runtime["broker_public_key"].encode()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.connect(runtime["client_endpoint"])
    return ctx, sock


def attack_renders(bench: Bench, seconds: float) -> dict:
    client = Client(ClientConfig.load(bench.fleet.client_config), timeout=30)
    refused: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in (LOOPS, "{{ \"A\" * 30000000 }}"):
            try:
                client.send(document_content=_doc(line), targets=["tag:role=web"], dry_run=True)
            except RequestFailed as exc:
                refused[exc.code] = refused.get(exc.code, 0) + 1
    client.close()
    return refused


def attack_map_bomb(bench: Bench, seconds: float) -> dict:
    ctx, sock = _raw_client(bench, "bomber")
    bomb = {f"k{i}": i for i in range(1_500_000)}
    bomb.update(type="instances", rid=1)
    body = msgspec.msgpack.encode(bomb)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.send_multipart([protocol.HEADER, body])
        sent += 1
        sock.poll(20000)
        sock.recv_multipart()
    sock.close(0)
    ctx.term()
    return {"frames": sent, "frame_mb": round(len(body) / 1e6, 1)}


def attack_flood(bench: Bench, seconds: float) -> dict:
    ctx, sock = _raw_client(bench, "flooder")
    body = msgspec.msgpack.encode({"type": "ping", "rid": 1})
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(500):
            sock.send_multipart([protocol.HEADER, body])
        sent += 500
        while sock.poll(0):
            sock.recv_multipart()
    sock.close(0)
    ctx.term()
    return {"requests": sent}


def run(seconds: float = 8.0, agents: int = 100, max_seconds: float = 300) -> dict:
    figures: dict = {}
    rows = []
    with Bench("hostile", max_seconds=max_seconds) as bench:
        bench.start_broker()
        bench.start_sim(agents, tags={"role": "web"})
        for name, attack in (("hostile renders", attack_renders), ("map bomb", attack_map_bomb),
                             ("request flood", attack_flood)):
            rss_before = rss_mb(bench.broker_pid)
            pinger, watch = Pinger(bench), RssWatch(bench.broker_pid)
            pinger.start()
            watch.start()
            try:
                detail = attack(bench, seconds)
            except ZerorunError as exc:
                detail = {"error": str(exc)}
            pinger.stop.set()
            watch.stop.set()
            pinger.join(15)
            watch.join(5)
            pinger.client.close()
            lost = [v.instance_id for v in bench.fleet.client().instances() if v.ping_status != "Online"]
            s = summary([ms(t) for t in pinger.times])
            figures[name] = {"ping_ms": s, "rss_before_mb": rss_before, "rss_peak_mb": watch.peak,
                             "agents_not_online": len(lost), "attack": detail}
            rows.append([name, s["n"], s["p50"], s["p99"], s["max"], rss_before, watch.peak, len(lost),
                         "yes" if s["p99"] <= TARGET_PING_P99_MS else "NO"])
    report("hostile", rows, ["attack", "pings", "p50 ms", "p99 ms", "max ms", "RSS before MB", "RSS peak MB",
                             "agents lost", "p99 <= 50 ms"], figures,
           {"seconds_per_attack": seconds, "agents": agents, "target_ping_p99_ms": TARGET_PING_P99_MS})
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=8.0, help="per attack")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=300)
    a = p.parse_args(argv)
    run(a.seconds, a.agents, a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
