# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Base class of the collection's action plugins: broker-only work on the controller.

Validates the task's arguments against the spec derived from the module stub's documentation,
and turns every AnsibleError (bad settings, broker unavailable, request refused) into a failed
task result with a clear ``msg`` instead of a traceback.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.plugins.action import ActionBase

from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker
from ansible_collections.zerorun.fleet.plugins.plugin_utils.argspec import module_argument_spec


class ZerorunAction(ActionBase):
    _requires_connection = False
    _supports_check_mode = True
    _supports_async = False  # a controller-side action cannot be async: see async_refusal
    TRANSFERS_FILES = False

    MODULE_NAME = ""
    MUTUALLY_EXCLUSIVE: list = []
    REQUIRED_TOGETHER: list = []
    ASYNC_HINT = "It returns as soon as the broker answers: remove async and poll from the task."
    """What to do instead of async, in the refusal (see async_refusal)."""

    def normalize_args(self, args: dict) -> dict:
        """Hook: fix argument shapes before validation (default: none)."""
        return args

    def validated_args(self) -> dict:
        validator = ArgumentSpecValidator(module_argument_spec(self.MODULE_NAME),
                                          mutually_exclusive=self.MUTUALLY_EXCLUSIVE or None,
                                          required_together=self.REQUIRED_TOGETHER or None)
        args = self.normalize_args(dict(self._task.args))
        validation = validator.validate(args)
        if validation.error_messages:
            raise AnsibleActionFail("Invalid arguments for %s: %s" % (
                self._task.action, "; ".join(validation.error_messages)))
        return broker.builtin_data(validation.validated_parameters)

    def async_refusal(self) -> str:
        """Ansible's async runs a module as a job on the host and polls it there with
        async_status; this action runs on the controller and has no such job, so async cannot
        work. Refused here with the way to do it instead (ActionBase's own refusal names none)."""
        return "%s does not support async: it runs on the Ansible controller and talks to the broker, so there" \
               " is no job on the host that async_status could poll. %s" % (self._task.action, self.ASYNC_HINT)

    def run(self, tmp=None, task_vars=None):
        if self._task.async_val:
            raise AnsibleActionFail(self.async_refusal())
        result = super().run(tmp, task_vars)
        del tmp  # not used: nothing goes to a managed node
        args = self.validated_args()
        try:
            result.update(self.run_zerorun(args, task_vars or {}))
        except AnsibleError as exc:
            result.update(failed=True, msg=exc.message)
        result.setdefault("failed", False)
        result.setdefault("changed", False)
        return result

    def run_zerorun(self, args: dict, task_vars: dict) -> dict[str, Any]:
        raise NotImplementedError

    def read_document_file(self, option: str, path: str) -> tuple[str, str]:
        """The text of the local document file an option names, looked for as ``copy`` looks for
        its src (files/ of the role, then of the playbook, or the path itself) and read as the
        zerorun CLI reads one; also the words that name it in a message (``option path``, and
        where it was found when that is elsewhere). A file that cannot be read fails the task
        with one line naming it and what is wrong (missing, a directory, unreadable, not UTF-8)."""
        broker.require_zerorun()
        try:
            found = self._find_needle("files", path)
        except AnsibleError:
            raise AnsibleError("%s %s not found (looked in files/ of the role and the playbook)"
                               % (option, path)) from None
        label = "%s %s" % (option, path) if found == path else "%s %s (%s)" % (option, path, found)
        try:
            return broker.zclient.read_document_file(found, label), label
        except broker.zclient.DocumentFileError as exc:
            raise AnsibleError(str(exc)) from None
