"""Who may do what: roles from a YAML policy file, default deny, with a strict schema.

    roles:
      operator:
        allow: [read, run, cancel]                  # permissions, or ["*"]
        documents: ["RunShellScript", "App-*"]      # document name patterns; ["*"]: any
        targets: ["tag:role=web", "tag:env=dev*"]   # scope: every instance reached must match one
                                                    # (tags and instance ids only: never fact:)
        run_as: [deploy, "app-*"]                   # users its steps may run as (default: root only)
        webhook_urls: ["https://hooks.example.com/*"]  # raw --notify URLs (default: named webhooks only)
        forward: ["5432", "db.internal:5432"]       # destinations of port forwarding (default none)
    clients:                                        # client name -> role
      ci-bot: operator

Strict, so that a typo never widens a role: unknown keys anywhere are refused (``target:`` is
not ``targets:``), every value must be a list (``documents: "App-*"`` is refused, not read as
five one-letter patterns), a missing or empty list means *nothing* (write ``["*"]`` for any),
and unknown permissions, unknown roles and malformed patterns are refused with the file and the
place named. The broker keeps its last good policy when a file fails to load and says so
(``zerorun ping``, the audit log, a metric); ``zerorun policy check FILE`` checks a file offline.

Permissions:

- ``read``: instances, commands and their output, documents, the key list (within the scope);
- ``run``: send commands (documents matching ``documents``; a local document file is the name
  ``$LOCAL``); ``cancel``: cancel commands;
- ``documents``: create, update, set the default version of, and delete documents whose names
  match ``documents``;
- ``keys``: accept, reject, revoke, delete, add and replace *agent* keys (client keys are managed
  by the broker's admin key alone), and create and revoke enrolment tokens (a restricted role:
  only those that enrol instances into its scope, the only ones it lists). Accepting a pending
  key gives a new instance the tags its agent proposed (shown by ``keys list``); a token or
  ``keys add --tag`` gives the tags it names (``keys add --tag`` needs ``tags`` too). A role with
  a restricted scope manages only the keys of instances inside it, and may only give tags that
  keep the instance inside it;
- ``tags``: set, unset, approve and reject the tags of instances in the scope, never moving one
  out of it (the broker owns tags; an agent only proposes them, and its proposal waits for
  ``zerorun tags approve``);
- ``exec``: interactive exec and file transfer on one instance (the Ansible connection plugin).
  This is root on every instance in the scope: it cannot be narrowed by path or command.
- ``session``: an interactive shell (or one command in a terminal) on an instance in the scope:
  as root, like ``exec``.
- ``forward``: port forwarding through an instance in the scope (``zerorun forward``, ``zerorun
  proxy``), to the destinations in the role's ``forward`` list only: ``PORT`` (the instance
  itself), ``HOST:PORT`` (a host as reached from the instance; shell wildcards, matched against
  the host as the client wrote it), a port may be ``*`` or a range ``8000-8099``. Empty: none.

What a ``run`` may ask for besides the document:

- ``run_as``: user name patterns its steps may run as (``send --run-as``, a step's ``runAs``).
  A step that names no user runs as the agent's own user, which the policy calls ``root``. A
  role without ``run_as`` may run as ``root`` only (as before run-as existed); one that lists
  users may run as exactly those (add ``root`` to keep it); ``["*"]``: any user.
- ``webhook_urls``: URL patterns a role may give to ``send --notify`` as raw URLs. Every role
  that may run may use the webhooks the broker configures by name (``webhooks:`` in its config);
  raw URLs only where a pattern here matches (none by default: no role points the broker at an
  address of its choosing unless the policy says so).

The broker's own admin key (the one it generated) always has every permission, so an operator
cannot lock themselves out; no other key can be called ``admin``. The built-in ``readonly`` role
reads everything.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import msgspec

from .scope import Scope, ScopeError
from .yamltext import yaml_problem

PERMISSIONS = ("read", "run", "cancel", "documents", "keys", "tags", "exec", "session", "forward")
Permission = Literal["read", "run", "cancel", "documents", "keys", "tags", "exec", "session", "forward", "*"]
LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")
"""How a forward names the instance itself (a rule without a host allows these only)."""
RESERVED_ROLES = ("admin",)
ROOT = "root"  # how the policy names the agent's own user (a step without a run-as user)


class PolicyError(ValueError):
    """The policy cannot be used; the message names the file and what is wrong."""


class RoleSpec(msgspec.Struct, forbid_unknown_fields=True):
    allow: list[Permission] = []
    documents: list[str] = []
    targets: list[str] = []
    run_as: Union[list[str], None] = None  # None (absent): root only
    webhook_urls: list[str] = []
    forward: list[str] = []


class PolicySpec(msgspec.Struct, forbid_unknown_fields=True):
    roles: dict[str, object] = {}  # each a RoleSpec, converted one by one to name the role in errors
    clients: dict[str, str] = {}


@dataclass(frozen=True)
class ForwardRule:
    """One destination a role may forward to: a host pattern ("" for the instance itself) and a
    port range."""

    host: str
    low: int
    high: int

    def allows(self, host: str, port: int) -> bool:
        if not self.low <= port <= self.high:
            return False
        host = host.lower()
        if not self.host:
            return host in LOCAL_HOSTS
        return fnmatch.fnmatchcase(host, self.host)

    def __str__(self) -> str:
        ports = "*" if (self.low, self.high) == (1, 65535) else (
            str(self.low) if self.low == self.high else f"{self.low}-{self.high}")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{ports}" if self.host else ports


def parse_forward_rule(text: str) -> ForwardRule:
    """``PORT``, ``HOST:PORT``, ``[IPV6]:PORT``; a port is a number, ``LOW-HIGH`` or ``*``;
    ``*`` alone is any host and any port. ValueError when malformed."""
    text = str(text).strip()
    if text == "*":
        return ForwardRule("*", 1, 65535)
    host, sep, ports = text.rpartition(":")
    if sep and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif sep and ":" in host:
        raise ValueError(f"forward destination {text!r}: write an IPv6 address in brackets, [::1]:22")
    host = host.strip().lower()
    if sep and not host:
        raise ValueError(f"forward destination {text!r}: empty host")
    if host in ("localhost", "127.0.0.1", "::1"):
        host = ""
    if host and not all(c.isalnum() or c in ".-_:*?[]!" for c in host):
        raise ValueError(f"forward destination {text!r}: not a host name, address or pattern")
    ports = ports.strip()
    if ports == "*":
        return ForwardRule(host, 1, 65535)
    low_text, dash, high_text = ports.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise ValueError(f"forward destination {text!r}: expected PORT, HOST:PORT, a port range LOW-HIGH "
                         "or * for the port") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"forward destination {text!r}: ports are 1-65535, low to high")
    return ForwardRule(host, low, high)


@dataclass(frozen=True)
class Role:
    name: str
    allow: frozenset[str]
    documents: tuple[str, ...] = ()  # empty: none
    scope: Scope = Scope((), everything=False)  # which instances it may reach
    run_as: tuple[str, ...] = (ROOT,)  # user name patterns its steps may run as
    webhook_urls: tuple[str, ...] = ()  # URL patterns it may give as raw --notify URLs
    forward: tuple[ForwardRule, ...] = ()  # destinations of port forwarding; empty: none

    def permits(self, permission: str) -> bool:
        return "*" in self.allow or permission in self.allow

    def may_use_document(self, document: str) -> bool:
        # "*" first: each fnmatchcase is a microsecond, and the checks run for every command
        return "*" in self.documents or any(fnmatch.fnmatchcase(document, p) for p in self.documents)

    def may_run_as(self, user: str) -> bool:
        """``user`` "" is a step that names none: the agent's own user, ``root`` to the policy."""
        return "*" in self.run_as or any(fnmatch.fnmatchcase(user or ROOT, p) for p in self.run_as)

    def may_notify_url(self, url: str) -> bool:
        return any(fnmatch.fnmatchcase(url, p) for p in self.webhook_urls)


    def may_forward(self, host: str, port: int) -> bool:
        return any(rule.allows(host, port) for rule in self.forward)


