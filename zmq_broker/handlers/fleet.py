"""Client operations on the fleet: ping, instances."""

from __future__ import annotations

import time
from typing import Any

from zerorun import __version__, keys as keyfiles, protocol
from zerorun.protocol import CONNECTION_LOST, ONLINE

from ..context import BrokerContext, Peer
from ..model import InstanceRecord


def op_ping(ctx: BrokerContext, msg: protocol.Ping, peer: Peer) -> dict[str, Any]:
    return {"broker_version": __version__, "protocol_version": protocol.PROTOCOL_VERSION,
            "time": time.time(), "instances": len(ctx.fleet), "online": ctx.sessions.online_count(),
            "active_commands": len(ctx.book.active), "requester": ctx.requester(peer.key),
            "client_connections": ctx.stats["zap_allowed_clients"],
            "heartbeat_interval": ctx.sessions.fleet_heartbeat_interval()}


def instance_view(ctx: BrokerContext, rec: InstanceRecord) -> protocol.InstanceView:
    return protocol.InstanceView(
        instance_id=rec.instance_id, tags=rec.tags, hostname=rec.hostname, platform=rec.platform,
        platform_version=rec.platform_version, agent_version=rec.agent_version,
        ping_status=ctx.ping_status(rec.instance_id), first_seen=rec.first_seen,
        last_seen=rec.last_seen, key_fingerprint=keyfiles.fingerprint(rec.public_key))


def op_instances(ctx: BrokerContext, msg: protocol.ListInstances, peer: Peer) -> Any:
    views = [instance_view(ctx, r) for r in ctx.fleet.matching(msg.targets)]
    if not msg.include_offline:
        views = [v for v in views if v.ping_status in (ONLINE, CONNECTION_LOST)]
    return protocol.to_builtins(views)
