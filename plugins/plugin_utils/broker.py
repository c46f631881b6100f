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


class BrokerError(AnsibleError):
    """A clean, user-facing failure to reach or use the broker (no traceback)."""


def require_zerorun() -> None:
    if ZERORUN_IMPORT_ERROR is not None:
        raise BrokerError(
            "the zerorun.fleet plugins need the Python package 'zerorun' (with pyzmq and msgspec) on"
            " the Ansible controller, in the Python that runs Ansible: pip install zerorun"
            " (import failed: %s)" % ZERORUN_IMPORT_ERROR)


def describe_error(exc: Exception) -> str:
    """One line for people: what failed and the broker's reason code when it gave one."""
    if isinstance(exc, zclient.RequestFailed):
        return "the broker refused the request (%s): %s" % (exc.code, exc)
    if isinstance(exc, zclient.ConfigError):
        return "broker connection settings: %s" % exc
    return str(exc)


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """Turns the client library's ZerorunError family into BrokerError."""
    try:
        yield
    except zclient.ZerorunError as exc:
        raise BrokerError(describe_error(exc)) from None


@contextlib.contextmanager
def connect(options: Mapping[str, Any]) -> Iterator["zclient.Client"]:
    """A Client for the broker named by the fragment's options; closed (and its own ZeroMQ
    context terminated) on exit, so nothing lingers in a fork or in the inventory process."""
    require_zerorun()
    timeout = options.get("broker_timeout")
    with broker_errors():
        config = zclient.ClientConfig.from_options(
            config_file=options.get("config_file") or None,
            endpoint=options.get("endpoint") or None,
            broker_key=options.get("broker_key") or None,
            client_key_file=options.get("client_key_file") or None)
        context = zmq.Context()
        client = zclient.Client(config, timeout=float(timeout or DEFAULT_BROKER_TIMEOUT), context=context)
    try:
        with broker_errors():
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
