"""The broker's settings: one typed record that the command line and the config file fill."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class BrokerConfig:
    state_dir: Path
    agent_bind: str = "tcp://0.0.0.0:7450"
    client_bind: str = "tcp://127.0.0.1:7451"
    advertise_host: str = ""
    auto_accept: bool = False
    insecure: bool = False
    heartbeat_interval: float = 5.0  # the shortest interval agents are told
    max_heartbeats_per_second: float = 100.0  # 0: no cap (see Broker.fleet_heartbeat_interval)
    delivery_timeout: int = 3600
    max_output_bytes: int = 4 * 1024 * 1024
    max_pending_keys: int = 1000
    retention_days: float = 30.0
    metrics_bind: str = ""  # host:port for Prometheus metrics; "" = off
    policy_file: Path | None = None  # default: <state dir>/policy.yaml
    audit_file: Path | None = None  # default: <state dir>/audit.jsonl
    render_workers: int = 2  # processes that render untrusted templates, off the loop
    render_timeout: float = 2.0  # seconds one rendering may take
    render_memory_mb: int = 768  # each render worker's address space
    max_step_bytes: int = 1024 * 1024  # a rendered step's script
    max_command_bytes: int = 8 * 1024 * 1024  # all rendered steps of a command
    store: str = ""  # "" = SQLite in the state dir; postgresql://USER@HOST:PORT/DB (no password in it)
    store_password_file: Path | None = None  # else libpq's PGPASSWORD / ~/.pgpass
