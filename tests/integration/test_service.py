"""The daemons as services: config files, health check, metrics, SIGHUP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from tests.metrics_scrape import scrape
from zerorun.testing import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_move_during_a_command(fleet_factory):
    fleet = fleet_factory("metrics")
    fleet.start_broker("--metrics-bind", f"127.0.0.1:{free_port()}")
    agent_port = free_port()
    fleet.start_agent("web-1", {"role": "web"}, "--metrics-bind", f"127.0.0.1:{agent_port}")
    fleet.wait_online(["web-1"])
    address = fleet.runtime()["metrics"]
    online = 'zerorun_agents{ping_status="Online"}'
    # the broker publishes its figures once per tick: wait for a snapshot taken with web-1 Online
    before = wait_until(lambda: (m := scrape(address)).get(online) == 1 and m, "the metrics to show web-1 Online")
    assert before[online] == 1
    proc = fleet.cli("send", "RunShellScript", "-p", "commands=echo metrics", "-t", "tag:role=web")
    assert proc.returncode == 0
    success = 'zerorun_commands_total{status="Success"}'
    after = wait_until(lambda: (m := scrape(address)).get(success, 0) > before.get(success, 0) and m,
                       "the finished command to reach the published metrics")
    assert after[success] == before.get(success, 0) + 1
    assert after['zerorun_invocations_total{status="Success"}'] >= 1
    assert after['zerorun_messages_total{direction="in"}'] > before['zerorun_messages_total{direction="in"}']
    assert after["zerorun_completion_latency_seconds_count"] >= 1
    assert after["zerorun_dispatch_latency_seconds_count"] >= 1
    assert after["zerorun_store_write_seconds_count"] > 0
    # the collector's pauses: at least the full collection the broker made when it settled its heap
    assert after['zerorun_gc_pause_seconds_count{generation="2"}'] >= 1
    assert after['zerorun_gc_pause_seconds_bucket{generation="2",le="+Inf"}'] == \
        after['zerorun_gc_pause_seconds_count{generation="2"}']
    assert 0 < after['zerorun_gc_pause_longest_seconds{generation="2"}'] < 5
    agent = scrape(f"127.0.0.1:{agent_port}")
    assert agent['zerorun_agent_executions_total{status="Success"}'] == 1
    assert agent["zerorun_agent_running_invocations"] == 0


def test_health_check(fleet):
    ok = subprocess.run([sys.executable, "-m", "zmq_broker", "health", "--state-dir", str(fleet.broker_dir)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: broker")
    fleet.stop_broker()
    down = subprocess.run([sys.executable, "-m", "zmq_broker", "health", "--state-dir", str(fleet.broker_dir),
                           "--timeout", "1"], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:")


def test_config_files_and_bad_config(tmp_path):
    state = tmp_path / "broker"
    config = tmp_path / "broker.yaml"
    config.write_text(f"state_dir: {state}\nagent_bind: tcp://127.0.0.1:*\nclient_bind: tcp://127.0.0.1:*\n"
                      "auto_accept: true\nheartbeat_interval: 0.5\nlog_level: info\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: /tmp/x\nno_such_option: 1\n")
    proc = subprocess.run([sys.executable, "-m", "zmq_broker", "--config", str(bad)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option 'no_such_option'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("state_dir: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "--config", str(broken)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    for daemon, good in (("zmq_broker", config), ("zmq_broker", bad)):
        check = subprocess.run([sys.executable, "-m", daemon, "--config", str(good), "--check-config"],
                               capture_output=True, text=True, timeout=30)
        assert (check.returncode, check.stdout.strip()) == ((0, "configuration OK") if good is config else
                                                            (2, ""))
    broker_log = tmp_path / "broker.log"
    with open(broker_log, "wb") as log:
        broker = subprocess.Popen([sys.executable, "-m", "zmq_broker", "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT)
    agent = None
    try:
        deadline = time.time() + 20
        while not (state / "broker.json").exists():
            assert time.time() < deadline and broker.poll() is None
            time.sleep(0.05)
        import json

        runtime = json.loads((state / "broker.json").read_text())
        agent_config = tmp_path / "agent.yaml"
        agent_config.write_text(f"broker: {runtime['agent_endpoint']}\nbroker_key: {state / 'broker.key'}\n"
                                f"instance_id: cfg-1\ntags:\n  role: web\n  env: test\n"
                                f"state_dir: {tmp_path / 'agent'}\nheartbeat_interval: 0.5\n")
        check = subprocess.run([sys.executable, "-m", "agent", "--config", str(agent_config), "--check-config"],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and check.stdout.strip() == "configuration OK"
        agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(agent_config)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from zerorun.client import Client, ClientConfig

        with Client(ClientConfig.load(state / "client.yaml")) as client:
            deadline = time.time() + 20
            while True:
                found = [i for i in client.instances() if i.instance_id == "cfg-1" and i.ping_status == "Online"]
                if found:
                    break
                assert time.time() < deadline
                time.sleep(0.1)
            assert found[0].tags == {"role": "web", "env": "test"}
            # SIGHUP reloads without stopping
            config.write_text(config.read_text().replace("log_level: info", "log_level: debug"))
            broker.send_signal(signal.SIGHUP)
            wait_until(lambda: "log level is now DEBUG" in broker_log.read_text() or broker.poll() is not None,
                       "the broker to reload its configuration on SIGHUP")
            assert broker.poll() is None
            assert client.ping()["online"] == 1
            # the agent reloads its tags on SIGHUP and proposes them to the broker at once; they
            # are its tags once an operator approves them (the broker owns tags)
            agent_config.write_text(agent_config.read_text().replace("env: test", "env: staging"))
            agent.send_signal(signal.SIGHUP)
            deadline = time.time() + 15
            while client.instances(["instance:cfg-1"])[0].pending_tags != {"role": "web", "env": "staging"}:
                assert time.time() < deadline, "tags not reloaded"
                time.sleep(0.1)
            assert client.instances(["instance:cfg-1"])[0].tags == {"role": "web", "env": "test"}
            client.approve_tags("cfg-1")
            assert client.instances(["instance:cfg-1"])[0].tags == {"role": "web", "env": "staging"}
            assert agent.poll() is None
    finally:
        for proc in (agent, broker):
            if proc is not None:
                proc.terminate()
                proc.wait(15)
    output = broker_log.read_text()
    assert "SIGHUP: policy and log level reloaded" in output
    assert "log level is now DEBUG" in output
