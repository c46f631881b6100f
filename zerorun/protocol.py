"""The Zerorun wire protocol: every message the broker, agents and clients exchange.

Defined once, here, and imported by all three. Each ZeroMQ message is two frames:

    [HEADER, body]

``HEADER`` names the protocol and its version; a peer speaking another version is refused
before its body is decoded (no downgrade). ``body`` is a msgpack map decoded against the typed
unions below (``AgentMessage``, ``BrokerToAgent``, ``Request``); anything that does not decode is
counted and dropped, never trusted. Fields are only ever added with defaults, so an older peer of
the same protocol version still decodes a newer message.

Hot-path messages carry lists (``Deliver.invocations``, ``Results.results``, ``Ack.invocation_ids``)
so that one ZeroMQ message moves a whole batch.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, Union

if "msgspec" not in sys.modules and "typing_extensions" not in sys.modules:
    # msgspec takes typing's own on Python 3.11+ when typing_extensions cannot be imported: its
    # import (with ``inspect``) was a tenth of the CLI's start. Only for msgspec's import; a
    # package that needs typing_extensions later (psycopg in the broker) still gets it.
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]
    try:
        __import__("msgspec")
    finally:
        del sys.modules["typing_extensions"]
import msgspec
from msgspec import Meta, Struct, field

PROTOCOL_VERSION = 1
HEADER = b"ZRN\x01"
"""Frame 0 of every message: magic ``ZRN`` plus the protocol version byte."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""ZMQ_MAXMSGSIZE on every socket: a larger frame disconnects the peer."""

# --------------------------------------------------------------------------------------------
# Statuses (SSM Run Command vocabulary)

PENDING = "Pending"
IN_PROGRESS = "InProgress"
SUCCESS = "Success"
FAILED = "Failed"
CANCELLED = "Cancelled"
CANCELLING = "Cancelling"
TIMED_OUT = "TimedOut"
UNDELIVERABLE = "Undeliverable"
SKIPPED = "Skipped"

TERMINAL_STATUSES = frozenset({SUCCESS, FAILED, CANCELLED, TIMED_OUT, UNDELIVERABLE})

# Enumerations as types: msgspec refuses any other value when it decodes a message, so a bad
# value from a client or an agent never reaches a handler. The exception is what a document
# decides about a step (its action, precondition operator, onFailure/onSuccess): documents may
# use values an agent does not know, and such a step must fail (or be skipped) with a reason,
# as amazon-ssm-agent does, instead of making the whole Deliver undecodable for that agent.
InvocationStatus = Literal["Pending", "InProgress", "Success", "Failed", "Cancelling", "Cancelled",
                           "TimedOut", "Undeliverable"]
StepStatus = Literal["Success", "Failed", "Skipped", "TimedOut", "Cancelled"]
RefusalReason = Literal["expired", "duplicate", "invalid"]
OutputStream = Literal["stdout", "stderr"]
FileOp = Literal["open-put", "write", "commit", "open-fetch", "read", "close", "abort"]
KeyKind = Literal["agent", "client"]
KeyActionName = Literal["accept", "reject", "revoke", "delete", "replace"]
TargetKind = Literal["tag", "instance", "fact"]
TagActionName = Literal["set", "unset", "approve", "reject"]
SessionKind = Literal["shell", "exec", "tcp"]
SessionStream = Literal["", "stderr", "tty"]

# status details
DELIVERY_TIMED_OUT = "DeliveryTimedOut"
EXECUTION_TIMED_OUT = "ExecutionTimedOut"
TERMINATED = "Terminated"  # cancelled because max errors was reached
INTERRUPTED = "InterruptedByAgentRestart"

# ping statuses
ONLINE = "Online"
CONNECTION_LOST = "ConnectionLost"
INACTIVE = "Inactive"  # never connected since the broker learnt of it

# key states
KEY_PENDING = "pending"
KEY_ACCEPTED = "accepted"
KEY_REJECTED = "rejected"
KEY_DENIED = "denied"

# --------------------------------------------------------------------------------------------
# What runs: a rendered document, as the agent executes it


class Precondition(Struct, omit_defaults=True):
    """SSM's ``precondition: {StringEquals: [platformType, Linux]}``, evaluated by the agent."""

    op: str  # StringEquals (the only operator SSM has)
    operands: list[str]


