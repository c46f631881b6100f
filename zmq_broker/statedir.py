"""The broker's state directory: its keypairs, and the files it writes for others to read.

``keys/`` (0700) holds the broker's and the admin client's keypairs (secrets 0600); ``broker.key``
is the public key agents need; ``client.yaml`` (0600) is a ready client configuration for the
admin key; ``broker.json`` says where a running broker listens (for tools and tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zerorun import __version__, configtext, keys as keyfiles


@dataclass
class BrokerKeys:
    public: bytes  # z85
    secret: bytes
    admin_public: bytes


def prepare(state: Path) -> BrokerKeys:
    """Creates the directory and keypairs on first start; refuses unsafe permissions. Everything
    the broker creates from now on is for its own user only (umask 077), and so are the files an
    earlier version may have left readable."""
    os.umask(0o077)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    key_dir = state / "keys"
    key_dir.mkdir(exist_ok=True)
    os.chmod(key_dir, 0o700)
    public, secret = keyfiles.ensure_keypair(key_dir, "broker")
    admin_public, _ = keyfiles.ensure_keypair(key_dir, "admin")
    keyfiles.load_secret(key_dir / "broker.key_secret")  # refuses unsafe permissions
    for name in ("broker.db", "broker.db-wal", "broker.db-shm", "audit.jsonl", "broker.json"):
        try:
            os.chmod(state / name, 0o600)
        except FileNotFoundError:
            pass
    return BrokerKeys(public, secret, admin_public)


def advertised(endpoint: str, advertise_host: str) -> str:
    """The endpoint as others should dial it: a wildcard bind becomes the advertised host
    (127.0.0.1 when none is configured)."""
    host = advertise_host
    if not host and ("0.0.0.0" in endpoint or "[::]" in endpoint or "*" in endpoint):
        host = "127.0.0.1"
    if host:
        return f"tcp://{host}:{endpoint.rsplit(':', 1)[1]}"
    return endpoint


def write_client_files(state: Path, *, public_key: bytes, client_endpoint: str, agent_endpoint: str,
                       insecure: bool, metrics_address: str) -> None:
    public_copy = state / "broker.key"  # a public key, for agents: readable by all
    public_copy.write_text((state / "keys" / "broker.key").read_text())
    os.chmod(public_copy, 0o644)
    config: dict[str, str | bool] = {"endpoint": client_endpoint, "broker_public_key": public_key.decode(),
                                     "client_key_file": str(state / "keys" / "admin.key_secret")}
    if insecure:
        config["insecure"] = True
    path = state / "client.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(configtext.write(config, "# Zerorun client configuration, written by zerorun-broker. "
                                              "Use: zerorun -c THIS_FILE\n"))
    os.chmod(path, 0o600)
    runtime = {"pid": os.getpid(), "agent_endpoint": agent_endpoint, "client_endpoint": client_endpoint,
               "broker_public_key": public_key.decode(), "version": __version__, "metrics": metrics_address}
    tmp = state / "broker.json.tmp"
    tmp.write_text(json.dumps(runtime, indent=2) + "\n")
    os.replace(tmp, state / "broker.json")
