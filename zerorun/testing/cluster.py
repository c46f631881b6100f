"""Several real brokers on one PostgreSQL database, for tests and benchmarks: a cluster.

The first broker makes the cluster's keys; the others get copies of its ``keys/`` (as an operator
copies them, README: "Several brokers"). Agents and simulators are given every broker's agent
endpoint, their own broker first; clients every client endpoint. ``close()`` stops everything,
by pid.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping

from ..client import Client, ClientConfig
from .localfleet import LocalFleet


class LocalCluster:
    def __init__(self, root: Path | str, brokers: int, dsn: str, password_file: Path, *,
                 heartbeat_interval: float = 0.5, log_level: str = "info"):
        self.root = Path(root)
        self.dsn, self.password_file = dsn, password_file
        self.fleets = [LocalFleet(self.root / f"broker-{i}", auto_accept=True, heartbeat_interval=heartbeat_interval,
                                  log_level=log_level) for i in range(brokers)]

    def store_args(self) -> tuple[str, ...]:
        return ("--store", self.dsn, "--store-password-file", str(self.password_file))

    def start(self, *extra: str) -> None:
        for i, fleet in enumerate(self.fleets):
            if i > 0 and not (fleet.broker_dir / "keys").exists():
                fleet.broker_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.fleets[0].broker_dir / "keys", fleet.broker_dir / "keys")
            fleet.start_broker(*self.store_args(), *extra)

    def restart(self, index: int, *extra: str) -> None:
        self.fleets[index].start_broker(*self.store_args(), *extra)

    def kill(self, index: int) -> None:
        self.fleets[index].stop_broker(signal.SIGKILL)

    @property
    def agent_endpoints(self) -> list[str]:
        return [f.runtime()["agent_endpoint"] for f in self.fleets]

    @property
    def client_endpoints(self) -> list[str]:
        return [f.runtime()["client_endpoint"] for f in self.fleets]

    def _brokers_from(self, index: int) -> list[str]:
        endpoints = self.agent_endpoints
        return endpoints[index:] + endpoints[:index]

    def start_agent(self, index: int, instance_id: str, tags: Mapping[str, str] | None = None,
                    *extra: str) -> subprocess.Popen[bytes]:
        """A real agent whose first broker is broker ``index`` (every other one is its fallback)."""
        more = [arg for endpoint in self._brokers_from(index)[1:] for arg in ("--broker", endpoint)]
        return self.fleets[index].start_agent(instance_id, tags, *more, *extra)

    def start_simulator(self, index: int, n: int, prefix: str, tags: Mapping[str, str] | None = None,
                        *extra: str, executor: str = "noop") -> subprocess.Popen[str]:
        more = [arg for endpoint in self._brokers_from(index)[1:] for arg in ("--broker", endpoint)]
        return self.fleets[index].start_simulator(n, prefix, tags, *more, *extra, executor=executor)

    def client(self, index: int, timeout: float = 10.0) -> Client:
        return self.fleets[index].client(timeout)

    def cluster_client(self, timeout: float = 10.0) -> Client:
        """A client that knows every broker (and moves on when one is gone)."""
        config = ClientConfig.load(self.fleets[0].client_config)
        return Client(ClientConfig(",".join(self.client_endpoints), config.broker_public_key, config.public_key,
                                   config.secret_key), timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"----- broker {i} -----\n{f.broker_log()[-4000:]}" for i, f in enumerate(self.fleets))

    def close(self) -> None:
        for fleet in self.fleets:
            fleet.close()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
