"""Daemon settings declared once (agent/config.py, zmq_broker/config.py): the flags, the config
keys, their precedence and the conversion of file values (the daemons themselves:
tests/integration/test_service.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.main import build_parser as agent_parser
from zerorun import daemon
from zerorun.daemon import parse_with_config
from zmq_broker.config import BrokerConfig
from zmq_broker.main import build_parser as broker_parser

AGENT_KEYS = {"broker", "broker_key", "instance_id", "tags", "state_dir", "max_concurrency", "heartbeat_interval",
              "max_output_bytes", "insecure", "metrics_bind", "drain_timeout", "reboot_command", "log_level",
              "log_format", "enrol_token_file", "facts_interval"}
BROKER_KEYS = {"state_dir", "agent_bind", "client_bind", "advertise_host", "auto_accept", "insecure",
               "heartbeat_interval", "max_heartbeats_per_second", "delivery_timeout", "max_output_bytes",
               "max_pending_keys", "metrics_bind", "policy", "audit_log", "retention_days", "log_level",
               "log_format", "render_workers", "render_timeout", "render_memory_mb", "max_step_bytes",
               "max_command_bytes", "store", "store_password_file", "broker_id", "agent_tags"}
BROKER_KEYS |= {"max_full_output_bytes", "webhooks", "webhook_secret_file", "webhook_retry_seconds", "s3_bucket",
                "s3_prefix", "s3_endpoint_url"}  # issue 22: the output store, webhooks, the S3 sink
BROKER_KEYS |= {"session_idle_timeout", "session_max_duration", "max_sessions", "session_transcripts"}  # issue 23
BROKER_KEYS |= {"min_agent_version"}  # issue 19
BROKER_KEYS |= {"max_unread_reply_mb", "max_client_connections"}  # what client connections may hold (client_connections.py)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("parser, keys", [(agent_parser, AGENT_KEYS), (broker_parser, BROKER_KEYS)])
def test_every_setting_is_a_flag_and_a_config_key(parser, keys):
    p = parser()
    assert {s.key for s in p.settings} == keys
    dests = {a.dest for a in p._actions}
    assert dests == keys | {"help", "version", "config", "check_config"}


def test_defaults(tmp_path):
    agent = agent_parser().parse(["--config", write(tmp_path, "{}")]).settings
    assert agent == AgentConfig()
    assert (agent.instance_id, agent.state_dir, agent.max_concurrency, agent.heartbeat_interval) == (
        socket.gethostname(), Path("/var/lib/zerorun/agent"), 5, 5.0)
    broker = broker_parser().parse(["--config", write(tmp_path, "{}")]).settings
    assert broker == BrokerConfig()
    assert (broker.agent_bind, broker.delivery_timeout, broker.policy_file, broker.log_level) == (
        "tcp://0.0.0.0:7450", 3600, None, "info")


def test_flags_beat_the_file_which_beats_the_defaults_and_tags_add_up(tmp_path):
    path = write(tmp_path, "max_concurrency: 3\nheartbeat_interval: 2\ntags:\n  role: web\n  env: test\n"
                           "state-dir: /srv/agent\n")
    parsed = agent_parser().parse(["--config", path, "--max-concurrency", "7", "--tag", "env=prod",
                                   "--tag", "az=a", "--check-config"])
    config = parsed.settings
    assert config.max_concurrency == 7 and config.heartbeat_interval == 2.0
    assert config.tags == {"role": "web", "env": "prod", "az": "a"}
    assert config.state_dir == Path("/srv/agent")
    assert parsed.check_config and parsed.config_file == path


def test_file_values_are_converted_to_the_setting_type(tmp_path):
    path = write(tmp_path, "auto_accept: 'true'\ndelivery_timeout: '60'\nheartbeat_interval: 1\n"
                           "policy: /etc/p.yaml\naudit_log:\nlog_level: DEBUG\nmax_pending_keys:\n")
    broker = broker_parser().parse(["--config", path]).settings
    assert broker.auto_accept is True and broker.delivery_timeout == 60 and broker.heartbeat_interval == 1.0
    assert broker.policy_file == Path("/etc/p.yaml") and broker.audit_file is None and broker.log_level == "debug"
    assert broker.max_pending_keys == 1000  # a key with nothing after it: the default
    agent = agent_parser().parse(["--config", write(tmp_path, "instance_id: 42\ntags: [a=1, [b, 2]]\n")]).settings
    assert agent.instance_id == "42" and agent.tags == {"a": "1", "b": "2"}


@pytest.mark.parametrize("text, message", [
    ("no_such_option: 1\n", "unknown option 'no_such_option'"),
    ("max_concurrency: lots\n", "option 'max_concurrency' must be an integer, not 'lots'"),
    ("insecure: maybe\n", "option 'insecure' must be true or false"),
    ("log_level: verbose\n", "option 'log_level' must be one of debug, info, warning, error"),
    ("tags: [role]\n", "tag 'role' must look like KEY=VALUE"),
    ("heartbeat_interval: [1, 2]\n", "option 'heartbeat_interval' must be a single value, not a list"),
    ("state_dir: [unclosed\n", "is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("- a\n- b\n", "must be a mapping of option: value"),
])
def test_a_bad_file_is_one_clear_line_and_exit_2(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_:
        agent_parser().parse(["--config", write(tmp_path, text)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "<unicode string>" not in err and "^" not in err, err  # PyYAML's own text, joined


def test_a_bad_flag_is_argparse_s_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        agent_parser().parse(["--tag", "role"])
    assert exit_.value.code == 2 and "tag 'role' must look like KEY=VALUE" in capsys.readouterr().err


def test_no_file_named_and_no_default_file_is_fine(tmp_path):
    parser = agent_parser()
    parser.default_config = str(tmp_path / "absent.yaml")
    assert parser.parse(["--broker", "tcp://b:7450"]).settings.broker == ["tcp://b:7450"]
    with pytest.raises(SystemExit):
        parser.parse(["--config", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize("module", ["agent.main", "zmq_broker.main"])
def test_the_roles_validate_command_parses_a_config_file(tmp_path, module):
    """roles/*/vars/main.yml validate the written config with parse_with_config(build_parser(), ...)."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("log_level: info\n")
    bad.write_text("log_level: info\nbogus: 1\n")
    code = ("import sys; from zerorun.daemon import parse_with_config; "
            f"from {module} import build_parser, DEFAULT_CONFIG; "
            "parse_with_config(build_parser(), ['--config', sys.argv[1]], DEFAULT_CONFIG)")
    assert subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option 'bogus'" in proc.stderr


def test_internal_fields_are_neither_flags_nor_keys():
    internal = {f.name for f in daemon.fields(AgentConfig)} - {s.name for s in agent_parser().settings}
    assert internal == {"reconnect_base", "reconnect_max", "platform"}
    assert parse_with_config(agent_parser(), ["--insecure", "--broker", "x"]).insecure is True


@pytest.mark.parametrize("module, prog", [("agent", "zerorun-agent"), ("zmq_broker", "zerorun-broker")])
def test_version(module, prog):
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{prog} ")


def test_an_agent_takes_several_brokers_from_flags_or_the_file(tmp_path):
    from agent.main import build_parser as agent_build_parser

    parser = agent_build_parser()
    assert parser.parse(["--broker", "tcp://a:1", "--broker", "tcp://b:2,tcp://c:3"]).settings.broker == [
        "tcp://a:1", "tcp://b:2", "tcp://c:3"]
    listed = write(tmp_path, "broker: [tcp://a:1, tcp://b:2]\n")
    assert parser.parse(["--config", listed]).settings.broker == ["tcp://a:1", "tcp://b:2"]
    single = write(tmp_path, "broker: tcp://a:1\n")
    assert parser.parse(["--config", single]).settings.broker == ["tcp://a:1"]
    assert parser.parse(["--config", single, "--broker", "tcp://z:9"]).settings.broker == ["tcp://z:9"]


def test_a_settings_record_is_made_without_dataclasses():
    @daemon.settings
    class Example:
        name: str = daemon.option("x", help="a name")
        items: list[str] = daemon.option(default_factory=list)
        fixed: float = 1.5  # not a setting

    a, b = Example(), Example(name="y")
    assert (a.name, a.items, a.fixed, b.name) == ("x", [], 1.5, "y")
    a.items.append("one")
    assert Example().items == [] and a != Example() and Example() == Example()
    assert repr(b) == "Example(name='y', items=[], fixed=1.5)"
    assert [(f.name, f.option is not None) for f in daemon.fields(Example)] == [
        ("name", True), ("items", True), ("fixed", False)]
    with pytest.raises(TypeError, match="unexpected keyword arguments: nope"):
        Example(nope=1)


def test_the_agent_process_imports_neither_dataclasses_nor_inspect():
    """About 1 MB of an idle agent (issue 25): ``dataclasses`` imports ``inspect`` and ``ast``. What
    the agent's process imports at start (``agent.main`` leaves out typing_extensions first, which
    imports inspect too) stays without them."""
    code = ("import sys; sys.modules['typing_extensions'] = None; import agent.main, agent.daemon, agent.zygote; "
            "print(sorted({'dataclasses', 'inspect', 'ast'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
