"""``zerorun``: the operator CLI.

Exit codes (a contract for scripts): 0 success; 1 a command ran but some invocation did not
succeed (or is still running when a wait ended); 2 a usage or request error (bad target, unknown
document, invalid parameter...) or output that cannot be written; 3 the broker is unreachable or
refused this client.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, get_args

from . import __version__, protocol
from .client import (MAX_DELIVERY_TIMEOUT, BrokerUnavailable, Client, ClientConfig, ConfigError, DocumentFileError,
                     InvalidRequest, RequestFailed, Unauthorized, ZerorunError, check_send_limits, read_document_file)

EXIT_OK, EXIT_NOT_SUCCESS, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class UsageError(ZerorunError):
    code = "UsageError"


def _since(text: str) -> float:
    """'90s', '30m', '2h', '7d', a Unix time, or an ISO date/time, as a Unix time."""
    if not text:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
            value = time.time() - float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
        if value - value == 0:  # finite: nan or inf (1e400) matched nothing, and said nothing
            return value
    except ValueError:
        pass
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"cannot read time {text!r}: use 30m, 2h, 7d, a Unix time or an ISO date") from None


def _parameters(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; a repeated NAME makes a list; a JSON list or object value is decoded."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"parameter {pair!r} must look like NAME=VALUE")
        parsed: Any = value
        if value[:1] in "[{":
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):  # nested deeper than Python decodes: text, as bad JSON is
                parsed = value
        if name in params:
            prev = params[name]
            params[name] = (prev if isinstance(prev, list) else [prev]) + (
                parsed if isinstance(parsed, list) else [parsed])
        else:
            params[name] = parsed
    return params


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _safe(text: Any) -> str:
    """A value as one printable line: control characters (a forged line, an ANSI escape in an
    instance id) escaped, never passed to the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    rows = [[_safe(c) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _every_field(data: Any) -> Any:
    """Views with every field, defaults included: the views leave defaults out on the wire, and
    ``--json`` then changed shape with the values (no ``exit_code`` while an invocation was
    pending, no ``stderr`` when it was empty)."""
    fields = getattr(type(data), "__struct_fields__", None)
    if fields is not None:
        return {name: _every_field(getattr(data, name)) for name in fields}
    if isinstance(data, dict):
        return {key: _every_field(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_every_field(value) for value in data]
    return data


def _print_json(data: Any) -> None:
    json.dump(protocol.to_builtins(_every_field(data)), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


LOCAL_VERSION = "$LOCAL"  # the version the broker records for a local document file


def _document_label(view: protocol.CommandView) -> str:
    """``NAME vN``, or ``NAME (local file)`` for a document sent from a file: never a version
    number that would pass it off as the stored document of the same name."""
    if view.document_version == LOCAL_VERSION:
        return f"{view.document_name} (local file)"
    return f"{view.document_name} v{view.document_version}"


def _exit_code(view: protocol.CommandView) -> int:
    """The exit-code contract of send, wait and show: 0 when every invocation succeeded, 1 when
    one did not or the command is not finished."""
    if view.status not in protocol.TERMINAL_STATUSES:
        return EXIT_NOT_SUCCESS
    return EXIT_OK if _command_ok(view) else EXIT_NOT_SUCCESS


def _command_ok(view: protocol.CommandView) -> bool:
    return bool(view.invocations) and all(i.status == protocol.SUCCESS for i in view.invocations) \
        if view.invocations else view.status == protocol.SUCCESS


def _print_command(view: protocol.CommandView, output: bool = True) -> None:
    print(f"command {view.command_id}: {view.status}"
          + (f" ({view.status_details})" if view.status_details not in ("", view.status) else ""))
    print(f"  document {_document_label(view)} sha256:{view.document_sha256[:16]}"
          f"  targets {' AND '.join(view.targets)}  requested {_fmt_time(view.requested_at)}"
          f" by {view.requested_by}" + (f"  run as {view.run_as}" if view.run_as else ""))
    for inv in view.invocations:
        took = f"{inv.ended_at - inv.started_at:.2f}s" if inv.ended_at and inv.started_at else ""
        detail = f" ({inv.status_details})" if inv.status_details else ""
        code = f"exit {inv.exit_code}" if inv.exit_code != -1 else ""
        print(f"--- {inv.instance_id}  {inv.status}{detail}  {code}  {took}".rstrip())
        if output:
            for stream, text in (("", inv.stdout), ("stderr: ", inv.stderr)):
                for line in text.splitlines():
                    print(f"  {stream}{line}")
            if _truncated(inv):
                print(f"  (output truncated: {inv.stdout_size} bytes of stdout, {inv.stderr_size} of stderr in all;"
                      f" the whole of it: zerorun show {view.command_id} --instance {inv.instance_id} --output full)")
    for hook in view.webhooks:
        where = f" ({hook.instance_id})" if hook.instance_id else ""
        error = f": {hook.last_error}" if hook.last_error and hook.state != "delivered" else ""
        print(f"webhook {_safe(hook.target)} [{hook.event}{where}]: {hook.state} after {hook.attempts} attempt(s)"
              f"{error}")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(view.counts.items()))
    shown, total = len(view.invocations), sum(view.counts.values())
    if shown < total:  # --instance: the footer is the whole command's, said as such
        print(f"{shown} of {total} invocation(s) shown; the command's: {counts}")
    else:
        print(f"{shown} invocation(s): {counts or 'none'}")


_CUT_MARKER = re.compile(r"\n\[output truncated by the (?:broker|agent): [^\]\n]*\]\n")


def _truncated(inv: protocol.InvocationView) -> bool:
    """Whether the view holds less than the instance produced (the markers it adds not counted)."""
    return any(size > len(_CUT_MARKER.sub("", text).encode("utf-8", "surrogateescape"))
               for text, size in ((inv.stdout, inv.stdout_size), (inv.stderr, inv.stderr_size)))


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    info = client.ping()
    if args.json:
        _print_json(info)
    else:
        print(f"broker {info['broker_version']} (protocol {info['protocol_version']}): "
              f"{info['online']}/{info['instances']} instances online, "
              f"{info['active_commands']} active command(s); you are {_safe(info['requester'])}")
        policy = info.get("policy") or {}
        if policy:
            loaded = _fmt_time(policy.get("loaded_at", 0))
            print(f"policy {policy.get('path') or '(built-in roles only)'}: loaded {loaded}, "
                  f"sha256 {str(policy.get('sha256') or '-')[:16]}")
            if policy.get("last_error"):
                print(f"policy NOT reloaded, the previous one is in force: {_safe(policy['last_error'])}")
        audit = info.get("audit") or {}
        if audit.get("failed"):
            print(f"audit log {audit.get('path')} cannot be written ({audit['failed']}): new work is refused")
        store = info.get("store") or {}
        if store.get("failed"):
            print(f"the broker's database cannot be written ({_safe(store['failed'])}): every request but ping is "
                  "refused until it can")
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Checks a policy file the way the broker loads it, without a broker."""
    from pathlib import Path

    from .policy import PolicyError, load_policy, warnings

    path = Path(args.file)
    if not path.is_file():
        print(f"zerorun: no policy file {args.file}", file=sys.stderr)
        return EXIT_USAGE
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(f"zerorun: {exc}", file=sys.stderr)
        return EXIT_USAGE
    found = warnings(policy)
    if args.json:
        _print_json({"file": args.file, "valid": True, "sha256": policy.sha256, "roles": sorted(policy.roles),
                     "clients": policy.clients, "warnings": found})
        return EXIT_OK
    print(f"{args.file}: valid ({len(policy.roles)} role(s), {len(policy.clients)} client(s); "
          f"sha256 {policy.sha256[:16]})")
    for warning in found:
        print(f"warning: {warning}")
    return EXIT_OK


def _tags_text(tags: dict[str, str] | None) -> str:
    return ",".join(f"{k}={val}" for k, val in sorted((tags or {}).items())) or "-"


def _duration(text: str) -> float:
    """'90s', '30m', '2h', '7d' or plain seconds, as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"cannot read duration {text!r}: use 90s, 30m, 2h or 7d") from None
    if value <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    return value


def _pairs(words: list[str], what: str) -> dict[str, str]:
    """KEY=VALUE words as a mapping (a value may be empty)."""
    out: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} {word!r} must look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def cmd_instances(client: Client, args: argparse.Namespace) -> int:
    """The columns of SSM's DescribeInstanceInformation: platform, version, agent version, IP,
    ping status and last seen, beside the instance's tags (and a change its agent proposes)."""
    views = client.instances(args.target, include_offline=not args.online)
    if args.json:
        _print_json(views)
        return EXIT_OK
    rows = []
    for v in views:
        facts = v.facts
        platform = (facts.os.name if facts is not None and facts.os.name else v.platform) or "-"
        version = (facts.os.version if facts is not None and facts.os.version else v.platform_version) or "-"
        address = facts.ip[0] if facts is not None and facts.ip else "-"
        tags = _tags_text(v.tags) + (f" (proposed: {_tags_text(v.pending_tags)})" if v.pending_tags is not None else "")
        rows.append([v.instance_id, v.ping_status, platform, version, v.agent_version or "-", address,
                     _fmt_time(v.last_seen), tags])
    print(_table(rows, ["INSTANCE", "PING", "PLATFORM", "VERSION", "AGENT", "IP", "LAST SEEN", "TAGS"]))
    pending = [v.instance_id for v in views if v.pending_tags is not None]
    if pending:
        print(f"{len(pending)} instance(s) propose other tags: zerorun tags approve ID (or reject ID)", file=sys.stderr)
    return EXIT_OK


def cmd_tags(client: Client, args: argparse.Namespace) -> int:
    if args.tags_action == "set":
        view = client.set_tags(args.instance_id, _pairs(args.pairs, "tag"))
    elif args.tags_action == "unset":
        view = client.unset_tags(args.instance_id, args.keys)
    else:
        view = client.tag_action(args.tags_action, args.instance_id)
    if args.json:
        _print_json(view)
    else:
        pending = f"; proposed by its agent: {_tags_text(view.pending_tags)}" if view.pending_tags is not None else ""
        print(f"{view.instance_id}: {_tags_text(view.tags)}{pending}")
    return EXIT_OK


def cmd_tokens(client: Client, args: argparse.Namespace) -> int:
    if args.tokens_action == "create":
        view = client.create_token(_pairs(args.tag, "tag"), uses=args.uses, expires_in=_duration(args.expires),
                                   instance_prefix=args.instance_prefix, comment=args.comment)
        try:
            if args.json:
                _print_json(view)
            else:
                print(view.token)  # alone on stdout: `zerorun tokens create ... > token` (shown once, never stored)
            sys.stdout.flush()
        except OSError:  # `> token` on a full disk: a live token that nobody holds, and no word of it
            print(f"zerorun: token {view.token_id} was made but could not be written out; it enrols agents until"
                  f" {_fmt_time(view.expires_at)}: zerorun tokens revoke {view.token_id}", file=sys.stderr)
            raise
        if args.json:
            return EXIT_OK
        print(f"token {view.token_id}: tags {_tags_text(view.tags)}, {view.uses} use(s), expires "
              f"{_fmt_time(view.expires_at)}" + (f", instance ids {view.instance_prefix}*" if view.instance_prefix
                                                  else "") + "; this is the only time the token is shown",
              file=sys.stderr)
        return EXIT_OK
    if args.tokens_action == "revoke":
        view = client.revoke_token(args.token_id)
        if args.json:
            _print_json(view)
        else:
            print(f"token {view.token_id}: {view.state}")
        return EXIT_OK
    views = client.tokens()
    if args.json:
        _print_json(views)
        return EXIT_OK
    rows = [[v.token_id, v.state, f"{v.uses - v.uses_left}/{v.uses}", _fmt_time(v.expires_at),
             (v.instance_prefix + "*") if v.instance_prefix else "*", _tags_text(v.tags), v.created_by]
            for v in views]
    print(_table(rows, ["TOKEN", "STATE", "USED", "EXPIRES", "INSTANCES", "TAGS", "CREATED BY"]))
    return EXIT_OK


def _progress_line(view: protocol.CommandView, started: float) -> str:
    counts = view.counts
    done = sum(v for k, v in counts.items() if k in protocol.TERMINAL_STATUSES)
    failed = sum(counts.get(k, 0) for k in (protocol.FAILED, protocol.TIMED_OUT, protocol.UNDELIVERABLE))
    running = counts.get(protocol.IN_PROGRESS, 0) + counts.get(protocol.CANCELLING, 0)
    return (f"[{time.monotonic() - started:6.1f}s] {done}/{view.target_count} done, {running} in progress, "
            f"{failed} failed, {counts.get(protocol.PENDING, 0)} pending")


def _wait(client: Client, view: protocol.CommandView, args: argparse.Namespace) -> protocol.CommandView:
    """Waits with a live progress line on a terminal (never with --json or into a pipe)."""
    if view.status in protocol.TERMINAL_STATUSES:
        return view
    show = sys.stderr.isatty() and not args.json
    if not show:
        return client.wait(view.command_id, timeout=args.wait_timeout)
    started = time.monotonic()

    def progress(current: protocol.CommandView) -> None:
        sys.stderr.write("\r\033[K" + _progress_line(current, started))
        sys.stderr.flush()

    try:
        final = client.wait(view.command_id, timeout=args.wait_timeout, include_output=False,
                            on_progress=progress, poll_interval=1.0)
    finally:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
    return client.get_command(final.command_id) if final.status in protocol.TERMINAL_STATUSES else final


def _follow(client: Client, command_id: str, instance_ids: list[str], deadline: float | None,
            json_lines: bool = False) -> protocol.OutputUpdate | None:
    """Prints output as it arrives, each line prefixed by its instance id."""
    cursors: dict[str, int] = {}
    partial: dict[tuple[str, str], str] = {}
    width = 0
    update = None
    while deadline is None or time.monotonic() < deadline:
        # the first look does not wait: a broker that is not there is said within --request-timeout
        remaining = 0.0 if update is None else 10.0 if deadline is None else \
            max(0.0, min(10.0, deadline - time.monotonic()))
        update = client.follow(command_id, cursors, instance_ids, timeout=remaining)
        cursors = update.cursors
        for chunk in update.chunks:
            if json_lines:
                print(json.dumps({"instance_id": chunk.invocation_id, "stream": chunk.stream,
                                  "data": chunk.data}), flush=True)
                continue
            key = (chunk.invocation_id, chunk.stream)
            text = partial.pop(key, "") + chunk.data
            *lines, rest = text.split("\n")
            if rest:
                partial[key] = rest
            width = max(width, len(chunk.invocation_id))
            out = sys.stdout if chunk.stream == "stdout" else sys.stderr
            for line in lines:
                out.write(f"{chunk.invocation_id:<{width}} | {line}\n")
            out.flush()
        if update.done:
            break
    for (instance_id, stream), rest in partial.items():
        (sys.stdout if stream == "stdout" else sys.stderr).write(f"{instance_id:<{width}} | {rest}\n")
    return update


def _summary(view: protocol.CommandView) -> None:
    """The end of a followed command: statuses only (the output was already printed)."""
    for inv in view.invocations:
        detail = f" ({inv.status_details})" if inv.status_details else ""
        code = f" exit {inv.exit_code}" if inv.exit_code != -1 else ""
        print(f"--- {inv.instance_id}  {inv.status}{detail}{code}")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(view.counts.items()))
    print(f"command {view.command_id}: {view.status}; {len(view.invocations)} invocation(s): {counts or 'none'}")


