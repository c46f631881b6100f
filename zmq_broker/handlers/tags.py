"""Who says what an instance's tags are: the broker, never the instance alone.

An agent's ``--tag`` flags are a *proposal*. The first tags of an instance come from its
enrolment: the proposal of the pending key an operator accepted, the tags pre-registered with
``keys add --tag``, or an enrolment token's tags. After that, a change the agent proposes at
HELLO is held as pending (shown by ``keys list`` and ``instances``, audited, logged at warning)
until an operator approves it; targets and scopes keep seeing the approved tags. Operators set,
unset, approve or reject tags with ``zerorun tags`` (permission ``tags``), audited with the old and
the new values. ``--agent-tags trusted`` (labs) takes whatever the agent says, as brokers did
before.

Tag records live in the store apart from the instance records (the broker holding a session
rewrites those), so that a change made through one broker is not overwritten by another; the
others learn it through a ``FleetEvent``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from zerorun import keys as keyfiles, protocol
from zerorun.identifiers import tag_problem, tags_problem

from ..cluster import FleetEvent
from ..context import BrokerContext, Peer
from ..errors import BrokerError
from ..model import TagRecord
from . import access

log = logging.getLogger("zerorun.broker.tags")

TRUSTED = "trusted"  # --agent-tags trusted: agents set their own tags (labs)


def _fmt(tags: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((tags or {}).items())) or "-"


def save(ctx: BrokerContext, rec: TagRecord, by: str) -> None:
    """Writes an instance's tag record (queued for the group commit) and tells other brokers."""
    rec.updated_at, rec.updated_by = time.time(), by
    ctx.fleet.set_tags(rec)
    ctx.store.put_tags(rec)
    if ctx.cluster is not None:
        ctx.cluster.broadcast(FleetEvent(instances=[rec.instance_id]))


def enrolled(ctx: BrokerContext, instance_id: str, tags: Mapping[str, str], by: str, *, replace: bool) -> None:
    """A key was accepted for this instance (or pre-registered). ``tags`` become its tags when it
    has none yet, or always with ``replace`` (an enrolment token's, ``keys add --tag``); otherwise
    tags that differ from the approved ones are a pending proposal, as at HELLO."""
    current = ctx.fleet.tag_record(instance_id)
    if current is None or replace:
        new = dict(tags)
        if current is not None and current.tags == new and current.proposed is None:
            return
        save(ctx, TagRecord(instance_id, new), by)
        ctx.audit.write("tags.enrol", instance_id=instance_id, old=current.tags if current is not None else {},
                        new=new, by=by)
        return
    propose(ctx, instance_id, tags, by)


def propose(ctx: BrokerContext, instance_id: str, offered: Mapping[str, str], by: str) -> None:
    """An accepted instance's agent says what its tags should be (at HELLO). No tags at all is
    no opinion; the approved tags are no change (and withdraw a pending proposal); anything else
    waits for an operator, unless agents are trusted with their tags."""
    current = ctx.fleet.tag_record(instance_id)
    offered = dict(offered)
    if ctx.config.agent_tags == TRUSTED or ctx.config.insecure:
        if current is None or current.tags != offered or current.proposed is not None:
            old = current.tags if current is not None else {}
            save(ctx, TagRecord(instance_id, offered), by)
            if old != offered:
                ctx.audit.write("tags.agent_set", instance_id=instance_id, old=old, new=offered, agent=by)
        return
    if current is None:  # accepted without a record (a key accepted by an older broker): nothing approved yet
        current = TagRecord(instance_id)
        save(ctx, current, "no tags approved yet")
    if not offered:
        return
    if offered == current.tags:
        if current.proposed is not None:
            current.proposed, current.proposed_at = None, 0.0
            save(ctx, current, by)
            ctx.audit.write("tags.proposal_withdrawn", instance_id=instance_id, tags=current.tags, agent=by)
        return
    if offered == current.proposed:
        return  # pending already (said once, not at every reconnect)
    current.proposed, current.proposed_at = offered, time.time()
    save(ctx, current, by)
    log.warning("instance %s proposes tags %s (approved: %s); held until an operator runs `zerorun tags approve "
                "%s`", instance_id, _fmt(offered), _fmt(current.tags), instance_id)
    ctx.audit.write("tags.proposed", instance_id=instance_id, old=current.tags, new=offered, agent=by)


