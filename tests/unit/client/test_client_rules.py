"""Pure rules of the client library and CLI helpers: limits, the explicit-instance rule, an inline
secret key, client names, and the completion tables built from the CLI's parser."""

import pytest
import zmq

from zerorun import client, completion, onboarding
from zerorun.cli import build_parser
from zerorun.documents.render import MAX_TIMEOUT as RENDER_MAX_TIMEOUT


@pytest.mark.parametrize("limits", [
    {"timeout_seconds": 0}, {"timeout_seconds": -1}, {"timeout_seconds": 30 * 86400 + 1},
    {"execution_timeout": 0}, {"execution_timeout": 172801}, {"max_concurrency": "0"},
    {"max_concurrency": "0%"}, {"max_concurrency": "101%"}, {"max_concurrency": "x"}, {"max_errors": "-1"},
    {"max_errors": "100.5%"}, {"first": -1},
])
def test_out_of_range_limits_are_refused(limits):
    with pytest.raises(client.InvalidRequest) as exc:
        client.check_send_limits(**limits)
    assert "must be" in str(exc.value)


@pytest.mark.parametrize("limits", [
    {}, {"timeout_seconds": None, "execution_timeout": None, "max_concurrency": "", "max_errors": ""},
    {"timeout_seconds": 1, "execution_timeout": 172800, "max_concurrency": "1", "max_errors": "0"},
    {"max_concurrency": "100%", "max_errors": "0%", "first": 0},
])
def test_limits_in_range_pass(limits):
    client.check_send_limits(**limits)


def test_the_execution_timeout_bound_is_the_renderers():
    assert client.MAX_EXECUTION_TIMEOUT == RENDER_MAX_TIMEOUT


@pytest.mark.parametrize("targets, ids, expected", [
    (["instance:a"], [], ([], ["a"])),
    (["instance:a,b"], [], ([], ["a", "b"])),
    (["tag:role=web"], [], (["tag:role=web"], [])),
    (["instance:a", "tag:role=web"], [], (["instance:a", "tag:role=web"], [])),  # a filter
    (["instance:a"], ["b"], (["instance:a"], ["b"])),
    (["bogus"], [], (["bogus"], [])),  # the broker names the problem
])
def test_a_lone_instance_target_is_instance_ids(targets, ids, expected):
    assert client.explicit_instance_targets(targets, ids) == expected


def test_the_secret_key_from_the_environment(monkeypatch):
    public, secret = zmq.curve_keypair()
    broker, _ = zmq.curve_keypair()
    for text in (secret.decode(), f'curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n'):
        monkeypatch.setenv(client.ENV_CLIENT_SECRET_KEY, text)
        config = client.ClientConfig.from_options(endpoint="tcp://h:1", broker_key=broker.decode())
        assert (config.public_key, config.secret_key) == (public, secret)
    monkeypatch.setenv(client.ENV_CLIENT_SECRET_KEY, "not a key")
    with pytest.raises(client.ConfigError, match=client.ENV_CLIENT_SECRET_KEY):
        client.ClientConfig.from_options(endpoint="tcp://h:1", broker_key=broker.decode())
    monkeypatch.delenv(client.ENV_CLIENT_SECRET_KEY)
    monkeypatch.delenv(client.ENV_CLIENT_KEY_FILE, raising=False)
    with pytest.raises(client.ConfigError) as exc:
        client.ClientConfig.from_options(endpoint="tcp://h:1", broker_key=broker.decode())
    assert exc.value.missing == "client_key_file"