class Scope(Struct, omit_defaults=True):
    """An ``aws:runDocument`` step whose document a nested step comes from, with that step's own
    flow: the nested document's steps run as one step of the document that runs it (as in SSM,
    whose runDocument plugin runs the nested document as one plugin), so their ``onFailure``,
    exits and ``finallyStep`` act inside that document only, and this flow applies to its outcome."""

    name: str  # the runDocument step's full name ("deploy", or "deploy/configure" deeper)
    on_failure: str = ""
    on_success: str = ""
    finally_step: bool = False


class Step(Struct, omit_defaults=True):
    """One rendered step. ``script`` is final text: no templating happens on the agent."""

    name: str
    # Not an enumeration on purpose: a document may name an action this agent does not have
    # (aws:runPowerShellScript on Linux, or one newer than the agent); that step fails with a
    # reason, as amazon-ssm-agent reports an unsupported plugin, instead of the whole Deliver
    # being undecodable.
    action: str = "runShellScript"  # runShellScript | runScript | others, refused per step
    script: str = ""
    interpreter: list[str] = []  # runScript: argv prefix, e.g. ["python3"]; empty: /bin/sh or #!
    working_directory: str = ""
    timeout_seconds: int = 3600
    env: dict[str, str] = {}
    on_failure: str = ""  # "" (go on) | exit | successAndExit
    on_success: str = ""  # "" (go on) | exit | successAndExit
    finally_step: bool = False
    precondition: Precondition | None = None
    run_as: str = ""  # the user the step runs as ("": the agent's own user)
    # the runDocument steps this step is nested in, outermost first ([]: a step of the command's
    # own document); the steps of one runDocument step are consecutive. An agent older than this
    # field ignores it and runs the steps as one flat list, each with its own flow only.
    scope: list[Scope] = []


class Invocation(Struct, omit_defaults=True):
    """One command for one instance, as delivered to its agent."""

    invocation_id: str
    command_id: str
    instance_id: str
    document_name: str
    document_version: str
    document_sha256: str
    steps: list[Step]
    issued_at: float
    expires_at: float  # the agent refuses a delivery it receives after this


class StepResult(Struct, omit_defaults=True):
    name: str
    status: StepStatus
    exit_code: int = -1
    stdout: str = ""
    stderr: str = ""
    stdout_size: int = 0  # bytes produced, before any truncation
    stderr_size: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    detail: str = ""


class InvocationResult(Struct, omit_defaults=True):
    invocation_id: str
    status: InvocationStatus
    status_details: str = ""
    exit_code: int = -1
    stdout: str = ""
    stderr: str = ""
    stdout_size: int = 0
    stderr_size: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    steps: list[StepResult] = []
    stdout_follows: int = 0  # > 0: the whole stdout (this many bytes) is kept by the agent for OutputRead
    stderr_follows: int = 0


# --------------------------------------------------------------------------------------------
# Agent -> broker

_Fact = Annotated[str, Meta(max_length=256)]


class OsFacts(Struct, frozen=True):
    """From os-release: ``ID``, ``VERSION_ID``, ``NAME``, ``ID_LIKE``."""

    id: _Fact = ""
    version: _Fact = ""
    name: _Fact = ""
    like: Annotated[list[_Fact], Meta(max_length=16)] = []


class Facts(Struct):
    """What an agent reports about its machine (at HELLO, and in ``FactsUpdate`` when it changes).
    Claims, never trusted for authorisation: targets may use them (``fact:os.id=ubuntu``), policy
    scopes may not. Every field is bounded; an honest agent cuts its facts to fit."""

    os: OsFacts = field(default_factory=OsFacts)
    kernel: _Fact = ""
    arch: _Fact = ""
    hostname: _Fact = ""
    fqdn: _Fact = ""
    ip: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=32)] = []
    cpus: int = 0
    memory_mb: int = 0
    boot_time: float = 0.0
    agent_version: _Fact = ""
    python_version: _Fact = ""


class Hello(Struct, tag="hello", omit_defaults=True):
    """Sent on every (re)connect: who the agent is and what it still holds. ``tags`` are a
    proposal: the broker owns an instance's tags (an operator approves a change)."""

    instance_id: str
    tags: dict[str, str] = {}
    hostname: str = ""
    platform: str = "Linux"
    platform_version: str = ""
    agent_version: str = ""
    running: list[str] = []  # invocation ids executing now
    unacked: list[str] = []  # invocation ids whose results await the broker's ack
    max_concurrency: int = 0
    max_message_bytes: int = 0  # the largest message this agent accepts (0: MAX_MESSAGE_BYTES)
    facts: Facts | None = None
    enrol_token: Annotated[str, Meta(max_length=256)] = ""  # until first accepted: a token from `zerorun tokens create`


