"""Webhook rules without processes: which targets a client may give, the signature, how views show a
URL, and the retry schedule up to giving up."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from zmq_broker import webhooks
from zmq_broker.errors import BrokerError
from zmq_broker.model import CommandRecord, WebhookRecord


def test_targets_are_named_webhooks_or_urls_the_policy_allows():
    named = {"ops": "https://hooks.example.com/T0K3N"}
    refused: list[str] = []

    def may_use(url: str) -> None:
        if "evil" in url:
            refused.append(url)
            raise BrokerError("AccessDenied", "no")

    assert webhooks.resolve(["ops", "https://ci.example.com/x?k=1"], named, may_use) == [
        ("ops", "https://hooks.example.com/T0K3N"), ("https://ci.example.com/x?...", "https://ci.example.com/x?k=1")]
    with pytest.raises(BrokerError, match="unknown webhook 'nope' \\(named webhooks: ops\\)"):
        webhooks.resolve(["nope"], named, may_use)
    with pytest.raises(BrokerError, match="must be http:// or https://"):
        webhooks.resolve(["file:///etc/passwd"], named, may_use)
    with pytest.raises(BrokerError, match="AccessDenied|no"):
        webhooks.resolve(["https://evil.example.com/"], named, may_use)
    with pytest.raises(BrokerError, match="at most 10"):
        webhooks.resolve(["ops"] * 11, named, may_use)


def test_views_show_no_credentials_or_query():
    assert webhooks.shown_target("https://user:pw@h.example.com:8443/a/b?token=x#f") == "https://h.example.com:8443/a/b?..."


def test_the_signature_is_hmac_sha256_of_the_body_and_secret_files_are_private(tmp_path):
    secret = webhooks.load_secret(tmp_path / "webhook.secret", create=True)
    assert (tmp_path / "webhook.secret").stat().st_mode & 0o777 == 0o600 and len(secret) == 64
    assert webhooks.signature(secret, b"{}") == "sha256=" + hmac.new(secret, b"{}", hashlib.sha256).hexdigest()
    (tmp_path / "open").write_text("x" * 32)
    (tmp_path / "open").chmod(0o644)
    with pytest.raises(BrokerError, match="readable by others"):
        webhooks.load_secret(tmp_path / "open", create=False)
    with pytest.raises(BrokerError, match="does not exist"):
        webhooks.load_secret(tmp_path / "missing", create=False)


class Store:
    def __init__(self):
        self.rows: dict[str, WebhookRecord] = {}

    def put_webhook(self, rec):
        self.rows[rec.delivery_id] = rec


def test_failures_back_off_and_give_up_when_the_time_is_up():
    store = Store()
    queue = webhooks.WebhookQueue(store, b"k" * 32, retry_seconds=20.0)
    try:
        rec = CommandRecord("c1", "Success", "Success", "D", "1", "0" * 64, {"password": "hunter2"}, [], "admin",
                            0.0, 60.0, 60, 1, 0, [], notify=[("ops", "http://127.0.0.1:9/")], completed_at=2.0)
        queue.command_completed(rec, {"Success": 1})
        (delivery,) = store.rows.values()
        assert b"hunter2" not in delivery.body and b'"counts": {"Success": 1}' in delivery.body
        delays = []
        now = delivery.created_at
        while delivery.state == "pending":
            queue._outcomes.put((delivery, "connection refused"))
            queue._record_outcomes(now)
            if delivery.state == "pending":
                delays.append(round(delivery.next_at - now))
                now = delivery.next_at
        assert delays == [1, 2, 4, 8] and delivery.state == "failed" and delivery.attempts == 5
        assert queue.stats["failed"] == 1 and queue.stats["attempt_failures"] == 5
    finally:
        queue.close()