@pytest.mark.parametrize("endpoint, names", [
    ("garbage", "'garbage'"), ("tcp://127.0.0.1", "'tcp://127.0.0.1'"), ("tcp://127.0.0.1:99999", "99999"),
    ("tcp://127.0.0.1:7451,tcp://b", "'tcp://b'"), ("udp://h:1", "'udp://h:1'"), (" , ,", "names no broker"),
])
def test_an_endpoint_libzmq_cannot_connect_to_is_a_config_error_naming_it(tmp_path, endpoint, names):
    """A typo in the endpoint was a ZMQError traceback ("Invalid argument") when connecting, or
    when failing over to a cluster's second broker; ",," an IndexError; port 99999 a wait."""
    import subprocess
    import sys

    from zerorun import keys

    keys.create_keypair(tmp_path, "me")
    broker, _ = zmq.curve_keypair()
    with pytest.raises(client.ConfigError, match="broker endpoint") as exc:
        client.ClientConfig.from_options(endpoint=endpoint, broker_key=broker.decode(),
                                         client_key_file=str(tmp_path / "me.key_secret"))
    assert names in str(exc.value)
    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "--request-timeout", "1", "ping"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "ZERORUN_ENDPOINT": endpoint,
                                                      "ZERORUN_BROKER_KEY": broker.decode(),
                                                      "ZERORUN_CLIENT_KEY_FILE": str(tmp_path / "me.key_secret")})
    assert proc.returncode == 2 and proc.stderr == f"zerorun: ConfigError: {exc.value}\n", proc.stderr


@pytest.mark.parametrize("endpoint", ["tcp://h:1", "tcp://[::1]:7451", "tcp://a:1, tcp://b:2", "ipc:///run/zr.sock"])
def test_endpoints_libzmq_takes_are_taken(endpoint):
    client.check_endpoints(endpoint)


@pytest.mark.parametrize("setting", ["ZERORUN_CLIENT_KEY_FILE", "ZERORUN_BROKER_KEY"])
def test_a_key_file_that_is_not_text_is_a_config_error(tmp_path, setting):
    """A binary file given as a key file (a .der, a copy gone wrong) was a UnicodeDecodeError
    traceback."""
    import subprocess
    import sys

    from zerorun import keys

    keys.create_keypair(tmp_path, "me")
    binary = tmp_path / "binary.key_secret"
    binary.write_bytes(b"\xff\xfe\x00curve\n")
    binary.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "ZERORUN_ENDPOINT": "tcp://127.0.0.1:9",
           "ZERORUN_BROKER_KEY": str(tmp_path / "me.key"), "ZERORUN_CLIENT_KEY_FILE": str(tmp_path / "me.key_secret")}
    env[setting] = str(binary)
    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "--request-timeout", "1", "ping"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"zerorun: ConfigError: {binary} is not a key file (not UTF-8 text)\n"


def test_a_directory_given_as_the_secret_key_file_is_named_as_one(tmp_path):
    """A directory (the --out of clients create, say) was "accessible by group/others (mode
    0755); run: chmod 600 DIR", which could only make it worse."""
    import subprocess
    import sys

    from zerorun import keys

    keys.create_keypair(tmp_path, "me")
    tmp_path.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "--request-timeout", "1", "ping"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "ZERORUN_ENDPOINT": "tcp://127.0.0.1:9",
                                                      "ZERORUN_BROKER_KEY": str(tmp_path / "me.key"),
                                                      "ZERORUN_CLIENT_KEY_FILE": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"zerorun: ConfigError: secret key file {tmp_path} is a directory: name the"
                           " NAME.key_secret file in it\n")


@pytest.mark.parametrize("name, ok", [("alice", True), ("awx-prod.eu@1", True), ("admin", False), ("../x", False),
                                      ("", False), ("a" * 129, False), ("alice\n", False)])
def test_client_names(name, ok):
    """``alice\n`` passed (a pattern ending in ``$`` matches before a final newline): the broker
    registered the client "alice\n" and the key files were named "alice\n.key_secret"."""
    if ok:
        onboarding.check_name(name, "operator")
    else:
        with pytest.raises(client.InvalidRequest):
            onboarding.check_name(name, "operator")
    with pytest.raises(client.InvalidRequest):
        onboarding.check_name("alice", "operator\n")


