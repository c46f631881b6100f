"""The garbage collector's pauses of a broker that does not report them itself (a revision before
``zerorun_gc_pause_seconds``), for comparing revisions: put this directory first on PYTHONPATH
of a benchmark run,

    PYTHONPATH=bench/gcprobe GCPROBE_DIR=/tmp/gc python -m bench.fanout --sizes 10000 --executors noop

and each ``zmq_broker`` process it starts appends one line per collection to
``$GCPROBE_DIR/<pid>.log``: generation, pause in ms, objects collected. Other processes are left
alone. The hook is the one ``zmq_broker.heap.GcPauses`` installs."""

import gc
import os
import time

_DIR = os.environ.get("GCPROBE_DIR")
try:
    with open("/proc/self/cmdline", "rb") as _f:
        _BROKER = b"zmq_broker" in _f.read()
except OSError:
    _BROKER = False

if _DIR and _BROKER:
    _log = open(os.path.join(_DIR, f"{os.getpid()}.log"), "a", buffering=1)
    _started = [0.0]

    def _on_gc(phase, info):
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        paused = time.perf_counter() - _started[0]
        _log.write(f"{info['generation']} {paused * 1000:.3f} {info['collected']}\n")

    gc.callbacks.append(_on_gc)
