"""A real broker and real agents on 127.0.0.1, for tests, the demo and benchmarks.

Everything runs as separate processes from this Python (``-m zmq_broker``, ``-m agent``,
``-m zerorun.cli``), with the broker on ports it picks itself (``tcp://127.0.0.1:*``) and every
state dir under one root. ``close()`` stops every process it started, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..client import Client, ClientConfig
from .waits import wait_until


class FleetError(RuntimeError):
    pass


def _wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class LocalFleet:
    def __init__(self, root: Path | str, *, auto_accept: bool = True, heartbeat_interval: float = 0.5,
                 insecure: bool = False, python: str = sys.executable, log_level: str = "info"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.auto_accept = auto_accept
        self.heartbeat_interval = heartbeat_interval
        self.insecure = insecure
        self.python = python
        self.log_level = log_level
        self.broker_dir = self.root / "broker"
        self.broker: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_args: dict[str, list[str]] = {}
        self.agent_cwd: dict[str, Path] = {}  # where an agent runs (default: here; python -m puts it on sys.path)
        self._agent_bind = "tcp://127.0.0.1:*"
        self._client_bind = "tcp://127.0.0.1:*"
        self._clients: list[Client] = []
        self._adopted: list[Client] = []  # made by the caller, closed with the fleet
        self.simulators: list[subprocess.Popen[str]] = []
        self._control_dir: Path | None = None

    # -- paths ------------------------------------------------------------------------------

    @property
    def control_dir(self) -> Path:
        """Where the connection plugin's multiplexers for this fleet live: short, because a
        unix socket path has at most 107 bytes."""
        if self._control_dir is None:
            self._control_dir = Path(tempfile.mkdtemp(prefix="zr-cp-"))
        return self._control_dir

    @property
    def client_config(self) -> Path:
        return self.broker_dir / "client.yaml"

    @property
    def broker_key(self) -> Path:
        return self.broker_dir / "broker.key"

    def runtime(self) -> dict[str, Any]:
        return json.loads((self.broker_dir / "broker.json").read_text())

    @property
    def agent_endpoint(self) -> str:
        return self.runtime()["agent_endpoint"]

    def agent_dir(self, instance_id: str) -> Path:
        return self.root / "agents" / instance_id

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ZERORUN_CONFIG"] = str(self.client_config)
        env["ZERORUN_CONTROL_PATH_DIR"] = str(self.control_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # -- broker -----------------------------------------------------------------------------

    def start_broker(self, *extra: str, wait: bool = True) -> subprocess.Popen[bytes]:
        if self.broker is not None and self.broker.poll() is None:
            raise FleetError("broker already running")
        info = self.broker_dir / "broker.json"
        if info.exists():
            info.unlink()
        args = [self.python, "-m", "zmq_broker", "--state-dir", str(self.broker_dir),
                "--agent-bind", self._agent_bind, "--client-bind", self._client_bind,
                "--heartbeat-interval", str(self.heartbeat_interval), "--log-level", self.log_level]
        if self.auto_accept:
            args.append("--auto-accept")
        if self.insecure:
            args.append("--insecure")
        args.extend(extra)
        log = open(self.root / "broker.log", "ab")
        self.broker = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        log.close()
        if wait:
            _wait_for(lambda: info.exists() or self.broker.poll() is not None, 20, "the broker to start")
            if self.broker.poll() is not None:
                raise FleetError(f"broker exited with {self.broker.returncode}:\n{self.broker_log()[-3000:]}")
            runtime = self.runtime()
            # restarts reuse the same ports, as a real broker's would
            self._agent_bind = runtime["agent_endpoint"]
            self._client_bind = runtime["client_endpoint"]
        return self.broker

    def stop_broker(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        proc, self.broker = self.broker, None
        return _stop(proc, sig, timeout)

    def kill_broker(self) -> None:
        self.stop_broker(signal.SIGKILL)

    def broker_log(self) -> str:
        path = self.root / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- agents -----------------------------------------------------------------------------

    def start_agent(self, instance_id: str, tags: Mapping[str, str] | None = None, *extra: str,
                    max_concurrency: int = 5) -> subprocess.Popen[bytes]:
        existing = self.agents.get(instance_id)
        if existing is not None and existing.poll() is None:
            raise FleetError(f"agent {instance_id} already running")
        args = [self.python, "-m", "agent", "--broker", self.agent_endpoint,
                "--instance-id", instance_id, "--state-dir", str(self.agent_dir(instance_id)),
                "--heartbeat-interval", str(self.heartbeat_interval),
                "--max-concurrency", str(max_concurrency), "--log-level", self.log_level,
                "--drain-timeout", "3"]
        if self.insecure:
            args.append("--insecure")
        else:
            args += ["--broker-key", str(self.broker_key)]
        for key, value in (tags or {}).items():
            args += ["--tag", f"{key}={value}"]
        args.extend(extra)
        self.agent_args[instance_id] = args
        return self.restart_agent(instance_id)

    def restart_agent(self, instance_id: str) -> subprocess.Popen[bytes]:
        """Starts the agent again with the arguments it was first started with."""
        args = self.agent_args[instance_id]
        log = open(self.root / f"agent-{instance_id}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                start_new_session=True, cwd=self.agent_cwd.get(instance_id))
        log.close()
        self.agents[instance_id] = proc
        return proc

    def stop_agent(self, instance_id: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        return _stop(self.agents.get(instance_id), sig, timeout)

    def stop_commands(self, instance_id: str) -> None:
        """Stops what still runs under the supervisors of a stopped agent (``zerorun-agent
        stop-commands``), when anything does: a look at the run directories decides."""
        if _live_supervisors(self.agent_dir(instance_id) / "work"):
            subprocess.run([self.python, "-m", "agent", "stop-commands", "--state-dir",
                            str(self.agent_dir(instance_id))], env=self.env(), capture_output=True, timeout=60)

    def agent_log(self, instance_id: str) -> str:
        path = self.root / f"agent-{instance_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_agents(self, specs: Mapping[str, Mapping[str, str]], wait: bool = True) -> None:
        for instance_id, tags in specs.items():
            self.start_agent(instance_id, tags)
        if wait:
            self.wait_online(specs)

    def wait_online(self, instance_ids: Iterable[str], timeout: float = 30) -> None:
        wanted = set(instance_ids)

        def ready() -> bool:
            online = {v.instance_id for v in self.client().instances() if v.ping_status == "Online"}
            return wanted <= online

        _wait_for(ready, timeout, f"instances {sorted(wanted)} to be Online", interval=0.1)

    def wait_status(self, instance_id: str, status: str, timeout: float = 30) -> None:
        def ready() -> bool:
            return any(v.instance_id == instance_id and v.ping_status == status
                       for v in self.client().instances())

        _wait_for(ready, timeout, f"{instance_id} to be {status}", interval=0.1)

    def wait_invocations(self, command_id: str, status: str, instance_ids: Iterable[str] | None = None,
                         timeout: float = 30) -> Any:
        """Until the command's invocations (all, or those on ``instance_ids``) have ``status``
        (``InProgress``: the agent said the step started); returns the command's view."""
        wanted = None if instance_ids is None else set(instance_ids)

        def ready() -> Any:
            view = self.client().get_command(command_id, include_output=False)
            chosen = [i for i in view.invocations if wanted is None or i.instance_id in wanted]
            if chosen and (wanted is None or {i.instance_id for i in chosen} == wanted) \
                    and all(i.status == status for i in chosen):
                return view
            return None

        who = "every invocation" if wanted is None else f"the invocations on {sorted(wanted)}"
        return wait_until(ready, f"{who} of {command_id} to be {status}", timeout)

    def executions(self, instance_id: str) -> list[dict[str, Any]]:
        """What the agent recorded as finished (its ``executions.jsonl``), oldest first."""
        path = self.agent_dir(instance_id) / "executions.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.split("\n")[:-1] if line]  # the last one may be half written

    def wait_executed(self, instance_id: str, command_id: str, timeout: float = 30) -> dict[str, Any]:
        """Until the agent on ``instance_id`` records that it finished its invocation of
        ``command_id`` (whether or not the broker has heard of it); returns that record."""
        return wait_until(lambda: next((e for e in self.executions(instance_id) if e.get("command_id") == command_id),
                                       None), f"{instance_id} to finish its invocation of {command_id}", timeout)

    def start_simulator(self, n: int, prefix: str, tags: Mapping[str, str] | None = None,
                        *extra: str, executor: str = "noop") -> subprocess.Popen[str]:
        """``zerorun-fleet-sim``: n simulated agents in one process (needs --auto-accept);
        stopped by close() like every other process."""
        args = [self.python, "-m", "agent.fleetsim", "--broker", self.agent_endpoint,
                "--broker-key", str(self.broker_key), "-n", str(n), "--prefix", prefix,
                "--executor", executor]
        for key, value in (tags or {}).items():
            args += ["--tag", f"{key}={value}"]
        args.extend(extra)
        log = open(self.root / f"fleetsim-{prefix}.log", "ab")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=self.env(),
                                start_new_session=True)
        log.close()
        self.simulators.append(proc)
        return proc

    # -- clients ----------------------------------------------------------------------------

    def client(self, timeout: float = 10.0) -> Client:
        """A client connection, reused (closed by close())."""
        if not self._clients:
            self._clients.append(Client(ClientConfig.load(self.client_config), timeout=timeout))
        return self._clients[0]

    def adopt(self, client: Client) -> Client:
        """A client made by the caller, closed by close() with the fleet's own."""
        self._adopted.append(client)
        return client

    def add_client(self, name: str, directory: Path, timeout: float = 10.0) -> Client:
        """A new client keypair in ``directory``, registered by the admin key under ``name`` (its
        role comes from the policy), and a connection with it; the caller closes it."""
        from .. import keys

        keys.create_keypair(directory, name)
        secret = directory / f"{name}.key_secret"
        public, _ = keys.load_secret(secret)
        self.client().add_key("client", name, public.decode())
        runtime = self.runtime()
        return Client(ClientConfig.from_options(endpoint=runtime["client_endpoint"],
                                                broker_key=runtime["broker_public_key"],
                                                client_key_file=str(secret)), timeout=timeout)

    def cli(self, *args: str, timeout: float = 120, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Runs the real ``zerorun`` CLI as a separate process."""
        proc = subprocess.run([self.python, "-m", "zerorun.cli", "-c", str(self.client_config), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env(), input=input)
        if check and proc.returncode != 0:
            raise FleetError(f"zerorun {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def close(self) -> None:
        from zerorun import mux

        if self._control_dir is not None:  # connection-plugin multiplexers of this fleet
            mux.stop_all(self._control_dir)
            shutil.rmtree(self._control_dir, ignore_errors=True)
        for client in self._clients + self._adopted:
            client.close()
        self._clients.clear()
        self._adopted.clear()
        for instance_id in list(self.agents):
            _stop(self.agents.pop(instance_id), signal.SIGTERM, 10)
        for instance_id in self.agent_args:  # commands outlive their agent (issue 19): stop them too
            self.stop_commands(instance_id)
        while self.simulators:
            _stop(self.simulators.pop(), signal.SIGTERM, 15)
        self.stop_broker()

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _live_supervisors(work: Path) -> bool:
    """Whether a supervisor recorded in a run directory still runs (agent/supervisor.py's
    ``supervisor`` file: JSON with the pid first)."""
    try:
        run_dirs = list(work.iterdir())
    except OSError:
        return False
    for run_dir in run_dirs:
        try:
            pid = json.loads((run_dir / "supervisor").read_bytes()[:256])["pid"]
            os.kill(pid, 0)
            return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    try:
        os.kill(proc.pid, sig)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait()
    except ProcessLookupError:
        return proc.wait()
