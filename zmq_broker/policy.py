"""Who may do what: roles from a YAML policy file, default deny.

    roles:
      operator:
        allow: [read, run, cancel]        # permissions, or "*"
        documents: ["RunShellScript", "App-*"]   # fnmatch patterns; absent: any document
        targets: ["tag:role=web", "tag:env=dev*"]  # every target of a command must match one
      readonly:
        allow: [read]
    clients:                              # client key name -> role
      ci-bot: operator

Permissions: ``read`` (instances, commands, output, documents, key list), ``run`` (send),
``cancel``, ``documents`` (create, update, delete, set default), ``keys`` (accept, reject,
revoke, delete, add), ``exec`` (interactive exec and file transfer on one instance, as the
Ansible connection plugin does; a role's ``targets`` patterns are matched against
``instance:<id>``). The broker's own ``admin`` key always has every permission, so an operator
cannot lock themselves out; ``admin`` and ``readonly`` roles exist even without a file.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BrokerError

log = logging.getLogger("zerorun.broker.policy")

PERMISSIONS = ("read", "run", "cancel", "documents", "keys", "exec")


class PolicyError(BrokerError):
    """The policy file cannot be used; the message names the file and what is wrong."""

    def __init__(self, message: str):
        super().__init__("InvalidPolicy", message)


@dataclass(frozen=True)
class Role:
    name: str
    allow: frozenset[str]
    documents: tuple[str, ...] = ()  # empty: any
    targets: tuple[str, ...] = ()  # empty: any

    def permits(self, permission: str) -> bool:
        return "*" in self.allow or permission in self.allow


BUILTIN_ROLES = {
    "admin": Role("admin", frozenset({"*"})),
    "readonly": Role("readonly", frozenset({"read"})),
}


@dataclass
class Policy:
    roles: dict[str, Role] = field(default_factory=lambda: dict(BUILTIN_ROLES))
    clients: dict[str, str] = field(default_factory=dict)

    def role_of(self, client_name: str) -> Role | None:
        if client_name == "admin":
            return BUILTIN_ROLES["admin"]
        role_name = self.clients.get(client_name)
        return self.roles.get(role_name) if role_name else None

    def check(self, client_name: str, permission: str, document: str | None = None,
              targets: list[str] | None = None) -> str | None:
        """None when allowed, else the reason, naming what is missing."""
        role = self.role_of(client_name)
        if role is None:
            return f"client {client_name!r} has no role in the broker policy (default deny)"
        if not role.permits(permission):
            return f"client {client_name!r} (role {role.name}) lacks permission {permission!r}"
        if document is not None and role.documents and not any(
                fnmatch.fnmatchcase(document, p) for p in role.documents):
            return f"client {client_name!r} (role {role.name}) may not run document {document!r}"
        if targets is not None and role.targets:
            for target in targets:
                if not any(fnmatch.fnmatchcase(target, p) for p in role.targets):
                    return f"client {client_name!r} (role {role.name}) may not target {target!r}"
        return None


def load_policy(path: Path | None) -> Policy:
    if path is None or not path.exists():
        return Policy()
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot load policy {path}: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise PolicyError(f"policy {path} must be a mapping with roles: and clients:")
    roles = dict(BUILTIN_ROLES)
    for name, spec in (data.get("roles") or {}).items():
        roles[str(name)] = _role(str(name), spec, path)
    clients = {}
    for client, role in (data.get("clients") or {}).items():
        if str(role) not in roles:
            raise PolicyError(f"policy {path}: client {client!r} has unknown role {role!r}")
        clients[str(client)] = str(role)
    unknown = set(data) - {"roles", "clients"}
    if unknown:
        raise PolicyError(f"policy {path}: unknown section(s) {sorted(unknown)}")
    return Policy(roles, clients)


def _role(name: str, spec: Any, path: Path) -> Role:
    if not isinstance(spec, dict):
        raise PolicyError(f"policy {path}: role {name!r} must be a mapping")
    allow = spec.get("allow") or []
    if isinstance(allow, str):
        allow = [allow]
    bad = [p for p in allow if p != "*" and p not in PERMISSIONS]
    if bad:
        raise PolicyError(f"policy {path}: role {name!r} has unknown permission(s) {bad}; "
                          f"known: {', '.join(PERMISSIONS)}, *")
    return Role(name, frozenset(map(str, allow)), tuple(map(str, spec.get("documents") or ())),
                tuple(map(str, spec.get("targets") or ())))


class PolicyFile:
    """The policy, reloaded when its file changes or on SIGHUP; a bad file keeps the old one."""

    def __init__(self, path: Path | None):
        self.path = path
        self._mtime = self._stat()
        self.policy = load_policy(path)

    def _stat(self) -> float:
        try:
            return os.stat(self.path).st_mtime if self.path else 0.0
        except OSError:
            return 0.0

    def reload_if_changed(self, force: bool = False) -> bool:
        mtime = self._stat()
        if not force and mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.policy = load_policy(self.path)
        except PolicyError as exc:
            log.error("%s; keeping the previous policy", exc)
            return False
        log.info("policy reloaded from %s", self.path)
        return True
