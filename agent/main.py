"""``zerorun-agent``: run the agent daemon on an instance.

``zerorun-agent stop-commands [--config FILE] [--state-dir DIR]`` stops the commands that still
run under their supervisors (the agent's own stop leaves them running): each gets SIGTERM (its
step is stopped, the invocation recorded Failed for the next agent start to report), what is
left after the grace period gets SIGKILL."""

from __future__ import annotations

import logging
import sys

from zerorun import __version__
from zerorun.daemon import DaemonParser, setup_logging
from zerorun.keys import KeyFileError, load_public

from .config import DEFAULT_CONFIG, AgentConfig


def build_parser() -> DaemonParser:
    return DaemonParser(AgentConfig, prog="zerorun-agent", description="Zerorun agent daemon.",
                        default_config=DEFAULT_CONFIG, version=__version__)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["stop-commands"]:
        return stop_commands(args[1:])
    parser = build_parser()
    parsed = parser.parse(argv)
    config: AgentConfig = parsed.settings
    setup_logging(config.log_level, config.log_format)
    if not config.broker:
        parser.error("--broker is required (or broker: in the config file)")
    from zerorun.identifiers import instance_id_problem, tags_problem

    problem = instance_id_problem(config.instance_id) or tags_problem(config.tags)
    if problem:
        parser.error(problem)
    config.max_concurrency = max(1, config.max_concurrency)
    config.drain_timeout = max(0.0, config.drain_timeout)
    broker_key = b""
    if not config.insecure:
        if not config.broker_key:
            parser.error("--broker-key is required unless --insecure")
        try:
            broker_key = load_public(config.broker_key)
        except KeyFileError as exc:
            parser.exit(2, f"zerorun-agent: {exc}\n")
    if parsed.check_config:
        print("configuration OK")
        return 0
    if "typing_extensions" not in sys.modules:
        # msgspec takes typing's own on Python 3.11+ when typing_extensions is missing (ZeroMQ
        # names it for type checkers only): about 0.2 MB less for as long as the agent runs
        sys.modules["typing_extensions"] = None  # type: ignore[assignment]
    from .daemon import Agent

    try:
        agent = Agent(config, broker_key)
    except (OSError, KeyFileError) as exc:
        print(f"zerorun-agent: {exc}", file=sys.stderr)
        return 2

    def reload() -> dict[str, str] | None:
        """SIGHUP: the log level and the tags may change without a restart."""
        try:
            fresh: AgentConfig = build_parser().parse(argv).settings
        except SystemExit:
            logging.getLogger("zerorun.agent").error("SIGHUP: the config is invalid; keeping the current one")
            return None
        logging.getLogger().setLevel(fresh.log_level.upper())
        return fresh.tags

    agent.reload_hook = reload
    agent.run()
    return 0


def stop_commands(argv: list[str]) -> int:
    config: AgentConfig = build_parser().parse(argv).settings
    from .supervisor import stop_all

    count = stop_all(config.state_dir / "work")
    print(f"stopped {count} running command(s) of the agent in {config.state_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