ADMIN = Role("admin", frozenset({"*"}), ("*",), Scope.parse(["*"]), run_as=("*",), webhook_urls=("*",),
             forward=(ForwardRule("*", 1, 65535),))
BUILTIN_ROLES = {"readonly": Role("readonly", frozenset({"read"}), ("*",), Scope.parse(["*"]))}


@dataclass
class Policy:
    roles: dict[str, Role] = field(default_factory=lambda: dict(BUILTIN_ROLES))
    clients: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of the file's text ("" without a file)

    def role_of(self, client_name: str) -> Role | None:
        role_name = self.clients.get(client_name)
        return self.roles.get(role_name) if role_name else None

    def check(self, client_name: str, role: Role | None, permission: str, document: str | None = None) -> str | None:
        """None when ``role`` allows the operation (and the document), else the reason, naming
        what is missing. Target scopes are checked against resolved instances, by the caller."""
        if role is None:
            return f"client {client_name!r} has no role in the broker policy (default deny)"
        if not role.permits(permission):
            return f"client {client_name!r} (role {role.name}) lacks permission {permission!r}"
        if document is not None and not role.may_use_document(document):
            if document == "$LOCAL":
                return (f"client {client_name!r} (role {role.name}) may not send a local document file "
                        "(its role's documents must match '$LOCAL')")
            return f"client {client_name!r} (role {role.name}) may not run document {document!r}"
        return None