def _wait_and_report(client: Client, view: protocol.CommandView, args: argparse.Namespace) -> int:
    if getattr(args, "follow", False) and not args.json:
        deadline = time.monotonic() + args.wait_timeout
        _follow(client, view.command_id, [], deadline)
        view = client.get_command(view.command_id, include_output=False)
        _summary(view)
    else:
        view = _wait(client, view, args)
        if args.json:
            _print_json(view)
        else:
            _print_command(view)
    if not args.json:
        if view.status not in protocol.TERMINAL_STATUSES:
            view = client.get_command(view.command_id, include_output=False)
            outstanding = [f"{i.instance_id} ({i.status})" for i in view.invocations
                           if i.status not in protocol.TERMINAL_STATUSES]
            print(f"still outstanding after {args.wait_timeout:g}s: {', '.join(outstanding)};"
                  f" follow up with: zerorun wait {view.command_id}", file=sys.stderr)
    return _exit_code(view)


def _local_document_name(path: str) -> str:
    """A local document is recorded under its file's own name (shown marked local), never under
    the name of a stored document it would then pass for."""
    return _document_stem(path)[:128] or "local-document"


def cmd_send(client: Client, args: argparse.Namespace) -> int:
    content = ""
    if args.document_file:
        if args.document:
            raise UsageError(f"give a stored DOCUMENT ({args.document}) or --document-file, not both: a local"
                             " document is named after its file")
        content = _read_document_file(args.document_file)
        if content is None:
            return EXIT_USAGE
        if not content:  # no content is no local document to the broker: it looked for a stored one of the name
            print(f"zerorun: error: {args.document_file} is empty: a document is a mapping with schemaVersion",
                  file=sys.stderr)
            return EXIT_USAGE
        args.document = _local_document_name(args.document_file)
    if not args.document:
        print("zerorun: error: name a DOCUMENT or give --document-file", file=sys.stderr)
        return EXIT_USAGE
    if args.no_wait and args.follow:  # --follow was dropped without a word
        raise UsageError("--no-wait returns at once; --follow prints the output until the command ends: one or the"
                         " other")
    if args.follow and args.json:  # --follow was dropped without a word: no line until the end
        raise UsageError("--follow prints lines as they come, --json one view at the end: one or the other (JSON"
                         " lines: send --no-wait, then zerorun logs ID --follow --json)")
    if args.notify_invocations and not args.notify:  # it was dropped without a word
        raise UsageError("--notify-invocations needs --notify NAME|URL (the webhook told when each invocation ends)")
    check_send_limits(timeout_seconds=args.timeout, execution_timeout=args.execution_timeout,
                      max_concurrency=args.max_concurrency, max_errors=args.max_errors, first=args.first)
    # short commands are answered by the send itself; longer ones go on below (progress, follow)
    quick = 0.0 if args.no_wait or args.dry_run or args.follow else min(args.wait_timeout, 1.0)
    parameters = _parameters(args.parameter)
    try:
        view = client.send(args.document, parameters, args.target, args.instance_id,
                           document_version=args.document_version, document_hash=args.document_hash,
                           document_content=content, timeout_seconds=args.timeout or 0,
                           execution_timeout=args.execution_timeout or 0,
                           max_concurrency=args.max_concurrency, max_errors=args.max_errors,
                           comment=args.comment, dry_run=args.dry_run, first=args.first, wait=quick,
                           run_as=args.run_as, notify=args.notify, notify_invocations=args.notify_invocations)
    except KeyboardInterrupt:  # before the answer, which holds the id: it ended with nothing said
        if not args.dry_run:
            if client.ever_connected():
                print("zerorun: interrupted before the broker answered: the command may have been sent and"
                      " go on; zerorun commands --limit 5 lists the latest", file=sys.stderr)
            else:
                print(f"zerorun: interrupted; nothing was sent: the broker at {client.endpoint} was never"
                      " reached", file=sys.stderr)
        raise
    except BrokerUnavailable as exc:  # no answer: "is it running?" alone, and the command ran on unsaid
        if args.dry_run or not client.ever_connected():
            raise
        raise BrokerUnavailable(f"{exc}; the command may have been sent and go on: zerorun commands --limit 5"
                                " lists the latest once the broker answers") from None
    if args.dry_run:
        runs = [i.instance_id for i in view.invocations if i.status != protocol.UNDELIVERABLE]
        unknown = [i.instance_id for i in view.invocations if i.status == protocol.UNDELIVERABLE]
        if args.json:
            _print_json(view)
        else:
            print(f"would run {_document_label(view)} "
                  f"(sha256 {view.document_sha256}) on {len(runs)} instance(s): " + ", ".join(runs))
            for step in view.steps:
                print(f"--- step {step.name} ({step.action})" + (f" as {step.run_as}" if step.run_as else ""))
                print(step.script)
        if unknown:  # as the real send, which would exit 1
            print(f"zerorun: unknown to the broker, would end Undeliverable: {', '.join(unknown)}", file=sys.stderr)
            return EXIT_NOT_SUCCESS
        return EXIT_OK
    if args.no_wait:
        if args.json:
            _print_json(view)
        else:
            print(view.command_id)
        return EXIT_OK
    try:
        return _wait_and_report(client, view, args)
    except KeyboardInterrupt:  # Ctrl-C stops the waiting, not the command: say which one goes on
        print(f"zerorun: interrupted; command {view.command_id} goes on: zerorun wait {view.command_id}"
              f" (or zerorun cancel {view.command_id})", file=sys.stderr)
        raise
    except BrokerUnavailable as exc:  # the broker went away after it took the command: keep its id
        raise BrokerUnavailable(f"{exc}; command {view.command_id} was sent: zerorun wait {view.command_id}"
                                " once the broker answers") from None


