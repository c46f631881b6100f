# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Action plugin of zerorun.fleet.instance_info (documented in plugins/modules/instance_info.py)."""

from __future__ import annotations

from typing import Any

from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker
from ansible_collections.zerorun.fleet.plugins.plugin_utils.action import ZerorunAction
from ansible_collections.zerorun.fleet.plugins.plugin_utils.argspec import keep_strings_whole


class ActionModule(ZerorunAction):
    MODULE_NAME = "instance_info"

    def normalize_args(self, args: dict) -> dict:
        return keep_strings_whole(args, "targets")

    def run_zerorun(self, args: dict, task_vars: dict) -> dict[str, Any]:
        broker.check_targets(args["targets"])
        with broker.connect(args) as client:
            instances = broker.plain(client.instances(args["targets"], include_offline=args["include_offline"]))
        return {"instances": instances, "count": len(instances)}
