# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The ``attributes`` every module of the collection shares, written once.

- ``zerorun.fleet.attributes`` (DOCUMENTATION): where the module runs (the controller, which
  talks to the broker), for every module.
- ``zerorun.fleet.attributes.info`` (INFO): the check and diff modes of the modules that only
  read (command_info, instance_info).

A module's own ``attributes:`` entries are merged over these.
"""

from __future__ import annotations


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
attributes:
  platform:
    support: full
    platforms: all
    description: Runs on the Ansible controller and talks to the broker.
"""

    INFO = r"""
attributes:
  check_mode:
    support: full
    description: Only reads; runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
"""
