"""Client operations on the document store: list, show, versions, create, update, set the
default version, delete."""

from __future__ import annotations

import logging
from typing import Any, Callable

from zerorun import protocol

from ..context import DEFERRED, BrokerContext, Peer
from ..docstore import CheckedDocument
from ..documents import check_content
from ..errors import BrokerError
from . import access

log = logging.getLogger("zerorun.broker")


def _info(info: Any, **extra: Any) -> dict[str, Any]:
    data = protocol.to_builtins(info)
    data.update(extra)
    return data


def op_documents(ctx: BrokerContext, msg: protocol.ListDocuments, peer: Peer) -> Any:
    return [{"name": s.name, "version": s.default_version, "sha256": s.sha256,
             "description": s.description, "builtin": s.builtin, "is_default": True,
             "default_version": s.default_version, "latest_version": s.latest_version}
            for s in ctx.documents.list()]


def op_document(ctx: BrokerContext, msg: protocol.GetDocument, peer: Peer) -> Any:
    """One version with its parameters. Those are kept when a version is stored; one stored
    before (by an older broker, or before a restart) is parsed by a render worker, once: in the
    loop, parsing 256 KiB held every client and agent for half a second, on every show."""
    info = ctx.documents.read(msg.name, msg.version)
    view = ctx.documents.parameter_view(info)
    if view is not None:
        return _info(info, parameters=view)

    def parsed(result: CheckedDocument | None, error: BrokerError | None) -> None:
        def work() -> Any:
            if error is not None:
                raise error
            assert result is not None and result.parameters is not None
            return _info(info, parameters=ctx.documents.keep_view(info.name, info.sha256, result.parameters))

        ctx.respond(peer.routing_id, msg.rid, work, type(msg).__name__, read_only=True)

    ctx.renderer.check_stored(info.name, info.version, info.content, parsed)
    return DEFERRED


def op_document_versions(ctx: BrokerContext, msg: protocol.DocumentVersions, peer: Peer) -> Any:
    return [_info(i) for i in ctx.documents.versions(msg.name)]


def _checked(ctx: BrokerContext, msg: Any, peer: Peer, store: Callable[[CheckedDocument], Any]) -> Any:
    """Has a render worker check the document's text (parsing is never done in the loop for
    text a client sent), then ``store`` it and answer."""
    check_content(msg.content)

    def checked(result: CheckedDocument | None, error: BrokerError | None) -> None:
        def work() -> Any:
            if error is not None:
                raise error
            assert result is not None
            return store(result)

        ctx.respond(peer.routing_id, msg.rid, work, type(msg).__name__)

    ctx.renderer.validate(msg.name, msg.content, checked)
    return DEFERRED


def _owned(ctx: BrokerContext, peer: Peer, op: str, name: str) -> None:
    """A role changes only the documents its patterns name (its documents are its own)."""
    access.require_documents(ctx, peer, op, [name], why="change document {name!r}")


def op_document_create(ctx: BrokerContext, msg: protocol.CreateDocument, peer: Peer) -> Any:
    _owned(ctx, peer, "CreateDocument", msg.name)
    requester = ctx.requester(peer.key)

    def store(checked: CheckedDocument) -> Any:
        info = ctx.documents.create(msg.name, msg.content, requester, checked=checked)
        ctx.audit.write("document.create", name=info.name, version=info.version, sha256=info.sha256,
                        client=requester)
        log.info("document %s v%d created by %s", info.name, info.version, requester)
        return _info(info)

    return _checked(ctx, msg, peer, store)


def op_document_update(ctx: BrokerContext, msg: protocol.UpdateDocument, peer: Peer) -> Any:
    _owned(ctx, peer, "UpdateDocument", msg.name)
    requester = ctx.requester(peer.key)

    def store(checked: CheckedDocument) -> Any:
        info = ctx.documents.update(msg.name, msg.content, requester, set_default=msg.set_default,
                                    checked=checked)
        ctx.audit.write("document.update", name=info.name, version=info.version, sha256=info.sha256,
                        client=requester)
        log.info("document %s v%d added by %s", info.name, info.version, requester)
        return _info(info)

    return _checked(ctx, msg, peer, store)


def op_document_default(ctx: BrokerContext, msg: protocol.SetDefaultDocumentVersion, peer: Peer) -> Any:
    _owned(ctx, peer, "SetDefaultDocumentVersion", msg.name)
    requester = ctx.requester(peer.key)
    info = ctx.documents.set_default(msg.name, msg.version)
    ctx.audit.write("document.set_default", name=info.name, version=info.version, sha256=info.sha256,
                    client=requester)
    log.info("document %s default version set to %d by %s", info.name, info.version, requester)
    return _info(info)


def op_document_delete(ctx: BrokerContext, msg: protocol.DeleteDocument, peer: Peer) -> Any:
    _owned(ctx, peer, "DeleteDocument", msg.name)
    requester = ctx.requester(peer.key)
    gone = ctx.documents.versions(msg.name) if not ctx.documents.is_builtin(msg.name) else []
    if msg.version:
        gone = [v for v in gone if str(v.version) == str(msg.version).strip()]
    ctx.documents.delete(msg.name, msg.version or None)
    ctx.audit.write("document.delete", name=msg.name, version=msg.version, client=requester,
                    sha256=[v.sha256 for v in gone])
    log.info("document %s%s deleted by %s", msg.name, f" v{msg.version}" if msg.version else "", requester)
    return {"deleted": msg.name, "version": msg.version}
