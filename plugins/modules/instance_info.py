# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done on the controller by plugins/action/instance_info.py,
# whose argument spec is derived from the options below.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: instance_info
short_description: List Zerorun instances matching targets
version_added: 0.1.0
description:
  - Lists the instances the Zerorun broker knows, optionally filtered by target expressions.
author:
  - Zerorun Developers (@zerorun)
extends_documentation_fragment:
  - zerorun.fleet.broker
  - zerorun.fleet.attributes
  - zerorun.fleet.attributes.info
options:
  targets:
    description:
      - Target expressions (V(tag:role=web), V(tag:env), V(instance:ID)), AND-ed; all instances when empty.
      - A single string is one target.
    type: list
    elements: str
    default: []
  include_offline:
    description:
      - Also list instances whose agent is not connected (ping status V(Inactive)).
      - By default only V(Online) and V(ConnectionLost) instances are listed.
    type: bool
    default: false
seealso:
  - module: zerorun.fleet.run_command
  - plugin: zerorun.fleet.instances
    plugin_type: inventory
"""

EXAMPLES = r"""
- name: Web servers that are online
  zerorun.fleet.instance_info:
    targets:
      - tag:role=web
  register: web

- name: Their ids
  ansible.builtin.debug:
    msg: "{{ web.instances | map(attribute='instance_id') | list }}"
"""

RETURN = r"""
instances:
  description: The matching instances.
  returned: success
  type: list
  elements: dict
  contains:
    instance_id:
      description: Instance id.
      type: str
      sample: i-0abc
    tags:
      description: The instance's tags.
      type: dict
      sample: {"role": "web", "env": "prod"}
    hostname:
      description: Host name reported by the agent.
      type: str
    platform:
      description: Platform (V(Linux), ...).
      type: str
    platform_version:
      description: Platform version.
      type: str
    agent_version:
      description: Version of the agent.
      type: str
    ping_status:
      description: V(Online), V(ConnectionLost) or V(Inactive).
      type: str
    first_seen:
      description: When the broker first saw the instance (epoch seconds).
      type: float
    last_seen:
      description: When the broker last heard from the agent (epoch seconds).
      type: float
    key_fingerprint:
      description: Fingerprint of the agent's key.
      type: str
count:
  description: Number of instances returned.
  returned: success
  type: int
  sample: 3
"""
