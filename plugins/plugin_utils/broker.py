# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Broker access for the controller-side plugins, on top of the ``zerorun`` client library.

This lives in plugin_utils, not module_utils: it runs only on the controller (action and
inventory plugins) and needs pyzmq, which is never shipped to managed nodes. The client
library does all protocol work; this file only turns plugin options into a Client, client
errors into AnsibleErrors and views into plain data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from ansible.errors import AnsibleError

try:
    import zmq
    from zerorun import client as zclient
    from zerorun import protocol as zprotocol
    from zerorun import targets as ztargets
except ImportError as exc:  # reported when a plugin is used, not when it is loaded
    ZERORUN_IMPORT_ERROR: Exception | None = exc
else:
    ZERORUN_IMPORT_ERROR = None

BROKER_OPTIONS = ("config_file", "endpoint", "broker_key", "client_key_file", "broker_timeout")
DEFAULT_BROKER_TIMEOUT = 10.0
MAX_BROKER_TIMEOUT = 30 * 86400  # the zerorun CLI's bound for --request-timeout


class BrokerError(AnsibleError):
    """A clean, user-facing failure to reach or use the broker (no traceback)."""


def require_zerorun() -> None:
    if ZERORUN_IMPORT_ERROR is not None:
        raise BrokerError(
            "the zerorun.fleet plugins need the Python package 'zerorun' (with pyzmq and msgspec) on"
            " the Ansible controller, in the Python that runs Ansible: pip install zerorun"
            " (import failed: %s)" % ZERORUN_IMPORT_ERROR)


# How a user gives each connection setting, per kind of plugin: a missing setting is reported in
# these terms (a plugin user has no -c flag to pass).
SETTINGS = {
    "module": {
        "config_file": "the task option config_file (or module_defaults for group/zerorun.fleet.fleet) or"
                       " ZERORUN_CONFIG in the environment",
        "endpoint": "the task option endpoint or ZERORUN_ENDPOINT",
        "broker_key": "the task option broker_key or ZERORUN_BROKER_KEY",
        "client_key_file": "the task option client_key_file or ZERORUN_CLIENT_KEY_FILE",
    },
    "inventory": {
        "config_file": "config_file in the inventory file or ZERORUN_CONFIG in the environment",
        "endpoint": "endpoint in the inventory file or ZERORUN_ENDPOINT",
        "broker_key": "broker_key in the inventory file or ZERORUN_BROKER_KEY",
        "client_key_file": "client_key_file in the inventory file or ZERORUN_CLIENT_KEY_FILE",
    },
    "connection": {
        "config_file": "the host or group variable ansible_zerorun_config (the zerorun.fleet.instances inventory"
                       " plugin sets it with set_connection: true), config_file in the [zerorun_connection]"
                       " section of ansible.cfg, or ZERORUN_CONFIG in the environment",
        "endpoint": "ansible_zerorun_endpoint, [zerorun_connection] endpoint or ZERORUN_ENDPOINT",
        "broker_key": "ansible_zerorun_broker_key, [zerorun_connection] broker_key or ZERORUN_BROKER_KEY",
        "client_key_file": "ansible_zerorun_client_key_file, [zerorun_connection] client_key_file or"
                           " ZERORUN_CLIENT_KEY_FILE",
    },
}
_MISSING = {"endpoint": "broker endpoint", "broker_key": "broker public key", "client_key_file": "client key"}


def describe_error(exc: Exception, kind: str = "module") -> str:
    """One line for people: what failed and the broker's reason code when it gave one; a missing
    setting named the way this kind of plugin takes it."""
    if isinstance(exc, getattr(zclient, "InvalidRequest", ())):
        return "refused before sending (%s): %s" % (exc.code, exc)
    if isinstance(exc, zclient.RequestFailed):
        return "the broker refused the request (%s): %s" % (exc.code, exc)
    if isinstance(exc, zclient.ConfigError):
        missing = getattr(exc, "missing", "")
        if missing in _MISSING:
            ways = SETTINGS.get(kind, SETTINGS["module"])
            return "broker connection settings: no %s. Give a client config file with %s; or set %s" % (
                _MISSING[missing], ways["config_file"], ways[missing])
        return "broker connection settings: %s" % exc
    return str(exc)


@contextlib.contextmanager
def broker_errors(kind: str = "module") -> Iterator[None]:
    """Turns the client library's ZerorunError family into BrokerError."""
    try:
        yield
    except zclient.ZerorunError as exc:
        raise BrokerError(describe_error(exc, kind)) from None


def client_config(options: Mapping[str, Any], kind: str = "module") -> "zclient.ClientConfig":
    """The client settings from a plugin's broker options (fragment zerorun.fleet.broker): the
    one place where plugin options become a ClientConfig."""
    require_zerorun()
    with broker_errors(kind):
        return zclient.ClientConfig.from_options(
            config_file=options.get("config_file") or None,
            endpoint=options.get("endpoint") or None,
            broker_key=options.get("broker_key") or None,
            client_key_file=options.get("client_key_file") or None)


def request_timeout(options: Mapping[str, Any]) -> float:
    """broker_timeout, from more than 0 to 30 days (0 or unset: the default). nan, inf or 1e300
    failed as "Task failed: cannot convert float NaN to integer" from ZeroMQ's poll, and a
    negative one blamed a broker that was there ("no answer within -1s")."""
    value = float(options.get("broker_timeout") or DEFAULT_BROKER_TIMEOUT)
    if not 0 < value <= MAX_BROKER_TIMEOUT:  # false for nan too
        raise BrokerError("broker_timeout must be a number of seconds from more than 0 to %d (30 days), not %s"
                          % (MAX_BROKER_TIMEOUT, options.get("broker_timeout")))
    return value


@contextlib.contextmanager
def connect(options: Mapping[str, Any], kind: str = "module") -> Iterator["zclient.Client"]:
    """A Client for the broker named by the fragment's options; closed (and its own ZeroMQ
    context terminated) on exit, so nothing lingers in a fork or in the inventory process."""
    config = client_config(options, kind)
    context = zmq.Context()
    client = zclient.Client(config, timeout=request_timeout(options), context=context)
    try:
        with broker_errors(kind):
            yield client
    finally:
        client.close()
        context.term()


def check_targets(targets: list[str]) -> None:
    """Rejects a malformed target before any broker round trip, with the CLI's own message."""
    require_zerorun()
    for text in targets:
        try:
            ztargets.parse_target(text)
        except ztargets.TargetError as exc:
            raise BrokerError(str(exc)) from None


def builtin_data(value: Any) -> Any:
    """Plain str/int/float/bool/dict/list copies of task data. ansible-core 2.19 hands plugins
    tagged subclasses of str, dict... (data tagging), which msgspec refuses to encode."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {builtin_data(k): builtin_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [builtin_data(v) for v in value]
    return value


def plain(view: Any) -> Any:
    """A client view (or list of views) as plain dicts and lists."""
    return zprotocol.to_builtins(view)


def is_terminal(status: str) -> bool:
    require_zerorun()
    return status in zprotocol.TERMINAL_STATUSES
