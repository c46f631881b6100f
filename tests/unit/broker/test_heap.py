"""The broker's heap after start-up (zmq_broker/heap.py). Each check runs in a fresh interpreter:
``settle`` changes the collector of the whole process, and a pytest worker is not a broker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_settle_freezes_start_up_and_collects_the_young_less_often():
    run("""
        import gc, weakref
        from zmq_broker import heap

        class Node: pass
        before = Node(); before.me = before  # start-up's garbage: collected, not frozen
        gone = weakref.ref(before); del before
        kept = [Node() for _ in range(100)]  # start-up's state: frozen
        heap.settle()
        assert gone() is None
        assert gc.get_freeze_count() >= 100
        assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
        assert not any(gc.is_tracked(n) and n in gc.get_objects() for n in kept[:3])
        # what the loop makes afterwards is collected as always
        later = Node(); later.me = later
        ref = weakref.ref(later); del later
        gc.collect()
        assert ref() is None
    """)


def test_pauses_are_counted_by_generation_and_the_hook_goes_on_close():
    run("""
        import gc
        from zmq_broker.heap import GcPauses, PAUSE_BUCKETS

        pauses = GcPauses()
        gc.collect(0); gc.collect(2); gc.collect(2)
        snap = pauses.snapshot()
        assert snap["collections"][0] >= 1 and snap["collections"][2] == 2, snap
        assert sum(snap["buckets"][2]) == 2 and len(snap["buckets"][2]) == len(PAUSE_BUCKETS) + 1
        assert 0 < snap["longest"][2] <= snap["seconds"][2]
        snap["buckets"][2][-1] += 99  # a copy: the live figures are the hook's alone
        assert sum(pauses.buckets[2]) == 2
        pauses.close()
        pauses.close()
        gc.collect()
        assert pauses.snapshot()["collections"][2] == 2
    """)
