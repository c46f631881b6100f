"""Who may do what: every client request is authorised here before its handler runs."""

from __future__ import annotations

from typing import Any

from zerorun import keys as keyfiles, protocol

from ..context import BrokerContext
from ..errors import BrokerError


def authorise(ctx: BrokerContext, key: str | None, permission: str, msg: Any) -> None:
    """Default deny: the key must still be accepted and its role must allow the operation
    (and, to run, the document and every target)."""
    if key is None:  # --insecure: no identities, no policy
        return
    if not ctx.keys.is_accepted_client(key):
        ctx.audit.write("access.denied", client=keyfiles.fingerprint(key), op=type(msg).__name__,
                        reason="key revoked")
        raise BrokerError("AccessDenied", "this client key has been revoked")
    name = ctx.keys.client_name(key)
    document = targets = None
    if isinstance(msg, protocol.SendCommand):
        document = "$LOCAL" if msg.document_content else msg.document
        targets = [str(t) for t in msg.targets] + [f"instance:{i}" for i in msg.instance_ids]
    elif isinstance(msg, (protocol.Exec, protocol.FileTransfer)):
        targets = [f"instance:{msg.instance_id}"]
    reason = ctx.policy.policy.check(name, permission, document, targets)
    if reason is not None:
        ctx.stats["access_denied"] += 1
        ctx.audit.write("access.denied", client=name, fingerprint=keyfiles.fingerprint(key),
                        op=type(msg).__name__, permission=permission, reason=reason)
        raise BrokerError("AccessDenied", reason)
