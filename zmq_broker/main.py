"""``zerorun-broker``: run the broker service."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from zerorun import __version__
from zerorun.daemon import (ConfigFileError, add_logging_flags, load_config_file, parse_with_config,
                            setup_logging)
from zerorun.keys import KeyFileError

DEFAULT_CONFIG = "/etc/zerorun/broker.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerorun-broker", description="Zerorun broker service.",
                                epilog="`zerorun-broker health` checks a running broker.")
    p.add_argument("--version", action="version", version=f"zerorun-broker {__version__}")
    p.add_argument("--config", help=f"YAML config file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--state-dir", default="/var/lib/zerorun/broker",
                   help="keys, database and the generated client config live here")
    p.add_argument("--agent-bind", default="tcp://0.0.0.0:7450", help="endpoint agents connect to")
    p.add_argument("--client-bind", default="tcp://127.0.0.1:7451", help="endpoint clients connect to")
    p.add_argument("--advertise-host", default="", help="host name written into the client config")
    p.add_argument("--auto-accept", action="store_true",
                   help="accept every new agent key on first HELLO (demos and tests only)")
    p.add_argument("--insecure", action="store_true",
                   help="no CURVE encryption or authentication (experiments only, never production)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0,
                   help="seconds between agent heartbeats (the shortest; see --max-heartbeats-per-second)")
    p.add_argument("--max-heartbeats-per-second", type=float, default=100.0,
                   help="cap on the fleet's heartbeat rate: with more than interval x this many agents, "
                   "agents are told to heartbeat less often (0: no cap)")
    p.add_argument("--delivery-timeout", type=int, default=3600,
                   help="default seconds for a command to reach its instances")
    p.add_argument("--max-output-bytes", type=int, default=4 * 1024 * 1024,
                   help="output kept per stream and invocation")
    p.add_argument("--max-pending-keys", type=int, default=1000)
    p.add_argument("--metrics-bind", default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (off by default)")
    p.add_argument("--policy", help="authorisation policy YAML (default <state dir>/policy.yaml;"
                   " reloaded on change and on SIGHUP)")
    p.add_argument("--audit-log", help="append-only JSON-lines audit log (default <state dir>/audit.jsonl)")
    p.add_argument("--render-workers", type=int, default=2,
                   help="processes that render Jinja, composite and local documents off the loop")
    p.add_argument("--render-timeout", type=float, default=2.0, help="seconds one rendering may take")
    p.add_argument("--render-memory-mb", type=int, default=768, help="memory limit of each render worker")
    p.add_argument("--max-step-bytes", type=int, default=1024 * 1024, help="largest rendered step script")
    p.add_argument("--max-command-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest rendered command (every step, scripts and environment)")
    p.add_argument("--retention-days", type=float, default=30.0,
                   help="finished commands older than this are pruned (0: keep forever)")
    p.add_argument("--store", default="", metavar="DSN",
                   help="state store: postgresql://USER@HOST:PORT/DB for a PostgreSQL database several "
                   "brokers can share (default: SQLite in the state dir); never a password in it")
    p.add_argument("--store-password-file", metavar="FILE",
                   help="the PostgreSQL password, in a 0600 file (default: libpq's PGPASSWORD or ~/.pgpass)")
    p.add_argument("--check-config", action="store_true",
                   help="only check the configuration (file and flags), then exit 0 or 2")
    add_logging_flags(p)
    return p


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
        known = {a.dest for a in build_parser()._actions}
        try:
            state_dir = load_config_file(args.config, DEFAULT_CONFIG, known).get("state_dir")
        except ConfigFileError as exc:
            print(f"unhealthy: {exc}")
            return 1
        state_dir = state_dir or build_parser().get_default("state_dir")
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
    args = parse_with_config(parser, argv, DEFAULT_CONFIG)
    setup_logging(args.log_level, args.log_format)
    if args.heartbeat_interval <= 0:
        parser.error("--heartbeat-interval must be positive")
    if args.max_heartbeats_per_second < 0:
        parser.error("--max-heartbeats-per-second must be 0 (no cap) or positive")
    if args.policy:
        from .policy import PolicyError, load_policy

        try:
            load_policy(Path(args.policy))
        except PolicyError as exc:
            parser.exit(2, f"zerorun-broker: {exc}\n")
    from .store import store_setting_problem

    problem = store_setting_problem(args.store, args.store_password_file)
    if problem:
        parser.exit(2, f"zerorun-broker: {problem}\n")
    if args.store_password_file:
        from .errors import BrokerError
        from .store.pg_connection import read_password_file

        try:
            read_password_file(args.store_password_file)
        except BrokerError as exc:
            parser.exit(2, f"zerorun-broker: {exc.message}\n")
    if args.check_config:
        print("configuration OK")
        return 0
    from .config import BrokerConfig
    from .server import Broker

    config = BrokerConfig(
        state_dir=Path(args.state_dir), agent_bind=args.agent_bind, client_bind=args.client_bind,
        advertise_host=args.advertise_host, auto_accept=args.auto_accept, insecure=args.insecure,
        heartbeat_interval=args.heartbeat_interval,
        max_heartbeats_per_second=args.max_heartbeats_per_second, delivery_timeout=args.delivery_timeout,
        max_output_bytes=args.max_output_bytes, max_pending_keys=args.max_pending_keys,
        retention_days=args.retention_days, metrics_bind=args.metrics_bind,
        render_workers=max(1, args.render_workers), render_timeout=args.render_timeout,
        render_memory_mb=args.render_memory_mb, max_step_bytes=args.max_step_bytes,
        max_command_bytes=min(args.max_command_bytes, 32 * 1024 * 1024),
        policy_file=Path(args.policy) if args.policy else None,
        audit_file=Path(args.audit_log) if args.audit_log else None, store=args.store,
        store_password_file=Path(args.store_password_file) if args.store_password_file else None)
    try:
        broker = Broker(config)
    except KeyFileError as exc:
        print(f"zerorun-broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"zerorun-broker: {exc}", file=sys.stderr)
        return 2
    def reload_log_level() -> None:  # SIGHUP: what can change without a restart
        known = {a.dest for a in parser._actions}
        try:
            level = load_config_file(args.config, DEFAULT_CONFIG, known).get("log_level")
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
