# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Action plugin of zerorun.fleet.command_info (documented in plugins/modules/command_info.py)."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError

from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker, results
from ansible_collections.zerorun.fleet.plugins.plugin_utils.action import ZerorunAction


def info_result(command: dict, include_output: bool = True) -> dict[str, Any]:
    """The command as run_command reports it, but informational: never failed for its outcome."""
    result = results.command_result(command, with_output=include_output)
    result["done"] = result["status"] not in results.NOT_DONE
    result["failed"] = False
    return result


class ActionModule(ZerorunAction):
    MODULE_NAME = "command_info"

    def run_zerorun(self, args: dict, task_vars: dict) -> dict[str, Any]:
        if args.get("wait_timeout") is not None and args["wait_timeout"] < 0:  # was taken as 0, without a word
            raise AnsibleError("wait_timeout must be 0 or more seconds (unset: no limit), got %d" % args["wait_timeout"])
        with broker.connect(args) as client:
            if args["wait"]:
                view = client.wait(args["command_id"], timeout=args.get("wait_timeout"),
                                   include_output=args["include_output"])
            else:
                view = client.get_command(args["command_id"], include_output=args["include_output"])
        return info_result(broker.plain(view), args["include_output"])