def _refuse_other_instances(client: Client, command_id: str, asked: list[str], seen: Any = None) -> None:
    """An instance the command does not run on is a mistake (a typo), never an empty answer:
    ``show ID -i typo`` printed "0 invocation(s)" and exited 0. ``seen``: the instances a view
    filtered by ``asked`` holds (else asked of the broker)."""
    if not asked:
        return
    if seen is None:
        seen = [i.instance_id for i in client.get_command(command_id, include_output=False,
                                                          instance_ids=asked).invocations]
    unknown = [i for i in dict.fromkeys(asked) if i not in set(seen)]
    if unknown:
        known = [i.instance_id for i in client.get_command(command_id, include_output=False).invocations]
        raise InvalidRequest(f"command {command_id} has no invocation on {', '.join(unknown)}"
                             f" (it runs on: {', '.join(known) or 'none'})", "NotFound")


def _write_full_output(client: Client, command_id: str, instance_id: str) -> int:
    """The whole output of one instance's invocation, byte for byte: stdout to stdout, stderr to
    stderr; a note on stderr when the broker does not hold all of it."""
    sys.stdout.flush()
    last = None
    for stream, sink in (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)):
        last = client.stream_output(command_id, instance_id, stream, sink)
        sink.flush()
        if not last.complete:
            print(f"zerorun: {stream} of {instance_id} is incomplete ({last.size} of {last.produced} bytes): "
                  f"{last.note or 'still being read from the agent'}", file=sys.stderr)
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    if args.output == "full":
        if args.json:  # the raw bytes went out, and a script parsed them as JSON
            raise UsageError("--output full writes the output itself, byte for byte: not with --json")
        if len(args.instance) != 1:
            raise UsageError("--output full needs exactly one --instance ID (the whole output of one invocation)")
        _refuse_other_instances(client, args.command_id, args.instance)
        _write_full_output(client, args.command_id, args.instance[0])
        return _exit_code(client.get_command(args.command_id, include_output=False))
    view = client.get_command(args.command_id, instance_ids=args.instance)
    _refuse_other_instances(client, args.command_id, args.instance, [i.instance_id for i in view.invocations])
    if args.json:
        _print_json(view)
    else:
        _print_command(view)
        if args.script:
            for step in view.steps:
                print(f"--- step {step.name} ({step.action})" + (f" as {step.run_as}" if step.run_as else ""))
                print(step.script)
    return _exit_code(view)


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    view = client.get_command(args.command_id, include_output=False)
    if view.status in protocol.TERMINAL_STATUSES:
        view = client.get_command(args.command_id)  # finished: the same view as show, output included
    return _wait_and_report(client, view, args)


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    _refuse_other_instances(client, args.command_id, args.instance)  # a mistake, not a no-op
    view = client.cancel(args.command_id, args.instance)
    if args.json:
        _print_json(view)
    else:
        print(f"command {view.command_id}: {view.status}")
    return EXIT_OK


def cmd_commands(client: Client, args: argparse.Namespace) -> int:
    if args.before_id and not args.before:
        raise UsageError("--before-id goes with --before (both from a page's '(more: ...)' line)")
    views = client.commands(limit=args.limit, status=args.status, document=args.document,
                            since=_since(args.since), before=_since(args.before), target=args.target,
                            before_id=args.before_id)
    if args.json:
        _print_json(views)  # the hint below too, on stderr: stdout stays the list
    else:
        rows = [[v.command_id, v.status,
                 v.document_name + (" (local file)" if v.document_version == LOCAL_VERSION else ""),
                 str(v.target_count), _fmt_time(v.requested_at), " AND ".join(v.targets)] for v in views]
        print(_table(rows, ["COMMAND", "STATUS", "DOCUMENT", "INSTANCES", "REQUESTED", "TARGETS"]))
    if len(views) == args.limit:
        # the exact time (repr): rounded to 6 places it was later than the row half the time,
        # and the next page began with the row this one ended with; and the row's id: a command
        # requested at the very same time (another broker of a cluster, a coarse clock) comes next
        print(f"(more: --before {views[-1].requested_at!r} --before-id {views[-1].command_id})", file=sys.stderr)
    return EXIT_OK


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    if args.wait_timeout is not None and not args.follow:  # it was dropped without a word
        raise UsageError("--wait-timeout goes with --follow (logs without it prints what there is now)")
    args.wait_timeout = args.wait_timeout or 0.0
    _refuse_other_instances(client, args.command_id, args.instance)
    if args.follow:
        deadline = None if args.wait_timeout <= 0 else time.monotonic() + args.wait_timeout
        update = _follow(client, args.command_id, args.instance, deadline, json_lines=args.json)
        if update is not None and update.done:
            return EXIT_OK
        print(f"zerorun: command {args.command_id} still running after {args.wait_timeout:g}s; follow on with:"
              f" zerorun logs {args.command_id} --follow", file=sys.stderr)  # exit 1 alone said nothing
        return EXIT_NOT_SUCCESS
    if len(args.instance) == 1 and not args.json:  # one instance: its whole output, byte for byte
        return _write_full_output(client, args.command_id, args.instance[0])
    update = client.follow(args.command_id, {}, args.instance, timeout=0)
    if args.json:  # each chunk names its instance as `logs --follow --json` does (invocation_id: the same, as before)
        data = _every_field(update)
        data["chunks"] = [{"instance_id": chunk["invocation_id"], **chunk} for chunk in data["chunks"]]
        _print_json(data)
        return EXIT_OK
    for chunk in update.chunks:
        out = sys.stdout if chunk.stream == "stdout" else sys.stderr
        for line in chunk.data.splitlines():
            out.write(f"{chunk.invocation_id} | {line}\n")
    return EXIT_OK


def _read_public_key(value: str) -> str:
    """A z85 public key given inline or as a key file (.key or .key_secret)."""
    from . import keys as keyfiles

    try:
        if len(value) == 40 and not os.path.exists(value):
            return keyfiles.parse_public_key(value).decode()
        return keyfiles.load_public(value).decode()
    except (keyfiles.KeyFileError, OSError) as exc:
        raise UsageError(f"cannot read a public key from {value!r}: {exc}") from None


