"""Client operations on enrolment tokens (create, list, revoke: permission ``keys``), and the
enrolment of an agent that presents one in its HELLO (``tokens.py`` says what a token is)."""

from __future__ import annotations

import logging
import time
from typing import Any

from zerorun import keys as keyfiles, protocol
from zerorun.identifiers import instance_id_problem, printable, tags_problem
from zerorun.protocol import KEY_ACCEPTED, KEY_DENIED

from .. import tokens
from ..context import BrokerContext, Peer
from ..errors import BrokerError
from ..identity import HelloVerdict
from ..model import TokenRecord
from . import access, tags as tags_api

log = logging.getLogger("zerorun.broker.tokens")


def op_token_create(ctx: BrokerContext, msg: protocol.CreateToken, peer: Peer) -> Any:
    problem = tags_problem(msg.tags)
    if problem:
        raise BrokerError("InvalidTag", problem)
    if not 1 <= msg.uses <= tokens.MAX_USES:
        raise BrokerError("BadRequest", f"uses must be from 1 to {tokens.MAX_USES}, not {msg.uses}")
    if not 0 < msg.expires_in <= tokens.MAX_LIFETIME:
        raise BrokerError("BadRequest", f"a token expires after more than 0 seconds and at most "
                                        f"{tokens.MAX_LIFETIME:.0f} (a year), not {msg.expires_in:g}")
    if msg.instance_prefix and instance_id_problem(msg.instance_prefix):
        raise BrokerError("BadRequest", f"instance prefix {printable(msg.instance_prefix)}: use ASCII letters, "
                                        "digits, '.', '_' or '-', starting with a letter or digit")
    if len(msg.comment) > tokens.MAX_COMMENT:  # it was cut there without a word
        raise BrokerError("BadRequest", f"a token's comment has at most {tokens.MAX_COMMENT} characters, "
                                        f"not {len(msg.comment)}")
    if not msg.comment.isprintable():  # a newline or an escape went into `tokens list` as it is
        raise BrokerError("BadRequest", f"a token's comment is one line of printable characters, not "
                                        f"{printable(msg.comment)}")
    if not access.unrestricted(peer):  # a restricted role may only enrol instances into its own scope
        access.require_in_scope(ctx, peer, "CreateToken", [_enrols(msg.instance_prefix, msg.tags)])
    now = time.time()
    secret = tokens.new_secret()
    rec = TokenRecord(token_id=tokens.new_id(), tags=dict(msg.tags), uses=msg.uses, expires_at=now + msg.expires_in,
                      created_at=now, created_by=ctx.requester(peer.key), instance_prefix=msg.instance_prefix,
                      comment=msg.comment)
    ctx.store.create_token(rec, tokens.digest(secret))
    log.info("enrolment token %s created by %s: tags %s, %d use(s), expires in %gs", rec.token_id, rec.created_by,
             tags_api._fmt(rec.tags), rec.uses, msg.expires_in)
    ctx.audit.write("token.create", token_id=rec.token_id, tags=rec.tags, uses=rec.uses, expires_at=rec.expires_at,
                    instance_prefix=rec.instance_prefix, client=rec.created_by, comment=rec.comment)
    return protocol.to_builtins(tokens.view(tokens.TokenRow(rec, rec.uses, False), secret))


def _enrols(instance_prefix: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The instances a token enrols, as a scope sees them."""
    return instance_prefix + "*", tags


def op_tokens(ctx: BrokerContext, msg: protocol.ListTokens, peer: Peer) -> Any:
    rows = sorted(ctx.store.tokens(), key=lambda r: r.record.created_at)
    if not access.unrestricted(peer):  # a restricted role sees the tokens that enrol into its scope
        assert peer.role is not None
        rows = [r for r in rows if peer.role.scope.contains(*_enrols(r.record.instance_prefix, r.record.tags))]
    return protocol.to_builtins([tokens.view(r) for r in rows])


def op_token_revoke(ctx: BrokerContext, msg: protocol.RevokeToken, peer: Peer) -> Any:
    row = next((r for r in ctx.store.tokens() if r.record.token_id == msg.token_id), None)
    if row is None:
        raise BrokerError("NotFound", f"no enrolment token {msg.token_id!r} (zerorun tokens list)")
    if not access.unrestricted(peer):  # nor revoke another scope's
        access.require_in_scope(ctx, peer, "RevokeToken", [_enrols(row.record.instance_prefix, row.record.tags)])
    if ctx.store.revoke_token(msg.token_id):
        row.revoked = True
        requester = ctx.requester(peer.key)
        log.info("enrolment token %s revoked by %s", msg.token_id, requester)
        ctx.audit.write("token.revoke", token_id=msg.token_id, uses_left=row.uses_left, client=requester)
    else:
        row.revoked = True
    return protocol.to_builtins(tokens.view(row))


def enrol(ctx: BrokerContext, key: str, instance_id: str, secret: str) -> HelloVerdict:
    """An unknown or pending agent key presents an enrolment token at HELLO: accepted with the
    token's tags (its own proposals ignored), one use taken; or refused, always with the same
    words after the same queries. The secret is never logged."""
    taken = ctx.keys.claim_problem(key, instance_id)
    if taken is not None:  # another key holds this id: no use is taken
        return taken
    now = time.time()
    found = None
    digest = tokens.digest(secret)
    try:
        found = ctx.store.redeem_token(digest, instance_id, now)
        why = "" if found is not None else tokens.refusal_reason(ctx.store.token_by_digest(digest), instance_id, now)
    except BrokerError as exc:
        why = f"store unavailable: {exc.message}"
    fingerprint = keyfiles.fingerprint(key)
    if found is None:
        ctx.stats["hello_denied"] += 1
        ctx.stats["tokens_refused"] += 1
        log.warning("refused enrolment of %s (key %s): %s", instance_id, fingerprint, why)
        # one rate limit for every refused token, whatever the key (keys cost nothing to make)
        ctx.audit.write_refusal("enrolment-tokens", "token.refused", instance_id=instance_id, fingerprint=fingerprint,
                                reason=why)
        return HelloVerdict(KEY_DENIED, tokens.REFUSED)
    rec = found.record
    ctx.keys.enrol(key, instance_id, note=f"enrolled with token {rec.token_id}")
    tags_api.enrolled(ctx, instance_id, rec.tags, f"token {rec.token_id}", replace=True)
    ctx.stats["tokens_used"] += 1
    log.info("agent %s enrolled with token %s (%d use(s) left)", instance_id, rec.token_id, found.uses_left)
    ctx.audit.write("token.use", token_id=rec.token_id, instance_id=instance_id, fingerprint=fingerprint,
                    tags=rec.tags, uses_left=found.uses_left)
    return HelloVerdict(KEY_ACCEPTED, newly_accepted=True)