class FactsUpdate(Struct, tag="facts"):
    """The agent's facts changed (checked at most once a minute)."""

    facts: Facts


class Heartbeat(Struct, tag="hb", omit_defaults=True):
    running: int = 0


class Ack(Struct, tag="ack", omit_defaults=True):
    """Deliveries journaled on disk: they will run exactly once. ``started`` names those that
    started at once (saving a separate Started message)."""

    invocation_ids: list[str]
    started: list[str] = []
    at: float = 0.0


class Refusal(Struct, omit_defaults=True):
    invocation_id: str
    reason: RefusalReason
    message: str = ""


class Refuse(Struct, tag="refuse"):
    items: list[Refusal]


class Started(Struct, tag="started"):
    invocation_ids: list[str]
    at: float


class Results(Struct, tag="results"):
    """Results, stored by the agent until a ResultAck. They also stand for the Ack of their
    invocations: an agent whose step ended before its Ack was due sends only this."""

    results: list[InvocationResult]


class OutputChunk(Struct, omit_defaults=True):
    invocation_id: str
    stream: OutputStream
    data: str
    step: str = ""


class Output(Struct, tag="out"):
    """Live output while a step runs (coalesced by the agent)."""

    chunks: list[OutputChunk]


class Bye(Struct, tag="bye"):
    """The agent is stopping cleanly."""


class ExecDone(Struct, tag="exec-done", omit_defaults=True):
    """The answer to an AgentExec: raw bytes, no markers, no PTY."""

    request_id: str
    rc: int = -1
    stdout: bytes = b""
    stderr: bytes = b""
    error: str = ""  # the agent could not run it at all (e.g. timed out, cannot start)


class FileDone(Struct, tag="file-done", omit_defaults=True):
    """The answer to an AgentFileOp."""

    request_id: str
    ok: bool = True
    error: str = ""
    code: str = ""  # with an error: FileNotFound, PermissionDenied, IsADirectory, or "" (the broker relays it as
    # the reply's error code, FileError when empty)
    data: bytes = b""  # read: the chunk
    size: int = 0  # open-fetch: the file's size
    sha256: str = ""  # open-fetch / commit: the whole file's digest
    mode: int = 0  # open-fetch: the file's permission bits


class OutputData(Struct, tag="out-data", omit_defaults=True):
    """The answer to an OutputRead: bytes of an invocation's whole stdout or stderr."""

    invocation_id: str
    stream: OutputStream
    offset: int = 0
    data: bytes = b""
    error: str = ""  # the agent no longer holds this output (it restarted, or gave up on it)


class SessionStarted(Struct, tag="session-started", omit_defaults=True):
    """The answer to a SessionStart: the process runs (or the connection is made), or why not."""

    session_id: str
    ok: bool = True
    error: str = ""
    window: int = 0  # bytes of client input this agent buffers before it acknowledges (its receive window)
    pty: bool = True  # a shell: it runs in a pseudo-terminal (False: on pipes, as SessionStart.pty asked;
    # an agent that predates that field always gives a shell a pseudo-terminal, and says nothing)


class SessionData(Struct, tag="session-data", omit_defaults=True):
    """One step of a session, either way between broker and agent (see "Sessions" below)."""

    session_id: str
    seq: int = 0  # numbers each message of one direction that carries data or eof, from 1
    stream: SessionStream = ""  # "": the session's main stream; "stderr"; "tty": an exec's terminal
    data: bytes = b""
    eof: bool = False  # no more data on ``stream`` from this side
    ack: int = 0  # bytes of the other direction consumed so far (cumulative)
    cols: int = 0  # broker -> agent: the terminal's new size (0: unchanged)
    rows: int = 0
    close: bool = False  # broker -> agent: end it now; agent -> broker: it ended (exit_code, error)
    exit_code: int = -1  # with close from the agent: the process's status (128+N: killed by signal N)
    error: str = ""


AgentMessage = Union[Hello, Heartbeat, Ack, Refuse, Started, Results, Output, Bye, ExecDone, FileDone,
                     FactsUpdate, OutputData, SessionStarted, SessionData]

# --------------------------------------------------------------------------------------------
# Broker -> agent


