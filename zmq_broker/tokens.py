"""Enrolment tokens: how an autoscaled fleet joins without ``--auto-accept`` and without an
operator accepting every key (SSM hybrid activations, Salt's autosign grains).

``zerorun tokens create --tag role=web --uses 100 --expires 2h`` makes a token: a random secret
(256 bits) printed once. The store keeps only its SHA-256 (a secret of that strength needs no
slow hash), the uses left and whether it is revoked; never the secret, which no log or audit
line holds either. An agent presents it in its first HELLO (``--enrol-token-file``); its key is
accepted with the token's tags, one use taken by one atomic statement in the store (exact with
several brokers). Every failure (wrong, expired, used up, revoked, another instance prefix) is
answered with the same ``REFUSED`` text after the same store queries: nothing tells a guesser
which part was wrong. The audit log says which.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from zerorun import protocol

from .store.base import TokenRow

TOKEN_PREFIX = "zrt1_"
MAX_USES = 1_000_000
MAX_LIFETIME = 365 * 86400.0  # seconds
MAX_COMMENT = 200  # characters
REFUSED = ("enrolment refused: the enrolment token is not valid for this agent (ask an operator for a valid "
           "token, or to accept this agent's key: zerorun keys accept)")
RETRY_AFTER = 60.0  # seconds an agent waits before presenting a refused token again


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_id() -> str:
    return "tok-" + secrets.token_hex(6)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def state(row: TokenRow, now: float | None = None) -> str:
    """active | revoked | used | expired"""
    now = time.time() if now is None else now
    if row.revoked:
        return "revoked"
    if row.uses_left <= 0:
        return "used"
    if row.record.expires_at <= now:
        return "expired"
    return "active"


def refusal_reason(row: TokenRow | None, instance_id: str, now: float) -> str:
    """Why a token was refused, for the audit log only."""
    if row is None:
        return "unknown token"
    current = state(row, now)
    if current == "active" and not instance_id.startswith(row.record.instance_prefix):
        return f"instance id outside the token's prefix {row.record.instance_prefix!r}"
    return {"revoked": "token revoked", "used": "token used up", "expired": "token expired"}.get(
        current, "token taken by a concurrent enrolment")


def view(row: TokenRow, secret: str = "") -> protocol.TokenView:
    rec = row.record
    return protocol.TokenView(token_id=rec.token_id, state=state(row), tags=dict(rec.tags), uses=rec.uses,
                              uses_left=row.uses_left, expires_at=rec.expires_at, created_at=rec.created_at,
                              created_by=rec.created_by, instance_prefix=rec.instance_prefix, comment=rec.comment,
                              token=secret)
