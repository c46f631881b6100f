"""Interactive requests in flight (exec and file transfers for the Ansible connection plugin).

A client's Exec / FileTransfer becomes one AgentExec / AgentFileOp for the instance's current
agent session; the agent's ExecDone / FileDone answers the waiting client. Nothing is stored:
an interactive request is answered once (by the agent, or with an error when the agent is not
connected, goes away, or the deadline passes) and forgotten. File data is relayed chunk by chunk,
never gathered in the broker. This module keeps the bookkeeping; ``handlers/interactive.py``
does the relaying.

Rules:
- an answer counts only when it comes from the session the request was sent to (another agent
  cannot answer for it);
- a transfer id belongs to the client key that opened it, on the instance it was opened on;
- ``sweep()`` gives up on requests past their deadline and those whose agent disconnected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .sessions import Session

DEFAULT_EXEC_TIMEOUT = 3600.0  # the agent's own default when the client gives none
GRACE = 10.0  # the broker waits this much longer than the agent's timeout
FILE_OP_TIMEOUT = 120.0
SLOW_FILE_OP_TIMEOUT = 600.0  # open-fetch and commit hash the whole file
TRANSFER_IDLE = 600.0
FILE_OPS = ("open-put", "write", "commit", "open-fetch", "read", "close", "abort")


@dataclass
class Pending:
    routing_id: bytes  # the client's
    rid: int
    deadline: float
    instance_id: str
    session: Session
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
    def __init__(self) -> None:
        self.pending: dict[str, Pending] = {}  # request id (ours, sent to the agent) -> waiting client
        self.transfers: dict[str, TransferOwner] = {}

    def __bool__(self) -> bool:
        return bool(self.pending or self.transfers)

    def owner(self, transfer_id: str, client_key: str, instance_id: str) -> TransferOwner | None:
        """The open transfer, if it is this client's on this instance."""
        owner = self.transfers.get(transfer_id)
        if owner is None or owner.client_key != client_key or owner.instance_id != instance_id:
            return None
        return owner

    def finish_transfer(self, transfer_id: str, op: str, ok: bool) -> None:
        if op in ("commit", "close", "abort") or (op.startswith("open-") and not ok):
            self.transfers.pop(transfer_id, None)

    def claim(self, session: Session, request_id: str) -> tuple[Pending | None, bool]:
        """The request an agent's answer is for, and whether the answer was refused because
        another session sent it (an unknown id is just late: not refused)."""
        pending = self.pending.get(request_id)
        if pending is None:
            return None, False
        if pending.session is not session:
            return None, True
        del self.pending[request_id]
        return pending, False

    def sweep(self, now: float, current: Callable[[str], Session | None]) -> list[tuple[Pending, str]]:
        """Requests given up on, each with why: "gone" (its agent disconnected) or "timeout"."""
        out = []
        for request_id, pending in list(self.pending.items()):
            session = current(pending.instance_id)
            if session is not pending.session or not session.online:
                del self.pending[request_id]
                self.finish_transfer(pending.transfer_id, "abort", ok=False)
                out.append((pending, "gone"))
            elif now >= pending.deadline:
                del self.pending[request_id]
                out.append((pending, "timeout"))
        for transfer_id, owner in list(self.transfers.items()):
            if now - owner.last_used > TRANSFER_IDLE:
                del self.transfers[transfer_id]
        return out