def cmd_keys(client: Client, args: argparse.Namespace) -> int:
    if args.tag and args.action != "add":
        raise UsageError("--tag goes with keys add agent (zerorun tags set changes an instance's tags)")
    if args.key and args.action not in ("add", "replace"):  # it was dropped without a word
        raise UsageError(f"--key goes with keys add and keys replace, not keys {args.action}")
    if args.action == "add":
        words = list(args.args) + ([args.key] if args.key else [])
        if len(words) != 3 or words[0] not in ("agent", "client"):
            raise UsageError("usage: zerorun keys add agent|client NAME PUBLIC_KEY_OR_FILE [--tag KEY=VALUE ...]"
                             " (or the key as --key=KEY)")
        kind, name, key = words
        if args.tag and kind != "agent":
            raise UsageError("--tag goes with agent keys only")
        view = client.add_key(kind, name, _read_public_key(key), _pairs(args.tag, "tag"))
        if args.json:
            _print_json(view)
        else:
            print(f"{view.kind} key {view.fingerprint} ({view.name}): {view.state}")
        return EXIT_OK
    args.name = args.args[0] if args.args else ""
    if len(args.args) > (0 if args.action == "list" else 1) and args.action != "replace":
        # `keys reject web-2 db-1` rejected web-2 alone, exit 0: db-1 stayed accepted unsaid
        if args.action == "list":
            raise UsageError(f"keys list takes no NAME (it lists every key), not {' '.join(args.args)!r}")
        raise UsageError(f"keys {args.action} takes one NAME, not {' '.join(args.args)!r}: run it once per key")
    if args.action == "list":
        views = client.keys()
        if args.json:
            _print_json(views)
            return EXIT_OK
        rows = [[v.kind, v.name, v.state, v.fingerprint, _fmt_time(v.updated_at),
                 _tags_text(v.tags) if v.kind == "agent" else "",
                 _tags_text(v.proposed_tags) if v.proposed_tags is not None else ""] for v in views]
        print(_table(rows, ["KIND", "NAME", "STATE", "FINGERPRINT", "UPDATED", "TAGS", "PROPOSED TAGS"]))
        return EXIT_OK
    if not args.name:
        print(f"zerorun: error: keys {args.action} needs an instance id or key fingerprint", file=sys.stderr)
        return EXIT_USAGE
    replacement = ""
    if args.action == "replace":
        words = list(args.args[1:]) + ([args.key] if args.key else [])
        if len(words) != 1:
            raise UsageError("usage: zerorun keys replace NAME NEW_KEY (a known key's fingerprint, e.g. the denied "
                             "key of a rebuilt instance, or a public key or key file)")
        try:
            replacement = _read_public_key(words[0])
        except UsageError:
            replacement = words[0]  # a fingerprint (or its prefix): the broker knows the key
    view = client.key_action(args.action, args.name, replacement)
    if args.json:
        _print_json(view)
    else:
        print(f"{view.kind} key {view.fingerprint} ({view.name}): {view.state}"
              if args.action != "delete" else f"deleted {view.kind} key {view.fingerprint} ({view.name})")
    return EXIT_OK


# -- clients -----------------------------------------------------------------------------------


def cmd_clients_create(client: Client, args: argparse.Namespace) -> int:
    from .onboarding import create_client

    created = create_client(client, args.name, args.role, args.out, endpoint=args.endpoint,
                            request_timeout=args.request_timeout)
    if args.json:
        _print_json(created.as_dict())
        return EXIT_OK
    print(f"client {created.name}: key {created.fingerprint} accepted by the broker")
    print(f"  {created.secret_key_file}  secret key (0600): give it to {created.name} only")
    print(f"  {created.public_key_file}  public key")
    print(f"  {created.config_file}  endpoint {created.endpoint}, paths relative to the file")
    if created.role_in_effect and created.role_seen and created.role_seen != created.role:
        print(f"role: the broker's policy gives {created.name} the role {created.role_seen}, not {created.role}:"
              f" change its line under `clients:` in the policy file to\n    {created.policy_line}")
    elif created.role_in_effect:
        print(f"role: the broker's policy already names {created.name}"
              + (f" (role {created.role_seen})" if created.role_seen else
                 f"; check that its line under `clients:` reads `{created.policy_line}`"))
    else:
        print(f"role: not set yet. Roles are bound to client names in the broker's policy file"
              f" (<broker state dir>/policy.yaml, or its --policy file); add under `clients:`\n"
              f"    {created.policy_line}\n"
              f"  The broker reloads the file when it changes (or on SIGHUP). Until then the broker denies"
              f" {created.name} everything (default deny).")
    for note in created.notes:
        print(f"note: {note}")
    print(f"try: zerorun -c {created.config_file} ping")
    return EXIT_OK


def cmd_clients_list(client: Client, args: argparse.Namespace) -> int:
    views = [k for k in client.keys() if k.kind == "client"]
    if args.json:
        _print_json(views)
        return EXIT_OK
    rows = [[v.name, v.state, v.fingerprint, _fmt_time(v.updated_at)] for v in views]
    print(_table(rows, ["CLIENT", "STATE", "FINGERPRINT", "UPDATED"]))
    return EXIT_OK


# -- documents ---------------------------------------------------------------------------------


def _read_document_file(path: str) -> str | None:
    """A document file's text ("-": stdin); None after printing a one-line error."""
    try:
        return read_document_file(path)
    except DocumentFileError as exc:
        print(f"zerorun: error: {exc}", file=sys.stderr)
    return None


_DOC_LIST_DROP = ("content", "parameters", "created_at", "created_by", "document_format")
_DOC_VERSION_DROP = ("content", "parameters", "default_version", "latest_version")


def _doc_json(info: protocol.DocumentInfo, drop: tuple[str, ...]) -> dict[str, Any]:
    """Every field the operation fills, defaults included (``--json`` keeps a stable shape)."""
    return {f: protocol.to_builtins(getattr(info, f)) for f in info.__struct_fields__ if f not in drop}


def _doc_row(d: protocol.DocumentInfo) -> list[str]:
    return [d.name, str(d.default_version or d.version), str(d.latest_version or d.version),
            "yes" if d.builtin else "", d.sha256[:16], d.description.split("\n")[0][:60]]


def cmd_documents_list(client: Client, args: argparse.Namespace) -> int:
    docs = client.documents()
    if args.json:
        _print_json([_doc_json(d, _DOC_LIST_DROP) for d in docs])
        return EXIT_OK
    print(_table([_doc_row(d) for d in docs], ["NAME", "DEFAULT", "LATEST", "BUILTIN", "SHA256", "DESCRIPTION"]))
    return EXIT_OK


def _parameter_details(info: protocol.DocumentInfo) -> dict[str, dict[str, Any]]:
    """Each parameter's declaration, read from the document's own text (which the broker sends
    with one version): type, default (secret ones as ***), allowed values, pattern and limits."""
    details = {name: dict(p) for name, p in info.parameters.items()}
    if not info.content:
        return details
    try:
        from zerorun import documents as engine  # YAML only for this command

        doc = engine.load_document(info.content, name=info.name)
    except Exception:  # the broker accepted it; a parse problem here only costs the details
        return details
    for name, spec in doc.parameters.items():
        entry = details.setdefault(name, {"type": spec.type, "description": spec.description,
                                          "required": spec.required, "secret": spec.secret})
        if not spec.required:
            entry["default"] = "***" if spec.secret and spec.default not in ("", None) else spec.default
        if spec.allowed_values:
            entry["allowed_values"] = list(spec.allowed_values)
        if spec.allowed_pattern:
            entry["allowed_pattern"] = spec.allowed_pattern
        for key in ("min_items", "max_items", "min_chars", "max_chars"):
            if getattr(spec, key) is not None:
                entry[key] = getattr(spec, key)
    return details


def _allowed_text(entry: dict[str, Any]) -> str:
    parts = []
    if entry.get("allowed_values"):
        parts.append("|".join(map(str, entry["allowed_values"])))
    if entry.get("allowed_pattern"):
        parts.append(f"pattern {entry['allowed_pattern']}")
    for key, label in (("min_items", "items >="), ("max_items", "items <="), ("min_chars", "chars >="),
                       ("max_chars", "chars <=")):
        if key in entry:
            parts.append(f"{label} {entry[key]}")
    text = "; ".join(parts)
    return text if len(text) <= 60 else text[:57] + "..."


def _default_text(entry: dict[str, Any]) -> str:
    if "default" not in entry:
        return "(required)"
    value = entry["default"]
    text = value if isinstance(value, str) else json.dumps(value)
    text = '""' if text == "" else text
    return text if len(text) <= 40 else text[:37] + "..."


def cmd_documents_show(client: Client, args: argparse.Namespace) -> int:
    doc = client.get_document(args.name, args.version)
    if args.json:
        data = _doc_json(doc, ("default_version", "latest_version"))
        data["parameters"] = _parameter_details(doc)
        _print_json(data)
        return EXIT_OK
    if args.content:
        sys.stdout.write(doc.content)  # byte for byte: `> FILE` keeps the SHA-256
        return EXIT_OK
    details = _parameter_details(doc)
    print(f"document {doc.name} v{doc.version}{' (default)' if doc.is_default else ''}"
          f"{' built-in' if doc.builtin else ''}  {doc.document_format}  sha256:{doc.sha256}")
    if doc.created_at or doc.created_by:
        print(f"  created {_fmt_time(doc.created_at)} by {doc.created_by or '-'}")
    if doc.description:
        print(f"  {doc.description}")
    rows = [[name, str(p.get("type", "")), _default_text(p), _allowed_text(p), "yes" if p.get("secret") else "",
             str(p.get("description", "")).split("\n")[0][:70]] for name, p in details.items()]
    if rows:
        print(_table(rows, ["PARAMETER", "TYPE", "DEFAULT", "ALLOWED", "SECRET", "DESCRIPTION"]))
    else:
        print("no parameters")
    return EXIT_OK


