# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done on the controller by plugins/action/command_info.py,
# whose argument spec is derived from the options below.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: command_info
short_description: Status and results of a Zerorun command
version_added: 0.1.0
description:
  - Reads a command from the Zerorun broker by id, for example one sent by
    M(zerorun.fleet.run_command) with O(zerorun.fleet.run_command#module:wait=false).
  - Poll it with C(until) on RV(done), or O(wait) for it here.
  - Reports the command's outcome without failing when the command failed; check RV(status).
author:
  - Zerorun Developers (@zerorun)
extends_documentation_fragment:
  - zerorun.fleet.broker
  - zerorun.fleet.attributes
  - zerorun.fleet.attributes.info
options:
  command_id:
    description:
      - Id of the command.
    type: str
    required: true
  wait:
    description:
      - Wait until the command is complete (or O(wait_timeout) passed).
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to wait when O(wait=true); no limit when unset. V(0) looks once; a negative number is refused.
    type: int
  include_output:
    description:
      - Include each invocation's stdout, stderr and step output.
      - With V(false), the invocations' C(stdout), C(stderr), their C(_lines) and C(steps) are empty, C(stdout_size)
        and C(stderr_size) still say how much the instance produced, and nothing is reported as truncated
        (C(stdout_truncated) and C(stderr_truncated) false, C(output_note) empty).
    type: bool
    default: true
seealso:
  - module: zerorun.fleet.run_command
"""

EXAMPLES = r"""
- name: Send a long job without waiting
  zerorun.fleet.run_command:
    targets: tag:role=db
    commands: /usr/local/bin/backup
    wait: false
  register: backup

- name: Poll until every instance is done
  zerorun.fleet.command_info:
    command_id: "{{ backup.command_id }}"
  register: info
  until: info.done
  retries: 120
  delay: 30

- name: Fail when the backup failed somewhere
  ansible.builtin.assert:
    that: info.status == 'Success'
    fail_msg: "{{ info.msg }}"
"""

RETURN = r"""
command_id:
  description: Id of the command.
  returned: success
  type: str
  sample: 9f0c6a1e7f0e4a559d551c1f7a0c2b11
done:
  description: Whether the command reached a final status.
  returned: success
  type: bool
  sample: true
status:
  description: Status of the command (V(Pending), V(InProgress), V(Success), V(Failed), V(Cancelled), V(TimedOut), V(Undeliverable)).
  returned: success
  type: str
  sample: Success
status_details:
  description: Detail of the status.
  returned: success
  type: str
document:
  description: Name, version and sha256 of the document.
  returned: success
  type: dict
parameters:
  description: Parameters of the command (secret ones redacted by the broker).
  returned: success
  type: dict
targets:
  description: Target expressions of the command.
  returned: success
  type: list
  elements: str
counts:
  description: Number of invocations per status.
  returned: success
  type: dict
  sample: {"Success": 3}
target_count:
  description: Number of targeted instances.
  returned: success
  type: int
invocations:
  description:
    - One entry per instance, as in RV(zerorun.fleet.run_command#module:invocations) (instance_id, status, rc, stdout,
      stderr, stdout_lines, stderr_lines, steps, start, end, delta).
  returned: success
  type: list
  elements: dict
requested_at:
  description: When the command was requested (controller local time).
  returned: success
  type: str
completed_at:
  description: When the command completed.
  returned: success
  type: str
msg:
  description: Summary; names failed instances and why.
  returned: always
  type: str
"""
