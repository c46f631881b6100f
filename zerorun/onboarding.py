"""Onboarding a client (an operator's laptop, an AWX instance): a new CURVE keypair, registered
with the broker as a client key, and a self-contained ``client.yaml`` beside it.

The broker binds roles to client *names* in its policy file (``clients: {NAME: ROLE}``), which
no client request can change; so the role is checked and, when the broker does not give one yet,
the exact policy line to add is reported. Nothing is left half-done: the key files are removed
again when the broker refuses the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import configtext, keys as keyfiles
from .client import Client, ClientConfig, ConfigError, InvalidRequest, ZerorunError, check_endpoints
from .identifiers import CLIENT_NAME

CONFIG_NAME = "client.yaml"
NAME_PATTERN = CLIENT_NAME  # fullmatch: "$" let a final newline in
RESERVED_NAMES = ("admin",)  # the broker's own key: every permission, whatever the policy says
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class CreatedClient:
    name: str
    role: str
    endpoint: str
    fingerprint: str
    config_file: Path
    secret_key_file: Path
    public_key_file: Path
    role_in_effect: bool  # the broker's policy gives this name a role already
    role_seen: str = ""  # that role, when the broker named it ("" when it did not say)
    role_problem: str = ""  # what the broker answered the new key, when it refused
    notes: list[str] = field(default_factory=list)

    @property
    def policy_line(self) -> str:
        return f"{self.name}: {self.role}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "endpoint": self.endpoint, "fingerprint": self.fingerprint,
                "config_file": str(self.config_file), "secret_key_file": str(self.secret_key_file),
                "public_key_file": str(self.public_key_file), "role_in_effect": self.role_in_effect,
                "role_seen": self.role_seen, "role_problem": self.role_problem,
                "policy": {"clients": {self.name: self.role}}, "notes": list(self.notes)}


def check_name(name: str, role: str) -> None:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidRequest(f"client name {name!r}: use letters, digits and . _ @ - (at most 128, starting with"
                             " a letter or digit); it names the key files and the policy entry", "BadRequest")
    if name in RESERVED_NAMES:
        raise InvalidRequest(f"client name {name!r} is the broker's own key and has every permission whatever"
                             " the policy says: pick another name", "BadRequest")
    if not NAME_PATTERN.fullmatch(role or ""):
        raise InvalidRequest(f"role {role!r}: name a role of the broker's policy (letters, digits, . _ @ -)",
                             "BadRequest")


def is_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS


def config_text(endpoint: str, broker_public_key: str, secret_key_file: str, name: str, role: str) -> str:
    header = (f"# Zerorun client config for {name} (role {role} in the broker's policy), written by\n"
              "# `zerorun clients create`. Paths are relative to this file. Use it with\n"
              "# `zerorun -c client.yaml ...` or ZERORUN_CONFIG=/path/to/client.yaml.\n")
    body = {"endpoint": endpoint, "broker_public_key": broker_public_key, "client_key_file": secret_key_file}
    return configtext.write(body, header)


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def create_client(admin: Client, name: str, role: str, out_dir: str | os.PathLike, endpoint: str = "",
                  request_timeout: float = 10.0) -> CreatedClient:
    """Keypair in ``out_dir`` (0700; files 0600), the public key added as client ``name``, then
    ``client.yaml``; raises ZerorunError (and leaves nothing behind) when any step is refused."""
    check_name(name, role)
    if admin.config.insecure:
        raise InvalidRequest("this broker runs --insecure: there are no client keys to create", "BadRequest")
    endpoint = endpoint or admin.config.endpoint
    try:  # a client.yaml no client could use was written, and the key registered, before this
        check_endpoints(endpoint)
    except ConfigError as exc:
        raise InvalidRequest(f"--endpoint: {exc}", "BadRequest") from None
    out = Path(out_dir).expanduser()
    secret_path = out / (name + keyfiles.SECRET_SUFFIX)
    public_path = out / (name + keyfiles.PUBLIC_SUFFIX)
    config_path = out / CONFIG_NAME
    if out.exists() and not out.is_dir():
        raise InvalidRequest(f"--out {out} is not a directory", "BadRequest")
    existing = [str(p) for p in (secret_path, public_path, config_path) if p.exists()]
    if existing:
        raise InvalidRequest(f"refusing to overwrite {', '.join(existing)}: choose an empty --out directory",
                             "Conflict")
    if out.is_dir() and any(out.iterdir()):  # --out ~ or --out /tmp: a secret key among others' files, not 0700
        raise InvalidRequest(f"refusing to write into {out}, which is not empty: choose an empty --out directory",
                             "Conflict")
    for key in admin.keys():  # one name, one client: the policy binds roles to names
        if key.kind == "client" and key.name == name:
            raise InvalidRequest(f"a client named {name!r} exists already ({key.fingerprint}, {key.state}): pick"
                                 f" another name, or `zerorun keys delete {key.fingerprint}` first", "Conflict")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        public_path, secret_path = keyfiles.create_keypair(out, name)
    except OSError as exc:  # a file, a path under a file, a place not writable: before anything is registered
        for path in (secret_path, public_path):
            if path.is_file():
                path.unlink()
        raise InvalidRequest(f"cannot write the key files in --out {out}: {exc.strerror}", "BadRequest") from None
    os.chmod(public_path, 0o600)
    public, _secret = keyfiles.load_secret(secret_path)
    try:
        view = admin.add_key("client", name, public.decode())
        _write_new(config_path, config_text(endpoint, admin.config.broker_public_key.decode(),
                                            secret_path.name, name, role), 0o600)
    except BaseException:
        for path in (secret_path, public_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        raise
    created = CreatedClient(name, role, endpoint, view.fingerprint, config_path, secret_path, public_path,
                            role_in_effect=False)
    created.role_in_effect, created.role_seen, created.role_problem = _role_check(config_path, admin,
                                                                                  request_timeout)
    if is_loopback(endpoint):
        created.notes.append(f"the endpoint {endpoint} only reaches the broker from its own host: give"
                             " --endpoint tcp://BROKER-HOST:PORT for another machine (the broker must bind"
                             " its client socket there: --client-bind)")
    return created


def _role_check(config_path: Path, admin: Client, timeout: float) -> tuple[bool, str, str]:
    """Asks the broker as the new client (a ``ping`` needs the ``read`` permission): (the policy
    gives the name a role, that role when the broker's answer names it, the refusal)."""
    try:
        config = ClientConfig.load(config_path)
    except ZerorunError as exc:
        return False, "", str(exc)
    # The written endpoint may be one only other machines reach: ask where the admin does.
    config = ClientConfig(admin.config.endpoint, config.broker_public_key, config.public_key, config.secret_key)
    try:
        with Client(config, timeout=min(timeout, 5.0)) as client:
            client.ping()
    except ZerorunError as exc:
        named = re.search(r"\(role ([^)]+)\)", str(exc))
        return named is not None, named.group(1) if named else "", str(exc)
    return True, "", ""
