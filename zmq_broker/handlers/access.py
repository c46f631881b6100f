"""Who may do what: every client request is authorised here before its handler runs, and the
handlers ask here whether the instances a request reaches, or a command it reads, are in the
client's scope."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from zerorun import keys as keyfiles, protocol

from ..context import BrokerContext, Peer
from ..errors import BrokerError
from ..model import CommandRecord
from ..policy import ADMIN

NAMED = 10  # instances named in a refusal; the rest are counted


def authorise(ctx: BrokerContext, peer: Peer, permission: str, msg: Any) -> None:
    """Default deny: the key must still be accepted and its role must allow the operation (and,
    to run, the document). Sets ``peer.role`` for the scope checks that follow."""
    key = peer.key
    if key is None:  # --insecure: no identities, no policy
        return
    if not ctx.keys.is_accepted_client(key):
        ctx.audit.write_refusal(key, "access.denied", client=keyfiles.fingerprint(key), op=type(msg).__name__,
                                reason="key revoked")
        raise BrokerError("AccessDenied", "this client key has been revoked")
    peer.name = ctx.keys.client_name(key)
    peer.role = ADMIN if key == ctx.keys.admin_key else ctx.policy.policy.role_of(peer.name)
    document = None
    if isinstance(msg, protocol.SendCommand):
        document = "$LOCAL" if msg.document_content else msg.document
    reason = ctx.policy.policy.check(peer.name, peer.role, permission, document)
    if reason is not None:
        deny(ctx, peer, type(msg).__name__, reason, permission=permission)


def deny(ctx: BrokerContext, peer: Peer, op: str, reason: str, **fields: Any) -> None:
    """Counts, audits and raises a refusal."""
    ctx.stats["access_denied"] += 1
    ctx.audit.write_refusal(peer.key or "", "access.denied", client=peer.name,
                            fingerprint=keyfiles.fingerprint(peer.key or ""),
                    op=op, reason=reason, **fields)
    raise BrokerError("AccessDenied", reason)


def unrestricted(peer: Peer) -> bool:
    return peer.role is None or peer.role.scope.everything


def require_in_scope(ctx: BrokerContext, peer: Peer, op: str,
                     instances: Iterable[tuple[str, Mapping[str, str]]]) -> None:
    """Refuses unless every instance (id, tags) is in the client's scope, naming those outside."""
    if unrestricted(peer):
        return
    assert peer.role is not None
    outside = peer.role.scope.outside(instances)
    if outside:
        named = ", ".join(outside[:NAMED]) + (f" and {len(outside) - NAMED} more" if len(outside) > NAMED else "")
        deny(ctx, peer, op, f"client {peer.name!r} (role {peer.role.name}) may not reach {len(outside)} "
                            f"instance(s) outside its scope ({peer.role.scope}): {named}",
             instances_outside=len(outside))


def require_documents(ctx: BrokerContext, peer: Peer, op: str, names: Iterable[str],
                      why: str = "run document {name!r} (run by an aws:runDocument step)") -> None:
    """Refuses unless the client's role's document patterns match every one of these names: the
    documents a composite document runs, and a document a client creates, changes or deletes."""
    if peer.role is None:
        return
    for name in names:
        if not peer.role.may_use_document(name):
            deny(ctx, peer, op, f"client {peer.name!r} (role {peer.role.name}) may not " + why.format(name=name))


def require_run_as(ctx: BrokerContext, peer: Peer, op: str, users: Iterable[str]) -> None:
    """Refuses unless the client's role may run steps as every one of these users ("": a step
    that names none, the agent's own user, ``root`` to the policy)."""
    if peer.role is None:
        return
    refused = sorted({u or "root" for u in users if not peer.role.may_run_as(u)})
    if refused:
        allowed = ", ".join(peer.role.run_as) or "none"
        deny(ctx, peer, op, f"client {peer.name!r} (role {peer.role.name}) may not run as {', '.join(refused)} "
                            f"(its role's run_as allows: {allowed})", run_as=refused)


def instance_in_scope(ctx: BrokerContext, peer: Peer, instance_id: str) -> bool:
    if unrestricted(peer):
        return True
    assert peer.role is not None
    rec = ctx.fleet.get(instance_id)
    return peer.role.scope.contains(instance_id, rec.tags if rec is not None else {})


def command_visible(ctx: BrokerContext, peer: Peer, rec: CommandRecord, instance_ids: Iterable[str]) -> bool:
    """A client sees a command it sent, or one whose every instance is in its scope."""
    if unrestricted(peer) or (peer.key is not None and rec.requested_by_key == keyfiles.fingerprint(peer.key)):
        return True
    return all(instance_in_scope(ctx, peer, i) for i in instance_ids)


def require_command_visible(ctx: BrokerContext, peer: Peer, op: str, rec: CommandRecord,
                            instance_ids: Iterable[str]) -> None:
    if not command_visible(ctx, peer, rec, instance_ids):
        assert peer.role is not None
        deny(ctx, peer, op, f"client {peer.name!r} (role {peer.role.name}) may not see command "
                            f"{rec.command_id}: it reaches instances outside its scope ({peer.role.scope})",
             command_id=rec.command_id)
