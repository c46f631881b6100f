"""Completion webhooks: a signed JSON POST when a command ends (and, when asked, each invocation).

Durable and off the loop. A notification is a row of the store (``webhooks``, ``model.WebhookRecord``)
written by the same group commit as the completion it announces, so it survives a broker restart
and is never announced for a completion that was not committed. Once a second the loop *claims*
due rows (SQLite: what it is not sending already; PostgreSQL: ``FOR UPDATE SKIP LOCKED`` with a
lease, so that each notification goes out from one broker of a cluster, not from each) and hands
them to a few sender threads, which only POST (their own HTTP connections: they never touch the
loop's sockets or the store) and hand the outcome back; the loop records it with the next group
commit. A failure (no connection, a timeout, an answer other than 2xx) is retried with backoff
(1 s, doubling, at most 10 minutes apart) until ``--webhook-retry-seconds`` have passed; then the
row is ``failed``. ``zerorun show`` lists each notification's state, attempts and last error;
metrics count deliveries and failures.

The body: the event, command id, document (name, version, SHA-256), status and details, counts,
target count, requested_by, timing (and the instance, invocation and exit code for an invocation
event). Never output, parameters or anything secret. Headers: ``X-Zerorun-Signature:
sha256=<hex HMAC-SHA256 of the body>`` keyed by the webhook secret (``--webhook-secret-file``),
``X-Zerorun-Event``, ``X-Zerorun-Delivery`` (the delivery's id: the same on every attempt, so a
receiver can drop a repeat: delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zerorun import __version__, protocol

from .errors import BrokerError
from .model import CommandRecord, WebhookRecord

log = logging.getLogger("zerorun.broker.webhooks")

CLAIM_EVERY = 1.0  # seconds between looks for due notifications
CLAIM_BATCH = 50
LEASE = 120.0  # seconds a claim hides a notification from other brokers (more than one attempt takes)
SEND_TIMEOUT = 10.0  # seconds one POST may take
SENDERS = 4  # POSTs at once
FIRST_RETRY = 1.0
MAX_RETRY = 600.0
MAX_TARGETS = 10  # webhooks per command


def load_secret(path: Path, create: bool) -> bytes:
    """The signing key: the file's content (whitespace stripped). ``create``: made (random, 0600)
    when missing. A file others may read is refused, as key files are."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise BrokerError("WebhookSecret", f"webhook secret file {path} does not exist") from None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        info = os.stat(path)
    if info.st_mode & 0o077:
        raise BrokerError("WebhookSecret", f"webhook secret file {path} is readable by others (mode "
                                           f"{info.st_mode & 0o777:o}): chmod 600 it")
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise BrokerError("WebhookSecret", f"webhook secret file {path} holds fewer than 16 bytes")
    return secret


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def shown_target(url: str) -> str:
    """A URL as views show it: without user info, query and fragment (where tokens tend to be)."""
    parts = urllib.parse.urlsplit(url)
    try:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a port that is no number
        host = parts.hostname or ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + ("?..." if parts.query else "")


def resolve(notify: list[str], named: dict[str, str], may_use_url: Any) -> list[tuple[str, str]]:
    """(shown target, URL) for each ``--notify`` entry: a name the broker configures, or a URL the
    client's role allows (``may_use_url(url)`` returns the refusal, or None)."""
    if len(notify) > MAX_TARGETS:
        raise BrokerError("InvalidNotify", f"at most {MAX_TARGETS} webhooks per command, not {len(notify)}")
    out: list[tuple[str, str]] = []
    for entry in notify:
        if entry in named:
            out.append((entry, named[entry]))
            continue
        parts = urllib.parse.urlsplit(entry) if "://" in entry else None
        if parts is None:
            known = ", ".join(sorted(named)) or "none: the broker configures no webhooks"
            raise BrokerError("InvalidNotify", f"unknown webhook {entry!r} (named webhooks: {known})")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrokerError("InvalidNotify", f"webhook URL {shown_target(entry)!r} must be http:// or https:// "
                                               "with a host")
        may_use_url(entry)
        out.append((shown_target(entry), entry))
    return list(dict.fromkeys(out))


