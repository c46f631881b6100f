# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Task results from command views (plain dicts), shaped the way Ansible users expect.

Per-host results look like the ``command`` module's (rc, stdout, stdout_lines, stderr,
stderr_lines, start, end, delta, failed, msg). ``failed`` is always set explicitly.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

SUCCESS = "Success"
HOST_INVOCATION = "zerorun_invocation"
"""The key of a per-host result that holds its whole invocation: not ``invocation``, which Ansible
keeps for a module's arguments and deletes from every registered result."""
NOT_DONE = ("Pending", "InProgress", "Delayed", "Cancelling")
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def _timestamp(epoch: float) -> str | None:
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(epoch).strftime(_TIME_FORMAT)


def _delta(start: float, end: float) -> str | None:
    if not start or not end:
        return None
    return str(datetime.timedelta(seconds=max(0.0, end - start)))


def _strip_end(text: str) -> str:
    """The command module strips trailing newlines; so do we."""
    return (text or "").rstrip("\r\n")


_CUT_MARKER = re.compile(r"\n\[output truncated by the (?:broker|agent): [^\]\n]*\]\n")


def _kept_and_produced(inv: dict[str, Any], stream: str) -> tuple[int, int]:
    """Bytes of a stream the result holds (the cut markers not counted) and bytes the instance produced."""
    kept = len(_CUT_MARKER.sub("", inv.get(stream) or "").encode("utf-8", "surrogateescape"))
    return kept, inv.get(stream + "_size", 0)


def is_truncated(inv: dict[str, Any], stream: str, with_output: bool = True) -> bool:
    """Whether the result holds less of a stream than the instance produced. Never when the
    output was not asked for (command_info's include_output=false): none of it is there, and
    none of it was cut."""
    kept, produced = _kept_and_produced(inv, stream)
    return with_output and produced > kept


def output_note(inv: dict[str, Any], command_id: Any, with_output: bool = True) -> str:
    """Where the output in the result was cut and how to get the whole of it ("" when it was not,
    and when the output was not asked for)."""
    cut = []
    for stream in ("stdout", "stderr"):
        kept, produced = _kept_and_produced(inv, stream)
        if is_truncated(inv, stream, with_output):
            cut.append("%s truncated after %d of %d bytes" % (stream, min(kept, produced), produced))
    if not cut:
        return ""
    return "%s; the whole output: zerorun show %s --instance %s --output full (or zerorun logs %s -i %s)" % (
        ", ".join(cut), command_id, inv.get("instance_id"), command_id, inv.get("instance_id"))


def invocation_summary(inv: dict[str, Any], with_output: bool = True) -> dict[str, Any]:
    """One instance's outcome: status, rc, output, steps and times (``with_output=False``: the
    view was asked for without output, so its empty output is not a truncated one)."""
    stdout = _strip_end(inv.get("stdout", ""))
    stderr = _strip_end(inv.get("stderr", ""))
    started, ended = inv.get("started_at", 0.0), inv.get("ended_at", 0.0)
    return {
        "instance_id": inv.get("instance_id"),
        "invocation_id": inv.get("invocation_id"),
        "status": inv.get("status"),
        "status_details": inv.get("status_details", ""),
        "rc": inv.get("exit_code", -1),
        "stdout": stdout,
        "stderr": stderr,
        "stdout_lines": stdout.splitlines(),
        "stderr_lines": stderr.splitlines(),
        "stdout_truncated": is_truncated(inv, "stdout", with_output),
        "stderr_truncated": is_truncated(inv, "stderr", with_output),
        "stdout_size": inv.get("stdout_size", 0),
        "stderr_size": inv.get("stderr_size", 0),
        "output_note": output_note(inv, inv.get("command_id"), with_output),
        "steps": inv.get("steps", []),
        "start": _timestamp(started),
        "end": _timestamp(ended),
        "delta": _delta(started, ended),
    }


def invocation_problem(inv: dict[str, Any]) -> str | None:
    """Why an invocation failed, naming the instance; None when it succeeded or still runs."""
    status = inv.get("status")
    if status == SUCCESS or status in NOT_DONE:
        return None
    why = [status]
    if inv.get("exit_code", -1) >= 0:
        why.append("exit code %d" % inv["exit_code"])
    if inv.get("status_details"):
        why.append(inv["status_details"])
    return "instance %s: %s" % (inv.get("instance_id"), ", ".join(why))


def document_summary(cmd: dict[str, Any]) -> dict[str, Any]:
    return {"name": cmd.get("document_name"), "version": cmd.get("document_version"),
            "sha256": cmd.get("document_sha256")}