def cmd_documents_versions(client: Client, args: argparse.Namespace) -> int:
    versions = client.document_versions(args.name)
    if args.json:
        _print_json([_doc_json(v, _DOC_VERSION_DROP) for v in versions])
        return EXIT_OK
    rows = [[str(v.version), "yes" if v.is_default else "", v.sha256, v.document_format,
             _fmt_time(v.created_at), v.created_by or "-"] for v in versions]
    print(_table(rows, ["VERSION", "DEFAULT", "SHA256", "FORMAT", "CREATED", "BY"]))
    return EXIT_OK


def _print_version(verb: str, info: protocol.DocumentInfo, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(_doc_json(info, _DOC_VERSION_DROP))
    else:
        print(f"{verb} document {info.name} version {info.version}"
              f"{' (default)' if info.is_default else ''} sha256:{info.sha256}")
    return EXIT_OK


def cmd_documents_create(client: Client, args: argparse.Namespace) -> int:
    content = _read_document_file(args.file)
    if content is None:
        return EXIT_USAGE
    return _print_version("created", client.create_document(args.name, content), args)


def cmd_documents_update(client: Client, args: argparse.Namespace) -> int:
    content = _read_document_file(args.file)
    if content is None:
        return EXIT_USAGE
    return _print_version("updated", client.update_document(args.name, content, set_default=args.set_default),
                          args)


def cmd_documents_set_default(client: Client, args: argparse.Namespace) -> int:
    return _print_version("default set:", client.set_default_document_version(args.name, args.version), args)


def cmd_documents_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_document(args.name, args.version)
    if args.json:
        _print_json({"deleted": args.name, "version": args.version})
    else:
        print(f"deleted document {args.name}" + (f" version {args.version}" if args.version else ""))
    return EXIT_OK


def _local_document(args: argparse.Namespace) -> Any:
    """The engine and the parsed FILE (validate/render), or None after a one-line error."""
    from zerorun import documents as engine  # YAML and Jinja only for these local commands

    content = _read_document_file(args.file)
    if content is None:
        return None
    try:
        return engine, engine.load_document(content, name=args.name or _document_stem(args.file))
    except engine.DocumentError as exc:
        print(f"zerorun: InvalidDocument: {args.file}: {exc}", file=sys.stderr)
    except Exception as exc:  # an engine bug must still end in one line, not a traceback
        print(f"zerorun: InvalidDocument: {args.file}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return None


def _document_stem(path: str) -> str:
    import os.path

    base = os.path.basename(path)
    return base.rsplit(".", 1)[0] if "." in base else (base if path != "-" else "local-document")


def cmd_documents_validate(args: argparse.Namespace) -> int:
    loaded = _local_document(args)
    if loaded is None:
        return EXIT_USAGE
    engine, doc = loaded
    steps = []
    for step in doc.steps:
        pre = step.precondition
        # an unsupported step passes only when a platformType precondition skips it on Linux
        skipped = pre is not None and "platformType" in pre[1] and "Linux" not in pre[1]
        steps.append({"name": step.name, "action": step.action, "supported": step.supported,
                      "precondition": list(pre[1]) if pre else None,
                      "runs_on_linux": step.supported or skipped,
                      "runs_document": step.inputs.get("documentPath") if step.action == "aws:runDocument" else None})
    language = engine.TEMPLATING_DESCRIPTIONS[doc.templating]
    report = {"name": doc.name, "valid": True, "sha256": doc.sha256, "schema_version": doc.schema_version,
              "templating": doc.templating, "description": doc.description,
              "parameters": {n: {"type": p.type, "required": p.required, "secret": p.secret,
                                 "description": p.description} for n, p in doc.parameters.items()},
              "steps": steps}
    if args.json:
        _print_json(report)
        return EXIT_OK
    print(f"{args.file}: valid (schemaVersion {doc.schema_version}, {language}, {len(doc.parameters)} "
          f"parameter(s), {len(doc.steps)} step(s)) sha256:{doc.sha256}")
    for s in steps:
        if s["supported"]:
            note = f"  (runs document {s['runs_document']} when sent)" if s["runs_document"] else ""
        else:
            what = "documentType" if s["runs_document"] else "action"
            note = (f"  (unsupported {what}: skipped on Linux by its precondition)" if s["runs_on_linux"]
                    else f"  (unsupported {what}: sending it to Linux is refused)")
        print(f"  step {s['name']} ({s['action']}){note}")
    return EXIT_OK


def cmd_documents_render(args: argparse.Namespace) -> int:
    parameters = _parameters(args.parameter)  # a UsageError: exit 2 (see main)
    loaded = _local_document(args)
    if loaded is None:
        return EXIT_USAGE
    engine, doc = loaded
    try:
        rendering = engine.render(doc, parameters, platform=args.platform, resolver=engine.builtin_resolver)
        shown = rendering.display_steps
    except engine.ParameterError as exc:
        print(f"zerorun: InvalidParameters: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except engine.DocumentError as exc:
        print(f"zerorun: InvalidDocument: {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # an engine bug must still end in one line, not a traceback
        print(f"zerorun: InvalidDocument: {args.file}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import dataclasses

    from zerorun.documents.render import precondition_holds

    if args.json:
        _print_json({"name": doc.name, "sha256": doc.sha256, "platform": args.platform,
                     "templating": doc.templating, "parameters": rendering.shown_parameters, "steps": shown,
                     "runs": [precondition_holds(s.precondition, args.platform) for s in shown],
                     "nested": [dataclasses.asdict(n) for n in rendering.nested]})
        return EXIT_OK
    print(f"# {doc.name} sha256:{doc.sha256} on {args.platform}, {engine.TEMPLATING_DESCRIPTIONS[doc.templating]}"
          f" (secret values shown as ***; nothing sent)")
    scopes = {scope.name: scope for step in shown for scope in step.scope}
    for nested in rendering.nested:
        scope = scopes.get(nested.step)
        flow = [f"{key} {value}" for key, value in (("onFailure", scope.on_failure), ("onSuccess", scope.on_success))
                if value] if scope is not None else []
        if scope is not None and scope.finally_step:
            flow.append("finallyStep")
        print(f"# step {nested.step} runs {nested.name} v{nested.version} sha256:{nested.sha256}"
              + (f" ({', '.join(flow)}, applied to its outcome)" if flow else ""))
    for step in shown:
        extra = [f"timeout {step.timeout_seconds}s"]
        if step.working_directory:
            extra.append(f"cwd {step.working_directory}")
        if step.interpreter:
            extra.append("interpreter " + " ".join(step.interpreter))
        for key, value in (("onFailure", step.on_failure), ("onSuccess", step.on_success)):
            if value:
                extra.append(f"{key} {value}")
        if step.finally_step:
            extra.append("finallyStep")
        if step.precondition is not None:
            extra.append(f"precondition {step.precondition.op} {step.precondition.operands}")
        print(f"--- step {step.name} ({step.action}) {', '.join(extra)}")
        if not precondition_holds(step.precondition, args.platform):
            print(f"(skipped on {args.platform}: precondition not met)")
        else:
            print(step.script)
    return EXIT_OK


def _request_timeout(text: str) -> float:
    """Seconds to wait for each answer, from more than 0 to 30 days: ``nan``, ``inf`` or
    ``1e300`` were tracebacks from ZeroMQ's poll, and 0 or less blamed a broker that was there
    ("no answer within 0s")."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_DELIVERY_TIMEOUT:  # false for nan too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from more than 0 to"
                                         f" {MAX_DELIVERY_TIMEOUT} (30 days)")
    return value


def _wait_timeout(text: str) -> float:
    """``--wait-timeout``: 0 or more seconds. ``send --wait-timeout -5`` sent the command, then
    reported it "still outstanding after -5s"; ``nan`` followed nothing and exited 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # false for nan too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


MAX_COMMANDS_LIMIT = 1000
"""The most commands one ``commands`` page holds: the broker's stores cap LIMIT at this."""


def _commands_limit(text: str) -> int:
    """``commands --limit``: 1 or more, a page holding at most the broker's cap. A larger limit
    gave 1000 rows and no "(more: ...)" hint (the hint compared with the limit asked), 0 or less
    quietly gave 1 row, and a number past 2**64 was a traceback from the encoder."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of commands, 1 or more")
    return min(value, MAX_COMMANDS_LIMIT)


def _command_status(text: str) -> str:
    """``commands --status``: a status as SSM spells it, in any case ("" for any). Another word
    went to the broker, which could only answer "malformed request or unsupported protocol
    version"."""
    names = {name.lower(): name for name in get_args(protocol.InvocationStatus)}
    if text and text.lower() not in names:
        raise argparse.ArgumentTypeError(f"no status {text!r}: use one of {', '.join(names.values())}")
    return names.get(text.lower(), "")


def _config_file(text: str) -> str:
    """``-c FILE``: an empty FILE (``-c "$CONFIG"`` with CONFIG unset) is refused; it was taken as no
    -c at all, and the command went to the broker of $ZERORUN_CONFIG or ~/.config/zerorun/client.yaml."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no config file")
    return text


def _common_options(main: bool) -> argparse.ArgumentParser:
    """Options that work before or after the subcommand (``zerorun --json keys`` and ``zerorun
    keys --json``). The subcommands' copies default to SUPPRESS, so they never undo a value
    given before the subcommand."""
    parser = _Parser(add_help=False)
    unset = argparse.SUPPRESS
    parser.add_argument("-c", "--config", type=_config_file, default=None if main else unset, metavar="FILE",
                        help="client config file (default: $ZERORUN_CONFIG, ~/.config/zerorun/client.yaml,"
                             " /etc/zerorun/client.yaml)")
    parser.add_argument("--request-timeout", type=_request_timeout, default=10.0 if main else unset, metavar="S",
                        help="seconds to wait for each broker answer (default 10)")
    parser.add_argument("--json", action="store_true", default=False if main else unset,
                        help="machine-readable output")
    return parser


def _add_documents_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("documents", help="manage stored documents; validate and render local files",
                           description="manage stored documents; validate and render local files",
                           parents=[common])
    dsub = group.add_subparsers(dest="documents_cmd", required=True, metavar="ACTION")

    def add(name: str, fn: Any, help_: str, local: bool = False) -> argparse.ArgumentParser:
        sp = dsub.add_parser(name, help=help_, description=help_, parents=[common])
        sp.set_defaults(**({"fn": None, "local_fn": fn} if local else {"fn": fn}))
        return sp

    add("list", cmd_documents_list, "list stored and built-in documents")
    sp = add("show", cmd_documents_show, "show a document version with its parameters' defaults and allowed"
             " values (default: the default version)")
    sp.add_argument("name")
    sp.add_argument("--version", default="", help="$DEFAULT, $LATEST or a number")
    sp.add_argument("--content", action="store_true", help="print only the document's text")
    sp = add("versions", cmd_documents_versions, "list a document's versions")
    sp.add_argument("name")
    sp = add("create", cmd_documents_create, "store a new document (version 1) from FILE")
    sp.add_argument("name")
    sp.add_argument("file", help="YAML or JSON document ('-': stdin)")
    sp = add("update", cmd_documents_update, "add a version from FILE (identical content is refused)")
    sp.add_argument("name")
    sp.add_argument("file", help="YAML or JSON document ('-': stdin)")
    sp.add_argument("--set-default", action="store_true", help="make the new version the default")
    sp = add("set-default", cmd_documents_set_default, "choose the version `send NAME` runs")
    sp.add_argument("name")
    sp.add_argument("version", help="a number or $LATEST")
    sp = add("delete", cmd_documents_delete, "delete a document, or one non-default version")
    sp.add_argument("name")
    sp.add_argument("--version", default="", help="only this version")
    sp = add("validate", cmd_documents_validate, "check a local document file (no broker needed)", local=True)
    sp.add_argument("file", help="YAML or JSON document ('-': stdin)")
    sp.add_argument("--name", default="", help=argparse.SUPPRESS)
    sp = add("render", cmd_documents_render,
             "print exactly what each step would run, sending nothing (no broker needed)", local=True)
    sp.add_argument("file", help="YAML or JSON document ('-': stdin)")
    sp.add_argument("--parameter", "-p", action="append", default=[], metavar="NAME=VALUE",
                    help="repeat a NAME for a list; a JSON list/object value is decoded")
    sp.add_argument("--platform", default="Linux", help="platformType for preconditions (default Linux)")
    sp.add_argument("--name", default="", help=argparse.SUPPRESS)


def _add_clients_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("clients", help="onboard operators and automation (AWX): keys and client.yaml",
                           description="onboard operators and automation (AWX): keys and client.yaml",
                           parents=[common])
    csub = group.add_subparsers(dest="clients_cmd", required=True, metavar="ACTION")
    sp = csub.add_parser("create", parents=[common],
                         help="new keypair, registered with the broker, and a self-contained client.yaml",
                         description="Creates NAME.key_secret and NAME.key (0600) and client.yaml in DIR (0700),"
                                     " and registers the key with the broker as client NAME. Roles are bound to"
                                     " client names in the broker's policy file; the command checks it and says"
                                     " what to add when the policy does not give NAME a role yet.")
    sp.set_defaults(fn=cmd_clients_create)
    sp.add_argument("name", help="client name (the policy binds roles to it), e.g. alice or awx-prod")
    sp.add_argument("--role", required=True, help="role of the broker's policy that NAME is meant to have")
    sp.add_argument("--endpoint", default="", metavar="tcp://HOST:PORT",
                    help="broker client endpoint written into client.yaml (default: this client's own)")
    sp.add_argument("--out", required=True, metavar="DIR", help="directory for the key files and client.yaml")
    sp = csub.add_parser("list", parents=[common], help="client keys and their states",
                         description="client keys and their states")
    sp.set_defaults(fn=cmd_clients_list)


def _add_tags_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("tags", help="set, unset or approve an instance's tags (the broker owns them)",
                           description="An instance's tags belong to the broker: its agent's --tag flags are a "
                                       "proposal, held until approved (shown by instances and keys list).",
                           parents=[common])
    tsub = group.add_subparsers(dest="tags_action", required=True, metavar="ACTION")
    sp = tsub.add_parser("set", parents=[common], help="add or change tags: ID KEY=VALUE ...")
    sp.add_argument("instance_id")
    sp.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    sp = tsub.add_parser("unset", parents=[common], help="remove tags: ID KEY ...")
    sp.add_argument("instance_id")
    sp.add_argument("keys", nargs="+", metavar="KEY")
    for action, text in (("approve", "make the tags its agent proposes the instance's tags"),
                         ("reject", "drop the tags its agent proposes (it proposes them again at its next HELLO)")):
        sp = tsub.add_parser(action, parents=[common], help=text, description=text)
        sp.add_argument("instance_id")
    group.set_defaults(fn=cmd_tags)
    group = sub.add_parser("tokens", help="enrolment tokens: agents join with the token's tags, no keys accept",
                           description="Enrolment tokens let agents join without `keys accept` or --auto-accept: "
                                       "an agent started with --enrol-token-file presents one at its first HELLO.",
                           parents=[common])
    ksub = group.add_subparsers(dest="tokens_action", required=True, metavar="ACTION")
    sp = ksub.add_parser("create", parents=[common], help="make a token (printed once, stored only hashed)",
                         description="Makes an enrolment token and prints it once on stdout (details on stderr).")
    sp.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="the tags agents join with")
    sp.add_argument("--uses", type=int, default=1, help="agents it may enrol (default 1)")
    sp.add_argument("--expires", default="1h", metavar="DURATION", help="90s, 30m, 2h, 7d (default 1h)")
    sp.add_argument("--instance-prefix", default="", metavar="PREFIX", help="only instance ids starting with PREFIX")
    sp.add_argument("--comment", default="")
    ksub.add_parser("list", parents=[common], help="tokens, their uses and states (never the secrets)")
    sp = ksub.add_parser("revoke", parents=[common], help="a token enrols no more agents")
    sp.add_argument("token_id")
    group.set_defaults(fn=cmd_tokens)
def cmd_session(config: ClientConfig, args: argparse.Namespace) -> int:
    from . import session

    run_as, pty, command = _session_command(args.command, args.run_as, args.pty)
    return session.run_shell(config, args.instance_id, " ".join(command), run_as=run_as,
                             timeout=args.request_timeout, pty=pty)


_SESSION_FLAGS = ("-t", "-T")  # the session options that take no value


def _add_pty_options(parser: argparse.ArgumentParser, default: bool | None) -> None:
    parser.add_argument("-t", dest="pty", action="store_const", const=True, default=default,
                        help="a pseudo-terminal on the instance even when stdin is not a terminal (ssh -tt); "
                        "the end of stdin is typed into it as a Ctrl-D, which an interactive shell may miss "
                        "and wait forever, as with ssh -tt")
    parser.add_argument("-T", dest="pty", action="store_const", const=False,
                        help="no pseudo-terminal on the instance even when stdin is a terminal (ssh -T)")


def _session_command(rest: list[str], run_as: str, pty: bool | None = None) -> tuple[str, bool | None, list[str]]:
    """``session ID [--run-as U] [-t|-T] [-- CMD ...]``: argparse's REMAINDER takes everything
    after ID, options included, so the options before ``--`` (or before the first word that is
    not one) are read here."""
    if "--" in rest:
        head, command = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    else:
        split = 0
        while split < len(rest) and rest[split].startswith("-"):
            split += 1 if "=" in rest[split] or rest[split] in _SESSION_FLAGS else 2
        head, command = rest[:split], rest[split:]
    options = argparse.ArgumentParser(prog="zerorun session ID", add_help=False)
    options.add_argument("--run-as", default=run_as)
    _add_pty_options(options, pty)
    parsed, unknown = options.parse_known_args(head)
    if unknown:
        raise UsageError(f"session: unknown option(s) {' '.join(unknown)!r} (options go before -- CMD)")
    return parsed.run_as, parsed.pty, command


def cmd_forward(config: ClientConfig, args: argparse.Namespace) -> int:
    from . import session

    try:
        local_port, host, remote_port = session.parse_forward(args.spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return session.run_forward(config, args.instance_id, local_port, host, remote_port,
                               timeout=args.request_timeout, bind=args.bind)


def cmd_proxy(config: ClientConfig, args: argparse.Namespace) -> int:
    from . import session

    if not 1 <= args.port <= 65535:
        raise UsageError(f"port {args.port} is not 1-65535")
    return session.run_proxy(config, args.instance_id, args.port, host=args.host, timeout=args.request_timeout)


def _add_session_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("session", parents=[common], help="an interactive shell on an instance (or -- CMD ...)",
                        description="Opens an interactive login shell on the instance in a pseudo-terminal, through "
                                    "the broker (permission session). With -- CMD ..., runs that command with a "
                                    "terminal, through the user's shell as ssh does. Exits with the remote status; "
                                    "255 when zerorun itself fails. ~. after a newline disconnects. When stdin is "
                                    "not a terminal, as ssh: no pseudo-terminal (unless -t), the remote shell reads "
                                    "stdin until its end, its stderr comes to stderr.")
    sp.add_argument("instance_id", metavar="ID")
    sp.add_argument("--run-as", default="", metavar="USER",
                    help="the user to run as (the role's run_as must allow it; default: the agent's own, root)")
    _add_pty_options(sp, None)
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD", help="a command instead of a shell")
    sp.set_defaults(fn=None, session_fn=cmd_session)
    sp = sub.add_parser("forward", parents=[common], help="forward a local port to a port on or behind an instance",
                        description="Listens on 127.0.0.1:LOCAL_PORT and carries every connection to REMOTE_PORT "
                                    "on the instance, or to HOST:REMOTE_PORT as reached from it (permission forward, "
                                    "destination in the role's forward list). Runs until Ctrl-C.")
    sp.add_argument("instance_id", metavar="ID")
    sp.add_argument("spec", metavar="LOCAL_PORT:[HOST:]REMOTE_PORT")
    sp.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                    help="local address to listen on (default 127.0.0.1: this machine only)")
    sp.set_defaults(fn=None, session_fn=cmd_forward)
    sp = sub.add_parser("proxy", parents=[common], help="stdin/stdout to a port on an instance (ssh ProxyCommand)",
                        description="Carries stdin and stdout to PORT on the instance (or on --host as reached from "
                                    "it), for ssh -o ProxyCommand='zerorun proxy %%h %%p' (permission forward).")
    sp.add_argument("instance_id", metavar="ID")
    sp.add_argument("port", type=int)
    sp.add_argument("--host", default="", help="a host reached from the instance instead of the instance itself")
    sp.set_defaults(fn=None, session_fn=cmd_proxy)


class _Unbuilt:
    """Stands for the parser of a command this run does not use: whatever is added to it is dropped."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


class _OnlyWanted:
    """The subcommands action, building only the parsers of commands named in the arguments:
    building all ~40 (argparse looks up translations and compiles patterns for each) is a tenth
    of a short CLI run."""

    def __init__(self, sub: Any, wanted: set[str]):
        self._sub, self._wanted = sub, wanted

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self._sub.add_parser(name, **kwargs) if name in self._wanted else _Unbuilt()


COMMANDS = frozenset({  # every top-level command (tests/unit/test_cli_parser.py checks the list)
    "ping", "instances", "send", "show", "wait", "cancel", "commands", "keys", "tags", "logs", "clients",
    "documents", "session", "forward", "proxy", "policy", "completion", "__complete", "tokens"})


_Z85_KEY = r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}"  # compiled on first use (the CLI's start-up counts)


_help_width: int | None = None


def _terminal_width() -> int:
    """The width argparse's help formatter takes (``shutil.get_terminal_size``'s columns, less 2),
    worked out once and without importing ``shutil`` (bz2, lzma and more come with it)."""
    global _help_width
    if _help_width is None:
        try:
            columns = int(os.environ.get("COLUMNS", 0))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 0
        _help_width = (columns or 80) - 2
    return _help_width


class _Parser(argparse.ArgumentParser):
    """Takes a z85 public key that starts with '-' (one key in 85 does) for the argument it is,
    not for an unknown option: ``keys add agent NAME KEY`` as written. A word that starts like one
    of the parser's options (``-i...``, ``--tag=...``, or an abbreviation) is still that option.

    argparse makes a help formatter for every argument added (to check its metavar), and each
    asked the terminal's width through ``shutil``: the width is given (``_terminal_width``)."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=_terminal_width())  # type: ignore[call-arg]

    def _parse_optional(self, arg_string: str) -> Any:
        if len(arg_string) == 40 and arg_string[0] == "-" and re.fullmatch(_Z85_KEY, arg_string):
            if arg_string[1] == "-":
                name = arg_string.split("=", 1)[0]
                if not any(option.startswith(name) for option in self._option_string_actions):
                    return None
            elif arg_string[:2] not in self._option_string_actions:
                return None
        return super()._parse_optional(arg_string)


EXIT_CODES_HELP = ("exit codes: 0 success (send, wait, show: every invocation succeeded); 1 a command ran but an"
                   " invocation did not succeed, or was still running when the wait ended; 2 a usage or request"
                   " error, or output that cannot be written; 3 the broker is unreachable or refused this client;"
                   " 130 interrupted (Ctrl-C). session and proxy exit with the remote status, 255 when zerorun"
                   " itself fails.")
"""The exit-code contract, in ``zerorun --help`` (it was in the README and the module's docstring only)."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the arguments of a run that names a command, only that command's."""
    p = _Parser(prog="zerorun", description="Run command documents on fleets by tag.",
                parents=[_common_options(main=True)], epilog=EXIT_CODES_HELP)
    p.add_argument("--version", action="version", version=f"zerorun {__version__} (protocol"
                                                          f" {protocol.PROTOCOL_VERSION})")
    common = _common_options(main=False)
    sub: Any = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    named = COMMANDS.intersection(argv or ())
    if named:  # a mistyped command, or none: all of them, for the error or the help
        sub = _OnlyWanted(sub, named)

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, parents=[common])
        sp.set_defaults(fn=fn)
        return sp

    add("ping", cmd_ping, "check the broker answers")
    sp = add("instances", cmd_instances, "list instances with their platform, agent, IP, ping status and tags")
    sp.add_argument("--target", "-t", "--filter", action="append", default=[],
                    help="tag:KEY=VALUE, tag:KEY, tag:KEY= (empty value), fact:NAME=VALUE (e.g. fact:os.id=ubuntu), instance:ID; repeat: AND")
    sp.add_argument("--online", action="store_true", help="only Online and ConnectionLost instances")

    sp = add("send", cmd_send, "run a document on instances by tag")
    sp.add_argument("document", nargs="?", default="", help="stored or built-in document name, e.g. RunShellScript")
    sp.add_argument("--parameter", "-p", action="append", default=[], metavar="NAME=VALUE",
                    help="repeat a NAME for a list; a JSON list/object value is decoded")
    sp.add_argument("--target", "-t", action="append", default=[],
                    help="tag:KEY=VALUE[,VALUE], tag:KEY, tag:KEY= (empty value), fact:NAME=VALUE[,VALUE], instance:ID; repeat: AND")
    sp.add_argument("--instance-id", "-i", action="append", default=[], help="an instance id (repeatable)")
    sp.add_argument("--document-file", metavar="PATH",
                    help="a local document file (YAML or JSON; '-': stdin) instead of a stored one;"
                         " recorded under the file's name, marked local")
    sp.add_argument("--document-version", default="", help="$DEFAULT, $LATEST or a number")
    sp.add_argument("--document-hash", default="", help="SHA-256 the document must have")
    sp.add_argument("--timeout", type=int, default=None, metavar="S",
                    help="delivery timeout, 1 to 2592000 seconds (default: the broker's, 3600)")
    sp.add_argument("--execution-timeout", type=int, default=None, metavar="S",
                    help="override each step's timeout, 1 to 172800 seconds (default: the document's)")
    sp.add_argument("--max-concurrency", default="", metavar="N|P%",
                    help="instances at once: a number >= 1 or 1%%-100%% (default 50)")
    sp.add_argument("--max-errors", default="", metavar="N|P%",
                    help="errors allowed before dispatch stops: a number >= 0 or 0%%-100%% (default 0)")
    sp.add_argument("--comment", default="")
    sp.add_argument("--no-wait", action="store_true", help="print the command id and return")
    sp.add_argument("--wait-timeout", type=_wait_timeout, default=3600.0, metavar="S",
                    help="give up waiting after S seconds, the command going on (default 3600; 0: look once)")
    sp.add_argument("--dry-run", action="store_true", help="validate, render and resolve; send nothing")
    sp.add_argument("--follow", "-f", action="store_true", help="print output live, prefixed by instance id")
    sp.add_argument("--first", type=int, default=0, metavar="N",
                    help="canary: run N instances first and stop everything if any of them fails")
    sp.add_argument("--run-as", default="", metavar="USER",
                    help="run every step (but those with their own runAs) as USER: its uid, groups, a login "
                         "environment and its home directory (the broker's policy says who may)")
    sp.add_argument("--notify", action="append", default=[], metavar="NAME|URL",
                    help="POST a signed JSON summary when the command ends: a webhook the broker names, or a "
                         "URL the policy allows (repeatable)")
    sp.add_argument("--notify-invocations", action="store_true",
                    help="with --notify: also POST when each instance's invocation ends")

    sp = add("show", cmd_show, "show a command and its invocations' output (exit code as send and wait)")
    sp.add_argument("command_id")
    sp.add_argument("--script", action="store_true", help="also print the rendered steps")
    sp.add_argument("--instance", "-i", action="append", default=[], help="only this instance (repeatable)")
    sp.add_argument("--output", choices=["view", "full"], default="view",
                    help="full: the whole output of one --instance, byte for byte (stdout to stdout, stderr to "
                         "stderr), beyond the view's cap")
    sp = add("wait", cmd_wait, "wait for a command to finish, then show it as show does")
    sp.add_argument("command_id")
    sp.add_argument("--wait-timeout", "--timeout", type=_wait_timeout, default=3600.0, dest="wait_timeout",
                    metavar="S", help="give up after S seconds, the command going on (default 3600; 0: look once)")
    sp = add("cancel", cmd_cancel, "cancel a command (or some of its instances)")
    sp.add_argument("command_id")
    sp.add_argument("--instance", action="append", default=[], help="only this instance of the command (repeatable)")
    sp = add("commands", cmd_commands, "list recent commands")
    sp.add_argument("--limit", type=_commands_limit, default=50,
                    help=f"default 50; a page holds at most {MAX_COMMANDS_LIMIT}")
    sp.add_argument("--status", default="", type=_command_status,
                    help="only commands with this status: " + ", ".join(get_args(protocol.InvocationStatus)))
    sp.add_argument("--document", default="")
    sp.add_argument("--since", default="", help="30m, 2h, 7d, a Unix time or an ISO date")
    sp.add_argument("--before", default="", help="older than this (pagination)")
    sp.add_argument("--before-id", default="", metavar="COMMAND_ID",
                    help="with --before: go on after this command, the last one shown (a page's '(more: ...)' line "
                         "gives both), so that commands requested at the same time are not skipped")
    sp.add_argument("--target", default="", help="commands with this target or a part of one: "
                    "tag:role=web, role=web, instance:i-1 or i-1")
    sp = add("keys", cmd_keys, "list, accept, reject, revoke, delete, replace or add agent and client keys")
    sp.add_argument("action", choices=["list", "accept", "reject", "revoke", "delete", "replace", "add"],
                    nargs="?", default="list")
    sp.add_argument("args", nargs="*", metavar="NAME",
                    help="instance id, client name or key fingerprint; for add: agent|client NAME KEY; "
                         "for replace: NAME NEW_KEY (fingerprint of a known key, or a public key)")
    sp.add_argument("--key", default="", help="add, replace: the public key (z85 or a key file), as an option")
    sp.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="add agent: the instance's tags, pre-registered with its key (repeatable)")
    _add_tags_parsers(sub, common)
    sp = add("logs", cmd_logs, "print a command's output; --follow prints it live; with one -i, the whole output "
                               "of that instance byte for byte")
    sp.add_argument("command_id")
    sp.add_argument("--instance", "-i", action="append", default=[], help="only this instance (repeatable)")
    sp.add_argument("--follow", "-f", action="store_true", help="keep printing until the command ends")
    sp.add_argument("--wait-timeout", type=_wait_timeout, default=None, metavar="S",
                    help="stop following after S seconds (default and 0: never)")
    _add_clients_parser(sub, common)
    _add_documents_parser(sub, common)
    _add_session_parsers(sub, common)
    group = sub.add_parser("policy", help="check a policy file offline", description="check a policy file offline",
                           parents=[common])
    psub = group.add_subparsers(dest="policy_action", metavar="ACTION", required=True)
    sp = psub.add_parser("check", parents=[common], help="validate a policy file as the broker would load it, "
                         "and warn about what it grants", description="validate a policy file as the broker would "
                         "load it, and warn about what it grants (exit 0: valid, 2: not)")
    sp.add_argument("file")
    sp.set_defaults(fn=None, local_fn=cmd_policy_check)
    sp = sub.add_parser("completion", parents=[common], help="print a shell completion script (bash, zsh)",
                        description="Prints a completion script: `source <(zerorun completion bash)` in"
                                    " ~/.bashrc, `source <(zerorun completion zsh)` in ~/.zshrc.")
    sp.add_argument("shell", choices=["bash", "zsh"])
    sp.set_defaults(fn=None, local_fn=cmd_completion)
    sp = sub.add_parser("__complete", parents=[common])  # no help: hidden, used by the completion scripts
    sp.add_argument("kind", choices=["instances", "documents", "commands"])
    sp.set_defaults(fn=None, local_fn=cmd_complete_values)
    return p


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return EXIT_OK


def cmd_complete_values(args: argparse.Namespace) -> int:
    """Names for the completion scripts, one per line; nothing at all when the broker is not
    there or says no (a completion must never print an error into the command line)."""
    try:
        config = ClientConfig.from_options(config_file=args.config)
        with Client(config, timeout=min(args.request_timeout, 2.0)) as client:
            if args.kind == "instances":
                names = [v.instance_id for v in client.instances()]
            elif args.kind == "documents":
                names = [d.name for d in client.documents()]
            else:
                names = [c.command_id for c in client.commands(limit=20)]
    except ZerorunError:
        return EXIT_OK
    sys.stdout.write("".join(f"{name}\n" for name in names))
    return EXIT_OK


def _quiet_broken_pipe() -> int:
    """The reader went away (``zerorun commands | head -1``): end as coreutils do, killed by
    SIGPIPE without a word (status 141 in the shell), instead of a BrokenPipeError traceback."""
    import signal  # only here: its enums are a millisecond of every run's start

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
    except OSError:
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # not reached where SIGPIPE exists


def _output_failed(exc: OSError) -> int:
    """The output cannot be written (``> FILE`` on a full disk, ``> /dev/full``): one line and
    exit 2, not a traceback and exit 1, which says that a command did not succeed."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere, not to a traceback at exit
    except (OSError, ValueError):
        pass
    try:
        print(f"zerorun: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr, flush=True)
    except OSError:  # stderr is where it fails too: the exit code says it
        pass
    return EXIT_USAGE


def _closed_standard_streams() -> int | None:
    """Standard streams closed when the CLI started (``2>&-``, ``>&-``, ``<&-``): Python leaves
    ``sys.stderr`` (...) None, and every error was an AttributeError traceback, lost with stderr,
    and exit 1: ``zerorun show ID 2>&-`` could not tell a script "no such command" (2) from "a
    command failed" (1). Each gets /dev/null (also so that no file opened later lands on its fd);
    a closed stdout, where the CLI's answer goes, is an error (exit 2), as coreutils have it."""
    for fd, name in ((0, "stdin"), (2, "stderr"), (1, "stdout")):
        if getattr(sys, name) is not None:
            continue
        devnull = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
        setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", errors="surrogateescape",
                                closefd=False))
        if fd == 1:
            print("zerorun: error: standard output is closed: nothing could be shown (>/dev/null to drop it)",
                  file=sys.stderr)
            return EXIT_USAGE
    return None


def main(argv: list[str] | None = None) -> int:
    closed = _closed_standard_streams()
    if closed is not None:
        return closed
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as exc:
        return _output_failed(exc)


def _run(argv: list[str] | None) -> int:
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    if getattr(args, "local_fn", None) is not None:  # documents validate/render, completion: no broker
        try:
            return args.local_fn(args)
        except ZerorunError as exc:
            print(f"zerorun: {exc.code}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if getattr(args, "session_fn", None) is not None:  # session, forward, proxy: their own connection
        return _run_session(args)
    try:
        config = ClientConfig.from_options(config_file=args.config)
        with Client(config, timeout=args.request_timeout) as client:
            return args.fn(client, args)
    except (ConfigError, RequestFailed) as exc:
        print(f"zerorun: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BrokerUnavailable, Unauthorized) as exc:
        print(f"zerorun: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ZerorunError as exc:
        print(f"zerorun: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _run_session(args: argparse.Namespace) -> int:
    """``session`` and ``proxy`` exit as ssh does: the remote status, or 255 when zerorun itself
    fails (so that a remote status is never mistaken for zerorun's); ``forward`` as the others."""
    failure = EXIT_USAGE if args.cmd == "forward" else 255
    try:
        config = ClientConfig.from_options(config_file=args.config)
        return args.session_fn(config, args)
    except (BrokerUnavailable, Unauthorized) as exc:
        print(f"zerorun: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if args.cmd == "forward" else failure
    except ZerorunError as exc:
        print(f"zerorun: {exc.code}: {exc}", file=sys.stderr)
        return failure
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The ``zerorun`` command: ``main()``, then the process ends without the interpreter's
    teardown (freeing every module and object: about a sixth of a short run's CPU). By then the
    output is flushed and the broker connection closed; the CLI registers no exit handlers."""
    code = main()
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