class Welcome(Struct, tag="welcome"):
    instance_id: str
    heartbeat_interval: float
    broker_time: float


class KeyPending(Struct, tag="key-pending"):
    """Not welcomed yet: the agent's key waits for ``zerorun keys accept``, or the broker cannot
    write its database; the agent logs ``message`` and says HELLO again after ``retry_after``."""

    message: str
    retry_after: float


class Denied(Struct, tag="denied"):
    """The agent's key or claimed identity is refused; the agent logs it and retries slowly."""

    reason: str
    retry_after: float = 60.0


class Deliver(Struct, tag="deliver"):
    invocations: list[Invocation]
    results_acked: list[str] = []  # a ResultAck folded in: results stored, the agent may forget them


class ResultAck(Struct, tag="rack"):
    invocation_ids: list[str]


class Cancel(Struct, tag="cancel"):
    invocation_ids: list[str]


class Pong(Struct, tag="pong"):
    broker_time: float
    heartbeat_interval: float = 0.0  # > 0: heartbeat at this interval from now on (fleet grew or shrank)


class PleaseHello(Struct, tag="hello?"):
    """The broker does not know this connection (e.g. it restarted): send HELLO."""


class AgentExec(Struct, tag="exec", omit_defaults=True):
    """Interactive exec for the Ansible connection plugin: ``/bin/sh -c command`` with stdin."""

    request_id: str
    command: str
    stdin: bytes = b""
    timeout: float = 0.0  # 0: the agent's default
    env: dict[str, str] = {}
    expires_at: float = 0.0


class AgentFileOp(Struct, tag="file", omit_defaults=True):
    """One step of a chunked file transfer; ``transfer_id`` ties the steps together."""

    request_id: str
    transfer_id: str
    op: FileOp
    path: str = ""
    mode: int = -1  # open-put: permission bits to set on commit (-1: keep/0644)
    offset: int = 0
    data: bytes = b""  # write
    length: int = 0  # read: bytes wanted
    sha256: str = ""  # commit: the digest the file must have
    expires_at: float = 0.0


class OutputRead(Struct, tag="out-read", omit_defaults=True):
    """The broker pulls the whole output of a finished invocation, one chunk at a time: it
    decides how much is in flight, so a large output never floods it."""

    invocation_id: str
    stream: OutputStream
    offset: int = 0
    length: int = 0


class OutputDone(Struct, tag="out-done"):
    """The broker has what it wants of these invocations' whole output: the agent may drop it."""

    invocation_ids: list[str]


class SessionStart(Struct, tag="session-start", omit_defaults=True, kw_only=True):
    """Starts a session on the agent: a shell (or one command through the user's shell) in a
    pseudo-terminal (or on pipes), an exec with a controlling terminal, or a TCP connection."""

    session_id: str
    kind: SessionKind
    command: str = ""
    run_as: str = ""
    term: str = ""
    cols: int = 80
    rows: int = 24
    env: dict[str, str] = {}
    stdin_tty: bool = False
    pty: bool = True  # shell: in a pseudo-terminal; False: on pipes, without a terminal (see OpenSession)
    host: str = ""
    port: int = 0
    window: int = 0  # bytes the client accepts before it acknowledges: the agent's send credit
    expires_at: float = 0.0


BrokerToAgent = Union[Welcome, KeyPending, Denied, Deliver, ResultAck, Cancel, Pong, PleaseHello,
                      AgentExec, AgentFileOp, OutputRead, OutputDone, SessionStart, SessionData]

# --------------------------------------------------------------------------------------------
# Client <-> broker: request/reply. Every request carries ``rid``, echoed in its reply.


class Target(Struct, frozen=True, omit_defaults=True):
    """One target, as SSM writes them: ``tag:KEY=V1,V2`` (values OR-ed), ``tag:KEY`` (the key is
    present), ``instance:ID,ID``. Several targets of a request are AND-ed. Parsed once, by the
    sender (``zerorun.targets.parse_target``), never re-parsed from text by the broker."""

    kind: TargetKind
    key: str = ""  # tag key (kind "tag"), fact name (kind "fact", e.g. "os.id")
    values: tuple[str, ...] = ()  # tag or fact values, or instance ids; empty for "tag:KEY"

    def __str__(self) -> str:
        if self.kind == "instance":
            return "instance:" + ",".join(self.values)
        return f"{self.kind}:{self.key}" + ("=" + ",".join(self.values) if self.values else "")


