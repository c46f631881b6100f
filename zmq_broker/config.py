"""The broker's settings: one typed record; each ``option()`` field is a config-file key and a
flag (``zerorun.daemon.DaemonParser``)."""

from __future__ import annotations

from pathlib import Path

from zerorun.daemon import log_format_option, log_level_option, option, parse_tag, settings

DEFAULT_CONFIG = "/etc/zerorun/broker.yaml"


@settings
class BrokerConfig:
    state_dir: Path = option(Path("/var/lib/zerorun/broker"),
                             help="keys, database and the generated client config live here")
    agent_bind: str = option("tcp://0.0.0.0:7450", help="endpoint agents connect to")
    client_bind: str = option("tcp://127.0.0.1:7451", help="endpoint clients connect to")
    advertise_host: str = option("", help="host name written into the client config")
    auto_accept: bool = option(False, help="accept every new agent key on first HELLO (demos and tests only)")
    agent_tags: str = option("operator", choices=("operator", "trusted"),
                             help="who sets an instance's tags: operator (default; what an agent proposes waits for "
                                  "`zerorun tags approve`) or trusted (agents set their own: labs only)")
    insecure: bool = option(False, help="no CURVE encryption or authentication (experiments only, never "
                                        "production)")
    heartbeat_interval: float = option(5.0, help="seconds between agent heartbeats (the shortest; see "
                                                 "--max-heartbeats-per-second)")
    max_heartbeats_per_second: float = option(
        100.0, help="cap on the fleet's heartbeat rate: with more than interval x this many agents, agents "
                    "are told to heartbeat less often (0: no cap)")
    delivery_timeout: int = option(3600, help="default seconds for a command to reach its instances")
    max_output_bytes: int = option(4 * 1024 * 1024, help="output kept per stream and invocation (and step)")
    max_pending_keys: int = option(1000)
    max_client_connections: int = option(1024, help="connections one client key may hold, and connections that "
                                         "have sent nothing yet may hold together (beyond, the newest of a key is "
                                         "refused and closed, the oldest silent one closed)")
    max_unread_reply_mb: int = option(256, metavar="MIB", help="reply bytes one client key may leave unread in "
                                      "the broker; its requests are refused beyond (a reply can be 64 MiB)")
    min_agent_version: str = option("", metavar="VERSION", help="refuse agents older than this version (e.g. "
                                    "0.2.0): they are told to upgrade and retry (default: every version)")
    retention_days: float = option(30.0, help="finished commands older than this are pruned (0: keep forever)")
    metrics_bind: str = option("", metavar="HOST:PORT", help="serve Prometheus metrics here (off by default)")
    policy_file: Path | None = option(None, key="policy", help="authorisation policy YAML (default "
                                      "<state dir>/policy.yaml; reloaded on change and on SIGHUP)")
    audit_file: Path | None = option(None, key="audit_log", help="append-only JSON-lines audit log "
                                     "(default <state dir>/audit.jsonl)")
    render_workers: int = option(2, help="processes that render Jinja, composite and local documents off "
                                         "the loop")
    render_timeout: float = option(2.0, help="seconds one rendering may take")
    render_memory_mb: int = option(768, help="memory limit of each render worker")
    max_step_bytes: int = option(1024 * 1024, help="largest rendered step script")
    max_command_bytes: int = option(8 * 1024 * 1024, help="largest rendered command (every step, scripts and "
                                                          "environment; at most 32 MiB)")
    broker_id: str = option("", help="this broker's stable id in a cluster (default: made once and kept in "
                                      "<state dir>/broker.id)")
    store: str = option("", metavar="DSN", help="state store: postgresql://USER@HOST:PORT/DB for a PostgreSQL "
                        "database several brokers can share (default: SQLite in the state dir); never a password "
                        "in it")
    store_password_file: Path | None = option(None, metavar="FILE", help="the PostgreSQL password, in a 0600 "
                                              "file (default: libpq's PGPASSWORD or ~/.pgpass)")
    max_full_output_bytes: int = option(
        1024 ** 3, help="whole output kept per invocation in the output store (beside the database, or in "
                        "PostgreSQL), read from the agent after the result: what `zerorun show --output full` prints")
    webhooks: dict[str, str] = option(
        default_factory=dict, flag="--webhook", item=parse_tag, metavar="NAME=URL",
        help="a named webhook clients may give to `send --notify NAME` (repeatable; config: webhooks: {NAME: URL})")
    webhook_secret_file: Path | None = option(
        None, metavar="FILE", help="the key of the webhooks' HMAC-SHA256 signature (X-Zerorun-Signature), in a "
                                   "file only the broker's user reads (default <state dir>/keys/webhook.secret, made "
                                   "on first start: brokers of a cluster share it with keys/)")
    webhook_retry_seconds: float = option(
        86400.0, help="how long a webhook that cannot be delivered is retried (backoff up to 10 minutes)")
    s3_bucket: str = option("", help="copy every finished invocation's whole output to this S3 bucket (needs "
                                     "zerorun[s3]; credentials as boto3 finds them)")
    s3_prefix: str = option("zerorun/", help="key prefix in the S3 bucket: PREFIX<command>/<instance>/stdout|stderr")
    s3_endpoint_url: str = option("", metavar="URL", help="an S3-compatible service's endpoint (default: AWS)")
    session_idle_timeout: float = option(1200.0, metavar="S", help="a session (shell, port forward, proxy) with "
                                         "no data either way for this long is ended (0: never)")
    session_max_duration: float = option(0.0, metavar="S", help="a session is ended after this long whatever "
                                         "it does (0: no limit)")
    max_sessions: int = option(256, help="sessions open at once on this broker (each buffers at most 512 KiB)")
    session_transcripts: Path | None = option(None, metavar="DIR", help="record every shell session's output "
                                              "to DIR as an asciicast v2 file (off by default)")
    log_level: str = log_level_option()
    log_format: str = log_format_option()
