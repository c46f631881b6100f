# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Action plugin of zerorun.fleet.run_command (documented in plugins/modules/run_command.py).

Explicit targets/instance_ids: one command, every invocation in the result. Otherwise each
inventory host runs on its own instance, and the hosts of the batch share one broker command
(see plugin_utils/coalesce.py for how the forks agree on it). While it waits, the one process
that waits for a command (this task, or the batch's leader) shows progress and, with -v, the
output as it arrives (plugin_utils/live.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ansible import constants as C
from ansible.errors import AnsibleError

from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker, coalesce, live, results, task_internals
from ansible_collections.zerorun.fleet.plugins.plugin_utils.action import ZerorunAction
from ansible_collections.zerorun.fleet.plugins.plugin_utils.argspec import keep_strings_whole

try:
    from zerorun.documents import DocumentError
    from zerorun.documents.loader import parse_data
except ImportError:  # reported by broker.require_zerorun() when the plugin runs
    pass

INSTANCE_ID_VAR = "zerorun_instance_id"
FOLLOWER_GRACE = 30.0
"""Seconds a follower waits for its leader beyond the gathering time and two broker timeouts."""
SHOWN_GRACE = 5.0
"""Seconds a follower whose wait ended holds its result back for the leader's last lines,
beyond one broker timeout (the leader's last request)."""
VERBOSE_OVERRIDE = "_ansible_verbose_override"
"""Result key that keeps -v from dumping a result (whose output was shown live already)."""


def commands_list(commands: Any) -> list[str]:
    if isinstance(commands, str):
        return [commands]
    if isinstance(commands, (list, tuple)) and all(isinstance(c, (str, int, float)) for c in commands):
        return [str(c) for c in commands]
    raise AnsibleError("commands must be a string or a list of strings, got %s" % type(commands).__name__)


LOCAL_DOCUMENT_NAME = "local-document"


def local_document_name(path: str) -> str:
    """A local document is recorded under its file's own name (the broker marks its version
    $LOCAL), never under the stored document name it would then pass for."""
    base = os.path.basename(path)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return stem[:128] or LOCAL_DOCUMENT_NAME


def send_request(args: dict, read_document: Callable[[str], str]) -> dict[str, Any]:
    """The task's options as keyword arguments of ``Client.send`` (targets not included)."""
    parameters = dict(args.get("parameters") or {})
    if args.get("commands") is not None:
        parameters["commands"] = commands_list(args["commands"])
    content = args.get("document_content") or ""
    document = args.get("document") or "RunShellScript"
    if args.get("document_file"):
        content = read_document(args["document_file"])
        document = local_document_name(args["document_file"])
        if not content:  # no content is no local document: the broker looked for a stored one of this name
            raise AnsibleError("document_file %s is empty: a document is a mapping with schemaVersion"
                               % args["document_file"])
    elif content:
        document = LOCAL_DOCUMENT_NAME
    elif args.get("document_content") is not None:  # "" ran the stored document (RunShellScript) instead
        raise AnsibleError("document_content is empty: a document is a mapping with schemaVersion")
    return {
        "document": document,
        "document_version": args.get("document_version") or "",
        "document_hash": args.get("document_hash") or "",
        "document_content": content,
        "parameters": parameters,
        "timeout_seconds": args.get("timeout") or 0,
        "execution_timeout": args.get("execution_timeout") or 0,
        "max_concurrency": "" if args.get("max_concurrency") is None else str(args["max_concurrency"]),
        "max_errors": "" if args.get("max_errors") is None else str(args["max_errors"]),
        "comment": args.get("comment") or "",
        "first": args.get("first") or 0,
        "run_as": args.get("run_as") or "",
        "notify": list(args.get("notify") or []),
        "notify_invocations": bool(args.get("notify_invocations")),
    }


def check_document_text(content: str, label: str) -> None:
    """Text that is not YAML or JSON, or not a mapping, is no document: said here, naming its
    file, rather than by the broker without it. The rest of a document is the broker's to check."""
    try:
        data = parse_data(content, what=label)
    except DocumentError as exc:
        raise AnsibleError(str(exc)) from None
    if not isinstance(data, dict):
        raise AnsibleError("%s is not a document: a document is a mapping with schemaVersion" % label)


def batch_arguments(args: dict) -> dict:
    """What must be equal for hosts to share a command: everything but the broker connection."""
    return {k: v for k, v in args.items() if k not in broker.BROKER_OPTIONS}


def host_instance_id(host_vars: Any, inventory_hostname: str) -> str:
    value = host_vars.get(INSTANCE_ID_VAR) if host_vars is not None else None
    return str(value) if value else inventory_hostname


class ActionModule(ZerorunAction):
    MODULE_NAME = "run_command"
    MUTUALLY_EXCLUSIVE = [
        ["document_file", "document_content"],
        ["commands", "parameters"],
        ["commands", "document_file"],
        ["commands", "document_content"],
    ]

    ASYNC_HINT = ("Instead of poll: 0, set wait: false (the task returns once the broker accepted the command)"
                  " and follow it later with zerorun.fleet.command_info and until: info.done, as async_status"
                  " would; instead of the async time limit, set wait_timeout.")

    def normalize_args(self, args: dict) -> dict:
        return keep_strings_whole(args, "targets")

    def _read_document(self, path: str) -> str:
        content, label = self.read_document_file("document_file", path)
        if content:  # (an empty one is refused as empty, by send_request)
            check_document_text(content, label)
        return content

    def run_zerorun(self, args: dict, task_vars: dict) -> dict[str, Any]:
        broker.require_zerorun()
        if args["progress_interval"] < 0:
            raise AnsibleError("progress_interval must be 0 (no progress lines) or a number of seconds, got %d"
                               % args["progress_interval"])
        if args.get("wait_timeout") is not None and args["wait_timeout"] < 0:  # else sent, then "still running"
            raise AnsibleError("wait_timeout must be 0 or more seconds (unset: no limit), got %d" % args["wait_timeout"])
        if args.get("notify_invocations") and not args.get("notify"):  # it was dropped without a word
            raise AnsibleError("notify_invocations needs notify (the webhooks told when each invocation ends)")
        request = send_request(args, self._read_document)
        if args.get("targets") or args.get("instance_ids"):
            broker.check_targets(args.get("targets") or [])
            return self._run_explicit(args, request)
        return self._run_for_this_host(args, request, task_vars)

    # -- mode 1: explicit targets ----------------------------------------------------------

    def _run_explicit(self, args: dict, request: dict) -> dict[str, Any]:
        request = dict(request, targets=args.get("targets") or [], instance_ids=args.get("instance_ids") or [])
        shown: set[str] = set()
        with broker.connect(args) as client:
            if self._task.check_mode:
                return results.dry_run_result(broker.plain(client.send(dry_run=True, **request)), self._task.diff)
            view = client.send(**request)
            if args["wait"]:
                watch = self._watch(client, view.command_id, args, [i.instance_id for i in view.invocations])
                view = watch.run(args.get("wait_timeout"))
                shown = watch.shown
        result = results.command_result(broker.plain(view))
        result["changed"] = True
        if live.hide_result_dump(self._display.verbosity, [i["instance_id"] for i in result["invocations"]], shown):
            result[VERBOSE_OVERRIDE] = True
        if args["wait"] and not broker.is_terminal(view.status):
            result["failed"] = True
            result["msg"] = ("command %s still %s after wait_timeout=%ss; it goes on: follow it with "
                             "zerorun.fleet.command_info" % (view.command_id, view.status, args.get("wait_timeout")))
        return result

    # -- mode 2: one inventory host, coalesced with its batch -------------------------------

    def _run_for_this_host(self, args: dict, request: dict, task_vars: dict) -> dict[str, Any]:
        hostname = task_vars.get("inventory_hostname") or self._task.get_name()
        instance_id = host_instance_id(task_vars, hostname)
        if self._task.check_mode:
            with broker.connect(args) as client:
                view = client.send(dry_run=True, instance_ids=[instance_id], **request)
            return results.dry_run_host_result(broker.plain(view), instance_id, self._task.diff)

        rendezvous, ticket, command_id = self._coalesced_command(args, request, task_vars, hostname, instance_id)
        try:
            view, shown = self._await_host(args, rendezvous, ticket, command_id, instance_id)
        finally:
            rendezvous.finish(ticket)
        result = results.host_result(broker.plain(view), instance_id)
        result["changed"] = True
        if live.hide_result_dump(self._display.verbosity, [instance_id], shown):
            result[VERBOSE_OVERRIDE] = True
        if args["wait"] and not result["failed"] and not broker.is_terminal(result.get("status") or ""):
            result["failed"] = True
            result["msg"] = "instance %s still %s after wait_timeout=%ss (command %s goes on)" % (
                instance_id, result["status"], args.get("wait_timeout"), command_id)
        return result

    def _await_host(self, args: dict, rendezvous: coalesce.Rendezvous, ticket: coalesce.Ticket, command_id: str,
                    instance_id: str) -> tuple[Any, list[str]]:
        """This host's own invocation (not the batch's) and the instances whose output was shown
        live. The leader shows the batch's progress and output while it waits; a follower only
        waits, then lets the leader finish its lines before it returns."""
        with broker.connect(args) as client:
            if not args["wait"]:
                return client.get_command(command_id, instance_ids=[instance_id]), []
            if live.shows_live(explicit=False, leader=ticket.leader):
                watch = self._watch(client, command_id, args, ticket.members.values(), instance_ids=[instance_id])
                try:
                    return watch.run(args.get("wait_timeout")), sorted(watch.shown)
                finally:
                    rendezvous.record_shown(ticket, watch.shown)
            view = client.wait(command_id, timeout=args.get("wait_timeout"), instance_ids=[instance_id])
        shown: list[str] = []
        if live.awaits_leader(True, self._follows_output(), args["progress_interval"]):
            shown = rendezvous.await_shown(ticket, broker.request_timeout(args) + SHOWN_GRACE) or []
        return view, shown

    def _watch(self, client: Any, command_id: str, args: dict, batch_instances: Any,
               instance_ids: list[str] | None = None) -> live.Watch:
        return live.Watch(client, command_id, self._show, follow=self._follows_output(),
                          progress_interval=args["progress_interval"], width=live.prefix_width(batch_instances),
                          instance_ids=instance_ids or [])

    def _follows_output(self) -> bool:
        return live.follows_output(self._display.verbosity, no_log=bool(self._task.no_log or C.DEFAULT_NO_LOG))

    def _show(self, text: str, is_output: bool) -> None:
        """Through Ansible's display: from a fork it goes to the main process, which prints it now.
        Output lines are -v messages (stdout, or stderr with ANSIBLE_VERBOSE_TO_STDERR); progress
        goes to stderr, as the CLI's and other tools' progress does, so that without -v stdout
        holds only what the stdout callback writes (ansible.posix.json stays parsable)."""
        if is_output:
            self._display.v(text)
        else:
            self._display.display(text, stderr=True)

    def _coalesced_command(self, args: dict, request: dict, task_vars: dict, hostname: str,
                           instance_id: str) -> tuple[coalesce.Rendezvous, coalesce.Ticket, str]:
        """Joins the batch's rendezvous and returns it, this host's ticket (the caller finishes
        it after its wait) and the batch's command id (sent by this host if it leads)."""
        batch = list(task_vars.get("ansible_play_batch") or [hostname])
        key = coalesce.batch_key(os.getppid(), task_internals.play_uuid(self._task),
                                 task_internals.task_uuid(self._task), batch, False, batch_arguments(args))
        rendezvous = coalesce.Rendezvous(key)
        blocker = coalesce.preassignment_blocker(self._task, broker.BROKER_OPTIONS)
        preassigned = None if blocker else (lambda: self._batch_members(batch, task_vars))
        if blocker:
            self._display.vvv("zerorun: gathering the batch for this task (not pre-assigned: %s)" % blocker)
        ticket = rendezvous.join(hostname, instance_id, preassigned)
        try:
            if not ticket.leader:
                broker_timeout = broker.request_timeout(args)
                try:
                    return rendezvous, ticket, rendezvous.await_command(
                        ticket, coalesce.MAX_GATHER + 2 * broker_timeout + FOLLOWER_GRACE)
                except coalesce.CoalesceError as exc:
                    raise AnsibleError(str(exc)) from None
            members = ticket.members if preassigned is not None else rendezvous.gather(ticket, set(batch))
            try:
                with broker.connect(args) as client:
                    view = client.send(instance_ids=sorted(set(members.values())), **request)
            except BaseException as exc:
                rendezvous.publish(ticket, error=getattr(exc, "message", None) or str(exc) or type(exc).__name__)
                raise
            rendezvous.publish(ticket, command_id=view.command_id)
            self._display.vv("zerorun: command %s sent for %d host(s) of the batch" % (view.command_id, len(members)))
            return rendezvous, ticket, view.command_id
        except BaseException:
            rendezvous.finish(ticket)
            raise

    def _batch_members(self, batch: list[str], task_vars: dict) -> dict[str, str]:
        hostvars = task_vars.get("hostvars") or {}
        members = {}
        for host in batch:
            try:
                host_vars = hostvars[host]
            except KeyError:
                host_vars = None
            members[host] = host_instance_id(host_vars, host)
        return members
