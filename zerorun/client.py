"""Client library: what the CLI and the Ansible plugins use to talk to the broker.

One DEALER socket with CurveZMQ, request/reply with per-request ids and a deadline on every
wait, so a caller never hangs on a dead broker. A key the broker does not accept is reported as
``Unauthorized`` (seen through the socket monitor's handshake events), not as a silent timeout.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Any, Iterable

import zmq

from . import configtext, keys, protocol, targets as targeting
import msgspec  # after .protocol, which imports it without typing_extensions (a tenth of the CLI's start)
from .zmqutil import close_monitor, connect_monitored, monitor_socket, recv_monitor_message
from .protocol import CommandView, DocumentInfo, InstanceView, KeyView

ENV_CONFIG = "ZERORUN_CONFIG"
ENV_ENDPOINT = "ZERORUN_ENDPOINT"
ENV_BROKER_KEY = "ZERORUN_BROKER_KEY"
ENV_CLIENT_KEY_FILE = "ZERORUN_CLIENT_KEY_FILE"
ENV_CLIENT_SECRET_KEY = "ZERORUN_CLIENT_SECRET_KEY"
"""The client's secret key itself (z85, or a whole .key_secret file's text), when no key file is
given: how AWX injects it (files that AWX writes are group-readable, which a key file may not be)."""
DEFAULT_CONFIG_PATHS = ("~/.config/zerorun/client.yaml", "/etc/zerorun/client.yaml")
DEFAULT_TIMEOUT = 10.0


class ZerorunError(Exception):
    """Base of every error a client reports; ``code`` is machine-readable."""

    code = "Error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(ZerorunError):
    """Client settings are missing or unusable. ``missing`` names the setting that was not given
    at all ("endpoint", "broker_key", "client_key_file"), so that a caller (the CLI, a plugin) can
    say how to give it in its own terms; "" when a given setting could not be used."""

    code = "ConfigError"

    def __init__(self, message: str, code: str | None = None, missing: str = ""):
        super().__init__(message, code)
        self.missing = missing


class BrokerUnavailable(ZerorunError):
    code = "BrokerUnavailable"


class Unauthorized(ZerorunError):
    code = "Unauthorized"


class RequestFailed(ZerorunError):
    """The broker answered with an error (unknown document, bad parameter, no match...)."""


class InvalidRequest(RequestFailed):
    """Refused by this client before anything was sent (the broker would refuse it too)."""


class DocumentFileError(ZerorunError):
    """A local document file that cannot be read: one line that names it and says why."""

    code = "DocumentFileError"


def read_document_file(path: str, label: str = "") -> str:
    """A local document file's text, exactly ("-": stdin; CRLF kept, so that its hash is the
    file's), for the CLI and the Ansible plugins alike; DocumentFileError naming ``label``
    (default: the path) and what is wrong: missing, a directory, unreadable, not UTF-8."""
    label = label or path
    try:
        if path == "-":
            import sys

            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, encoding="utf-8", newline="") as handle:  # newline="": the exact bytes
            return handle.read()
    except OSError as exc:
        raise DocumentFileError(f"cannot read {label}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DocumentFileError(f"{label} is not UTF-8 text (byte {exc.start})") from None


MAX_EXECUTION_TIMEOUT = 172800
"""Seconds a step may run at most: SSM's limit, and the document renderer's (48 hours)."""
MAX_DELIVERY_TIMEOUT = 30 * 86400
"""The delivery timeout's upper bound (SSM's TimeoutSeconds and the broker's: 30 days)."""


def _rate(value: str | int, what: str, minimum: int) -> None:
    text = str(value).strip()
    low = "1" if minimum else "0"
    allowed = f"a whole number >= {low} or a percentage from {low}% to 100%"
    try:
        if text.endswith("%"):
            number = float(text[:-1])
            ok = (number > 0 if minimum else number >= 0) and number <= 100
        else:
            ok = int(text) >= minimum
    except ValueError:
        ok = False
    if not ok:
        raise InvalidRequest(f"{what} must be {allowed}, not {text!r}", "InvalidRate")


def check_send_limits(*, timeout_seconds: int | None = None, execution_timeout: int | None = None,
                      max_concurrency: str | int | None = None, max_errors: str | int | None = None,
                      first: int | None = None) -> None:
    """Refuses out-of-range limits before anything is sent, naming the allowed range (SSM refuses
    them too; the broker checks again). None or "" mean "not given": the default applies; a
    given 0 is out of range for the timeouts and for max_concurrency."""
    if timeout_seconds is not None and not 1 <= int(timeout_seconds) <= MAX_DELIVERY_TIMEOUT:
        raise InvalidRequest(f"the delivery timeout must be from 1 to {MAX_DELIVERY_TIMEOUT} seconds (30 days),"
                             f" not {timeout_seconds}", "InvalidTimeout")
    if execution_timeout is not None and not 1 <= int(execution_timeout) <= MAX_EXECUTION_TIMEOUT:
        raise InvalidRequest(f"the execution timeout must be from 1 to {MAX_EXECUTION_TIMEOUT} seconds"
                             f" (48 hours), not {execution_timeout}", "InvalidTimeout")
    if max_concurrency is not None and str(max_concurrency).strip():
        _rate(max_concurrency, "max_concurrency", 1)
    if max_errors is not None and str(max_errors).strip():
        _rate(max_errors, "max_errors", 0)
    if first is not None and int(first) < 0:
        raise InvalidRequest(f"first (the canary count) must be 0 (off) or more, not {first}", "BadRequest")


