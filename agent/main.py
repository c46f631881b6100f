"""``zerorun-agent``: run the agent daemon on an instance."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from zerorun import __version__
from zerorun.daemon import add_logging_flags, parse_with_config, setup_logging
from zerorun.keys import KeyFileError, load_public

DEFAULT_CONFIG = "/etc/zerorun/agent.yaml"


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"tag {text!r} must look like KEY=VALUE")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerorun-agent", description="Zerorun agent daemon.")
    p.add_argument("--version", action="version", version=f"zerorun-agent {__version__}")
    p.add_argument("--config", help=f"YAML config file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--broker", help="broker agent endpoint, e.g. tcp://broker.example:7450")
    p.add_argument("--broker-key", help="file with the broker's public key (broker.key)")
    p.add_argument("--instance-id", default=socket.gethostname(), help="default: the host name")
    p.add_argument("--tag", dest="tags", action="append", type=_tag, default=[], metavar="KEY=VALUE",
                   help="a tag of this instance (repeatable)")
    p.add_argument("--state-dir", default="/var/lib/zerorun/agent")
    p.add_argument("--max-concurrency", type=int, default=5, help="commands run at once")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--max-output-bytes", type=int, default=4 * 1024 * 1024,
                   help="output kept per stream and step")
    p.add_argument("--insecure", action="store_true", help="no CURVE (experiments only)")
    p.add_argument("--metrics-bind", default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (off by default)")
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds running commands get to finish before they are cancelled")
    p.add_argument("--check-config", action="store_true",
                   help="only check the configuration (file and flags), then exit 0 or 2")
    add_logging_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_config(parser, argv, DEFAULT_CONFIG)
    setup_logging(args.log_level, args.log_format)
    if not args.broker:
        parser.error("--broker is required (or broker: in the config file)")
    try:  # from a config file, tags may be "KEY=VALUE" strings too
        tags = [_tag(t) if isinstance(t, str) else tuple(t) for t in args.tags]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    broker_key = b""
    if not args.insecure:
        if not args.broker_key:
            parser.error("--broker-key is required unless --insecure")
        try:
            broker_key = load_public(Path(args.broker_key))
        except KeyFileError as exc:
            parser.exit(2, f"zerorun-agent: {exc}\n")
    if args.check_config:
        print("configuration OK")
        return 0
    from .daemon import Agent, AgentConfig

    config = AgentConfig(
        broker=args.broker, instance_id=args.instance_id, state_dir=Path(args.state_dir),
        broker_key=broker_key, tags={str(k): str(v) for k, v in tags},
        max_concurrency=max(1, args.max_concurrency), heartbeat_interval=args.heartbeat_interval,
        max_output_bytes=args.max_output_bytes, insecure=args.insecure, metrics_bind=args.metrics_bind,
        drain_timeout=max(0.0, args.drain_timeout))
    try:
        agent = Agent(config)
    except (OSError, KeyFileError) as exc:
        print(f"zerorun-agent: {exc}", file=sys.stderr)
        return 2

    def reload() -> dict[str, str] | None:
        """SIGHUP: the log level and the tags may change without a restart."""
        try:
            fresh = parse_with_config(build_parser(), argv, DEFAULT_CONFIG)
            new_tags = {str(k): str(v) for k, v in (_tag(t) if isinstance(t, str) else tuple(t)
                                                    for t in fresh.tags)}
        except (SystemExit, argparse.ArgumentTypeError):
            logging.getLogger("zerorun.agent").error("SIGHUP: the config is invalid; keeping the current one")
            return None
        logging.getLogger().setLevel(fresh.log_level.upper())
        return new_tags

    agent.reload_hook = reload
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
