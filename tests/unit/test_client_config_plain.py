"""The client config the broker writes is read without PyYAML, whatever its key; anything less
plain is left to YAML, and both readings agree."""

from __future__ import annotations

import pytest
import yaml

from zerorun import configtext
from zerorun.client import _read_config
from zerorun.configtext import read_plain as _read_plain_config

BROKER_WRITTEN = ("# Zerorun client configuration, written by zerorun-broker. Use: zerorun -c THIS_FILE\n"
                  + yaml.safe_dump({"endpoint": "tcp://127.0.0.1:46193",
                                    "broker_public_key": "X)c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac^q",
                                    "client_key_file": "/tmp/b/keys/admin.key_secret"}, sort_keys=False))


@pytest.mark.parametrize("key", ["X)c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac^q", "!c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac^q",
                                 "&c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac^q", "1234567890123456789012345678901234567890",
                                 "*c!YlV+c#SVplL3G34Y@rxT3UIqI5NFhsG4Ac^q", "[c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac]q",
                                 "yes", "'quoted'", "a:"])
def test_what_the_broker_writes_reads_as_yaml_reads_it(tmp_path, key):
    text = yaml.safe_dump({"endpoint": "tcp://127.0.0.1:1", "broker_public_key": key,
                           "client_key_file": "keys/admin.key_secret"}, sort_keys=False)
    plain = _read_plain_config(text)
    assert plain is None or plain == yaml.safe_load(text)
    path = tmp_path / "client.yaml"
    path.write_text(text)
    assert _read_config(path) == yaml.safe_load(text)


def test_the_broker_written_config_takes_the_plain_path():
    assert _read_plain_config(BROKER_WRITTEN) == yaml.safe_load(BROKER_WRITTEN)


@pytest.mark.parametrize("text", ["endpoint: tcp://a:1\ninsecure: True\n", "endpoints:\n- tcp://a:1\n",
                                  "endpoint: \"tcp://a:1\"\n", "endpoint: tcp://a:1 # comment\n",
                                  "endpoint: tcp://a:1\nendpoint: tcp://b:1\n", "  endpoint: tcp://a:1\n",
                                  "endpoint: null\n", "endpoint: 'it's'\n", "insecure: yes\n",
                                  "endpoint: 1234\n", "endpoint: 2026-12-07\n", "endpoint: .inf\n", "endpoint: 0x1F\n"])
def test_anything_less_plain_is_left_to_yaml(text):
    assert _read_plain_config(text) is None


Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def _config(key: str) -> str:
    return yaml.safe_dump({"endpoint": "tcp://127.0.0.1:1", "broker_public_key": key,
                           "client_key_file": "/s/keys/admin.key_secret"}, sort_keys=False)


def test_most_keys_yaml_writes_unquoted_take_the_plain_path():
    """A config written by PyYAML (as brokers before this one wrote theirs): every key it writes
    unquoted that cannot be read as anything but a string is read plain; those that start with an
    indicator (14 of z85's 85 characters) are left to YAML. Those that start with a digit, a sign
    or a dot (12 more, each CLI run importing PyYAML) are read plain unless they could be a number."""
    import random

    rng = random.Random(25)
    plain = 0
    for _ in range(2000):
        key = "".join(rng.choice(Z85) for _ in range(40))
        text = _config(key)
        read = _read_plain_config(text)
        assert read is None or read == yaml.safe_load(text)
        unquoted = f"broker_public_key: {key}\n" in text
        if unquoted and key[0] not in "-?:,[]{}#&*!|>%@`" and not key.endswith(":"):
            assert read is not None, key
        plain += read is not None
    assert plain > 1600  # 83.5 % of keys: all but those that start with one of z85's 14 indicators


def test_every_config_written_here_takes_the_plain_path():
    """What the broker and ``zerorun clients create`` write: single-quoted text, whatever the key
    starts with, and ``insecure: true``; the CLI never imports PyYAML for it."""
    import random

    rng = random.Random(7)
    for i in range(2000):
        key = "".join(rng.choice(Z85) for _ in range(40))
        values = {"endpoint": "tcp://127.0.0.1:1", "broker_public_key": key, "client_key_file": "/s/it's/admin.key_secret"}
        if i % 2:
            values["insecure"] = bool(i % 4 == 1)
        text = configtext.write(values, "# written here\n")
        assert _read_plain_config(text) == yaml.safe_load(text) == values, text


def test_text_that_is_not_printable_ascii_is_written_for_yaml_to_read():
    values = {"endpoint": "tcp://127.0.0.1:1", "broker_public_key": "k" * 40,
              "client_key_file": "/home/j\u00e9r\u00f4me/\U0001f600/\u5b57 \"x\" \\ 'y'\tz\x7f.key_secret"}
    text = configtext.write(values)
    assert text.isascii() and yaml.safe_load(text) == values
    assert _read_plain_config(text) is None  # double quotes: PyYAML's
    path = configtext.write({"client_key_file": "/s/it's/admin.key_secret"})
    assert _read_plain_config(path) == yaml.safe_load(path) == {"client_key_file": "/s/it's/admin.key_secret"}


