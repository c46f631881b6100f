"""What the broker asks of its durable store, whatever the backend.

The broker keeps live state in memory and the store is its memory across restarts. State writes
are *queued* (``put_*``) and committed together by ``flush()`` once per loop iteration (group
commit): replies and acks that promise durability are sent only after the flush, so a crash loses
nothing that was acknowledged. Document versions are rare and off the hot path: their writes
commit at once. A backend lives in its own module beside this one and implements this protocol.

A backend on a server (PostgreSQL) can lose it for a while: then any call may raise
``BrokerError(STORE_UNAVAILABLE, ...)``; a failed ``flush()`` keeps every queued write for the next
call, and the caller sends nothing that depends on them until a flush succeeds. A backend on a
file (SQLite) can find its disk full or failing: its ``flush()`` then raises the same error, keeps
the queued writes, says why in ``write_failed`` and tries again at most once a second.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

from msgspec import Struct

from zerorun.protocol import InvocationView

from ..model import CommandRecord, InstanceRecord, KeyRecord, OutputRecord, TagRecord, TokenRecord, WebhookRecord

STORE_UNAVAILABLE = "StoreUnavailable"  # BrokerError code: the backend cannot be reached now


class DocumentRow(Struct):
    """One stored document version, without its content."""

    name: str
    version: int
    sha256: str
    created_at: float
    created_by: str
    description: str
    document_format: str


class TokenRow(Struct):
    """An enrolment token as stored: its fixed record, the uses it has left, and whether it is revoked."""

    record: TokenRecord
    uses_left: int
    revoked: bool


class QueuedWrites:
    """The ``put_*`` half of ``Store``, the same for every backend: each table's writes queued for
    the next group commit by the key of its rows, so that a record written twice between two
    commits is written once. A backend's ``flush`` writes them and then calls ``_written``."""

    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord | None] = {}  # None: deleted
        self._instances: dict[str, InstanceRecord] = {}
        self._commands: dict[str, CommandRecord] = {}
        self._new_commands: dict[str, CommandRecord] = {}  # their target terms are written once
        self._invocations: dict[str, InvocationView] = {}
        self._tags: dict[str, TagRecord] = {}
        self._outputs: dict[str, OutputRecord] = {}
        self._webhooks: dict[str, WebhookRecord] = {}

    def put_key(self, rec: KeyRecord) -> None:
        self._keys[rec.public_key] = rec

    def delete_key(self, public_key: str) -> None:
        self._keys[public_key] = None

    def put_instance(self, rec: InstanceRecord) -> None:
        self._instances[rec.instance_id] = rec

    def put_command(self, rec: CommandRecord, new: bool = False) -> None:
        self._commands[rec.command_id] = rec
        if new:
            self._new_commands[rec.command_id] = rec

    def put_invocation(self, rec: InvocationView) -> None:
        self._invocations[rec.invocation_id] = rec

    def put_tags(self, rec: TagRecord) -> None:
        self._tags[rec.instance_id] = rec

    def put_output(self, rec: OutputRecord) -> None:
        self._outputs[rec.invocation_id] = rec

    def put_webhook(self, rec: WebhookRecord) -> None:
        self._webhooks[rec.delivery_id] = rec

    def _queued(self) -> bool:
        return bool(self._keys or self._instances or self._commands or self._invocations or self._tags
                    or self._outputs or self._webhooks)

    def _written(self) -> None:
        """After a commit of everything queued."""
        for queued in (self._keys, self._instances, self._commands, self._new_commands, self._invocations,
                       self._tags, self._outputs, self._webhooks):
            queued.clear()


class PrunePasses(Protocol):
    """``Store.prune`` through a connection of its own; ``close`` ends that connection."""

    def __call__(self, older_than: float, batch: int, invocations: int) -> int: ...
    def close(self) -> None: ...