def explicit_instance_targets(targets: list[str | protocol.Target],
                              instance_ids: list[str]) -> tuple[list[str | protocol.Target], list[str]]:
    """One rule for instances named explicitly, whichever the spelling: a lone ``instance:ID,...``
    target is the same as ``instance_ids``, so an id the broker does not know gets an invocation
    that ends Undeliverable ("unknown instance") instead of failing the whole request with
    NoInstancesInTag. Instance targets combined with other targets stay filters (AND-ed)."""
    if instance_ids or len(targets) != 1:
        return targets, instance_ids
    from .targets import TargetError, parse_target

    try:
        target = targets[0] if isinstance(targets[0], protocol.Target) else parse_target(targets[0])
    except TargetError:
        return targets, instance_ids  # the broker names the problem
    if target.kind != "instance":
        return targets, instance_ids
    return [], list(target.values)


class ClientConfig(msgspec.Struct, frozen=True):
    """How to reach the broker(s). A Struct, not a dataclass: ``dataclasses`` imports ``inspect``
    and ``ast``, a tenth of the CLI's start."""

    endpoint: str  # one endpoint, or several brokers of a cluster separated by commas
    broker_public_key: bytes  # z85
    public_key: bytes  # z85
    secret_key: bytes  # z85
    insecure: bool = False

    @property
    def endpoints(self) -> list[str]:
        """The brokers to try, in order (a cluster's brokers answer the same)."""
        return [e.strip() for e in self.endpoint.split(",") if e.strip()]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClientConfig":
        return cls.from_options(config_file=str(path))

    @classmethod
    def from_options(cls, config_file: str | None = None, endpoint: str | None = None,
                     broker_key: str | None = None, client_key_file: str | None = None,
                     insecure: bool | None = None) -> "ClientConfig":
        """Explicit options beat environment variables, which beat the config file."""
        config_file = config_file or os.environ.get(ENV_CONFIG)
        data: dict[str, Any] = {}
        base = os.getcwd()
        if not config_file:
            for candidate in DEFAULT_CONFIG_PATHS:
                if os.path.exists(os.path.expanduser(candidate)):
                    config_file = os.path.expanduser(candidate)
                    break
        if config_file:
            data = _read_config(config_file)
            base = os.path.dirname(os.path.realpath(os.path.expanduser(config_file)))
        endpoint = endpoint or os.environ.get(ENV_ENDPOINT) or data.get("endpoint") or data.get("endpoints")
        if isinstance(endpoint, (list, tuple)):  # a YAML list of a cluster's brokers
            endpoint = ",".join(str(e) for e in endpoint)
        broker_key = broker_key or os.environ.get(ENV_BROKER_KEY) or data.get("broker_public_key")
        client_key_file = (client_key_file or os.environ.get(ENV_CLIENT_KEY_FILE)
                           or data.get("client_key_file"))
        if insecure is None:
            insecure = bool(data.get("insecure", False))
        # a setting missing from a config file that was given: name the file, and what it has
        # instead (``endpiont:`` was "no broker endpoint: give a client config file", given)
        unknown = sorted(str(key) for key in data if key not in _CONFIG_KEYS)
        in_file = (f" (client config {config_file}" + (f"; unknown key(s) there: {', '.join(unknown)}" if unknown
                                                        else "") + ")") if config_file else ""
        if not endpoint:
            raise ConfigError(("no broker endpoint: set endpoint in the config or " if config_file else
                               f"no broker endpoint: give a client config file (-c FILE or {ENV_CONFIG}) or set ")
                              + ENV_ENDPOINT + in_file, missing="endpoint")
        check_endpoints(endpoint)
        if insecure:
            return cls(endpoint, b"", b"", b"", insecure=True)
        if not broker_key:
            raise ConfigError(f"no broker public key: set broker_public_key in the config or {ENV_BROKER_KEY}"
                              + in_file, missing="broker_key")
        inline_secret = os.environ.get(ENV_CLIENT_SECRET_KEY, "") if not client_key_file else ""
        if not client_key_file and not inline_secret.strip():
            raise ConfigError(f"no client key: set client_key_file in the config, {ENV_CLIENT_KEY_FILE} or"
                              f" {ENV_CLIENT_SECRET_KEY}" + in_file, missing="client_key_file")
        try:
            broker_public = _key_or_file(broker_key, base)
            if client_key_file:
                public, secret = keys.load_secret(_resolve(client_key_file, base))
            else:
                public, secret = _inline_secret_key(inline_secret)
        except keys.KeyFileError as exc:
            raise ConfigError(str(exc)) from None
        return cls(endpoint, broker_public, public, secret)