class WebhookQueue:
    def __init__(self, store: Any, secret: bytes, retry_seconds: float, claimer: str = ""):
        self.store = store
        self.secret = secret
        self.retry_seconds = retry_seconds
        self.claimer = claimer
        self._sending: dict[str, WebhookRecord] = {}
        self._outcomes: queue.SimpleQueue[tuple[WebhookRecord, str]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook")
        self._next_claim = 0.0
        self._pending_known = 0
        self.stats = {"delivered": 0, "failed": 0, "attempt_failures": 0, "pending": 0}

    def close(self) -> None:
        """Stops sending; what was being sent is claimed again after a restart."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- enqueue (from the loop, with the completion's group commit) ----------------------------

    def _enqueue(self, rec: CommandRecord, event: str, body: dict[str, Any], instance_id: str = "") -> None:
        now = time.time()
        for target, url in rec.notify:
            delivery_id = uuid.uuid4().hex
            data = json.dumps({"delivery_id": delivery_id, **body}, sort_keys=True).encode()
            self.store.put_webhook(WebhookRecord(delivery_id, rec.command_id, target, url, event, data, now, now,
                                                 instance_id=instance_id))
        self._next_claim = 0.0  # send them now

    def command_completed(self, rec: CommandRecord, counts: dict[str, int]) -> None:
        if not rec.notify:
            return
        self._enqueue(rec, "command", {
            "event": "command.completed", "command_id": rec.command_id, **_document(rec),
            "status": rec.status, "status_details": rec.status_details, "counts": counts,
            "target_count": len(rec.invocation_ids), "requested_by": rec.requested_by,
            "requested_at": rec.requested_at, "completed_at": rec.completed_at,
            "duration_seconds": round(max(0.0, rec.completed_at - rec.requested_at), 3)})

    def invocation_ended(self, rec: CommandRecord, inv: protocol.InvocationView) -> None:
        if not rec.notify or not rec.notify_invocations:
            return
        self._enqueue(rec, "invocation", {
            "event": "invocation.completed", "command_id": rec.command_id, **_document(rec),
            "instance_id": inv.instance_id, "invocation_id": inv.invocation_id, "status": inv.status,
            "status_details": inv.status_details, "exit_code": inv.exit_code, "requested_by": rec.requested_by,
            "requested_at": rec.requested_at, "started_at": inv.started_at, "ended_at": inv.ended_at},
            inv.instance_id)

    # -- the loop's share: claim, hand over, record outcomes -------------------------------------

    def tick(self, now: float) -> None:
        self._record_outcomes(now)
        if now < self._next_claim:
            return
        self._next_claim = now + CLAIM_EVERY
        room = CLAIM_BATCH - len(self._sending)
        if room <= 0:
            return
        for rec in self.store.claim_webhooks(now, room, self.claimer, LEASE, set(self._sending)):
            self._sending[rec.delivery_id] = rec
            self._pool.submit(self._send, rec)

    def _record_outcomes(self, now: float) -> None:
        while True:
            try:
                rec, error = self._outcomes.get_nowait()
            except queue.Empty:
                return
            self._sending.pop(rec.delivery_id, None)
            rec.attempts += 1
            if not error:
                rec.state, rec.delivered_at, rec.last_error = "delivered", now, ""
                self.stats["delivered"] += 1
                log.info("webhook %s delivered for command %s (%s)", rec.target, rec.command_id, rec.event)
            else:
                rec.last_error = error
                self.stats["attempt_failures"] += 1
                delay = min(MAX_RETRY, FIRST_RETRY * 2 ** (rec.attempts - 1))
                if now + delay > rec.created_at + self.retry_seconds:
                    rec.state = "failed"
                    self.stats["failed"] += 1
                    log.error("webhook %s for command %s failed after %d attempt(s), giving up: %s", rec.target,
                              rec.command_id, rec.attempts, error)
                else:
                    rec.next_at = now + delay
                    log.warning("webhook %s for command %s: attempt %d failed (%s); again in %.0fs", rec.target,
                                rec.command_id, rec.attempts, error, delay)
            self.store.put_webhook(rec)

    def _send(self, rec: WebhookRecord) -> None:
        """A sender thread: one POST, its outcome handed back to the loop ("" when delivered)."""
        request = urllib.request.Request(rec.url, data=rec.body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"zerorun-broker/{__version__}",
            "X-Zerorun-Event": f"{rec.event}.completed", "X-Zerorun-Delivery": rec.delivery_id,
            "X-Zerorun-Signature": signature(self.secret, rec.body)})
        try:
            with _OPENER.open(request, timeout=SEND_TIMEOUT) as response:
                response.read(65536)
                error = "" if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            error = str(reason) or type(exc).__name__
        except Exception as exc:  # a sender thread never dies of one delivery
            error = f"{type(exc).__name__}: {exc}"
        self._outcomes.put((rec, error[:300]))

    # -- views ----------------------------------------------------------------------------------

    def status(self, command_id: str) -> list[protocol.WebhookStatus]:
        return [protocol.WebhookStatus(target=r.target, event=r.event, state=r.state, attempts=r.attempts,
                                       last_error=r.last_error, instance_id=r.instance_id,
                                       delivered_at=r.delivered_at)
                for r in self.store.webhooks_of(command_id)]

    def snapshot(self, now: float) -> dict[str, int]:
        """Counters for the metrics; the pending count is asked of the store every 15 s at most."""
        if now >= self._pending_known:
            self._pending_known = now + 15.0
            self.stats["pending"] = self.store.webhook_counts().get("pending", 0)
        return dict(self.stats)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not an invitation to POST elsewhere (the policy allowed this URL)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _document(rec: CommandRecord) -> dict[str, Any]:
    return {"document": {"name": rec.document_name, "version": rec.document_version,
                         "sha256": rec.document_sha256}}
