"""Sessions beside command traffic (issue 23): a 100 MB transfer through a port forward
(``zerorun forward`` to an HTTP server on the agent's side) while a command runs on 30
instances; the command's time must stay within 20 % of its time alone.

One real agent carries the tunnel; the 30 command instances are simulated (``agent.fleetsim``,
real executor: each runs ``echo hi``). The command is ``send ... wait`` through the client library
(one request, answered when every invocation has its result), p50 over runs, in rounds of a few
alone and a few while downloads of a 100 MB file loop through the tunnel (each checked for its
size). Also the tunnel's throughput alone, while the commands run back to back (the broker lets
sessions yield to command work), and right after.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, Bench, cpu_seconds, report, summary  # noqa: E402

TARGET_RATIO = 1.2
DOWNLOADER = r"""
import socket, sys, time
port, until = int(sys.argv[1]), float(sys.argv[2])
total = 0
while time.time() < until:
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /big.bin HTTP/1.0\r\nHost: bench\r\n\r\n")
    got = mark = 0
    while True:
        block = s.recv(1 << 20)
        if not block:
            break
        got += len(block)
        if got - mark >= 1 << 20:
            mark = got
            print(f"p {time.time():.4f} {total + got}", flush=True)
    s.close()
    total += got
    print(f"d {got} {time.perf_counter() - t0:.4f}", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command_times(client, runs: int, n: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        view = client.send("RunShellScript", {"commands": "echo hi"}, targets=["tag:role=cmd"], wait=60)
        dt = time.perf_counter() - t0
        if view.status != "Success" or len(view.invocations) != n:
            raise RuntimeError(f"command ended {view.status} with {len(view.invocations)} invocations")
        times.append(dt)
    return times


def run(n: int, runs: int, size_mb: int, max_seconds: float, rounds: int = 5) -> dict:
    with Bench("sessions", max_seconds=max_seconds, heartbeat_interval=1.0) as bench:
        www = bench.root / "www"
        www.mkdir()
        with open(www / "big.bin", "wb") as handle:
            for _ in range(size_mb):
                handle.write(os.urandom(1024 * 1024))
        size = size_mb * 1024 * 1024
        http_port = _free_port()
        bench.popen([PYTHON, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www), str(http_port)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bench.start_broker()
        bench.fleet.start_agent("tunnel-1", {"role": "tunnel"})
        bench.start_sim(n, executor="real", prefix="cmd", tags={"role": "cmd"})
        bench.fleet.wait_online(["tunnel-1"])
        forward = bench.popen([PYTHON, "-m", "zerorun.cli", "-c", str(bench.fleet.client_config), "forward",
                               "tunnel-1", f"0:{http_port}"], stderr=subprocess.PIPE, text=True,
                              env=bench.fleet.env())
        line = forward.stderr.readline()
        local = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        client = bench.client()
        _command_times(client, 3, n)  # warm up

        def downloads(seconds: float) -> subprocess.Popen:
            return bench.popen([PYTHON, "-c", DOWNLOADER, str(local), str(time.time() + seconds)],
                               stdout=subprocess.PIPE, text=True)

        solo = downloads(0.1)  # one download, nothing else running
        done = [line.split() for line in solo.communicate(timeout=120)[0].splitlines() if line.startswith("d ")]
        if int(done[0][1]) < size:
            raise RuntimeError(f"a download through the tunnel got {done[0][1]} of {size} bytes")
        solo_s = float(done[0][2])

        # Rounds of "alone, then beside a flowing transfer", so that the machine's drift (other
        # load on a shared host) falls on both sides alike.
        alone: list[float] = []
        busy: list[float] = []
        sizes: list[int] = []
        moved = spent = moved_after = spent_after = 0.0
        agent_pid = bench.fleet.agents["tunnel-1"].pid
        cpu0 = {"broker": cpu_seconds(bench.broker_pid), "agent": cpu_seconds(agent_pid),
                "forward": cpu_seconds(forward.pid)}
        per_round = max(1, runs // rounds)
        for _ in range(rounds):
            alone += _command_times(client, per_round, n)
            loop = downloads(3600)
            time.sleep(0.7)  # the transfer is flowing at full speed
            started = time.time()
            busy += _command_times(client, per_round, n)
            ended = time.time()
            time.sleep(0.5)  # and flowing again once the commands are done
            loop.terminate()
            lines = [line.split() for line in loop.communicate(timeout=30)[0].splitlines()]
            progress = [(float(t), int(b)) for kind, t, b in lines if kind == "p"]
            sizes += [int(b) for kind, b, _ in lines if kind == "d"]
            during = [b for t, b in progress if started <= t <= ended]
            if len(during) > 1:
                moved += max(during) - min(during)
            spent += ended - started
            after = [(t, b) for t, b in progress if t > ended]
            if len(after) > 1:
                moved_after += after[-1][1] - after[0][1]
                spent_after += after[-1][0] - after[0][0]
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in
               (("broker", bench.broker_pid), ("agent", agent_pid), ("forward", forward.pid))}
        if any(got < size for got in sizes):
            raise RuntimeError(f"a download through the tunnel was cut short: {sizes}")
        moved_after = moved_after / max(1e-9, spent_after)
        client.close()
    a, b = summary(alone), summary(busy)
    ratio = b["p50"] / a["p50"]
    busy_rate = moved / max(1e-9, spent) / 1e6
    figures = {"instances": n, "runs": runs, "transfer_mb": size_mb, "command_alone_s": a, "command_during_s": b,
               "ratio_p50": ratio, "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
               "tunnel_alone_mb_s": size / solo_s / 1e6, "tunnel_during_commands_mb_s": busy_rate,
               "tunnel_after_commands_mb_s": moved_after / 1e6, "downloads_checked": len(sizes),
               "cpu_seconds_during": cpu}
    rows = [[f"send echo hi to {n} (real executor), alone", a["p50"], a["p90"], "-", "-"],
            [f"the same while {size_mb} MB transfers loop through a tunnel", b["p50"], b["p90"],
             f"<= {TARGET_RATIO:.1f}x", f"{ratio:.2f}x {'yes' if figures['met'] else 'NO'}"],
            [f"tunnel throughput alone (MB/s, one {size_mb} MB download)", size / solo_s / 1e6, "-", "-", "-"],
            ["tunnel throughput while commands ran back to back (MB/s)", busy_rate, "-", "-", "-"],
            ["tunnel throughput in the half second after them (MB/s)", moved_after / 1e6, "-", "-", "-"]]
    report("sessions", rows, ["measure (s)", "p50", "p90", "target", "met"], figures,
           {"instances": n, "runs": runs, "transfer_mb": size_mb, "executor": "real (fleetsim)"})
    print("CPU seconds while the commands ran beside the transfers: "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=30)
    p.add_argument("--runs", type=int, default=30, help="commands alone and as many beside the transfer")
    p.add_argument("--rounds", type=int, default=5, help="alternations of alone / beside the transfer")
    p.add_argument("--size-mb", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=600)
    a = p.parse_args(argv)
    run(a.n, a.runs, a.size_mb, a.max_seconds, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
