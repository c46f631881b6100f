"""The broker's file descriptors: its soft limit raised at start, and a look that says when none is
left. Each runs in a child process: they change the process's limits."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_the_soft_limit_is_raised_to_the_hard_one():
    proc = _run("""
        import resource
        from zmq_broker.descriptors import raise_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(raise_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard or hard)
    """)
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_a_small_hard_limit_is_said_at_start():
    proc = _run("""
        import logging, resource
        logging.basicConfig(level=logging.INFO)
        from zmq_broker.descriptors import raise_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))
        print(raise_limit())
    """)
    assert proc.stdout.strip() == "300", proc.stdout + proc.stderr
    assert "this broker may open 300 files" in proc.stderr and "LimitNOFILE" in proc.stderr


def test_none_free_is_said_once_a_minute_and_few_free_is_warned():
    proc = _run("""
        import logging, os, resource
        logging.basicConfig(level=logging.INFO)
        from zmq_broker.descriptors import DescriptorWatch
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        watch = DescriptorWatch(64)
        held = []
        while len(held) < 59 - 3:
            held.append(os.open("/dev/null", os.O_RDONLY))
        print("low", watch.check(0.0))
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        print("none", watch.check(100.0), watch.check(101.0), watch.check(110.0), watch.check(200.0))
    """)
    lines = proc.stdout.split()
    assert lines == ["low", "False", "none", "True", "False", "True", "True"], proc.stdout + proc.stderr
    assert proc.stderr.count("file descriptors in use") == 1, proc.stderr
    assert proc.stderr.count("out of file descriptors") == 2, proc.stderr  # at 100 and 200, not 110
