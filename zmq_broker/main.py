"""``zerorun-broker``: run the broker service."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from zerorun import __version__
from zerorun.daemon import ConfigFileError, DaemonParser, setup_logging
from zerorun.keys import KeyFileError
from zerorun.versions import version_key

from .config import DEFAULT_CONFIG, BrokerConfig


def build_parser() -> DaemonParser:
    return DaemonParser(BrokerConfig, prog="zerorun-broker", description="Zerorun broker service.",
                        default_config=DEFAULT_CONFIG, version=__version__,
                        epilog="`zerorun-broker health` checks a running broker.")


def health(argv: list[str]) -> int:
    """``zerorun-broker health``: exit 0 when the broker answers a ping in time (for systemd
    and load balancers), 1 with the reason otherwise."""
    p = argparse.ArgumentParser(prog="zerorun-broker health", description=health.__doc__)
    p.add_argument("--config", help=f"the broker's config file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--state-dir", help="the broker's state dir (its client.yaml is used)")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    state_dir = args.state_dir
    if not state_dir:
        try:
            state_dir = build_parser().read_config_file(args.config).get("state_dir")
        except ConfigFileError as exc:
            print(f"unhealthy: {exc}")
            return 1
        state_dir = state_dir or BrokerConfig().state_dir
    from zerorun.client import Client, ClientConfig, ZerorunError

    started = time.monotonic()
    try:
        with Client(ClientConfig.load(Path(state_dir) / "client.yaml"), timeout=args.timeout) as client:
            info = client.ping()
    except ZerorunError as exc:
        print(f"unhealthy: {exc}")
        return 1
    print(f"ok: broker {info['broker_version']} answered in {(time.monotonic() - started) * 1000:.1f} ms; "
          f"{info['online']}/{info['instances']} instances online, {info['active_commands']} active command(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["health"]:
        return health(argv[1:])
    parser = build_parser()
    parsed = parser.parse(argv)
    config: BrokerConfig = parsed.settings
    setup_logging(config.log_level, config.log_format)
    if config.heartbeat_interval <= 0:
        parser.error("--heartbeat-interval must be positive")
    if config.render_workers < 1 or config.render_timeout <= 0 or config.render_memory_mb < 64:
        parser.error("--render-workers must be at least 1, --render-timeout positive, --render-memory-mb >= 64")
    if not 1024 <= config.max_step_bytes <= config.max_command_bytes <= 32 * 1024 * 1024:
        parser.error("--max-step-bytes must be at least 1024 and at most --max-command-bytes, which is at "
                     "most 32 MiB (33554432)")
    if config.max_heartbeats_per_second < 0:
        parser.error("--max-heartbeats-per-second must be 0 (no cap) or positive")
    if config.min_agent_version and version_key(config.min_agent_version) is None:
        parser.error(f"--min-agent-version: {config.min_agent_version!r} is not a version (e.g. 0.2.0)")
    if config.policy_file:
        from .policy import PolicyError, load_policy

        try:
            load_policy(config.policy_file)
        except PolicyError as exc:
            parser.exit(2, f"zerorun-broker: {exc}\n")
    from .store import store_setting_problem

    problem = store_setting_problem(config.store, config.store_password_file)
    if problem:
        parser.exit(2, f"zerorun-broker: {problem}\n")
    if config.store_password_file:
        from .errors import BrokerError
        from .store.pg_connection import read_password_file

        try:
            read_password_file(config.store_password_file)
        except BrokerError as exc:
            parser.exit(2, f"zerorun-broker: {exc.message}\n")
    if parsed.check_config:
        print("configuration OK")
        return 0
    from .server import Broker

    try:
        broker = Broker(config)
    except KeyFileError as exc:
        print(f"zerorun-broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"zerorun-broker: {exc}", file=sys.stderr)
        return 2

    def reload_log_level() -> None:  # SIGHUP: what can change without a restart (from the file)
        try:
            level = parser.read_config_file(parsed.config_file).get("log_level")
        except ConfigFileError as exc:
            logging.getLogger("zerorun.broker").error("%s; keeping the current settings", exc)
            return
        if level:
            logging.getLogger().setLevel(str(level).upper())
            logging.getLogger("zerorun.broker").info("log level is now %s", str(level).upper())

    broker.reload_hook = reload_log_level
    broker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