TargetSpec = Union[Target, str]
"""On the wire a target is a ``Target``; a client of this protocol version that predates the typed
form sends the text (``"tag:role=web"``), which the broker parses once when it decodes it."""


class Ping(Struct, tag="ping"):
    rid: int = 0


class ListInstances(Struct, tag="instances", omit_defaults=True):
    rid: int = 0
    targets: list[TargetSpec] = []
    include_offline: bool = True


class SendCommand(Struct, tag="send", omit_defaults=True):
    rid: int = 0
    document: str = ""  # stored or built-in name (ignored when document_content is given)
    document_version: str = ""  # "" / "$DEFAULT" / "$LATEST" / "N"
    document_hash: str = ""  # sha256 hex the document must have
    document_content: str = ""  # a local document file's text
    parameters: dict[str, Any] = {}
    targets: list[TargetSpec] = []
    instance_ids: list[str] = []
    timeout_seconds: int = 0  # delivery timeout; 0: broker default
    execution_timeout: int = 0  # 0: the document's own
    max_concurrency: str = ""  # "50" or "10%"; "": default
    max_errors: str = ""
    comment: str = ""
    dry_run: bool = False  # validate, render, resolve; record and send nothing
    first: int = 0  # canary: run this many instances first, stop everything if any of them fails
    wait: float = 0.0  # > 0: answer when the command is terminal or after this long (send + wait in one)
    run_as: str = ""  # every step without its own runAs runs as this user ("": the agent's own)
    notify: list[str] = []  # webhooks: names the broker configures, or URLs (as the policy allows)
    notify_invocations: bool = False  # also POST when each invocation ends, not only the command


class GetCommand(Struct, tag="command", omit_defaults=True):
    rid: int = 0
    command_id: str = ""
    include_output: bool = True
    instance_ids: list[str] = []  # only these instances' invocations (counts stay whole)


class ListCommands(Struct, tag="commands", omit_defaults=True):
    rid: int = 0
    limit: int = 50
    status: Literal["", "Pending", "InProgress", "Success", "Failed", "Cancelling", "Cancelled",
                    "TimedOut", "Undeliverable"] = ""
    document: str = ""
    since: float = 0.0
    before: float = 0.0  # pagination: only commands requested before this time
    # with ``before``, the id of the last command shown (keyset pagination): the page goes on after
    # (before, before_id) in (requested_at, command_id) order, a command of that same time included
    before_id: str = ""
    target: str = ""  # a target or a part of one, e.g. "tag:role=web", "role=web", an instance id


class WaitCommand(Struct, tag="wait", omit_defaults=True):
    """Replies when the command is terminal or ``timeout`` seconds passed (long poll)."""

    rid: int = 0
    command_id: str = ""
    timeout: float = 30.0
    include_output: bool = True
    instance_ids: list[str] = []  # only these instances' invocations (counts stay whole)


class FollowOutput(Struct, tag="follow", omit_defaults=True):
    """Output since ``cursors`` (characters already seen per "instance:stream"); long-polls up
    to ``timeout`` seconds when there is nothing new and the command is still running."""

    rid: int = 0
    command_id: str = ""
    instance_ids: list[str] = []
    cursors: dict[str, int] = {}
    timeout: float = 10.0


class OutputUpdate(Struct, omit_defaults=True):
    """The reply to FollowOutput."""

    command_id: str
    status: str
    done: bool
    chunks: list[OutputChunk] = []  # invocation_id holds the instance id here
    cursors: dict[str, int] = {}
    statuses: dict[str, str] = {}  # instance id -> invocation status


class GetOutput(Struct, tag="output", omit_defaults=True):
    """A slice of one invocation's whole output, from the broker's output store (``zerorun show
    --output full``, ``zerorun logs -i``); the reply is an OutputSlice."""

    rid: int = 0
    command_id: str = ""
    instance_id: str = ""
    stream: OutputStream = "stdout"
    offset: int = 0
    length: int = 1 << 20


class OutputSlice(Struct, omit_defaults=True):
    """The reply to GetOutput. ``size``: the bytes stored (so far); ``complete``: all the
    instance produced is there; ``note`` says why not (the broker's limit, an agent restart)."""

    data: bytes = b""
    size: int = 0
    produced: int = 0  # bytes the instance produced in this stream
    complete: bool = False
    pending: bool = False  # still being read from the agent
    note: str = ""


class CancelCommand(Struct, tag="cancel", omit_defaults=True):
    rid: int = 0
    command_id: str = ""
    instance_ids: list[str] = []


