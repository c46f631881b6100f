"""The broker's records: what it keeps in memory and persists in its store."""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field, structs

from zerorun import protocol
from zerorun.protocol import InvocationView, Step


class KeyRecord(Struct):
    public_key: str  # z85
    kind: str  # agent | client
    name: str  # claimed instance id (agents) or client name
    state: str  # pending | accepted | rejected | denied
    first_seen: float
    updated_at: float
    note: str = ""
    tags: dict[str, str] = {}  # agent keys while pending: the tags its agent proposes


class InstanceRecord(Struct):
    instance_id: str
    public_key: str
    tags: dict[str, str] = {}
    hostname: str = ""
    platform: str = ""
    platform_version: str = ""
    agent_version: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    facts: protocol.Facts | None = None  # what its agent reports (claims)


class TagRecord(Struct):
    """An instance's tags, owned by the broker (table ``instance_tags``, apart from the instance
    record its session's broker rewrites): the approved tags that targets and scopes see, and a
    change its agent proposed, held until an operator approves it."""

    instance_id: str
    tags: dict[str, str] = {}
    proposed: dict[str, str] | None = None
    proposed_at: float = 0.0
    updated_at: float = 0.0
    updated_by: str = ""


class TokenRecord(Struct):
    """An enrolment token's fixed part (table ``enrol_tokens``: the SHA-256 of the secret, the
    uses left and the revocation are columns that the store changes atomically)."""

    token_id: str
    tags: dict[str, str]
    uses: int
    expires_at: float
    created_at: float
    created_by: str = ""
    instance_prefix: str = ""
    comment: str = ""


class CommandRecord(Struct):
    command_id: str
    status: str
    status_details: str
    document_name: str
    document_version: str
    document_sha256: str
    parameters: dict[str, Any]  # secrets redacted
    targets: list[str]
    requested_by: str
    requested_at: float
    expires_at: float  # delivery deadline
    timeout_seconds: int
    max_concurrency: int
    max_errors: int
    steps: list[Step]
    comment: str = ""
    display_steps: list[Step] = []  # steps with secrets redacted: what views show
    completed_at: float = 0.0
    cancel_requested: bool = False
    first: int = 0  # canary size
    invocation_ids: list[str] = field(default_factory=list)
    instance_ids: list[str] = field(default_factory=list)  # every instance it reaches (scope checks)
    requested_by_key: str = ""  # the requesting key's fingerprint: a client always sees its own commands
    steps_bytes: int = 0  # size of the rendered steps: what one delivery of it weighs
    owner: str = ""  # the broker that dispatches it (several brokers on one store)
    run_as: str = ""  # the user of steps without their own runAs ("": the agent's own)
    notify: list[tuple[str, str]] = field(default_factory=list)  # webhooks: (shown target, URL)
    notify_invocations: bool = False  # a webhook per invocation too

    def view(self, invocations: list[InvocationView], include_output: bool = True) -> protocol.CommandView:
        counts: dict[str, int] = {}
        for inv in invocations:
            counts[inv.status] = counts.get(inv.status, 0) + 1
        if not include_output:
            invocations = [_without_output(inv) for inv in invocations]
        return protocol.CommandView(
            command_id=self.command_id, status=self.status, status_details=self.status_details,
            document_name=self.document_name, document_version=self.document_version,
            document_sha256=self.document_sha256, parameters=self.parameters, targets=self.targets,
            requested_by=self.requested_by, requested_at=self.requested_at, comment=self.comment,
            timeout_seconds=self.timeout_seconds, max_concurrency=self.max_concurrency,
            max_errors=self.max_errors, first=self.first, completed_at=self.completed_at, counts=counts,
            target_count=len(self.invocation_ids), steps=self.display_steps or self.steps,
            invocations=invocations, run_as=self.run_as)


def _without_output(inv: InvocationView) -> InvocationView:
    return structs.replace(inv, stdout="", stderr="", steps=[])


class OutputRecord(Struct):
    """An invocation's whole output in the broker's output store, beyond what its view keeps:
    what the instance produced, what is stored so far, and whether that is all of it."""

    invocation_id: str
    command_id: str
    instance_id: str
    stdout_size: int = 0  # bytes the instance produced
    stderr_size: int = 0
    stdout_want: int = 0  # bytes the broker keeps (the produced bytes, up to its limit)
    stderr_want: int = 0
    stdout_have: int = 0  # bytes stored (contiguous from 0)
    stderr_have: int = 0
    state: str = "pending"  # pending (being read from the agent) | complete | incomplete
    note: str = ""  # why it is incomplete
    broker_id: str = ""  # the broker reading it from the agent (several brokers)
    updated_at: float = 0.0


class WebhookRecord(Struct):
    """One notification to deliver: durable, retried with backoff until it is delivered or its
    time is up."""

    delivery_id: str
    command_id: str
    target: str  # what views show: the broker's name for it, or the URL without its query
    url: str
    event: str  # command | invocation
    body: bytes  # the JSON POSTed (signed when it is sent)
    created_at: float
    next_at: float  # when to try next
    state: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    last_error: str = ""
    instance_id: str = ""
    delivered_at: float = 0.0