def test_the_broker_writes_a_config_the_cli_reads_without_yaml(tmp_path):
    import subprocess
    import sys

    from zmq_broker.statedir import write_client_files

    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "broker.key").write_text("#c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac^q\n")
    for key in (b"#c!YlV+caSVplL3G34Y@rxT3UIqI5NFhsG4Ac^q", b"8t6Y973PVbtNmuFEqyf!UJyg]3(cMwZ5kG]-1pMO"):
        write_client_files(tmp_path, public_key=key, client_endpoint="tcp://127.0.0.1:1", agent_endpoint="",
                           insecure=False, metrics_address="")
        text = (tmp_path / "client.yaml").read_text()
        assert _read_plain_config(text) == yaml.safe_load(text)
        assert _read_plain_config(text)["broker_public_key"] == key.decode()
    probe = ("import sys; from zerorun.client import _read_config; _read_config(sys.argv[1]); "
             "print('yaml' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "client.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("key", ["QA#J]FDHVyjN=:%Ia!Ka.VjK0@](#Zk*ZG=rz5-c", "a{b}c[d]e,f:g#h&i*j!k|l>m%n@o",
                                 "=", "<<", "~", "$x", "x:", "(a)", "^a", "<a", "\\a"])
def test_a_plain_reading_is_yamls_reading(key):
    text = _config(key)
    read = _read_plain_config(text)
    assert read is None or read == yaml.safe_load(text)
    if key[0] in "Q(^$":
        assert read is not None


def test_any_printable_value_is_read_as_yaml_reads_it():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=500, deadline=None)
    @given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12))
    def check(value):
        for text in (_config(value), f"endpoint: {value}\n", f"endpoint: '{value}'\n",
                     configtext.write({"endpoint": value})):
            try:
                expected = yaml.safe_load(text)
            except yaml.YAMLError:
                expected = "invalid"
            read = _read_plain_config(text)
            assert read is None or read == expected, text
        assert _read_plain_config(configtext.write({"endpoint": value})) == {"endpoint": value}

    check()


@pytest.mark.parametrize("value", ["1234567890123456789012345678901234567890", "1_000", "+12", ".5", "1e3", "0b101",
                                   "0x1f", "12:30:45", "2026-12-07", "2026-12-07t20:00:00Z", ".inf", "+.INF", ".NaN",
                                   "8t6Y973PVbtNmuFEqyf!UJyg]3(cMwZ5kG]-1pMO", "0x1G", "9lives", ".hidden/key",
                                   "+y", "2026-12-07 20:00:00", "1.5.6_", "0o17"])
def test_a_value_that_starts_like_a_number_is_text_only_when_yaml_says_so(value):
    text = f"endpoint: {value}\n"
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError:
        expected = "invalid"
    read = _read_plain_config(text)
    assert read is None or read == expected
    if value in ("8t6Y973PVbtNmuFEqyf!UJyg]3(cMwZ5kG]-1pMO", "0x1G", "9lives", ".hidden/key", "+y"):
        assert read == {"endpoint": value}


@pytest.mark.parametrize("text, says", [
    (b"endpoint: tcp://127.0.0.1:1\nbroker_public_key: 1234\nclient_key_file: k\n", "broker_public_key must be text"),
    (b"endpoint: 7451\nbroker_public_key: abc\nclient_key_file: k\n", "endpoint must be text"),
    (b"endpoint: tcp://127.0.0.1:1\nbroker_public_key: abc\nclient_key_file: [k]\n", "client_key_file must be text"),
    (b"endpoints: [tcp://127.0.0.1:1, null]\nbroker_public_key: abc\nclient_key_file: k\n", "endpoints must be"),
    (b"endpoint: tcp://127.0.0.1:1\ninsecure: 'no'\n", "insecure must be true or false"),
    (b"endpoint: tcp://127.0.0.1:1\n# caf\xe9\n", "is not UTF-8 text"),
])
def test_a_config_value_of_the_wrong_type_is_one_line_not_a_traceback(tmp_path, text, says):
    """``broker_public_key: 1234`` was a TypeError traceback, a Latin-1 file a UnicodeDecodeError,
    and ``insecure: 'no'`` (a string, so true) turned CURVE off and then waited for an answer."""
    import subprocess
    import sys

    path = tmp_path / "client.yaml"
    path.write_bytes(text)
    proc = subprocess.run([sys.executable, "-m", "zerorun.cli", "-c", str(path), "--request-timeout", "1", "ping"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("zerorun: ConfigError: ") and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
