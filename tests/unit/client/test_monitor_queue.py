"""A socket monitor nobody reads must not stop the process's ZeroMQ I/O thread.

libzmq sends monitor events from its I/O thread with a blocking send; with pyzmq's
``get_monitor_socket`` a thousand unread events (a client idle while its broker is down) stopped
that thread for every socket of the context, and closing the socket then hung the process with
the GIL held. That happened in a test run, so the check runs in a child process with a time limit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import socket, threading, time
    import zmq
    SECONDS = int(__import__("sys").argv[1])
    from zerorun.zmqutil import drain_monitor, monitor_socket

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    other = ctx.socket(zmq.DEALER)
    other.linger = 0
    other.connect(f"tcp://127.0.0.1:{port}")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()[1]
    probe.close()  # nothing listens there: every reconnection is refused and reported

    idle = ctx.socket(zmq.DEALER)
    idle.linger = 0
    idle.setsockopt(zmq.RECONNECT_IVL, 1)
    idle.setsockopt(zmq.RECONNECT_IVL_MAX, 1)
    monitor = monitor_socket(idle, zmq.EVENT_CONNECT_RETRIED)
    idle.connect(f"tcp://127.0.0.1:{dead}")
    for _ in range(SECONDS):  # events pile up unread meanwhile (libzmq's queue held 1,000)
        time.sleep(1)
        other.send(b"still moving")
        assert router.poll(5000), "the I/O thread stopped: another socket's message never arrived"
        router.recv_multipart()
    queued = len(drain_monitor(monitor))

    def close():
        idle.disable_monitor()
        monitor.close(0)
        idle.close(0)

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "closing the monitored socket blocked"
    print("events", queued, flush=True)
""")


def test_an_unread_monitor_keeps_the_io_thread_moving_and_its_socket_closes():
    proc = subprocess.run([sys.executable, "-c", CHILD, "4"], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = int(proc.stdout.split()[-1])
    assert events > 1000, f"the test did not queue more than libzmq's 1,000 ({events})"
