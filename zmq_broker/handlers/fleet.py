"""Client operations on the fleet: ping, instances."""

from __future__ import annotations

import time
from typing import Any

from zerorun import __version__, keys as keyfiles, protocol
from zerorun.protocol import CONNECTION_LOST, ONLINE

from ..context import BrokerContext, Peer
from ..model import InstanceRecord
from . import access


def op_ping(ctx: BrokerContext, msg: protocol.Ping, peer: Peer) -> dict[str, Any]:
    return {"broker_version": __version__, "protocol_version": protocol.PROTOCOL_VERSION,
            "time": time.time(), "instances": len(ctx.fleet), "online": ctx.sessions.online_count(),
            "active_commands": len(ctx.book.active), "requester": ctx.requester(peer.key),
            "client_connections": ctx.stats["zap_allowed_clients"],
            "heartbeat_interval": ctx.sessions.fleet_heartbeat_interval(),
            "policy": ctx.policy.status(), "audit": {"path": str(ctx.audit.path or ""), "failed": ctx.audit.failed},
            "store": {"failed": ctx.store.write_failed},
            # where documents were rendered (the loop: inline, or a worker) and parsed (the same)
            "rendering": dict(ctx.renderer.stats, parsed_inline=ctx.documents.parses),
            "refused_unread_replies": ctx.stats["refused_unread_replies"],  # requests of keys that do not read
            "broker_id": ctx.cluster.id if ctx.cluster else "",
            "cluster": ctx.cluster.status() if ctx.cluster else []}


def last_seen(ctx: BrokerContext, rec: InstanceRecord) -> float:
    """When the instance was last heard from: its live session's last message (heartbeats keep
    it current, with no write per heartbeat), else what was stored when the session ended."""
    session = ctx.sessions.by_instance.get(rec.instance_id)
    if session is None or session.public_key != rec.public_key:
        return rec.last_seen
    return max(rec.last_seen, time.time() - (time.monotonic() - session.last_seen))


def instance_view(ctx: BrokerContext, rec: InstanceRecord) -> protocol.InstanceView:
    return protocol.InstanceView(
        instance_id=rec.instance_id, tags=rec.tags, hostname=rec.hostname, platform=rec.platform,
        platform_version=rec.platform_version, agent_version=rec.agent_version,
        ping_status=ctx.ping_status(rec.instance_id), first_seen=rec.first_seen,
        last_seen=last_seen(ctx, rec), key_fingerprint=keyfiles.fingerprint(rec.public_key),
        broker_id=ctx.broker_of(rec.instance_id), pending_tags=ctx.fleet.pending_tags(rec.instance_id),
        facts=rec.facts)


def op_instances(ctx: BrokerContext, msg: protocol.ListInstances, peer: Peer) -> Any:
    views = [instance_view(ctx, r) for r in ctx.fleet.matching(msg.targets)
             if access.unrestricted(peer) or peer.role.scope.contains(r.instance_id, r.tags)]
    if not msg.include_offline:
        views = [v for v in views if v.ping_status in (ONLINE, CONNECTION_LOST)]
    return protocol.to_builtins(views)