class Store(Protocol):
    last_flush_seconds: float
    # why the last commit could not be written (SQLite on a full disk), "" once one is: while it
    # is set the broker refuses new work, keeps what is queued, and tries again (``flush``)
    write_failed: str

    def close(self) -> None: ...

    # -- state: queued writes, one group commit ------------------------------------------------

    def put_key(self, rec: KeyRecord) -> None: ...
    def delete_key(self, public_key: str) -> None: ...
    def put_instance(self, rec: InstanceRecord) -> None: ...
    def put_command(self, rec: CommandRecord, new: bool = False) -> None:
        """``new``: the command's first write, which also writes its target terms (``terms.py``)."""
    def put_invocation(self, rec: InvocationView) -> None: ...
    def put_tags(self, rec: TagRecord) -> None: ...

    @property
    def dirty(self) -> bool: ...

    def flush(self) -> None:
        """Commits every queued write in one transaction; on failure keeps them all queued."""

    # -- state: reads of committed (and queued) state ------------------------------------------

    def load_keys(self) -> list[KeyRecord]: ...
    def load_instances(self) -> list[InstanceRecord]: ...
    def load_tags(self) -> list[TagRecord]: ...

    def get_tags(self, instance_ids: list[str]) -> list[TagRecord]:
        """These instances' tag records, as committed (another broker changed them)."""
    def load_active_commands(self) -> list[CommandRecord]: ...
    def get_command(self, command_id: str) -> CommandRecord | None: ...
    def get_invocations(self, command_id: str) -> list[InvocationView]: ...
    def bulk_invocations(self, command_ids: Iterable[str]) -> list[InvocationView]: ...
    def invocation_belongs(self, invocation_id: str, instance_id: str) -> bool: ...
    def invocations_belonging(self, invocation_ids: list[str], instance_id: str) -> set[str]:
        """Of these invocations, those ``invocation_belongs`` to the instance: a store with round
        trips asks for them all at once (an agent's message may name thousands)."""
        ...

    def list_commands(self, limit: int = 50, status: str = "", document: str = "", since: float = 0.0,
                      before: float = 0.0, target: str = "",
                      visible: Callable[[CommandRecord], bool] | None = None,
                      before_id: str = "") -> list[CommandRecord]:
        """Newest first, by (requested_at, command_id) descending; ``target``: commands with that
        target term (``terms.target_terms``: a target's text, or a part of it, e.g. ``role=web`` or
        an instance id), found by index; ``visible``: only the commands it accepts (a client's
        scope). ``before`` alone: requested before that time; with ``before_id`` (the last row of
        the page before) a keyset cursor: the rows after (before, before_id) in that order, so a
        command requested at the very same time as that row is not skipped."""

    def forget_overwritten(self) -> None:
        """Makes sure overwritten data (secret values of finished commands) is gone from disk."""

    def prune(self, older_than: float, batch: int = 500, invocations: int = 0) -> int:
        """Deletes up to ``batch`` finished commands requested before ``older_than``, oldest first
        (with their invocations, target terms, output records, output chunks and webhook
        deliveries); ``invocations`` (when > 0): stops before a command whose invocations would
        take the pass past that many (one command at least), which bounds the pass's time."""

    def prune_passes(self) -> PrunePasses | None:
        """``prune`` for another thread (a session of its own), where the store lets a pass run
        beside the loop's commits (PostgreSQL); None: passes run in the loop (SQLite: one writer)."""

    # -- whole outputs and webhook deliveries (issue 22): queued with the group commit ----------

    def put_output(self, rec: OutputRecord) -> None: ...
    def get_output(self, invocation_id: str) -> OutputRecord | None: ...

    def pending_outputs(self, broker_id: str = "", others: bool = False) -> list[OutputRecord]:
        """Whole outputs this broker was reading from agents (``others``: other brokers were)."""

    def put_webhook(self, rec: WebhookRecord) -> None: ...
    def webhooks_of(self, command_id: str) -> list[WebhookRecord]: ...

    def claim_webhooks(self, now: float, limit: int, claimer: str, lease: float,
                       exclude: set[str]) -> list[WebhookRecord]:
        """Due pending deliveries (not in ``exclude``), each claimed by ``claimer`` for ``lease``
        seconds: with several brokers, one broker's claim hides a delivery from the others."""

    def webhook_counts(self) -> dict[str, int]:
        """Deliveries by state."""

    # -- enrolment tokens: committed at once; the secret never reaches the store, only its SHA-256

    def create_token(self, rec: TokenRecord, digest: str) -> None: ...
    def tokens(self) -> list[TokenRow]: ...
    def token_by_digest(self, digest: str) -> TokenRow | None: ...

    def revoke_token(self, token_id: str) -> bool:
        """False when there is no such token, or it was revoked already."""

    def redeem_token(self, digest: str, instance_id: str, now: float) -> TokenRow | None:
        """Takes one use of the token with this digest, in one atomic statement, if it has a use
        left, is not revoked or expired, and its instance prefix fits ``instance_id``: exact even
        when several brokers redeem the same token at once. None: nothing was taken."""

    # -- documents: versions of named documents, committed at once -----------------------------

    def document_head(self, name: str) -> tuple[int, int] | None:
        """(default version, last version ever created), or None when there is no such document."""

    def document_version_with_sha256(self, name: str, sha256: str) -> int | None: ...

    def create_document(self, row: DocumentRow, content: str) -> None:
        """A new document whose version 1 (``row``) is its default."""

    def add_document_version(self, row: DocumentRow, content: str, default_version: int) -> None: ...
    def set_default_document_version(self, name: str, version: int) -> None: ...
    def delete_document(self, name: str, version: int | None = None) -> None: ...
    def document_row(self, name: str, version: int) -> DocumentRow | None: ...
    def document_content(self, name: str, version: int) -> str | None: ...
    def document_rows(self, name: str) -> list[DocumentRow]: ...
    def latest_document_version(self, name: str) -> int: ...

    def document_heads(self) -> list[tuple[DocumentRow, int, int]]:
        """Every stored document: the default version's row, the default and the latest version."""
