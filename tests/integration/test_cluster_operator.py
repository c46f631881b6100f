"""Issue 22 on several brokers sharing one PostgreSQL store: each webhook is delivered once (not once
per broker), and a whole output read by the broker its agent talks to is served by every broker."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import pytest

from tests.webhook_support import Receiver


@pytest.fixture
def receiver():
    made = Receiver()
    yield made
    made.close()


@pytest.fixture
def cluster(cluster_factory, receiver):
    return cluster_factory(3, "--webhook", f"ops={receiver.url('/ops')}")


def test_each_webhook_is_delivered_once_and_whole_outputs_are_served_by_every_broker(cluster, receiver, tmp_path):
    cluster.start_agent(1, "far-1", {"role": "far"})
    cluster.start_agent(2, "far-2", {"role": "far"})
    clients = [cluster.client(i) for i in range(3)]
    script = tmp_path / "big.py"
    script.write_text("import sys\nsys.stdout.buffer.write(bytes(range(256)) * 20000)\n")  # 5.12 MB, not UTF-8
    cluster.fleets[0].wait_online(["far-1", "far-2"], timeout=60)
    view = clients[0].send("RunShellScript", {"commands": [f"python3 {script}"]}, ["tag:role=far"],
                           notify=["ops"], notify_invocations=True, wait=60)
    assert view.status == "Success", view.counts
    requests = receiver.wait_for(3)
    ids = [json.loads(body)["delivery_id"] for _, _, body in requests]
    assert len(ids) == len(set(ids))
    events = sorted(json.loads(body)["event"] for _, _, body in requests)
    assert events == ["command.completed", "invocation.completed", "invocation.completed"]

    expected = bytes(range(256)) * 20000
    for index, instance in ((0, "far-1"), (1, "far-2"), (2, "far-1")):
        fleet = cluster.fleets[index]  # a broker that neither owns the command nor, for some, holds the agent
        shown = subprocess.run([fleet.python, "-m", "zerorun.cli", "-c", str(fleet.client_config), "show",
                                view.command_id, "-i", instance, "--output", "full"],
                               capture_output=True, timeout=120, env=fleet.env())
        assert shown.returncode == 0, shown.stderr
        assert hashlib.sha256(shown.stdout).hexdigest() == hashlib.sha256(expected).hexdigest(), shown.stderr

    time.sleep(3)  # three claims by each broker later: still exactly those three
    assert len(receiver.requests) == 3
    hooks = clients[2].get_command(view.command_id).webhooks
    assert len(hooks) == 3 and all(h.state == "delivered" and h.attempts == 1 for h in hooks)