def parse_policy(text: str, where: str = "policy") -> Policy:
    """A policy from YAML text; PolicyError naming ``where`` and the place of the first problem."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{where}: not valid YAML: {yaml_problem(exc)}") from None
    if data is None:
        data = {}
    try:
        spec = msgspec.convert(data, PolicySpec, strict=True)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{where}: {_readable(exc)}") from None
    roles = dict(BUILTIN_ROLES)
    for name, raw in spec.roles.items():
        try:
            role = msgspec.convert(raw, RoleSpec, strict=True)
        except msgspec.ValidationError as exc:
            raise PolicyError(f"{where}: {_readable(exc, f'roles.{name}')}") from None
        if name in RESERVED_ROLES:
            raise PolicyError(f"{where}: role {name!r} is reserved for the broker's own admin key")
        try:
            scope = Scope.parse(role.targets, empty_means_everything=False)
        except ScopeError as exc:
            raise PolicyError(f"{where}: role {name!r}: {exc}") from None
        for pattern in role.webhook_urls:
            if not pattern.startswith(("http://", "https://")):
                raise PolicyError(f"{where}: role {name!r}: webhook_urls pattern {pattern!r} must start with "
                                  "http:// or https://")
        run_as = (ROOT,) if role.run_as is None else tuple(role.run_as)
        try:
            forward = tuple(parse_forward_rule(r) for r in role.forward)
        except ValueError as exc:
            raise PolicyError(f"{where}: role {name!r}: {exc}") from None
        roles[name] = Role(name, frozenset(role.allow), tuple(role.documents), scope, run_as=run_as,
                           webhook_urls=tuple(role.webhook_urls), forward=forward)
    for client, role_name in spec.clients.items():
        if client == "admin":
            raise PolicyError(f"{where}: the client name 'admin' is the broker's own admin key; give other "
                              "clients other names")
        if role_name not in roles:
            raise PolicyError(f"{where}: client {client!r} has unknown role {role_name!r} "
                              f"(defined: {', '.join(sorted(roles))})")
    return Policy(roles, dict(spec.clients), hashlib.sha256(text.encode()).hexdigest())


def load_policy(path: Path | None) -> Policy:
    if path is None or not path.exists():
        return Policy()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # a file saved as Latin-1: was a traceback, and a reload failure nobody saw
        raise PolicyError(f"policy {path} is not UTF-8 text (byte {exc.start})") from None
    return parse_policy(text, f"policy {path}")


def warnings(policy: Policy) -> list[str]:
    """What a valid policy grants that an operator should know it grants."""
    out = []
    for role in sorted(policy.roles.values(), key=lambda r: r.name):
        if role.name in BUILTIN_ROLES:
            continue
        if role.permits("exec"):
            out.append(f"role {role.name!r} has exec: that is root on every instance in its scope "
                       f"({role.scope}), not narrowable by path or command")
        if role.permits("tags") and "*" not in role.allow:
            out.append(f"role {role.name!r} has tags: it decides which targets and scopes reach the instances in "
                       f"its scope ({role.scope})")
        if role.permits("session"):
            out.append(f"role {role.name!r} has session: an interactive shell as root on every instance in its "
                       f"scope ({role.scope})")
        if role.permits("forward"):
            if not role.forward:
                out.append(f"role {role.name!r} has forward but no forward destinations (forward: [] means none)")
            elif any(rule.host == "*" for rule in role.forward):
                out.append(f"role {role.name!r} may forward to any host its instances reach "
                           f"({', '.join(map(str, role.forward))})")
        if "*" in role.allow:
            out.append(f"role {role.name!r} has every permission (allow: ['*'])")
        if role.permits("run") and role.may_use_document("$LOCAL"):
            out.append(f"role {role.name!r} may send local document files: any script, in its scope")
        if not role.documents and (role.permits("run") or role.permits("documents")):
            out.append(f"role {role.name!r} may run or change no document (documents: [] means none)")
        if role.permits("run") and role.run_as != (ROOT,):
            if not role.run_as:
                out.append(f"role {role.name!r} may run as no user (run_as: []): it cannot run anything")
            elif any(fnmatch.fnmatchcase(ROOT, p) for p in role.run_as) and "*" in role.run_as:
                out.append(f"role {role.name!r} may run steps as any user (run_as: ['*'])")
        if role.webhook_urls:
            out.append(f"role {role.name!r} may point the broker's webhooks at URLs matching "
                       f"{', '.join(role.webhook_urls)}")
        if not role.scope.patterns and not role.scope.everything:
            out.append(f"role {role.name!r} reaches no instance (targets: [] means none)")
    used = set(policy.clients.values())
    for name in sorted(set(policy.roles) - used - set(BUILTIN_ROLES)):
        out.append(f"role {name!r} is given to no client")
    return out


def _readable(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec's message with the place first, in the policy's own words (roles.ops.allow[0])."""
    message, _, place = str(exc).partition(" - at `$")
    place = prefix + place.rstrip("`")
    return f"{place.lstrip('.')}: {message}" if place else message