def check_endpoints(endpoint: str) -> None:
    """Each broker of ``endpoint`` (commas between a cluster's) as libzmq takes it: a typo was a
    ZMQError traceback ("Invalid argument") when connecting, or later, when failing over to
    it; a port past 65535 waited for an answer that could never come."""
    entries = [e.strip() for e in endpoint.split(",") if e.strip()]
    if not entries:
        raise ConfigError(f"broker endpoint {endpoint!r} names no broker: use tcp://HOST:PORT")
    for entry in entries:
        scheme, _, rest = entry.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme == "ipc" and rest:
            continue
        if not (scheme == "tcp" and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"broker endpoint {entry!r} is not tcp://HOST:PORT (port 1-65535) or ipc://PATH")


def _inline_secret_key(text: str) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key given as text: the z85 key, or a .key_secret file's text."""
    import re

    found = re.search(r'secret-key\s*=\s*"([^"]+)"', text)
    value = (found.group(1) if found else text).strip()
    try:
        secret = keys.parse_public_key(value)  # the same z85 check for both halves of a keypair
        return zmq.curve_public(secret), secret
    except (keys.KeyFileError, zmq.ZMQError, ValueError):
        raise keys.KeyFileError(f"{ENV_CLIENT_SECRET_KEY} holds no valid secret key (40 z85 characters, or the"
                                " text of a .key_secret file)") from None


# Paths here are strings (``os.path``): ``pathlib`` (with ``urllib.parse`` and ``ipaddress``) was
# imported by the CLI for these lines only.

def _resolve(path: str, base: str) -> str:
    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.join(base, p)


def _key_or_file(value: str, base: str) -> bytes:
    if len(value) == 40 and not os.path.exists(value):
        return keys.parse_public_key(value)
    return keys.load_public(_resolve(value, base))