class ListKeys(Struct, tag="keys"):
    rid: int = 0


class KeyAction(Struct, tag="key", omit_defaults=True, kw_only=True):
    rid: int = 0
    action: KeyActionName
    name: str = ""  # instance id or key fingerprint
    replacement: str = ""  # replace: the new key's fingerprint (a known key) or z85 public key


class AddKey(Struct, tag="key-add", omit_defaults=True, kw_only=True):
    """Pre-authorises a known public key: an agent's (bound to an instance id) or a client's."""

    rid: int = 0
    kind: KeyKind
    name: str = ""  # instance id, or client name (its role comes from the policy)
    public_key: str = ""  # z85
    tags: dict[str, str] = {}  # agent keys: the instance's tags (permission tags too)


class TagAction(Struct, tag="tags", omit_defaults=True, kw_only=True):
    """An operator changes an instance's tags (permission ``tags``): ``set`` adds or changes
    ``tags``, ``unset`` removes ``keys``, ``approve`` / ``reject`` decide its agent's proposal."""

    rid: int = 0
    action: TagActionName
    instance_id: str = ""
    tags: dict[str, str] = {}
    keys: list[str] = []


class CreateToken(Struct, tag="token-create", omit_defaults=True):
    """An enrolment token: agents presenting it join with ``tags`` (permission ``keys``)."""

    rid: int = 0
    tags: dict[str, str] = {}
    uses: int = 1
    expires_in: float = 3600.0  # seconds
    instance_prefix: str = ""  # only instance ids starting with this
    comment: str = ""


class ListTokens(Struct, tag="tokens"):
    rid: int = 0


class RevokeToken(Struct, tag="token-revoke", omit_defaults=True):
    rid: int = 0
    token_id: str = ""


class ListDocuments(Struct, tag="documents"):
    rid: int = 0


class GetDocument(Struct, tag="document", omit_defaults=True):
    rid: int = 0
    name: str = ""
    version: str = ""  # "" / "$DEFAULT" / "$LATEST" / "N"


class DocumentVersions(Struct, tag="document-versions", omit_defaults=True):
    rid: int = 0
    name: str = ""


class CreateDocument(Struct, tag="document-create", omit_defaults=True):
    rid: int = 0
    name: str = ""
    content: str = ""


class UpdateDocument(Struct, tag="document-update", omit_defaults=True):
    """Adds a version; identical content to an existing version is refused."""

    rid: int = 0
    name: str = ""
    content: str = ""
    set_default: bool = False


class SetDefaultDocumentVersion(Struct, tag="document-default", omit_defaults=True):
    rid: int = 0
    name: str = ""
    version: str = ""


class DeleteDocument(Struct, tag="document-delete", omit_defaults=True):
    rid: int = 0
    name: str = ""
    version: str = ""  # "": the whole document


class Exec(Struct, tag="exec", omit_defaults=True):
    """Runs one shell command on one online instance and answers with ExecReply (not a stored
    command: for the Ansible connection plugin; permission ``exec``)."""

    rid: int = 0
    instance_id: str = ""
    command: str = ""
    stdin: bytes = b""
    timeout: float = 0.0
    env: dict[str, str] = {}


class ExecReply(Struct, omit_defaults=True):
    rc: int
    stdout: bytes = b""
    stderr: bytes = b""


class FileTransfer(Struct, tag="file", omit_defaults=True, kw_only=True):
    """Client side of a chunked transfer, relayed to the instance's agent as AgentFileOp;
    the reply carries the agent's FileDone fields. Permission ``exec``."""

    rid: int = 0
    instance_id: str = ""
    transfer_id: str = ""
    op: FileOp
    path: str = ""
    mode: int = -1
    offset: int = 0
    data: bytes = b""
    length: int = 0
    sha256: str = ""


# Sessions: an interactive shell, port forwarding, a terminal for the connection plugin's become.
# Data moves as sequenced chunks with credit-based flow control, end to end between client and
# agent: each side announces its receive window, a sender keeps at most that many bytes
# unacknowledged (``ack`` counts the bytes the receiver has consumed), and the broker refuses a
# peer that sends beyond it, so nothing buffers without bound. The client long-polls: every
# SessionIO is answered when there is something to say (output, an acknowledgement it waits for,
# the end) or after ``wait`` seconds, and a newer SessionIO answers the one held before it.


