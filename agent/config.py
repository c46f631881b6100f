"""The agent's settings: one typed record; each ``option()`` field is a config-file key and a
flag (``zerorun.daemon.DaemonParser``), the rest are fixed here."""

from __future__ import annotations

import socket
from pathlib import Path

from zerorun.daemon import log_format_option, log_level_option, option, parse_tag, settings

DEFAULT_CONFIG = "/etc/zerorun/agent.yaml"


@settings
class AgentConfig:
    broker: list[str] = option(default_factory=list, metavar="ENDPOINT",
                               help="broker agent endpoint, e.g. tcp://broker.example:7450; repeat it (or "
                                    "list them) for the brokers of a cluster: the agent uses one, and moves to "
                                    "the next when that one is gone")
    broker_key: Path | None = option(None, help="file with the broker's public key (broker.key)")
    instance_id: str = option(default_factory=socket.gethostname, help="default: the host name")
    tags: dict[str, str] = option(default_factory=dict, flag="--tag", item=parse_tag, metavar="KEY=VALUE",
                                  help="a tag of this instance (repeatable)")
    enrol_token_file: Path | None = option(None, metavar="FILE",
                                           help="file with an enrolment token (zerorun tokens create): presented "
                                                "until the broker accepts this agent, whose tags are then the "
                                                "token's")
    state_dir: Path = option(Path("/var/lib/zerorun/agent"))
    max_concurrency: int = option(5, help="commands run at once")
    heartbeat_interval: float = option(5.0)
    max_output_bytes: int = option(4 * 1024 * 1024, help="output a result carries per stream (all its steps together)")
    facts_interval: float = option(60.0, help="seconds between checks for changed facts (OS, addresses...)")
    insecure: bool = option(False, help="no CURVE (experiments only)")
    metrics_bind: str = option("", metavar="HOST:PORT", help="serve Prometheus metrics here (off by default)")
    drain_timeout: float = option(2.0, help="on SIGTERM, seconds running commands get to finish (and be "
                                             "reported) before the agent exits; what still runs goes on under "
                                             "its supervisor and is reported by the next start")
    reboot_command: str = option("systemctl reboot", help="what the agent runs (with /bin/sh) when a step "
                                                         "exits 194 to ask for a reboot")
    log_level: str = log_level_option()
    log_format: str = log_format_option()
    # not settable from outside
    reconnect_base: float = 1.0
    reconnect_max: float = 30.0
    platform: str = ""  # "": the platform this runs on
