# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The broker connection options, shared by every plugin of the collection.

Three variants of the same options (tests/unit/plugins/plugin_utils/test_argspec.py checks that
they agree; sanity wants literal strings here, so they are written out each time):

- ``zerorun.fleet.broker`` (DOCUMENTATION) for the modules. Module docs cannot carry ``env:``
  entries, so the action plugins add ``fallback=(env_fallback, [VAR])`` from ``ENV_VARS``.
- ``zerorun.fleet.broker.plugin`` (PLUGIN) for the inventory plugin, with ``env:`` entries read
  by Ansible's config system (how AWX inventory sources inject credentials).
- ``zerorun.fleet.broker.connection`` (CONNECTION) for the connection plugin: also host/group
  variables ``ansible_zerorun_<option>`` (the inventory plugin sets them with ``set_connection``)
  and ``ansible.cfg`` keys in ``[zerorun_connection]``, as Ansible users expect of a connection.
"""

from __future__ import annotations

CONNECTION_VARS = {
    "config_file": "ansible_zerorun_config",
    "endpoint": "ansible_zerorun_endpoint",
    "broker_key": "ansible_zerorun_broker_key",
    "client_key_file": "ansible_zerorun_client_key_file",
    "broker_timeout": "ansible_zerorun_broker_timeout",
}
CONNECTION_INI_SECTION = "zerorun_connection"

ENV_VARS = {
    "config_file": "ZERORUN_CONFIG",
    "endpoint": "ZERORUN_ENDPOINT",
    "broker_key": "ZERORUN_BROKER_KEY",
    "client_key_file": "ZERORUN_CLIENT_KEY_FILE",
    "broker_timeout": "ZERORUN_BROKER_TIMEOUT",
}


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  config_file:
    description:
      - Client config file (YAML with C(endpoint), C(broker_public_key), C(client_key_file)), as used by the C(zerorun) CLI.
      - Without it, C(~/.config/zerorun/client.yaml) and C(/etc/zerorun/client.yaml) are tried. Options given here override the file.
      - The environment variable E(ZERORUN_CONFIG) is used when this is not set.
    type: path
  endpoint:
    description:
      - Client endpoint of the broker, for example V(tcp://broker.example.com:7451).
      - The brokers of a cluster as one string, their endpoints separated by commas (V(tcp://b1:7451,tcp://b2:7451));
        a broker that cannot be reached is passed over for the others.
      - The environment variable E(ZERORUN_ENDPOINT) is used when this is not set.
    type: str
  broker_key:
    description:
      - Public CurveZMQ key of the broker, the 40-character Z85 text or the path of a public key file.
      - The environment variable E(ZERORUN_BROKER_KEY) is used when this is not set.
    type: str
  client_key_file:
    description:
      - Path of this client's secret CurveZMQ key file (a key the broker accepts as a client key).
      - Without a key file, the secret key itself is read from E(ZERORUN_CLIENT_SECRET_KEY) when set (how the AWX
        credential type C(meta/awx_credential_type.yml) of this collection gives it).
      - The environment variable E(ZERORUN_CLIENT_KEY_FILE) is used when this is not set.
    type: path
  broker_timeout:
    description:
      - Seconds to wait for the broker's answer to each request before reporting it unavailable.
      - The environment variable E(ZERORUN_BROKER_TIMEOUT) is used when this is not set.
    type: float
    default: 10
"""

    PLUGIN = r"""
options:
  config_file:
    description:
      - Client config file (YAML with C(endpoint), C(broker_public_key), C(client_key_file)), as used by the C(zerorun) CLI.
      - Without it, C(~/.config/zerorun/client.yaml) and C(/etc/zerorun/client.yaml) are tried. Options given here override the file.
    type: path
    env:
      - name: ZERORUN_CONFIG
  endpoint:
    description:
      - Client endpoint of the broker, for example V(tcp://broker.example.com:7451).
      - The brokers of a cluster as one string, their endpoints separated by commas (V(tcp://b1:7451,tcp://b2:7451));
        a broker that cannot be reached is passed over for the others.
    type: str
    env:
      - name: ZERORUN_ENDPOINT
  broker_key:
    description:
      - Public CurveZMQ key of the broker, the 40-character Z85 text or the path of a public key file.
    type: str
    env:
      - name: ZERORUN_BROKER_KEY
  client_key_file:
    description:
      - Path of this client's secret CurveZMQ key file (a key the broker accepts as a client key).
      - Without a key file, the secret key itself is read from E(ZERORUN_CLIENT_SECRET_KEY) when set (how the AWX
        credential type C(meta/awx_credential_type.yml) of this collection gives it).
    type: path
    env:
      - name: ZERORUN_CLIENT_KEY_FILE
  broker_timeout:
    description:
      - Seconds to wait for the broker's answer to each request before reporting it unavailable.
    type: float
    default: 10
    env:
      - name: ZERORUN_BROKER_TIMEOUT
"""

    CONNECTION = r"""
options:
  config_file:
    description:
      - Client config file (YAML with C(endpoint), C(broker_public_key), C(client_key_file)), as used by the C(zerorun) CLI.
      - Without it, C(~/.config/zerorun/client.yaml) and C(/etc/zerorun/client.yaml) are tried. Options given here override the file.
    type: path
    env:
      - name: ZERORUN_CONFIG
    ini:
      - section: zerorun_connection
        key: config_file
    vars:
      - name: ansible_zerorun_config
  endpoint:
    description:
      - Client endpoint of the broker, for example V(tcp://broker.example.com:7451).
      - The brokers of a cluster as one string, their endpoints separated by commas (V(tcp://b1:7451,tcp://b2:7451));
        a broker that cannot be reached is passed over for the others.
    type: str
    env:
      - name: ZERORUN_ENDPOINT
    ini:
      - section: zerorun_connection
        key: endpoint
    vars:
      - name: ansible_zerorun_endpoint
  broker_key:
    description:
      - Public CurveZMQ key of the broker, the 40-character Z85 text or the path of a public key file.
    type: str
    env:
      - name: ZERORUN_BROKER_KEY
    ini:
      - section: zerorun_connection
        key: broker_key
    vars:
      - name: ansible_zerorun_broker_key
  client_key_file:
    description:
      - Path of this client's secret CurveZMQ key file (a key the broker accepts as a client key).
      - Without a key file, the secret key itself is read from E(ZERORUN_CLIENT_SECRET_KEY) when set (how the AWX
        credential type C(meta/awx_credential_type.yml) of this collection gives it).
    type: path
    env:
      - name: ZERORUN_CLIENT_KEY_FILE
    ini:
      - section: zerorun_connection
        key: client_key_file
    vars:
      - name: ansible_zerorun_client_key_file
  broker_timeout:
    description:
      - Seconds to wait for the broker's answer to each request before reporting it unavailable.
    type: float
    default: 10
    env:
      - name: ZERORUN_BROKER_TIMEOUT
    ini:
      - section: zerorun_connection
        key: broker_timeout
    vars:
      - name: ansible_zerorun_broker_timeout
"""
