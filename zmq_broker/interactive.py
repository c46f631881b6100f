"""Interactive requests for the Ansible connection plugin: Exec and FileTransfer, relayed.

A client's Exec / FileTransfer becomes one AgentExec / AgentFileOp for the instance's current
agent session; the agent's ExecDone / FileDone answers the waiting client. Nothing is stored:
an interactive request is answered once (by the agent, or with an error when the agent is not
connected, goes away, or the deadline passes) and forgotten. File data is relayed chunk by chunk,
never gathered in the broker.

Rules:
- the instance must be Online, else the client gets ``AgentUnavailable`` at once;
- an answer counts only when it comes from the session the request was sent to (another agent
  cannot answer for it: counted and audited as ``agent.interactive_refused``);
- a transfer id belongs to the client key that opened it, on the instance it was opened on;
- ``sweep()`` (from the broker's tick) answers requests past their deadline with ``Timeout`` and
  those whose agent disconnected with ``AgentUnavailable``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from zerorun import protocol
from zerorun.protocol import HEADER, Reply

if TYPE_CHECKING:
    from .server import Broker, Session

log = logging.getLogger("zerorun.broker.interactive")

DEFAULT_EXEC_TIMEOUT = 3600.0  # the agent's own default when the client gives none
GRACE = 10.0  # the broker waits this much longer than the agent's timeout
FILE_OP_TIMEOUT = 120.0
SLOW_FILE_OP_TIMEOUT = 600.0  # open-fetch and commit hash the whole file
TRANSFER_IDLE = 600.0
AUDIT_COMMAND_CHARS = 500


@dataclass
class Pending:
    routing_id: bytes  # the client's
    rid: int
    deadline: float
    instance_id: str
    session: "Session"
    kind: str  # exec | file
    op: str = ""
    transfer_id: str = ""


@dataclass
class TransferOwner:
    client_key: str
    instance_id: str
    path: str
    last_used: float


class InteractiveRelay:
    def __init__(self, broker: "Broker"):
        self.broker = broker
        self.pending: dict[str, Pending] = {}
        self.transfers: dict[str, TransferOwner] = {}

    # -- client side ----------------------------------------------------------------------------

    def _fail(self, routing_id: bytes, rid: int, code: str, message: str) -> None:
        self.broker._replies.append((routing_id, Reply(rid, False, error=protocol.ErrorInfo(code, message))))

    def _session(self, routing_id: bytes, rid: int, instance_id: str) -> "Session | None":
        if not instance_id:
            self._fail(routing_id, rid, "BadRequest", "no instance_id")
            return None
        session = self.broker.by_instance.get(instance_id)
        if session is None or not session.online:
            status = self.broker._ping_status(instance_id)
            if instance_id not in self.broker.instances:
                text = f"instance {instance_id!r} is unknown to the broker"
            else:
                text = f"the agent of instance {instance_id!r} is not connected (ping status {status})"
            self._fail(routing_id, rid, "AgentUnavailable", text)
            return None
        return session

    def _relay(self, session: "Session", message: Any, pending: Pending, request_id: str) -> bool:
        try:
            self.broker.agents.send_multipart([session.routing_id, HEADER, protocol.encode(message)],
                                              zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            self.broker.stats["send_failures"] += 1
            self._fail(pending.routing_id, pending.rid, "AgentUnavailable",
                       f"could not reach the agent of {pending.instance_id}: {exc}")
            return False
        self.broker.stats["messages_out"] += 1
        self.pending[request_id] = pending
        return True

    def exec(self, msg: protocol.Exec, routing_id: bytes, key: str | None) -> None:
        session = self._session(routing_id, msg.rid, msg.instance_id)
        if session is None:
            return
        timeout = msg.timeout if msg.timeout > 0 else DEFAULT_EXEC_TIMEOUT
        request_id = uuid.uuid4().hex
        self.broker.audit.write("exec", client=self.broker._requester(key), instance=msg.instance_id,
                                command=msg.command[:AUDIT_COMMAND_CHARS], stdin_bytes=len(msg.stdin),
                                request_id=request_id)
        self.broker.stats["interactive_exec"] += 1
        now = time.monotonic()
        pending = Pending(routing_id, msg.rid, now + timeout + GRACE, msg.instance_id, session, "exec")
        self._relay(session, protocol.AgentExec(request_id=request_id, command=msg.command, stdin=msg.stdin,
                                                timeout=timeout, env=dict(msg.env),
                                                expires_at=time.time() + timeout),
                    pending, request_id)

    def file(self, msg: protocol.FileTransfer, routing_id: bytes, key: str | None) -> None:
        if not msg.transfer_id or len(msg.transfer_id) > 128:
            self._fail(routing_id, msg.rid, "BadRequest", "a file transfer needs a transfer_id (at most 128 characters)")
            return
        if msg.op not in ("open-put", "write", "commit", "open-fetch", "read", "close", "abort"):
            self._fail(routing_id, msg.rid, "BadRequest", f"unknown file operation {msg.op!r}")
            return
        client_key = key or "insecure"
        owner = self.transfers.get(msg.transfer_id)
        now = time.monotonic()
        if msg.op.startswith("open-"):
            if owner is not None:
                self._fail(routing_id, msg.rid, "BadRequest", "transfer id already in use")
                return
        elif owner is None or owner.client_key != client_key or owner.instance_id != msg.instance_id:
            if msg.op in ("close", "abort"):
                self.broker._replies.append((routing_id, Reply(msg.rid, True, data={"ok": True})))
            else:
                self._fail(routing_id, msg.rid, "NotFound", f"no open transfer {msg.transfer_id[:64]!r} of this client")
            return
        session = self._session(routing_id, msg.rid, msg.instance_id)
        if session is None:
            return
        requester = self.broker._requester(key)
        if msg.op.startswith("open-"):
            self.transfers[msg.transfer_id] = TransferOwner(client_key, msg.instance_id, msg.path, now)
            self.broker.audit.write("file.open", client=requester, instance=msg.instance_id,
                                    direction="put" if msg.op == "open-put" else "fetch", path=msg.path,
                                    transfer_id=msg.transfer_id)
        else:
            owner.last_used = now
            if msg.op == "commit":
                self.broker.audit.write("file.commit", client=requester, instance=msg.instance_id,
                                        path=owner.path, sha256=msg.sha256, transfer_id=msg.transfer_id)
        if msg.op in ("write", "read"):
            self.broker.stats["interactive_file_bytes"] += len(msg.data) + msg.length
        slow = msg.op in ("open-fetch", "commit")
        timeout = SLOW_FILE_OP_TIMEOUT if slow else FILE_OP_TIMEOUT
        request_id = uuid.uuid4().hex
        pending = Pending(routing_id, msg.rid, now + timeout, msg.instance_id, session, "file", msg.op,
                          msg.transfer_id)
        if not self._relay(session, protocol.AgentFileOp(
                request_id=request_id, transfer_id=msg.transfer_id, op=msg.op, path=msg.path, mode=msg.mode,
                offset=msg.offset, data=msg.data, length=msg.length, sha256=msg.sha256,
                expires_at=time.time() + timeout), pending, request_id):
            self._finish_transfer(msg.transfer_id, msg.op, ok=False)

    def _finish_transfer(self, transfer_id: str, op: str, ok: bool) -> None:
        if op in ("commit", "close", "abort") or (op.startswith("open-") and not ok):
            self.transfers.pop(transfer_id, None)

    # -- agent side -----------------------------------------------------------------------------

    def _claim(self, session: "Session", request_id: str) -> Pending | None:
        pending = self.pending.get(request_id)
        if pending is None or pending.session is not session:
            self.broker.stats["interactive_refused"] += 1
            if pending is not None:
                log.warning("refused an interactive answer from %s for a request sent to %s",
                            session.instance_id, pending.instance_id)
                self.broker.audit.write("agent.interactive_refused", instance_id=session.instance_id,
                                        request_id=request_id[:64])
            return None
        del self.pending[request_id]
        return pending

    def on_exec_done(self, session: "Session", msg: protocol.ExecDone) -> None:
        pending = self._claim(session, msg.request_id)
        if pending is None or pending.kind != "exec":
            return
        if msg.error:
            code = "Timeout" if msg.error.startswith("timed out") else "ExecFailed"
            self._fail(pending.routing_id, pending.rid, code, f"{pending.instance_id}: {msg.error}")
            return
        self.broker._replies.append((pending.routing_id, Reply(
            pending.rid, True, data={"rc": msg.rc, "stdout": msg.stdout, "stderr": msg.stderr})))

    def on_file_done(self, session: "Session", msg: protocol.FileDone) -> None:
        pending = self._claim(session, msg.request_id)
        if pending is None or pending.kind != "file":
            return
        self._finish_transfer(pending.transfer_id, pending.op, msg.ok)
        if not msg.ok:
            self._fail(pending.routing_id, pending.rid, msg.code or "FileError", f"{pending.instance_id}: {msg.error}")
            return
        self.broker._replies.append((pending.routing_id, Reply(pending.rid, True, data={
            "ok": True, "data": msg.data, "size": msg.size, "sha256": msg.sha256, "mode": msg.mode})))

    # -- housekeeping ---------------------------------------------------------------------------

    def sweep(self) -> None:
        now = time.monotonic()
        for request_id, pending in list(self.pending.items()):
            current = self.broker.by_instance.get(pending.instance_id)
            if current is not pending.session or not current.online:
                del self.pending[request_id]
                self._finish_transfer(pending.transfer_id, "abort", ok=False)
                self._fail(pending.routing_id, pending.rid, "AgentUnavailable",
                           f"the agent of {pending.instance_id} disconnected before answering")
            elif now >= pending.deadline:
                del self.pending[request_id]
                self.broker.stats["interactive_timeouts"] += 1
                what = "command" if pending.kind == "exec" else f"file operation {pending.op}"
                self._fail(pending.routing_id, pending.rid, "Timeout",
                           f"no answer from the agent of {pending.instance_id} to the {what} in time")
        for transfer_id, owner in list(self.transfers.items()):
            if now - owner.last_used > TRANSFER_IDLE:
                del self.transfers[transfer_id]