def known(ctx: BrokerContext, instance_id: str) -> bool:
    return (instance_id in ctx.fleet or ctx.fleet.tag_record(instance_id) is not None
            or instance_id in ctx.keys.bound)


def op_tags(ctx: BrokerContext, msg: protocol.TagAction, peer: Peer) -> Any:
    """``zerorun tags set|unset|approve|reject``: checked against the client's scope before and
    after (a role may neither touch an instance outside its scope nor move one out of it)."""
    instance_id = msg.instance_id
    if not known(ctx, instance_id):
        raise BrokerError("NotFound", f"no instance {instance_id!r} (zerorun instances, zerorun keys list)")
    current = ctx.fleet.tag_record(instance_id) or TagRecord(instance_id)
    old = dict(current.tags)
    access.require_in_scope(ctx, peer, "TagAction", [(instance_id, old)])
    proposed = current.proposed
    if msg.action == "set":
        if not msg.tags:
            raise BrokerError("BadRequest", "tags set needs at least one KEY=VALUE")
        new = {**old, **msg.tags}
        problem = tags_problem(new)
    elif msg.action == "unset":
        missing = [k for k in msg.keys if k not in old]
        if not msg.keys or missing:
            raise BrokerError("NotFound" if missing else "BadRequest",
                              f"instance {instance_id} has no tag {', '.join(map(repr, missing))} (its tags: {_fmt(old)})"
                              if missing else "tags unset needs at least one KEY")
        new = {k: v for k, v in old.items() if k not in msg.keys}
        problem = next((p for p in (tag_problem(k) for k in msg.keys) if p), None)
    else:
        if proposed is None:
            raise BrokerError("NotFound", f"instance {instance_id} proposes no tags (its tags: {_fmt(old)})")
        new = dict(proposed) if msg.action == "approve" else old
        problem = None
    if problem:
        raise BrokerError("InvalidTag", problem)
    access.require_in_scope(ctx, peer, "TagAction", [(instance_id, new)])
    requester = ctx.requester(peer.key)
    current.tags = new
    if msg.action in ("approve", "reject"):
        current.proposed, current.proposed_at = None, 0.0
    save(ctx, current, requester)
    log.info("tags %s: %s %s -> %s by %s", msg.action, instance_id, _fmt(old), _fmt(new), requester)
    ctx.audit.write("tags." + msg.action, instance_id=instance_id, old=old, new=new, client=requester,
                    **({"proposed": proposed} if msg.action in ("approve", "reject") else {}))
    return protocol.to_builtins(protocol.TagsView(instance_id, new, current.proposed))


def check_preregistered(ctx: BrokerContext, peer: Peer, kind: str, name: str, tags: Mapping[str, str]) -> None:
    """``keys add agent ID KEY --tag K=V``: tags only for agent keys, valid, given by a client
    that may set tags, and inside its scope."""
    if kind != "agent":
        raise BrokerError("BadRequest", "only agent keys carry tags")
    problem = tags_problem(dict(tags))
    if problem:
        raise BrokerError("InvalidTag", problem)
    if peer.role is not None and not peer.role.permits("tags"):
        access.deny(ctx, peer, "AddKey", f"client {peer.name!r} (role {peer.role.name}) lacks permission 'tags', "
                                         "which pre-registering tags with a key needs", permission="tags")
    access.require_in_scope(ctx, peer, "AddKey", [(name, tags)])


def agent_name(key: str | None, instance_id: str) -> str:
    """How audit lines name an agent: its instance id and key fingerprint."""
    return f"{instance_id} ({keyfiles.fingerprint(key)})" if key else instance_id
