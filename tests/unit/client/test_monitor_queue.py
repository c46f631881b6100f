"""A socket monitor must never stop the process's ZeroMQ I/O thread.

libzmq sends monitor events from its I/O thread with a blocking send. With pyzmq's
``get_monitor_socket`` that thread stopped, for every socket of the context, once a thousand
events waited unread (a client idle while its broker is down) or as soon as the monitor's reading
end was closed before the monitored socket (a client dropped without ``close()``, freed by the
garbage collector while it reconnected); closing the socket then hung the process with the GIL
held. Both happened in test runs, so each check runs in a child process with a time limit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

COMMON = textwrap.dedent("""
    import gc, socket, threading, time
    import zmq
    from zerorun import zmqutil
    from zerorun.zmqutil import drain_monitor, monitor_socket

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    other = ctx.socket(zmq.DEALER)
    other.linger = 0
    other.connect(f"tcp://127.0.0.1:{port}")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    DEAD = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there: every reconnection is refused and reported

    def still_moving(seconds):
        for _ in range(seconds):
            time.sleep(1)
            other.send(b"still moving")
            assert router.poll(5000), "the I/O thread stopped: another socket's message never arrived"
            router.recv_multipart()

    def reconnecting_socket():
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, 1)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1)
        return sock
""")

UNREAD = COMMON + textwrap.dedent("""
    idle = reconnecting_socket()
    monitor = monitor_socket(idle, zmq.EVENT_CONNECT_RETRIED)
    idle.connect(DEAD)
    still_moving(4)  # events pile up unread meanwhile (libzmq's queue held 1,000)
    queued = len(drain_monitor(monitor))

    def close():
        zmqutil.close_monitor(idle, monitor)
        idle.close(0)

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "closing the monitored socket blocked"
    print("events", queued, flush=True)
""")

DROPPED = COMMON + textwrap.dedent("""
    from zerorun.client import Client, ClientConfig

    public, secret = zmq.curve_keypair()
    client = Client(ClientConfig(DEAD, public, public, secret), timeout=1)
    client._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1)  # reconnect as fast as libzmq can
    idle = reconnecting_socket()
    monitor = monitor_socket(idle, zmq.EVENT_CONNECT_RETRIED)
    idle.connect(DEAD)
    time.sleep(0.5)
    readers = len(zmqutil._readers)
    del client, monitor, idle  # dropped while reconnecting: nothing closed them
    gc.collect()
    still_moving(2)
    later = ctx.socket(zmq.DEALER)
    zmqutil.close_monitor(later, monitor_socket(later, zmq.EVENT_CONNECTED))  # sweeps what stopped
    later.close(0)
    print("readers", readers, len(zmqutil._readers), flush=True)
""")


def _child(script: str) -> str:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_an_unread_monitor_keeps_the_io_thread_moving_and_its_socket_closes():
    events = int(_child(UNREAD).split()[-1])
    assert events > 1000, f"the test did not queue more than libzmq's 1,000 ({events})"


def test_monitored_sockets_dropped_without_close_leave_the_io_thread_moving():
    _, before, after = _child(DROPPED).split()
    assert (int(before), int(after)) == (2, 0), "the reading ends of the dropped sockets were not closed"


def test_pyzmqs_own_monitor_fails_the_unread_check():
    """The check tells: with pyzmq's monitor the I/O thread stops. (Dropping a socket with
    pyzmq's monitor stops it only when the garbage collector happens to free the reading end
    first, so that case has no such counter-check.)"""
    pyzmq = UNREAD.replace("monitor_socket(idle, zmq.EVENT_CONNECT_RETRIED)",
                           "idle.get_monitor_socket(zmq.EVENT_CONNECT_RETRIED)")
    try:
        proc = subprocess.run([sys.executable, "-c", pyzmq], capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired:
        return  # hung: as expected
    assert proc.returncode != 0 and "the I/O thread stopped" in proc.stderr, proc.stdout + proc.stderr


BAD_ENDPOINT = textwrap.dedent("""
    import zmq
    from zerorun.client import Client, ClientConfig

    ctx = zmq.Context()  # the client's own, as the Ansible plugins make it
    public, secret = zmq.curve_keypair()
    try:
        Client(ClientConfig("tcp://127.0.0.1", public, public, secret), context=ctx)  # no port
    except zmq.ZMQError as exc:
        print("refused:", exc)
    ctx.term()  # waits for every socket of the context: none may be left open
    print("terminated", flush=True)
""")


def test_a_client_that_cannot_connect_leaves_its_context_free_to_end():
    out = _child(BAD_ENDPOINT)
    assert "refused: Invalid argument" in out and "terminated" in out, out