class OpenSession(Struct, tag="session-open", omit_defaults=True, kw_only=True):
    """Opens a session on one online instance, answered (SessionUpdate) once the agent runs it.
    ``shell`` (permission ``session``): a login shell, or ``command`` through the user's shell, in a
    pseudo-terminal (on pipes with ``pty`` False); ``tcp`` (permission ``forward``): a connection
    to ``host:port`` as reached from the instance ("" host: the instance itself); ``exec``
    (permission ``exec``): ``/bin/sh -c command`` with pipes and a controlling terminal, for become
    prompts."""

    rid: int = 0
    instance_id: str = ""
    kind: SessionKind = "shell"
    command: str = ""
    run_as: str = ""  # "": the agent's own user
    term: str = ""
    cols: int = 80
    rows: int = 24
    env: dict[str, str] = {}  # shell: LANG and LC_* only; exec: added to the agent's environment
    stdin_tty: bool = False  # exec: stdin is the terminal too (su reads its password there)
    pty: bool = True  # shell: False runs it on pipes without a terminal, as sshd does when none is asked for
    # (ssh -T): stdout and stderr apart, and the client's eof is the shell's end of input
    host: str = ""
    port: int = 0
    window: int = 0  # this client's receive window in bytes (0: the default)
    dry_run: bool = False  # check permission, scope and destination; open nothing


class SessionIO(Struct, tag="session-io", omit_defaults=True):
    """Input, acknowledgements and the long poll for output of one open session."""

    rid: int = 0
    session_id: str = ""
    seq: int = 0  # numbers each SessionIO that carries data or eof, from 1
    stream: SessionStream = ""
    data: bytes = b""
    eof: bool = False
    ack: int = 0  # bytes of the session's output this client has consumed (cumulative)
    cols: int = 0  # the terminal's new size (0: unchanged)
    rows: int = 0
    close: bool = False  # end the session
    wait: float = 0.0  # seconds the broker may hold the answer while there is nothing to say


class SessionChunk(Struct, array_like=True):
    seq: int
    stream: SessionStream
    data: bytes


class SessionUpdate(Struct, omit_defaults=True):
    """The answer to OpenSession and SessionIO: output since the last answer and the state."""

    session_id: str
    chunks: list[SessionChunk] = []
    eof: list[SessionStream] = []  # streams the instance's side has closed
    ack: int = 0  # bytes of client input the instance's side has consumed (cumulative)
    window: int = 0  # (the open's answer) the instance's receive window
    pty: bool = True  # (the open's answer) a shell got a pseudo-terminal: False only when it was asked
    # for none and the broker and agent both know how (older ones always give one)
    ended: bool = False
    exit_code: int = -1  # shell/exec: the process's exit status (128+N: killed by signal N)
    error: str = ""  # why it ended, when not by its own exit or a clean close
    idle_timeout: float = 0.0  # (the open's answer) the broker's limits, 0: none
    max_duration: float = 0.0


Request = Union[Ping, ListInstances, SendCommand, GetCommand, ListCommands, WaitCommand,
                FollowOutput, GetOutput, CancelCommand, ListKeys, KeyAction, AddKey, ListDocuments, GetDocument, DocumentVersions,
                CreateDocument, UpdateDocument, SetDefaultDocumentVersion, DeleteDocument, Exec,
                FileTransfer, TagAction, CreateToken, ListTokens, RevokeToken, OpenSession, SessionIO]

SAFE_TO_REPEAT = (Ping, ListInstances, GetCommand, ListCommands, WaitCommand, FollowOutput, ListKeys, ListDocuments,
                  GetDocument, DocumentVersions, ListTokens, GetOutput)
"""Requests that change nothing: a client may send them again to another broker, and a broker cut
off from its store answers them StoreUnavailable at once (an answer that shows no state)."""


class ErrorInfo(Struct):
    code: str  # machine-readable, e.g. NoInstancesInTag, InvalidDocument, NotFound
    message: str  # for people


class Reply(Struct, omit_defaults=True):
    rid: int
    ok: bool
    data: Any = None
    error: ErrorInfo | None = None


# --------------------------------------------------------------------------------------------
# Views returned to clients: the stable JSON contract of ``zerorun ... --json``.


class InstanceView(Struct):
    instance_id: str
    tags: dict[str, str]
    hostname: str
    platform: str
    platform_version: str
    agent_version: str
    ping_status: str
    first_seen: float
    last_seen: float
    key_fingerprint: str
    broker_id: str = ""  # the broker holding its session (several brokers)
    pending_tags: dict[str, str] | None = None  # its agent's proposed tags, awaiting `zerorun tags approve`
    facts: Facts | None = None  # what its agent last reported