_CONFIG_KEYS = frozenset(configtext.TEXT_KEYS + ("endpoints", "insecure"))


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read client config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"client config {path} is not UTF-8 text") from None
    plain = configtext.read_plain(text)
    if plain:
        return plain
    import yaml  # only for a config that needs it

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        from .yamltext import yaml_problem

        raise ConfigError(f"client config {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"client config {path} must be a mapping")
    _check_types(data, path)
    return data


def _check_types(data: dict[str, Any], path: str) -> None:
    """YAML gives numbers, lists and nulls where text was meant (``broker_public_key: 1234``,
    ``insecure: "no"``, which is true): each is named here, instead of failing later as a
    traceback or, for ``insecure``, quietly turning CURVE off."""
    for key in ("endpoint", "broker_public_key", "client_key_file"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"client config {path}: {key} must be text, not {data[key]!r}")
    listed = data.get("endpoints")
    if "endpoints" in data and not (isinstance(listed, str) or isinstance(listed, list) and listed
                                    and all(isinstance(e, str) for e in listed)):
        raise ConfigError(f"client config {path}: endpoints must be a list of endpoints, not {listed!r}")
    if "insecure" in data and not isinstance(data["insecure"], bool):
        raise ConfigError(f"client config {path}: insecure must be true or false, not {data['insecure']!r}")


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


FAILOVER_EVENTS = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
RECONNECT_MAX_MS = 1000
"""The longest a client waits between reconnections to a broker that is gone."""
STORE_UNAVAILABLE = "StoreUnavailable"  # a broker's answer while its store's server is away


class _Unreachable(BrokerUnavailable):
    """The current broker refuses connections (it never had this request)."""


def request_frames(message: Any) -> list[bytes]:
    """``protocol.frames``, with what the encoder cannot carry named as the user's mistake."""
    try:
        frames = protocol.frames(message)
    except OverflowError:  # msgpack's integers are 64-bit: name the field, not the encoder
        raise _too_large(message) from None
    except UnicodeEncodeError:
        raise _not_utf8(message) from None
    if len(frames[1]) > protocol.MAX_MESSAGE_BYTES:  # the broker drops the connection: "no answer ... running?"
        raise InvalidRequest(f"the request is {len(frames[1])} bytes, more than the {protocol.MAX_MESSAGE_BYTES}"
                             " a message may have", "BadRequest")
    return frames


def _not_utf8(message: Any) -> InvalidRequest:
    """The error for a request with text that is not UTF-8: bytes of another encoding given as an
    argument (Python holds them as surrogates) were a UnicodeEncodeError traceback."""
    todo: list[tuple[str, Any]] = [(name, getattr(message, name)) for name in message.__struct_fields__]
    while todo:
        where, value = todo.pop(0)
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return InvalidRequest(f"{where}: {value!r} is not UTF-8 text", "BadRequest")
        elif isinstance(value, msgspec.Struct):
            todo += [(f"{where}.{name}", getattr(value, name)) for name in value.__struct_fields__]
        elif isinstance(value, dict):
            todo += [(where, key) for key in value] + [(f"{where}.{key}", item) for key, item in value.items()]
        elif isinstance(value, (list, tuple)):
            todo += [(where, item) for item in value]
    return InvalidRequest("the request holds text that is not UTF-8", "BadRequest")


def _too_large(message: Any) -> InvalidRequest:
    """The error for a request with a number msgpack cannot carry (``--first 10**20``, ``uses``):
    it was an OverflowError from the encoder, a traceback in the CLI."""
    fields = [f"{name}={value}" for name in message.__struct_fields__
              if isinstance(value := getattr(message, name), int) and not -2**63 <= value < 2**64]
    return InvalidRequest(f"{', '.join(fields) or 'a number'}: out of range for a request (64 bits)", "BadRequest")


def secure_broker_socket(sock: zmq.Socket, config: ClientConfig) -> None:
    """CURVE client settings for a socket to the broker's client endpoint (unless insecure)."""
    if not config.insecure:
        sock.curve_serverkey = config.broker_public_key
        sock.curve_publickey = config.public_key
        sock.curve_secretkey = config.secret_key


def handshake_error(event: int, config: ClientConfig) -> "ZerorunError":
    """The error for a failed CURVE handshake with the broker, seen on a socket monitor."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Unauthorized(
            f"the broker at {config.endpoint} refused this client's key "
            f"({keys.fingerprint(config.public_key)}): not an authorised client key")
    return BrokerUnavailable(
        f"security handshake with {config.endpoint} failed (wrong broker public key,"
        " or CURVE on one side only)")


class Client:
    """A connection to the broker's client endpoint. Reuse it; close it when done."""

    def __init__(self, config: ClientConfig, timeout: float = DEFAULT_TIMEOUT,
                 context: zmq.Context | None = None, via: str | None = None):
        """``via``: the ipc:// endpoint of a local multiplexer (zerorun.mux) that holds the
        CURVE connection to the broker for many clients; request ids then start at a random
        offset, which is how the multiplexer tells its clients' answers apart."""
        self.config = config
        self.timeout = timeout
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        self._socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._monitor: zmq.Socket | None = None
        if via is not None:
            self._rids = itertools.count((int.from_bytes(os.urandom(4), "big") >> 2) << 32)
            self._socket.setsockopt(zmq.RECONNECT_IVL, 10)
            self._socket.connect(via)
            return
        self._rids = itertools.count(1)
        # A client idle while its broker is down retries up to once a second, not ten times.
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        secure_broker_socket(self._socket, config)
        self._endpoints = config.endpoints
        self._current = 0
        self._handshaken = False  # with the current endpoint
        self._connections = 0  # handshakes so far: one more means a new connection (a broker restarted)
        self._disconnects = 0  # connections to the current broker that closed: the broker went away
        self._monitor = monitor_socket(self._socket, HANDSHAKE_FAILURES | FAILOVER_EVENTS)
        self._poller.register(self._monitor, zmq.POLLIN)
        connect_monitored(self._socket, self._monitor, self._endpoints[0])

    @property
    def endpoint(self) -> str:
        """The broker this client talks to now."""
        return self._endpoints[self._current] if self._monitor is not None else self.config.endpoint

    def _next_endpoint(self) -> None:
        """Moves to the next broker of the list (a cluster's brokers answer the same)."""
        self._socket.disconnect(self._endpoints[self._current])
        self._current = (self._current + 1) % len(self._endpoints)
        self._handshaken = False
        self._socket.connect(self._endpoints[self._current])

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._monitor is not None:
            close_monitor(self._socket, self._monitor)
        self._socket.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_monitor(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            event, endpoint = recv_monitor_message(self._monitor)
            if endpoint != self._endpoints[self._current] and endpoint in self._endpoints:
                continue  # a broker left before (still retried until libzmq hears of the disconnect)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
                self._connections += 1
            elif event == zmq.EVENT_DISCONNECTED and self._handshaken:
                # (before a handshake with the current broker: the one left in _next_endpoint)
                self._disconnects += 1
            elif event == zmq.EVENT_CONNECT_RETRIED:
                if not self._handshaken and len(self._endpoints) > 1:
                    raise _Unreachable(f"the broker at {self.endpoint} refuses connections")
            elif event & HANDSHAKE_FAILURES:
                raise handshake_error(event, self.config)

    def ever_connected(self) -> bool:
        """Whether a request may have reached the current broker (through a multiplexer: assumed)."""
        return self._monitor is None or not self._never_connected()

    def _never_connected(self) -> bool:
        """Whether the CURVE handshake with the current broker never succeeded: a request sent
        meanwhile is still queued in this socket (nothing is sent before the handshake), and goes
        with the connection when it is dropped."""
        try:
            self._check_monitor()
        except ZerorunError:  # refused or failed: not connected either
            pass
        return not self._handshaken

    def request(self, message: protocol.Request, timeout: float | None = None) -> Any:
        """Sends one request and returns the reply's data, or raises a ZerorunError. With several
        brokers, a broker that refuses connections is skipped at once, and one never connected to
        (no handshake) after the timeout; one that does not answer in time, or answers that its
        store is away (StoreUnavailable: cut off from PostgreSQL while the others are not), is
        skipped for requests that are safe to repeat (reads): a command is never sent twice
        because a broker was slow."""
        timeout = self.timeout if timeout is None else timeout
        tries = len(self._endpoints) if self._monitor is not None else 1
        repeatable = isinstance(message, protocol.SAFE_TO_REPEAT)
        for attempt in range(tries):
            rid = self._send_only(message)
            try:
                return self._receive_one({rid: None}, timeout, message if repeatable else None)[1]
            except _Unreachable:
                if attempt + 1 == tries:
                    raise BrokerUnavailable(f"no broker of {self.config.endpoint} accepts connections") from None
            except BrokerUnavailable:
                # a broker never reached (no handshake: a host that drops packets, a port that
                # takes connections and says nothing) never had the request: the next one may
                if attempt + 1 == tries or not (repeatable or self._never_connected()):
                    raise
            except RequestFailed as exc:
                if exc.code != STORE_UNAVAILABLE or attempt + 1 == tries or not repeatable:
                    raise
            self._next_endpoint()
        raise AssertionError("unreachable")

    # -- operations -------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return self.request(protocol.Ping())

    def instances(self, targets: Iterable[str] = (), include_offline: bool = True) -> list[InstanceView]:
        data = self.request(protocol.ListInstances(targets=_targets(targets), include_offline=include_offline))
        return protocol.convert(data, list[InstanceView])

    def send(self, document: str = "", parameters: dict[str, Any] | None = None,
             targets: Iterable[str] = (), instance_ids: Iterable[str] = (), *,
             document_version: str = "", document_hash: str = "", document_content: str = "",
             timeout_seconds: int = 0, execution_timeout: int = 0, max_concurrency: str | int = "",
             max_errors: str | int = "", comment: str = "", dry_run: bool = False,
             first: int = 0, wait: float = 0.0, run_as: str = "", notify: Iterable[str] = (),
             notify_invocations: bool = False) -> CommandView:
        """Sends a command; with ``wait`` > 0 the broker answers when it is terminal or after
        ``wait`` seconds (one round trip instead of send, then wait). Out-of-range limits raise
        InvalidRequest before anything is sent. ``run_as``: the user every step without its own
        runAs runs as; ``notify``: webhooks (names the broker configures, or URLs) told when the
        command ends (and each invocation, with ``notify_invocations``)."""
        check_send_limits(timeout_seconds=timeout_seconds or None, execution_timeout=execution_timeout or None,
                          max_concurrency=max_concurrency, max_errors=max_errors, first=first)
        targets, instance_ids = explicit_instance_targets(list(targets), list(instance_ids))
        data = self.request(protocol.SendCommand(
            document=document, document_version=document_version, document_hash=document_hash,
            document_content=document_content, parameters=dict(parameters or {}),
            targets=_targets(targets), instance_ids=list(instance_ids),
            timeout_seconds=int(timeout_seconds), execution_timeout=int(execution_timeout),
            max_concurrency=str(max_concurrency), max_errors=str(max_errors), comment=comment,
            dry_run=dry_run, first=int(first), wait=float(wait), run_as=run_as or "", notify=list(notify),
            notify_invocations=bool(notify_invocations)), timeout=self.timeout + max(0.0, wait))
        return protocol.convert(data, CommandView)

    def get_command(self, command_id: str, include_output: bool = True,
                    instance_ids: Iterable[str] = ()) -> CommandView:
        data = self.request(protocol.GetCommand(command_id=command_id, include_output=include_output,
                                                instance_ids=list(instance_ids)))
        return protocol.convert(data, CommandView)

    def wait(self, command_id: str, timeout: float | None = None, include_output: bool = True,
             on_progress: Any = None, poll_interval: float = 15.0,
             instance_ids: Iterable[str] = ()) -> CommandView:
        """Blocks until the command is terminal or ``timeout`` seconds passed (None: no limit).

        Returns the latest view either way; the caller checks ``view.status``. Long-polls the
        broker in slices so that a dead broker is noticed within one slice.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = poll_interval if deadline is None else max(0.0, deadline - time.monotonic())
            slice_ = min(poll_interval, remaining)
            data = self.request(protocol.WaitCommand(command_id=command_id, timeout=slice_,
                                                     include_output=include_output,
                                                     instance_ids=list(instance_ids)),
                                timeout=slice_ + self.timeout)
            view = protocol.convert(data, CommandView)
            if view.status in protocol.TERMINAL_STATUSES:
                return view
            if on_progress is not None:
                on_progress(view)
            if deadline is not None and time.monotonic() >= deadline:
                return view

    def follow(self, command_id: str, cursors: dict[str, int] | None = None,
               instance_ids: Iterable[str] = (), timeout: float = 10.0) -> protocol.OutputUpdate:
        """New output since ``cursors`` (pass back the returned cursors on the next call)."""
        data = self.request(protocol.FollowOutput(command_id=command_id, instance_ids=list(instance_ids),
                                                  cursors=dict(cursors or {}), timeout=timeout),
                            timeout=timeout + self.timeout)
        return protocol.convert(data, protocol.OutputUpdate)

    def output_slice(self, command_id: str, instance_id: str, stream: str = "stdout", offset: int = 0,
                     length: int = 1 << 20) -> protocol.OutputSlice:
        """Bytes of one invocation's whole output, from the broker's output store."""
        data = self.request(protocol.GetOutput(command_id=command_id, instance_id=instance_id, stream=stream,
                                               offset=int(offset), length=int(length)))
        return protocol.convert(data, protocol.OutputSlice)

    def stream_output(self, command_id: str, instance_id: str, stream: str, sink: Any,
                      chunk: int = 1 << 20, patience: float = 60.0) -> protocol.OutputSlice:
        """Writes one invocation's whole stdout or stderr to ``sink`` (a binary file), chunk by
        chunk, never whole in memory. While the broker is still reading it from the agent, waits
        for more (up to ``patience`` seconds without progress). Returns the last slice (its
        ``complete``, ``note``)."""
        offset = 0
        pause, stalled_since = 0.05, time.monotonic()
        while True:
            part = self.output_slice(command_id, instance_id, stream, offset, chunk)
            if part.data:
                _write_all(sink, part.data)
                offset += len(part.data)
                pause, stalled_since = 0.05, time.monotonic()
                continue
            if not part.pending or time.monotonic() - stalled_since > patience:
                return part
            time.sleep(pause)  # the broker is reading it from the agent now
            pause = min(1.0, pause * 2)

    def commands(self, limit: int = 50, status: str = "", document: str = "", since: float = 0.0,
                 before: float = 0.0, target: str = "", before_id: str = "") -> list[CommandView]:
        data = self.request(protocol.ListCommands(limit=limit, status=status, document=document,
                                                  since=since, before=before, target=target,
                                                  before_id=before_id))
        return protocol.convert(data, list[CommandView])

    def cancel(self, command_id: str, instance_ids: Iterable[str] = ()) -> CommandView:
        data = self.request(protocol.CancelCommand(command_id=command_id, instance_ids=list(instance_ids)))
        return protocol.convert(data, CommandView)

    def keys(self) -> list[KeyView]:
        return protocol.convert(self.request(protocol.ListKeys()), list[KeyView])

    def key_action(self, action: str, name: str, replacement: str = "") -> KeyView:
        """accept | reject | revoke | delete | replace (``replacement``: the new key's fingerprint or
        z85 public key)."""
        data = self.request(protocol.KeyAction(action=action, name=name, replacement=replacement))
        return protocol.convert(data, KeyView)

    def add_key(self, kind: str, name: str, public_key: str, tags: dict[str, str] | None = None) -> KeyView:
        """``tags``: an agent key's instance tags, pre-registered (permission ``tags`` too)."""
        data = self.request(protocol.AddKey(kind=kind, name=name, public_key=public_key, tags=dict(tags or {})))
        return protocol.convert(data, KeyView)

    # -- tags the broker owns, enrolment tokens --------------------------------------------------

    def tag_action(self, action: str, instance_id: str, tags: dict[str, str] | None = None,
                   keys: Iterable[str] = ()) -> protocol.TagsView:
        """set (``tags``) | unset (``keys``) | approve | reject (the agent's proposal)."""
        data = self.request(protocol.TagAction(action=action, instance_id=instance_id, tags=dict(tags or {}),
                                               keys=list(keys)))
        return protocol.convert(data, protocol.TagsView)

    def set_tags(self, instance_id: str, tags: dict[str, str]) -> protocol.TagsView:
        return self.tag_action("set", instance_id, tags)

    def unset_tags(self, instance_id: str, keys: Iterable[str]) -> protocol.TagsView:
        return self.tag_action("unset", instance_id, keys=keys)

    def approve_tags(self, instance_id: str) -> protocol.TagsView:
        return self.tag_action("approve", instance_id)

    def create_token(self, tags: dict[str, str] | None = None, uses: int = 1, expires_in: float = 3600.0,
                     instance_prefix: str = "", comment: str = "") -> protocol.TokenView:
        """An enrolment token; its secret (``token``) is in this answer only."""
        data = self.request(protocol.CreateToken(tags=dict(tags or {}), uses=int(uses), expires_in=float(expires_in),
                                                 instance_prefix=instance_prefix, comment=comment))
        return protocol.convert(data, protocol.TokenView)

    def tokens(self) -> list[protocol.TokenView]:
        return protocol.convert(self.request(protocol.ListTokens()), list[protocol.TokenView])

    def revoke_token(self, token_id: str) -> protocol.TokenView:
        return protocol.convert(self.request(protocol.RevokeToken(token_id=token_id)), protocol.TokenView)

    def documents(self) -> list[DocumentInfo]:
        return protocol.convert(self.request(protocol.ListDocuments()), list[DocumentInfo])

    def get_document(self, name: str, version: str | int = "") -> DocumentInfo:
        data = self.request(protocol.GetDocument(name=name, version=str(version)))
        return protocol.convert(data, DocumentInfo)

    def document_versions(self, name: str) -> list[DocumentInfo]:
        return protocol.convert(self.request(protocol.DocumentVersions(name=name)), list[DocumentInfo])

    def create_document(self, name: str, content: str) -> DocumentInfo:
        data = self.request(protocol.CreateDocument(name=name, content=content))
        return protocol.convert(data, DocumentInfo)

    def update_document(self, name: str, content: str, set_default: bool = False) -> DocumentInfo:
        data = self.request(protocol.UpdateDocument(name=name, content=content, set_default=set_default))
        return protocol.convert(data, DocumentInfo)

    def set_default_document_version(self, name: str, version: str | int) -> DocumentInfo:
        data = self.request(protocol.SetDefaultDocumentVersion(name=name, version=str(version)))
        return protocol.convert(data, DocumentInfo)

    def delete_document(self, name: str, version: str | int = "") -> None:
        self.request(protocol.DeleteDocument(name=name, version=str(version)))

    # -- interactive exec and file transfer (the Ansible connection plugin) ---------------------

    EXEC_DEFAULT_TIMEOUT = 3600.0  # the agent's default when no timeout is given
    FILE_WINDOW = 4  # chunks in flight during a transfer
    FILE_SLOW_TIMEOUT = 600.0  # open-fetch and commit hash the whole file on the instance

    def exec(self, instance_id: str, command: str, stdin: bytes = b"", timeout: float = 0.0,
             env: dict[str, str] | None = None) -> protocol.ExecReply:
        """Runs ``/bin/sh -c command`` on one online instance: exit code and raw stdout/stderr.

        ``timeout`` (seconds; 0: the agent's default of an hour) bounds the command; the broker
        answers ``Timeout`` a little later if the agent does not. Raises RequestFailed with code
        AgentUnavailable when the instance's agent is not connected."""
        stdin = bytes(stdin or b"")
        if len(stdin) > protocol.MAX_MESSAGE_BYTES - (1 << 20):
            raise RequestFailed("stdin too large for one exec request; transfer a file instead",
                                "BadRequest")
        wait = (timeout if timeout > 0 else self.EXEC_DEFAULT_TIMEOUT) + 15.0 + self.timeout
        data = self.request(protocol.Exec(instance_id=instance_id, command=command, stdin=stdin,
                                          timeout=float(timeout), env=dict(env or {})), timeout=wait)
        return protocol.convert(data, protocol.ExecReply)

    def _file_op(self, instance_id: str, transfer_id: str, op: str, timeout: float | None = None,
                 **fields: Any) -> dict[str, Any]:
        message = protocol.FileTransfer(instance_id=instance_id, transfer_id=transfer_id, op=op, **fields)
        return self.request(message, timeout=timeout if timeout is not None else self.timeout + 120.0)

    def _send_only(self, message: Any) -> int:
        rid = next(self._rids)
        message.rid = rid
        self._socket.send_multipart(request_frames(message))
        return rid

    def _receive_one(self, rids: dict[int, Any], timeout: float, resend: Any = None) -> tuple[int, Any]:
        """The next reply to one of ``rids`` (others are ignored): (rid, data), or raises.
        ``resend``: a request that changes nothing, sent again (with a new deadline) when the
        connection is made anew: a broker that restarted meanwhile lost it, and ``wait`` or
        ``logs --follow`` failed "no answer" though the broker was back."""
        deadline = time.monotonic() + timeout
        connections = disconnects = 0
        went_away = False
        if self._monitor is not None:
            self._check_monitor()
            disconnects = self._disconnects
            # sent before the first handshake with this broker, the request waits for it: not lost
            connections = self._connections if self._handshaken else -1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if went_away:
                    raise BrokerUnavailable(f"no answer from the broker at {self.endpoint} within {self.timeout:g}s "
                                            "after it went away (its connection closed)")
                raise BrokerUnavailable(
                    f"no answer from the broker at {self.endpoint} within {timeout:g}s "
                    "(is it running, and is this the client endpoint?)")
            events = dict(self._poller.poll(remaining * 1000))
            if self._monitor is not None and self._monitor in events:
                self._check_monitor()
                if self._disconnects > disconnects:
                    # The broker went away: a long poll (wait, logs --follow: up to its slice plus
                    # the timeout) no longer waits out its whole time. A read goes to the next
                    # broker at once; otherwise the broker has the request timeout to come back.
                    disconnects = self._disconnects
                    if resend is not None and len(self._endpoints) > 1:
                        raise BrokerUnavailable(f"the broker at {self.endpoint} went away (its connection closed)")
                    went_away = True
                    deadline = min(deadline, time.monotonic() + self.timeout)
                if resend is not None and self._handshaken and self._connections > connections:
                    if connections >= 0:  # connected anew: the broker we sent it to is gone, and it with it
                        self._socket.send_multipart(request_frames(resend))
                        deadline, went_away = time.monotonic() + timeout, False
                    connections = self._connections
            if self._socket not in events:
                continue
            parts = self._socket.recv_multipart()
            if len(parts) != 2 or parts[0] != protocol.HEADER:
                continue  # not ours to read; the broker never sends this
            try:
                reply = protocol.reply_decoder.decode(parts[1])
            except (protocol.DecodeError, protocol.ValidationError):
                continue
            if reply.rid not in rids:
                continue  # an answer to an earlier request we gave up on
            if not reply.ok:
                err = reply.error or protocol.ErrorInfo("Error", "request failed")
                if err.code == "Unauthorized":
                    raise Unauthorized(err.message)
                raise RequestFailed(err.message, err.code)
            return reply.rid, reply.data

    def put_file(self, instance_id: str, local_path: str | os.PathLike, remote_path: str,
                 mode: int | None = None, chunk_size: int = 1 << 20) -> dict[str, Any]:
        """Streams a local file to ``remote_path`` on the instance (a few chunks in flight,
        never the whole file in memory). The agent writes a 0600 temporary file beside the
        target and, on commit, checks the sha256 computed here while reading, sets the mode
        (``mode``; else the replaced file's; else 0644) and renames it into place atomically.
        Returns the agent's commit answer (size, sha256, mode)."""
        import hashlib
        import uuid

        chunk_size = max(1, min(int(chunk_size), 8 << 20))
        transfer_id = uuid.uuid4().hex
        digest = hashlib.sha256()
        with open(local_path, "rb") as handle:
            self._file_op(instance_id, transfer_id, "open-put", path=str(remote_path),
                          mode=-1 if mode is None else int(mode))
            try:
                inflight: dict[int, int] = {}
                offset, eof = 0, False
                while True:
                    while not eof and len(inflight) < self.FILE_WINDOW:
                        chunk = handle.read(chunk_size)
                        if not chunk:
                            eof = True
                            break
                        digest.update(chunk)
                        rid = self._send_only(protocol.FileTransfer(
                            instance_id=instance_id, transfer_id=transfer_id, op="write", offset=offset,
                            data=chunk))
                        inflight[rid] = offset
                        offset += len(chunk)
                    if not inflight:
                        break
                    rid, _ = self._receive_one(inflight, self.timeout + 120.0)
                    del inflight[rid]
                return self._file_op(instance_id, transfer_id, "commit", timeout=self.FILE_SLOW_TIMEOUT,
                                     sha256=digest.hexdigest(), mode=-1 if mode is None else int(mode))
            except BaseException:
                self._abort_transfer(instance_id, transfer_id)
                raise

    def fetch_file(self, instance_id: str, remote_path: str, local_path: str | os.PathLike,
                   chunk_size: int = 1 << 20) -> dict[str, Any]:
        """Streams ``remote_path`` from the instance into a temporary file beside ``local_path``,
        checks its sha256 against the agent's, gives it the remote permission bits and renames it
        into place. Returns the agent's description (size, sha256, mode)."""
        import hashlib
        import tempfile
        import uuid

        from pathlib import Path

        chunk_size = max(1, min(int(chunk_size), 8 << 20))
        transfer_id = uuid.uuid4().hex
        local = Path(local_path)
        if local.is_dir():  # found before anything is read from the instance
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(local))
        fd, temp = tempfile.mkstemp(prefix=f".{local.name[:100]}.", suffix=".zerorun.tmp",
                                    dir=str(local.parent))
        try:
            info = self._file_op(instance_id, transfer_id, "open-fetch", timeout=self.FILE_SLOW_TIMEOUT,
                                 path=str(remote_path))
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        size = int(info.get("size", 0))
        try:
            inflight: dict[int, int] = {}
            next_offset = 0
            while next_offset < size or inflight:
                while next_offset < size and len(inflight) < self.FILE_WINDOW:
                    rid = self._send_only(protocol.FileTransfer(
                        instance_id=instance_id, transfer_id=transfer_id, op="read", offset=next_offset,
                        length=min(chunk_size, size - next_offset)))
                    inflight[rid] = next_offset
                    next_offset += min(chunk_size, size - next_offset)
                rid, data = self._receive_one(inflight, self.timeout + 120.0)
                offset = inflight.pop(rid)
                chunk = data.get("data") or b""
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            digest = hashlib.sha256()
            with open(fd, "rb", closefd=False) as handle:
                handle.seek(0)
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != info.get("sha256"):
                raise RequestFailed(f"checksum mismatch fetching {remote_path} from {instance_id}: got "
                                    f"{digest.hexdigest()}, the agent reported {info.get('sha256')} "
                                    "(did the file change during the transfer?)", "ChecksumMismatch")
            os.fchmod(fd, int(info.get("mode", 0o600)) & 0o777)
            os.close(fd)
            fd = -1
            os.replace(temp, local)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(temp)
            except OSError:
                pass
            self._abort_transfer(instance_id, transfer_id)
            raise
        self._abort_transfer(instance_id, transfer_id, op="close")
        return info

    def _abort_transfer(self, instance_id: str, transfer_id: str, op: str = "abort") -> None:
        try:
            self._file_op(instance_id, transfer_id, op, timeout=min(self.timeout, 5.0))
        except ZerorunError:
            pass


def _write_all(sink: Any, data: bytes) -> None:
    """Writes all of ``data`` to a binary file. A buffered file's ``write`` returns a short count,
    without an error, when a write is cut short (the file system filled up, the reader of a pipe
    went away): ``zerorun logs ID -i X > FILE`` left a truncated FILE and exited 0. The next write
    raises the error (ENOSPC, EPIPE) instead."""
    view = memoryview(data)
    while view:
        written = sink.write(view)
        if not written:  # None (a non-blocking file that would block) or 0: no progress to wait for
            raise OSError(errno.EIO, f"short write ({len(view)} bytes not written)")
        view = view[written:]


def _targets(texts: Iterable[str | protocol.Target]) -> list[protocol.TargetSpec]:
    """Targets typed on the wire; bad text is the broker's own InvalidTarget error, found here."""
    try:
        return [t if isinstance(t, protocol.Target) else targeting.parse_target(t) for t in texts]
    except targeting.TargetError as exc:
        raise RequestFailed(str(exc), "InvalidTarget") from None


def connect(config_file: str | None = None, timeout: float = DEFAULT_TIMEOUT, **options: Any) -> Client:
    """A Client from a config file, environment variables and explicit options."""
    return Client(ClientConfig.from_options(config_file=config_file, **options), timeout=timeout)
