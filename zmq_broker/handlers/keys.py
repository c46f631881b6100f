"""Client operations on keys: list, accept / reject / revoke / delete, add."""

from __future__ import annotations

import logging
from typing import Any

from zerorun import keys as keyfiles, protocol

from ..context import BrokerContext, Peer

log = logging.getLogger("zerorun.broker")

GONE_DETAILS = {"reject": "agent key rejected", "revoke": "agent key revoked", "delete": "agent key deleted"}


def op_keys(ctx: BrokerContext, msg: protocol.ListKeys, peer: Peer) -> Any:
    return protocol.to_builtins(ctx.keys.views())


def op_key(ctx: BrokerContext, msg: protocol.KeyAction, peer: Peer) -> Any:
    if msg.action == "accept":
        rec = ctx.keys.accept(msg.name)
        nudge = ctx.sessions.pending_rids.pop(rec.public_key, None)
        if nudge is not None:
            ctx.to_agent(nudge, protocol.PleaseHello())
    else:
        if msg.action == "delete":
            rec = ctx.keys.delete(msg.name)
        else:
            rec = ctx.keys.reject(msg.name, note="revoked" if msg.action == "revoke" else "")
        if rec.kind == "agent":
            ctx.sessions.drop_key(rec.public_key)
            instance = ctx.fleet.get(rec.name)
            if instance is not None and instance.public_key == rec.public_key:
                ctx.book.instance_gone(rec.name, GONE_DETAILS[msg.action])
    requester = ctx.requester(peer.key)
    log.info("key %s: %s %s by %s", msg.action, rec.kind, rec.name, requester)
    ctx.audit.write("key." + msg.action, kind=rec.kind, name=rec.name,
                    fingerprint=keyfiles.fingerprint(rec.public_key), client=requester)
    return protocol.to_builtins(ctx.keys.view(rec))


def op_key_add(ctx: BrokerContext, msg: protocol.AddKey, peer: Peer) -> Any:
    rec = ctx.keys.add(msg.kind, msg.name, msg.public_key)
    ctx.audit.write("key.add", kind=rec.kind, name=rec.name, fingerprint=keyfiles.fingerprint(rec.public_key),
                    client=ctx.requester(peer.key))
    return protocol.to_builtins(ctx.keys.view(rec))