@pytest.fixture
def no_client_environment(monkeypatch):
    for name in (client.ENV_CONFIG, client.ENV_ENDPOINT, client.ENV_BROKER_KEY, client.ENV_CLIENT_KEY_FILE,
                 client.ENV_CLIENT_SECRET_KEY):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("text, says", [
    ("endpoint: [unclosed\n", "is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("endpoint: tcp://127.0.0.1:1\n\tbroker_public_key: x\n",
     "is not valid YAML: line 2, column 1: found character '\\t' that cannot start any token"),
])
def test_a_config_file_that_is_not_yaml_is_one_line_naming_where(tmp_path, no_client_environment, text, says):
    """PyYAML's text spans five lines, with the offending line and a caret under it."""
    config = tmp_path / "client.yaml"
    config.write_text(text)
    with pytest.raises(client.ConfigError) as exc:
        client.ClientConfig.from_options(config_file=str(config))
    assert str(exc.value) == f"client config {config} {says}"


@pytest.mark.parametrize("text, missing, says", [
    ("endpiont: tcp://127.0.0.1:1\n", "endpoint",
     "no broker endpoint: set endpoint in the config or ZERORUN_ENDPOINT (client config {config}; unknown key(s)"
     " there: endpiont)"),
    ("endpoint: tcp://127.0.0.1:1\nbroker_key: x\n", "broker_key",
     "no broker public key: set broker_public_key in the config or ZERORUN_BROKER_KEY (client config {config};"
     " unknown key(s) there: broker_key)"),
    ("endpoint: tcp://127.0.0.1:1\nbroker_public_key: x\n", "client_key_file",
     "no client key: set client_key_file in the config, ZERORUN_CLIENT_KEY_FILE or ZERORUN_CLIENT_SECRET_KEY"
     " (client config {config})"),
])
def test_a_setting_missing_from_a_config_file_names_the_file_and_what_it_has_instead(
        tmp_path, no_client_environment, text, missing, says):
    """A config file given with a misspelt key was told to "give a client config file (-c FILE or
    ZERORUN_CONFIG)": the file it had given."""
    config = tmp_path / "client.yaml"
    config.write_text(text)
    with pytest.raises(client.ConfigError) as exc:
        client.ClientConfig.from_options(config_file=str(config))
    assert exc.value.missing == missing and str(exc.value) == says.format(config=config)


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_a_public_key_file_given_as_the_secret_key_is_named_as_one(tmp_path, no_client_environment, mode):
    """NAME.key for NAME.key_secret: "accessible by group/others; run: chmod 600" (a .key file is
    0644), and after that "has no valid secret-key"."""
    from zerorun import keys

    public, _ = keys.create_keypair(tmp_path, "me")
    public.chmod(mode)
    with pytest.raises(client.ConfigError) as exc:
        client.ClientConfig.from_options(endpoint="tcp://127.0.0.1:1", broker_key=str(public),
                                         client_key_file=str(public))
    assert str(exc.value) == f"{public} holds a public key only, not a secret key (a NAME.key_secret file)"


def test_loopback_endpoints():
    assert onboarding.is_loopback("tcp://127.0.0.1:7451") and onboarding.is_loopback("tcp://localhost:1")
    assert not onboarding.is_loopback("tcp://broker.example.com:7451")


def test_completion_tables_follow_the_parser():
    tables = {"subs": {}, "opts": {}, "valopts": {}, "dyn": {}}
    completion._tables(build_parser(), "zerorun", tables)
    assert "send" in tables["subs"]["zerorun"].split() and "__complete" not in tables["subs"]["zerorun"]
    assert "--execution-timeout" in tables["valopts"]["zerorun send"].split()
    assert "--dry-run" in tables["opts"]["zerorun send"].split()
    assert "--dry-run" not in tables["valopts"]["zerorun send"].split()
    assert "--json" in tables["opts"]["zerorun documents show"].split()  # the global options, everywhere
    assert tables["dyn"]["zerorun send -i"] == "instances"
    assert tables["dyn"]["zerorun send"] == "documents"
    assert tables["dyn"]["zerorun keys accept"] == "instances"
    assert tables["subs"]["zerorun keys"].split()[:2] == ["list", "accept"]
