"""Client operations on keys: list, accept / reject / revoke / delete / replace, add.

The ``keys`` permission manages agent keys; client keys (who may use the broker, under which
name, hence which role) are managed by the broker's own admin key alone, so that no role can
give itself or anyone else more than it has. Every change is audited with who made it.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from zerorun import keys as keyfiles, protocol

from ..context import BrokerContext, Peer
from ..errors import BrokerError
from ..model import KeyRecord
from . import access, tags as tags_api

log = logging.getLogger("zerorun.broker")

GONE_DETAILS = {"reject": "agent key rejected", "revoke": "agent key revoked", "delete": "agent key deleted",
                "replace": "agent key replaced"}


def _instance(ctx: BrokerContext, rec: KeyRecord) -> tuple[str, Mapping[str, str]]:
    """The instance of an agent key as scopes see it: its approved tags or, while it has none, the
    proposal that accepting the key would make its tags."""
    current = ctx.fleet.tag_record(rec.name)
    return rec.name, current.tags if current is not None else rec.tags


def op_keys(ctx: BrokerContext, msg: protocol.ListKeys, peer: Peer) -> Any:
    if access.unrestricted(peer):
        return protocol.to_builtins(ctx.keys.views(ctx.fleet.tag_record))
    assert peer.role is not None
    records = sorted((r for r in ctx.keys.by_key.values()  # agent keys within the scope, as instances are
                      if r.kind != "agent" or peer.role.scope.contains(*_instance(ctx, r))),
                     key=lambda r: (r.kind, r.name))
    return protocol.to_builtins([ctx.keys.view(r, ctx.fleet.tag_record) for r in records])


def _require_admin_for_clients(ctx: BrokerContext, peer: Peer, op: str, kind: str) -> None:
    if kind == "client" and peer.key is not None and peer.key != ctx.keys.admin_key:
        access.deny(ctx, peer, op, f"client {peer.name!r}: only the broker's admin key manages client keys "
                                   "(the keys permission covers agent keys)")


def _require_agent_in_scope(ctx: BrokerContext, peer: Peer, op: str, rec: KeyRecord) -> None:
    """A restricted role manages the keys of instances in its scope only: the instance as it is
    (its approved tags) or, while it has none, as accepting its key would make it (its agent's
    proposal), so that it can neither cut off or take over an instance outside its scope nor
    enrol one there."""
    if rec.kind != "agent" or access.unrestricted(peer):
        return
    access.require_in_scope(ctx, peer, op, [_instance(ctx, rec)])


def op_key(ctx: BrokerContext, msg: protocol.KeyAction, peer: Peer) -> Any:
    try:
        target = ctx.keys.find(msg.name)
    except BrokerError:
        target = None  # the action itself says what is wrong with the name
    if target is not None:
        _require_admin_for_clients(ctx, peer, "KeyAction", target.kind)
        _require_agent_in_scope(ctx, peer, "KeyAction", target)
    details: dict[str, Any] = {}
    if msg.action == "accept":
        was_pending = target is not None and target.state != protocol.KEY_ACCEPTED
        rec = ctx.keys.accept(msg.name)
        if rec.kind == "agent" and was_pending:  # what its agent proposed (shown by keys list) becomes its tags
            tags_api.enrolled(ctx, rec.name, rec.tags, ctx.requester(peer.key), replace=False)
        _nudge(ctx, rec)
    elif msg.action == "replace":
        old, rec = ctx.keys.replace(msg.name, msg.replacement)
        _gone(ctx, old, "replace")
        _nudge(ctx, rec)
        details["replaced"] = keyfiles.fingerprint(old.public_key)
    else:
        if msg.action == "delete":
            rec = ctx.keys.delete(msg.name)
        else:
            rec = ctx.keys.reject(msg.name, note="revoked" if msg.action == "revoke" else "")
        _gone(ctx, rec, msg.action)
    requester = ctx.requester(peer.key)
    log.info("key %s: %s %s by %s", msg.action, rec.kind, rec.name, requester)
    ctx.audit.write("key." + msg.action, kind=rec.kind, name=rec.name,
                    fingerprint=keyfiles.fingerprint(rec.public_key), client=requester, **details)
    return protocol.to_builtins(ctx.keys.view(rec, ctx.fleet.tag_record))


def _nudge(ctx: BrokerContext, rec: KeyRecord) -> None:
    """An agent waiting with a newly accepted key says HELLO now, not at its next retry."""
    nudge = ctx.sessions.pending_rids.pop(rec.public_key, None)
    if nudge is not None:
        ctx.to_agent(nudge[0], protocol.PleaseHello(), fd=nudge[1])


def _gone(ctx: BrokerContext, rec: KeyRecord, action: str) -> None:
    """An agent key no longer valid: its session ends; what its instance was owed is undeliverable
    (unless another key now speaks for the instance)."""
    if rec.kind != "agent":
        return
    ctx.sessions.drop_key(rec.public_key)
    instance = ctx.fleet.get(rec.name)
    if instance is not None and instance.public_key == rec.public_key and action != "replace":
        ctx.book.instance_gone(rec.name, GONE_DETAILS[action])


def op_key_add(ctx: BrokerContext, msg: protocol.AddKey, peer: Peer) -> Any:
    _require_admin_for_clients(ctx, peer, "AddKey", msg.kind)
    if msg.kind == "agent" and (problem := ctx.fleet.id_problem(msg.name)):  # held to the rule its HELLO will be
        raise BrokerError("BadRequest", problem)
    if msg.tags:
        tags_api.check_preregistered(ctx, peer, msg.kind, msg.name, msg.tags)
    elif msg.kind == "agent" and not access.unrestricted(peer):  # an instance without tags: in its scope?
        access.require_in_scope(ctx, peer, "AddKey", [(msg.name, {})])
    rec = ctx.keys.add(msg.kind, msg.name, msg.public_key)
    ctx.audit.write("key.add", kind=rec.kind, name=rec.name, fingerprint=keyfiles.fingerprint(rec.public_key),
                    client=ctx.requester(peer.key), tags=msg.tags)
    if rec.kind == "agent":  # pre-registered tags are its tags; without any, its agent's proposal waits
        tags_api.enrolled(ctx, rec.name, msg.tags, ctx.requester(peer.key), replace=bool(msg.tags))
    return protocol.to_builtins(ctx.keys.view(rec, ctx.fleet.tag_record))
