"""The client config the broker writes is read without PyYAML; anything less plain is left to
YAML, and both readings agree."""

from __future__ import annotations

import pytest
import yaml

from zerorun.client import _read_config, _read_plain_config

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


@pytest.mark.parametrize("text", ["endpoint: tcp://a:1\ninsecure: true\n", "endpoints:\n- tcp://a:1\n",
                                  "endpoint: \"tcp://a:1\"\n", "endpoint: tcp://a:1 # comment\n",
                                  "endpoint: tcp://a:1\nendpoint: tcp://b:1\n", "  endpoint: tcp://a:1\n",
                                  "endpoint: null\n", "endpoint: 'it''s'\n"])
def test_anything_less_plain_is_left_to_yaml(text):
    assert _read_plain_config(text) is None
