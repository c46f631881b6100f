"""Sessions with several brokers on one store (issue 23): a session goes through the broker that
holds the instance's agent connection; another broker refuses it, naming that broker, and a
client that knows the cluster's endpoints moves there by itself."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest



@pytest.fixture
def two_brokers(cluster_factory):
    return cluster_factory(2)


def _config(cluster, path, endpoints: list[str]):
    base = cluster.fleets[0].client_config.read_text()
    lines = [line for line in base.splitlines() if not line.startswith("endpoint:")]
    path.write_text("\n".join(lines + [f"endpoint: {','.join(endpoints)}"]) + "\n")
    return path


def test_a_session_goes_through_the_broker_holding_the_instance(two_brokers, tmp_path):
    cluster = two_brokers
    cluster.start_agent(0, "web-1", {"role": "web"})
    client = cluster.client(1)
    deadline = time.monotonic() + 60
    while not any(i.instance_id == "web-1" and i.ping_status == "Online" for i in client.instances()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    b0, b1 = cluster.client_endpoints
    only_other = _config(cluster, tmp_path / "other.yaml", [b1])
    refused = subprocess.run([sys.executable, "-m", "zerorun.cli", "-c", str(only_other), "session", "web-1", "--",
                              "echo", "hi"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                             env=cluster.fleets[1].env())
    assert refused.returncode == 255
    assert "WrongBroker" in refused.stderr and b0 in refused.stderr, refused.stderr
    both = _config(cluster, tmp_path / "both.yaml", [b1, b0])  # the wrong broker first: the client moves
    moved = subprocess.run([sys.executable, "-m", "zerorun.cli", "-c", str(both), "session", "web-1", "--",
                            "echo", "through-$((1+1))"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, env=cluster.fleets[1].env())
    assert moved.returncode == 0, moved.stderr
    assert "through-2" in moved.stdout
