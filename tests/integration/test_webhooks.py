"""Completion webhooks (issue 22), with a real broker, real agents, the real CLI and a local HTTP
server started by the test: signed, durable, retried across a broker restart, governed by the
policy, and visible in `zerorun show`."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
from pathlib import Path

import pytest

from tests.cli_support import run_json
from tests.webhook_support import Receiver
from zerorun.client import Client, RequestFailed

POLICY = """
roles:
  named-only:
    allow: [read, run]
    documents: ["*"]
    targets: ["*"]
  hooks-ok:
    allow: [read, run]
    documents: ["*"]
    targets: ["*"]
    webhook_urls: ["http://127.0.0.1:*/allowed/*"]
clients:
  named-bot: named-only
  hook-bot: hooks-ok
"""


@pytest.fixture
def receiver():
    made = [Receiver()]
    yield made[0]
    made[0].close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _secret(fleet) -> bytes:
    return (fleet.broker_dir / "keys" / "webhook.secret").read_bytes().strip()


def _check_signature(fleet, headers: dict[str, str], body: bytes) -> None:
    expected = "sha256=" + hmac.new(_secret(fleet), body, hashlib.sha256).hexdigest()
    assert headers["X-Zerorun-Signature"] == expected


def test_a_named_webhook_receives_the_signed_summary(fleet_factory, receiver):
    fleet = fleet_factory("hooks")
    fleet.start_broker("--webhook", f"ops={receiver.url('/ops?token=s3cr3t')}")
    fleet.start_agents({"web-1": {"role": "web"}, "web-2": {"role": "web"}})
    assert (fleet.broker_dir / "keys" / "webhook.secret").stat().st_mode & 0o777 == 0o600
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=web", "-p",
                               "commands=echo private-output-text", "--notify", "ops", "--notify-invocations")
    assert code == 0, err
    requests = receiver.wait_for(3)
    events = {}
    for path, headers, body in requests:
        assert path == "/ops?token=s3cr3t"
        _check_signature(fleet, headers, body)
        assert b"private-output-text" not in body and b"echo" not in body  # no output, no parameters
        data = json.loads(body)
        assert headers["X-Zerorun-Delivery"] == data["delivery_id"]
        assert headers["X-Zerorun-Event"] == data["event"]
        events.setdefault(data["event"], []).append(data)
    done = events["command.completed"][0]
    assert done["command_id"] == view["command_id"] and done["status"] == "Success"
    assert done["counts"] == {"Success": 2} and done["target_count"] == 2
    assert done["document"]["name"] == "RunShellScript" and done["requested_by"].startswith("admin")
    assert done["completed_at"] >= done["requested_at"]
    assert sorted(e["instance_id"] for e in events["invocation.completed"]) == ["web-1", "web-2"]
    assert all(e["exit_code"] == 0 for e in events["invocation.completed"])

    def delivered() -> list[dict]:
        hooks = run_json(fleet, "show", view["command_id"])[1]["webhooks"]
        return hooks if all(h["state"] == "delivered" for h in hooks) else []

    deadline = time.monotonic() + 10
    while not delivered() and time.monotonic() < deadline:
        time.sleep(0.1)
    hooks = delivered()
    assert len(hooks) == 3 and {h["target"] for h in hooks} == {"ops"}
    assert "webhook ops [command]: delivered after 1 attempt(s)" in fleet.cli("show", view["command_id"]).stdout

    unknown = fleet.cli("send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true", "--notify", "nope")
    assert unknown.returncode == 2 and "unknown webhook 'nope' (named webhooks: ops)" in unknown.stderr


def test_with_the_server_down_the_broker_retries_and_delivers_after_a_restart(fleet_factory):
    port = _free_port()
    fleet = fleet_factory("retry")
    fleet.start_broker("--webhook", f"later=http://127.0.0.1:{port}/later")
    fleet.start_agents({"web-1": {"role": "web"}})
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=true",
                               "--notify", "later")
    assert code == 0, err

    def first_failure() -> dict | None:
        hooks = run_json(fleet, "show", view["command_id"])[1].get("webhooks") or []
        return hooks[0] if hooks and hooks[0].get("attempts", 0) >= 1 else None

    deadline = time.monotonic() + 15
    while (hook := first_failure()) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hook is not None and hook["state"] == "pending" and "refused" in hook["last_error"].lower()
    shown = fleet.cli("show", view["command_id"]).stdout
    assert "webhook later [command]: pending after" in shown and "refused" in shown.lower()

    fleet.stop_broker()
    receiver = Receiver(port)  # the server comes back while the broker is down
    try:
        fleet.start_broker("--webhook", f"later=http://127.0.0.1:{port}/later")
        path, headers, body = receiver.wait_for(1, timeout=60)[0]
        assert path == "/later" and json.loads(body)["command_id"] == view["command_id"]
        _check_signature(fleet, headers, body)
        time.sleep(0.5)
        hook = run_json(fleet, "show", view["command_id"])[1]["webhooks"][0]
        assert hook["state"] == "delivered" and hook["attempts"] >= 2
        assert len(receiver.requests) == 1  # once
    finally:
        receiver.close()


def _client(fleet, name: str, tmp_path: Path) -> Client:
    return fleet.add_client(name, tmp_path / "clients")


def test_the_policy_restricts_raw_urls_to_the_roles_patterns(fleet_factory, receiver, tmp_path):
    fleet = fleet_factory("policy")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(POLICY)
    fleet.start_broker("--webhook", f"ops={receiver.url('/named')}")
    fleet.start_agents({"web-1": {"role": "web"}})
    named, hook = _client(fleet, "named-bot", tmp_path), _client(fleet, "hook-bot", tmp_path)
    try:
        with pytest.raises(RequestFailed) as exc:
            named.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"], notify=[receiver.url("/allowed/x")])
        assert exc.value.code == "AccessDenied" and "use a webhook the broker names" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:  # outside the role's pattern
            hook.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"], notify=[receiver.url("/other")])
        assert exc.value.code == "AccessDenied"
        with pytest.raises(RequestFailed) as exc:
            hook.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"], notify=["ftp://127.0.0.1/x"])
        assert exc.value.code == "InvalidNotify"
        named.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"], notify=["ops"], wait=20)
        view = hook.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"],
                         notify=[receiver.url("/allowed/x?key=abc")], wait=20)
        paths = sorted(p for p, _, _ in receiver.wait_for(2))
        assert paths == ["/allowed/x?key=abc", "/named"]
        # views show a raw URL without its query (where tokens live)
        shown = hook.get_command(view.command_id)
        assert shown.webhooks and shown.webhooks[0].target == receiver.url("/allowed/x") + "?..."
    finally:
        named.close()
        hook.close()
