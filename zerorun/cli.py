"""``zerorun``: the operator CLI.

Exit codes (a contract for scripts): 0 success; 1 a command ran but some invocation did not
succeed (or is still running when a wait ended); 2 a usage or request error (bad target, unknown
document, invalid parameter...); 3 the broker is unreachable or refused this client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import protocol
from .client import BrokerUnavailable, Client, ClientConfig, ConfigError, RequestFailed, Unauthorized, ZerorunError

EXIT_OK, EXIT_NOT_SUCCESS, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _parameters(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; a repeated NAME makes a list; a JSON list or object value is decoded."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"zerorun: error: parameter {pair!r} must look like NAME=VALUE")
        parsed: Any = value
        if value[:1] in "[{":
            try:
                parsed = json.loads(value)
            except ValueError:
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


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _print_json(data: Any) -> None:
    json.dump(protocol.to_builtins(data), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _command_ok(view: protocol.CommandView) -> bool:
    return bool(view.invocations) and all(i.status == protocol.SUCCESS for i in view.invocations) \
        if view.invocations else view.status == protocol.SUCCESS


def _print_command(view: protocol.CommandView, output: bool = True) -> None:
    print(f"command {view.command_id}: {view.status}"
          + (f" ({view.status_details})" if view.status_details not in ("", view.status) else ""))
    print(f"  document {view.document_name} v{view.document_version} sha256:{view.document_sha256[:16]}"
          f"  targets {' AND '.join(view.targets)}  requested {_fmt_time(view.requested_at)}"
          f" by {view.requested_by}")
    for inv in view.invocations:
        took = f"{inv.ended_at - inv.started_at:.2f}s" if inv.ended_at and inv.started_at else ""
        detail = f" ({inv.status_details})" if inv.status_details else ""
        code = f"exit {inv.exit_code}" if inv.exit_code != -1 else ""
        print(f"--- {inv.instance_id}  {inv.status}{detail}  {code}  {took}".rstrip())
        if output:
            for stream, text in (("", inv.stdout), ("stderr: ", inv.stderr)):
                for line in text.splitlines():
                    print(f"  {stream}{line}")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(view.counts.items()))
    print(f"{len(view.invocations)} invocation(s): {counts or 'none'}")


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    info = client.ping()
    if args.json:
        _print_json(info)
    else:
        print(f"broker {info['broker_version']} (protocol {info['protocol_version']}): "
              f"{info['online']}/{info['instances']} instances online, "
              f"{info['active_commands']} active command(s); you are {info['requester']}")
    return EXIT_OK


def cmd_instances(client: Client, args: argparse.Namespace) -> int:
    views = client.instances(args.target, include_offline=not args.online)
    if args.json:
        _print_json(views)
        return EXIT_OK
    rows = [[v.instance_id, v.ping_status, v.hostname, v.platform,
             ",".join(f"{k}={val}" for k, val in sorted(v.tags.items())), _fmt_time(v.last_seen)]
            for v in views]
    print(_table(rows, ["INSTANCE", "PING", "HOSTNAME", "PLATFORM", "TAGS", "LAST SEEN"]))
    return EXIT_OK


def _wait_and_report(client: Client, view: protocol.CommandView, args: argparse.Namespace) -> int:
    if view.status not in protocol.TERMINAL_STATUSES:
        view = client.wait(view.command_id, timeout=args.wait_timeout)
    if args.json:
        _print_json(view)
    else:
        _print_command(view)
        if view.status not in protocol.TERMINAL_STATUSES:
            outstanding = [f"{i.instance_id} ({i.status})" for i in view.invocations
                           if i.status not in protocol.TERMINAL_STATUSES]
            print(f"still outstanding after {args.wait_timeout:g}s: {', '.join(outstanding)};"
                  f" follow up with: zerorun wait {view.command_id}", file=sys.stderr)
    if view.status not in protocol.TERMINAL_STATUSES:
        return EXIT_NOT_SUCCESS
    return EXIT_OK if _command_ok(view) else EXIT_NOT_SUCCESS


def cmd_send(client: Client, args: argparse.Namespace) -> int:
    content = ""
    if args.document_file:
        try:
            with open(args.document_file, encoding="utf-8") as f:
                content = f.read()
        except OSError as exc:
            print(f"zerorun: cannot read {args.document_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
    if not args.document and not content:
        print("zerorun: error: name a DOCUMENT or give --document-file", file=sys.stderr)
        return EXIT_USAGE
    view = client.send(args.document or "", _parameters(args.parameter), args.target, args.instance_id,
                       document_version=args.document_version, document_hash=args.document_hash,
                       document_content=content, timeout_seconds=args.timeout,
                       execution_timeout=args.execution_timeout,
                       max_concurrency=args.max_concurrency, max_errors=args.max_errors,
                       comment=args.comment, dry_run=args.dry_run)
    if args.dry_run:
        if args.json:
            _print_json(view)
        else:
            print(f"would run {view.document_name} v{view.document_version} "
                  f"(sha256 {view.document_sha256}) on {len(view.invocations)} instance(s): "
                  + ", ".join(i.instance_id for i in view.invocations))
            for step in view.steps:
                print(f"--- step {step.name} ({step.action})")
                print(step.script)
        return EXIT_OK
    if args.no_wait:
        if args.json:
            _print_json(view)
        else:
            print(view.command_id)
        return EXIT_OK
    return _wait_and_report(client, view, args)


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    view = client.get_command(args.command_id)
    if args.json:
        _print_json(view)
    else:
        _print_command(view)
        if args.script:
            for step in view.steps:
                print(f"--- step {step.name} ({step.action})")
                print(step.script)
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return _wait_and_report(client, client.get_command(args.command_id, include_output=False), args)


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    view = client.cancel(args.command_id, args.instance)
    if args.json:
        _print_json(view)
    else:
        print(f"command {view.command_id}: {view.status}")
    return EXIT_OK


def cmd_commands(client: Client, args: argparse.Namespace) -> int:
    views = client.commands(limit=args.limit, status=args.status, document=args.document)
    if args.json:
        _print_json(views)
        return EXIT_OK
    rows = [[v.command_id, v.status, v.document_name, str(v.target_count), _fmt_time(v.requested_at),
             " AND ".join(v.targets)] for v in views]
    print(_table(rows, ["COMMAND", "STATUS", "DOCUMENT", "TARGETS", "REQUESTED", "TARGET"]))
    return EXIT_OK


def cmd_keys(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        views = client.keys()
        if args.json:
            _print_json(views)
            return EXIT_OK
        rows = [[v.kind, v.name, v.state, v.fingerprint, _fmt_time(v.updated_at)] for v in views]
        print(_table(rows, ["KIND", "NAME", "STATE", "FINGERPRINT", "UPDATED"]))
        return EXIT_OK
    if not args.name:
        print(f"zerorun: error: keys {args.action} needs an instance id or key fingerprint", file=sys.stderr)
        return EXIT_USAGE
    view = client.key_action(args.action, args.name)
    if args.json:
        _print_json(view)
    else:
        print(f"{view.kind} key {view.fingerprint} ({view.name}): {view.state}"
              if args.action != "delete" else f"deleted {view.kind} key {view.fingerprint} ({view.name})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerorun", description="Run command documents on fleets by tag.")
    p.add_argument("-c", "--config", help="client config file (default: $ZERORUN_CONFIG)")
    p.add_argument("--request-timeout", type=float, default=10.0, help="seconds to wait for each broker answer")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    add("ping", cmd_ping, "check the broker answers")
    sp = add("instances", cmd_instances, "list instances with tags and ping status")
    sp.add_argument("--target", "-t", action="append", default=[], help="tag:KEY=VALUE, tag:KEY, instance:ID")
    sp.add_argument("--online", action="store_true", help="only Online and ConnectionLost instances")

    sp = add("send", cmd_send, "run a document on instances by tag")
    sp.add_argument("document", nargs="?", default="", help="stored or built-in document name, e.g. RunShellScript")
    sp.add_argument("--parameter", "-p", action="append", default=[], metavar="NAME=VALUE",
                    help="repeat a NAME for a list; a JSON list/object value is decoded")
    sp.add_argument("--target", "-t", action="append", default=[], help="tag:KEY=VALUE[,VALUE], tag:KEY, instance:ID")
    sp.add_argument("--instance-id", "-i", action="append", default=[], help="an instance id (repeatable)")
    sp.add_argument("--document-file", help="a local document file (YAML or JSON) instead of a stored one")
    sp.add_argument("--document-version", default="", help="$DEFAULT, $LATEST or a number")
    sp.add_argument("--document-hash", default="", help="SHA-256 the document must have")
    sp.add_argument("--timeout", type=int, default=0, help="delivery timeout in seconds")
    sp.add_argument("--execution-timeout", type=int, default=0, help="override each step's timeout")
    sp.add_argument("--max-concurrency", default="", help="number or percentage (default 50)")
    sp.add_argument("--max-errors", default="", help="number or percentage (default 0)")
    sp.add_argument("--comment", default="")
    sp.add_argument("--no-wait", action="store_true", help="print the command id and return")
    sp.add_argument("--wait-timeout", type=float, default=3600.0, help="give up waiting after S seconds")
    sp.add_argument("--dry-run", action="store_true", help="validate, render and resolve; send nothing")

    sp = add("show", cmd_show, "show a command and its invocations' output")
    sp.add_argument("command_id")
    sp.add_argument("--script", action="store_true", help="also print the rendered steps")
    sp = add("wait", cmd_wait, "wait for a command to finish")
    sp.add_argument("command_id")
    sp.add_argument("--wait-timeout", "--timeout", type=float, default=3600.0, dest="wait_timeout")
    sp = add("cancel", cmd_cancel, "cancel a command (or some of its instances)")
    sp.add_argument("command_id")
    sp.add_argument("--instance", action="append", default=[])
    sp = add("commands", cmd_commands, "list recent commands")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--status", default="")
    sp.add_argument("--document", default="")
    sp = add("keys", cmd_keys, "list, accept, reject or delete agent and client keys")
    sp.add_argument("action", choices=["list", "accept", "reject", "delete"], nargs="?", default="list")
    sp.add_argument("name", nargs="?", default="", help="instance id or key fingerprint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