class InvocationView(Struct, omit_defaults=True):
    invocation_id: str
    command_id: str
    instance_id: str
    status: str
    status_details: str = ""
    exit_code: int = -1
    stdout: str = ""
    stderr: str = ""
    stdout_size: int = 0
    stderr_size: int = 0
    requested_at: float = 0.0
    delivered_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    steps: list[StepResult] = []
    dispatched_at: float = 0.0  # when its owner sent it (several brokers: a new owner counts it in flight)


class WebhookStatus(Struct, omit_defaults=True):
    """One completion notification of a command: where it goes and how its delivery went."""

    target: str  # the broker's name for it, or the URL without its query
    event: str  # command | invocation
    state: str  # pending | delivered | failed
    attempts: int = 0
    last_error: str = ""
    instance_id: str = ""  # invocation events
    delivered_at: float = 0.0


class CommandView(Struct, omit_defaults=True):
    command_id: str
    status: str
    status_details: str
    document_name: str
    document_version: str
    document_sha256: str
    parameters: dict[str, Any]
    targets: list[str]
    requested_by: str
    requested_at: float
    comment: str = ""
    timeout_seconds: int = 0
    max_concurrency: int = 0
    max_errors: int = 0
    first: int = 0
    completed_at: float = 0.0
    counts: dict[str, int] = {}
    target_count: int = 0
    steps: list[Step] = []
    invocations: list[InvocationView] = []
    run_as: str = ""  # the user of steps without their own runAs ("": the agent's own)
    webhooks: list[WebhookStatus] = []


class DocumentInfo(Struct, omit_defaults=True):
    """A stored or built-in document version (``content`` only when one version is asked for)."""

    name: str
    version: int
    sha256: str
    created_at: float = 0.0
    created_by: str = ""
    description: str = ""
    document_format: str = "YAML"
    is_default: bool = False
    builtin: bool = False
    content: str = ""
    default_version: int = 0
    latest_version: int = 0
    parameters: dict[str, Any] = {}


class KeyView(Struct):
    kind: KeyKind
    name: str  # instance id (agents) or client name
    state: str
    fingerprint: str
    public_key: str
    first_seen: float
    updated_at: float
    tags: dict[str, str] = {}  # agent keys: the instance's approved tags
    proposed_tags: dict[str, str] | None = None  # what its agent proposes (a pending key's, or a pending change)


class TagsView(Struct):
    """An instance's tags after a ``TagAction``."""

    instance_id: str
    tags: dict[str, str]
    pending_tags: dict[str, str] | None = None


class TokenView(Struct, omit_defaults=True):
    token_id: str
    state: str  # active | expired | used | revoked
    tags: dict[str, str]
    uses: int
    uses_left: int
    expires_at: float
    created_at: float
    created_by: str = ""
    instance_prefix: str = ""
    comment: str = ""
    token: str = ""  # the secret itself: in the reply to CreateToken only, never stored or shown again


# --------------------------------------------------------------------------------------------
# Encoding

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

# Each side decodes one or two of these unions: a decoder is made when first asked for (a
# module ``__getattr__``; the module keeps it, so later lookups are plain attribute reads), which
# spares the CLI and the agent the others' type resolution at start-up (bench/README.md).
_DECODED = {"agent_message_decoder": "AgentMessage", "broker_to_agent_decoder": "BrokerToAgent",
            "request_decoder": "Request", "reply_decoder": "Reply"}
agent_message_decoder: msgspec.msgpack.Decoder
broker_to_agent_decoder: msgspec.msgpack.Decoder
request_decoder: msgspec.msgpack.Decoder
reply_decoder: msgspec.msgpack.Decoder


def __getattr__(name: str) -> Any:
    union = _DECODED.get(name)
    if union is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    decoder = globals()[name] = msgspec.msgpack.Decoder(globals()[union])
    return decoder

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError


def frames(message: Struct) -> list[bytes]:
    return [HEADER, _encoder.encode(message)]


def to_builtins(obj: Any) -> Any:
    """Plain dicts and lists, for JSON output and the Ansible plugins."""
    return msgspec.to_builtins(obj)


def convert(data: Any, kind: type) -> Any:
    return msgspec.convert(data, kind)