def command_result(cmd: dict[str, Any], with_output: bool = True) -> dict[str, Any]:
    """Result of a whole command (explicit targets, command_info): every invocation listed
    (``with_output=False``: a view fetched without output, which says nothing about truncation).

    Fails when the command ended in anything but Success or when any invocation failed.
    """
    invocations = cmd.get("invocations", [])
    problems = [p for p in (invocation_problem(inv) for inv in invocations) if p]
    status = cmd.get("status")
    done = status not in NOT_DONE
    failed = bool(problems) or (done and status != SUCCESS)
    result = {
        "command_id": cmd.get("command_id"),
        "status": status,
        "status_details": cmd.get("status_details", ""),
        "document": document_summary(cmd),
        "parameters": cmd.get("parameters", {}),
        "targets": cmd.get("targets", []),
        "comment": cmd.get("comment", ""),
        "counts": cmd.get("counts", {}),
        "target_count": cmd.get("target_count", len(invocations)),
        "requested_at": _timestamp(cmd.get("requested_at", 0.0)),
        "completed_at": _timestamp(cmd.get("completed_at", 0.0)),
        "invocations": [invocation_summary(inv, with_output) for inv in invocations],
        "failed": failed,
    }
    if failed:
        head = "command %s %s" % (cmd.get("command_id"), status)
        if cmd.get("status_details"):
            head += " (%s)" % cmd["status_details"]
        shown = problems[:10] + (["... and %d more" % (len(problems) - 10)] if len(problems) > 10 else [])
        result["msg"] = head + ("; " + "; ".join(shown) if shown else "")
    elif done:
        result["msg"] = "command %s %s on %d instance(s)" % (cmd.get("command_id"), status, len(invocations))
        notes = ["%s: %s" % (inv.get("instance_id"), note) for inv in invocations
                 if (note := output_note(inv, cmd.get("command_id"), with_output))]
        if notes:
            result["msg"] += "; output truncated on %d: %s" % (len(notes), notes[0]) + (
                " (and %d more)" % (len(notes) - 1) if len(notes) > 1 else "")
    else:
        result["msg"] = "command %s sent, %s" % (cmd.get("command_id"), status)
    return result


def find_invocation(cmd: dict[str, Any], instance_id: str) -> dict[str, Any] | None:
    for inv in cmd.get("invocations", []):
        if inv.get("instance_id") == instance_id:
            return inv
    return None


def host_result(cmd: dict[str, Any], instance_id: str) -> dict[str, Any]:
    """One inventory host's result, like the command module's, from the batch's command."""
    inv = find_invocation(cmd, instance_id)
    base = {"command_id": cmd.get("command_id"), "document": document_summary(cmd)}
    if inv is None:
        base.update(failed=True, rc=-1, stdout="", stderr="", stdout_lines=[], stderr_lines=[], start=None, end=None,
                    delta=None, output_note="", instance_id=instance_id, status=None, status_details="",
                    zerorun_invocation=None,
                    msg="instance %s is not part of command %s (unknown to the broker?)"
                        % (instance_id, cmd.get("command_id")))
        return base
    summary = invocation_summary(inv)
    problem = invocation_problem(inv)
    shown = ("rc", "stdout", "stderr", "stdout_lines", "stderr_lines", "start", "end", "delta", "status", "status_details",
             "output_note")
    base.update({key: summary[key] for key in shown})
    base["instance_id"] = instance_id
    base[HOST_INVOCATION] = summary
    base["failed"] = problem is not None
    if problem:
        base["msg"] = problem
    elif summary["status"] in NOT_DONE:
        base["msg"] = "instance %s: %s (command %s)" % (instance_id, summary["status"], cmd.get("command_id"))
    else:
        base["msg"] = summary["output_note"]
    return base


def rendered_steps(cmd: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": step.get("name"), "action": step.get("action", "runShellScript"),
             "script": step.get("script", "")} for step in cmd.get("steps", [])]


def dry_run_result(cmd: dict[str, Any], with_diff: bool) -> dict[str, Any]:
    """Check mode: what would run where. Nothing was sent, nothing recorded. The same keys as
    command_result, empty where nothing ran (a loop over ``invocations`` works in both modes)."""
    invocations = cmd.get("invocations", [])
    instances = [inv.get("instance_id") for inv in invocations if inv.get("status") != "Undeliverable"]
    # instances the broker does not know: the real run fails on them (Undeliverable), so does the check
    unknown = [inv.get("instance_id") for inv in invocations if inv.get("status") == "Undeliverable"]
    result = {
        "changed": True,
        "failed": bool(unknown),
        "command_id": None,
        "status": "DryRun",
        "status_details": "",
        "document": document_summary(cmd),
        "parameters": cmd.get("parameters", {}),
        "targets": cmd.get("targets", []),
        "comment": cmd.get("comment", ""),
        "counts": {},
        "target_count": cmd.get("target_count", len(instances)),
        "requested_at": None,
        "completed_at": None,
        "invocations": [],
        "would_run_on": instances,
        "steps": rendered_steps(cmd),
        "msg": "check mode: would run %s on %d instance(s)" % (cmd.get("document_name"), len(instances)) + (
            "; unknown to the broker, would end Undeliverable: %s" % ", ".join(unknown) if unknown else ""),
    }
    if with_diff:
        result["diff"] = [{"before": "", "before_header": "(nothing runs)",
                           "after": step["script"].rstrip("\n") + "\n",
                           "after_header": "%s step %s" % (cmd.get("document_name"), step["name"])}
                          for step in result["steps"]]
    return result


def dry_run_host_result(cmd: dict[str, Any], instance_id: str, with_diff: bool) -> dict[str, Any]:
    """Check mode for one inventory host: the keys of host_result, empty where nothing ran."""
    result = dry_run_result(cmd, with_diff)
    result.update(instance_id=instance_id, rc=-1, stdout="", stderr="", stdout_lines=[], stderr_lines=[],
                  start=None, end=None, delta=None, zerorun_invocation=None, output_note="")
    return result
